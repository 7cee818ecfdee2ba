"""A forgetting certificate: is the forgotten subgroup gone, or only hidden?

    cert = certify(bundle, "runs/poodle")          # θ₀ + α·Δ from the run folder vs θ₀
    save_certificate(cert, "runs/poodle")          # certificate.json + certificate.md, atomically
    print(cert["verdict"])

One module per check — ``relearn``, ``probes``, ``retrieval``, and ``zeroshot`` (the rest kept)
— then ``verdict`` (thresholds, Markdown) and ``certificate`` (``certify``, which runs them all);
``config`` holds the knobs. The run folder is read through :mod:`clipforget.runfolder`.

Three attacks on the unlearned model, each also run on the original for comparison:

- **relearning**: fine-tune the whole image tower for a few steps on a small sample of the
  forgotten subgroup paired with its coarse label, and follow the target accuracy on *other*
  images of the subgroup (a subgroup of the embedded gallery has one image per drawing style, so
  the sample is some styles and the evaluation the others; see :func:`.relearn.split_groups`). As a
  control, the same fine-tuning on an unrelated subgroup: it shows how much of the recovery any
  fine-tuning causes. Fine-tuning goes through the one loop, ``train.loop.optimize``.
- **linear probes** on frozen image embeddings, evaluated on held-out groups: (a) how well the
  forgotten subgroup is still separated from its siblings (the subgroup is still *identifiable*),
  (b) whether a probe trained to recognise the coarse class on the *other* images of the
  superclass still recognises the forgotten images (the association is hidden, not gone).
- **retrieval**: recall@k of the forgotten subgroup's gallery images for the coarse label, the
  subgroup name and paraphrases, before and after.

A model that forgot everything passes all three, so one more check asks that the rest is **kept**:
zero-shot accuracy on other superclasses' images, after against before.

The verdict combines the checks whose thresholds are in :class:`Thresholds`; every number it
uses is in the certificate next to the threshold.
"""
from __future__ import annotations

from ..runfolder import RunRecord, load_certificate, load_run_model, read_run
from .certificate import certify
from .config import CertifyConfig, ProbeConfig, RelearnConfig, RetrievalConfig, Thresholds
from .probes import _probe_predict, balanced_accuracy, fit_probe
from .relearn import group_key, relearn_curve, relearning_attack, split_groups
from .retrieval import retrieval_queries
from .verdict import checks, markdown, save_certificate, verdict_line

__all__ = ["CertifyConfig", "ProbeConfig", "RelearnConfig", "RetrievalConfig", "RunRecord", "Thresholds",
           "balanced_accuracy", "certify", "checks", "fit_probe", "group_key", "load_certificate", "load_run_model",
           "markdown", "read_run", "relearn_curve", "relearning_attack", "retrieval_queries", "save_certificate",
           "split_groups", "verdict_line", "_probe_predict"]
