"""Could the edited teacher's gate be written into the output projection instead of taught? The gate
ĝ₀(x) − γ·relu(r(x) − b)·t_c needs a ReLU; a weight edit of the image tower's last linear map can only
add an affine function of the unnormalised feature f along t_c:

    f' = f − γ·(a·f − b·m)·t_c        (a: the readout's direction, m: the mean ‖f‖ of the training rows)

— the gate without its ReLU (rows below the threshold get MORE of the superclass), and with ‖f‖
replaced by its mean. This probe applies both to the ORIGINAL model's features of the held-out
columns and classifies them: what a closed-form edit of the projection could at best do, beside the
gate the method is taught. Not a method.

    python bench/probe_linear_edit.py [EVERY] [OFFSET]     # every EVERY-th subgroup (default 8)
"""
import sys

import torch
import torch.nn.functional as F

from clipforget.data.gallery import Gallery
from clipforget.data.task import SplitConfig, ViewCache, build_task
from clipforget.embed import ENCODE_BATCH
from clipforget.methods.base import Context
from clipforget.models import load_clip
from clipforget.stages.teacher import SubgroupReadout
from clipforget.sweep import sweep_requests
from probe_teacher import summary_line

GAMMAS = (5.0, 10.0)


@torch.no_grad()
def raw_features(ctx, x: torch.Tensor) -> torch.Tensor:
    """The original model's image features before normalisation."""
    return torch.cat([ctx.original.encode_image(x[i:i + ENCODE_BATCH]).float() for i in range(0, len(x), ENCODE_BATCH)])


def main(every: int = 8, offset: int = 0) -> None:
    torch.set_num_threads(1)
    bundle = load_clip("embedded", None, "cpu", "fp32")
    gallery = Gallery.embedded()
    cache = ViewCache(gallery)
    cells = [(kind, g) for kind in ("gate", "affine") for g in GAMMAS]
    summary = {c: [] for c in cells}
    for req in sweep_requests(gallery, every=every, offset=offset):
        task = build_task(gallery, req, bundle.image_size, SplitConfig(), cache)
        ctx = Context(bundle, task)
        cols = {"target": "target", "retain": "retain", "other": "other_superclasses"}
        raw = {k: raw_features(ctx, ctx.inputs(task.test[c].views)) for k, c in cols.items()}
        labels = {k: task.test[c].labels for k, c in cols.items()}
        forget, retain = raw_features(ctx, ctx.inputs(task.forget)), raw_features(ctx, ctx.inputs(task.retain))
        readout = SubgroupReadout.fit(ctx, F.normalize(forget, dim=-1), F.normalize(retain, dim=-1))
        a = readout.direction()
        m = float(torch.cat([forget, retain]).norm(dim=-1).mean())
        t_c = ctx.coarse_emb.float()
        line = [f"{req.label:34s}"]
        for kind, gamma in cells:
            acc = {}
            for k, f in raw.items():
                g = F.normalize(f, dim=-1)
                if kind == "gate":
                    edited = g - gamma * readout.gate(g)[:, None] * t_c[None]
                else:
                    edited = f - gamma * (f @ a - readout.threshold * m)[:, None] * t_c[None]
                acc[k] = ctx.superclass_accuracy(F.normalize(edited, dim=-1), labels[k])
            summary[(kind, gamma)].append(acc)
            line.append(f"{kind} γ{gamma:g}: {acc['target']:.2f}/{acc['retain']:.2f}/{acc['other']:.2f}")
        print("  ".join(line), flush=True)
    chance = 1 / len(task.superclasses)
    print("cells: held-out target / retain / other superclasses after the edit")
    for (kind, gamma), accs in summary.items():
        print(summary_line(f"{kind} γ{gamma:g}", accs, chance))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
