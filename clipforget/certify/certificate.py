"""``certify``: every check on the model of a run folder, against the original, in one certificate."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable

from ..data.gallery import Gallery
from ..data.task import ViewCache, resolve
from ..merge import text_part
from ..models import ClipBundle
from ..runfolder import read_run
from ..train.loop import Callback, emit
from .config import CertifyConfig
from .probes import Encoder, coarse_probe, subgroup_probe
from .relearn import relearning_attack
from .retrieval import retrieval_check
from .verdict import checks, verdict_line
from .zeroshot import kept_check, superclass_texts


def certify(bundle: ClipBundle, run_dir: str | Path, gallery: Gallery | None = None,
            config: CertifyConfig | None = None, alpha: float | None = None,
            callbacks: Iterable[Callback] = (), cache: ViewCache | None = None) -> dict:
    """The certificate of the run in ``run_dir`` (a dict; :func:`save_certificate` writes it).

    ``bundle`` is the original model the run started from; ``alpha`` overrides the run's
    calibrated strength (α = 0 is the original model: a sham run that forgot nothing)."""
    from ..pipeline import edited_model
    cfg = config or CertifyConfig()
    callbacks = list(callbacks)
    run = read_run(run_dir)
    gallery = gallery or (cache.gallery if cache else Gallery.embedded())
    if run.gallery_hash and run.gallery_hash != gallery.content_hash:
        raise ValueError(f"run {run.path} was made on gallery {run.gallery!r} ({run.gallery_hash}); this gallery "
                         f"{gallery.name!r} is {gallery.content_hash}: pass the run's gallery (--gallery)")
    alpha = run.alpha if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cache = cache or ViewCache(gallery)
    req = run.request
    size = bundle.image_size
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    emit(callbacks, stage="certify: prepare", step=0, total=0, fraction=0.0, message="start")
    forget_items, retain_items, retain_names, _ = resolve(gallery, req)
    models = {"original": bundle.model, "unlearned": edited_model(bundle, run.delta, alpha)}
    edits_text = bool(text_part(run.delta))
    superclasses, sc_embs = superclass_texts(bundle, gallery, models, edits_text)
    enc = Encoder(bundle, models)

    # ---- relearning attack --------------------------------------------------------------------
    t0 = time.perf_counter()
    relearn = relearning_attack(bundle, run.delta, alpha, gallery, cache, req, forget_items, superclasses, sc_embs,
                                cfg, callbacks)
    seconds["relearn"] = time.perf_counter() - t0

    # ---- the rest kept ------------------------------------------------------------------------
    t0 = time.perf_counter()
    emit(callbacks, stage="certify: rest kept", step=0, total=1, fraction=0.0)
    kept = kept_check(bundle, models, gallery, cache, req, superclasses, sc_embs, cfg)
    seconds["kept"] = time.perf_counter() - t0

    # ---- linear probes ------------------------------------------------------------------------
    t0 = time.perf_counter()
    emit(callbacks, stage="certify: probes", step=0, total=2, fraction=0.0)
    probes = {"subgroup": subgroup_probe(enc, cache, size, forget_items, retain_items, cfg),
              "coarse": coarse_probe(enc, cache, size, gallery, req, forget_items, cfg)}
    emit(callbacks, stage="certify: probes", step=2, total=2, fraction=1.0)
    seconds["probes"] = time.perf_counter() - t0

    # ---- retrieval ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    retrieval = retrieval_check(bundle, models, gallery, req, forget_items, cfg, callbacks, edits_text)
    seconds["retrieval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    cert = {"run": str(run.path), "method": run.method, "request": req.to_dict(), "label": req.label,
            "model": bundle.arch, "alpha": alpha, "run_alpha": run.alpha, "gallery": gallery.name,
            "retain_subgroups": retain_names, "config": dataclasses.asdict(cfg),
            "kept": kept, "relearn": relearn, "probes": probes, "retrieval": retrieval, "seconds": seconds}
    cert["checks"] = checks(cert, cfg.thresholds)
    cert["certified"] = all(c["passed"] for c in cert["checks"])
    cert["verdict"] = verdict_line(cert)
    return cert
