"""How far the edited teacher's gate reaches on held-out files (the evidence behind
``remind.teacher``, docs/METHOD.md step 2.4): the ORIGINAL model's embeddings of each request's
held-out columns, edited as the teacher edits them — ĝ₀(x) − γ·relu(r(x) − b)·t_c, r the original's
own subgroup readout, b fitted on the forget examples and the retain training images — and
classified among the superclass prompts. Not a weight edit: what the method can at best be taught.
Each cell of the grid is a teacher setting (``remind.teacher``: threshold, quantile, gate, edit γ, readout).

    python bench/probe_teacher.py [EVERY] [OFFSET]     # every EVERY-th subgroup (default 8) from OFFSET

Per request: the readout's AUC (held-out target files against held-out sibling files), then for
each setting the held-out target / retain / other-superclass accuracy; a summary at the end.
"""
import statistics
import sys

import torch

from clipforget.data.gallery import Gallery
from clipforget.data.task import SplitConfig, ViewCache, build_task
from clipforget.methods.base import Context
from clipforget.models import load_clip
from clipforget.stages.teacher import SubgroupReadout, original_features, teacher_of
from clipforget.sweep import sweep_requests

# (threshold, quantile, gate, γ, readout): the first four as first measured, the default, then the
# saturating gate; then the margin readout (remind.teacher.readout) at the default gate and at γ 10
GRID = [("midway", q, "linear", g, "mean") for q in (0.5, 0.9) for g in (10.0, 20.0)] + [
    ("midway", 0.5, "linear", 5.0, "mean"), ("retain", 0.8, "saturating", 1.0, "mean"),
    ("retain", 0.9, "saturating", 1.0, "mean"), ("midway", 0.5, "linear", 5.0, "margin"),
    ("midway", 0.5, "linear", 10.0, "margin")]


def label(cell) -> str:
    threshold, q, gate, gamma, readout = cell
    return f"{threshold} q{q} {gate} γ{gamma:g}" + ("" if readout == "mean" else f" {readout}")


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())


def summary_line(name: str, accs: list[dict], chance: float) -> str:
    """One edit over the requests: held-out target at chance, mean target / retain / other superclasses."""
    mean = {k: statistics.mean(a[k] for a in accs) for k in accs[0]}
    return (f"{name}: held-out target at chance in {sum(a['target'] <= chance for a in accs)} "
            f"of {len(accs)}; mean target {mean['target']:.3f}, retain {mean['retain']:.3f}, "
            f"other superclasses {mean['other']:.3f}")


def main(every: int = 8, offset: int = 0) -> None:
    torch.set_num_threads(1)
    bundle = load_clip("embedded", None, "cpu", "fp32")
    gallery = Gallery.embedded()
    cache = ViewCache(gallery)
    summary = {key: [] for key in GRID}
    aucs = []
    for req in sweep_requests(gallery, every=every, offset=offset):
        task = build_task(gallery, req, bundle.image_size, SplitConfig(), cache)
        ctx = Context(bundle, task)
        feats = {k: original_features(ctx, ctx.inputs(task.test[col].views))
                 for k, col in (("target", "target"), ("retain", "retain"), ("other", "other_superclasses"))}
        labels = {"target": task.test["target"].labels, "retain": task.test["retain"].labels,
                  "other": task.test["other_superclasses"].labels}
        forget, retain = original_features(ctx, ctx.inputs(task.forget)), original_features(ctx, ctx.inputs(task.retain))
        line = [f"{req.label:34s}"]
        for cell in GRID:
            threshold, q, gate, gamma, kind = cell
            readout = SubgroupReadout.fit(ctx, forget, retain, q, threshold, gate, kind)
            if cell == GRID[0]:
                aucs.append(auc(readout.read(feats["target"]), readout.read(feats["retain"])))
                line.append(f"AUC {aucs[-1]:.3f}")
            acc = {k: ctx.superclass_accuracy(teacher_of(ctx, f, gamma, readout).features, labels[k])
                   for k, f in feats.items()}
            summary[cell].append(acc)
            line.append(f"{label(cell)}: {acc['target']:.2f}/{acc['retain']:.2f}/{acc['other']:.2f}")
        print("  ".join(line), flush=True)
    print(f"readout AUC >= 0.95 on {sum(a >= 0.95 for a in aucs)} of {len(aucs)}; cells: held-out target / retain / "
          "other superclasses after the edit")
    chance = 1 / len(task.superclasses)
    for cell, accs in summary.items():
        print(summary_line(label(cell), accs, chance))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
