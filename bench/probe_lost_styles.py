"""Which held-out sibling views a run of ours loses: those drawn in a style one of the forget examples
has, or the others (docs/results/sweep-ours.md, "which part of the method costs that retain").

    python bench/probe_lost_styles.py [SUPERCLASS/SUBGROUP ...]     # default: the six of that section

Per request, at the method's defaults (fold 0, seed 0): the retain test column's views split by
style, and how many of each the original recognised and the unlearned model no longer does.
"""
import collections
import sys

import torch

from clipforget.data.gallery import Gallery
from clipforget.data.request import ForgetRequest
from clipforget.methods.base import Context
from clipforget.models import load_clip
from clipforget.pipeline import edited_model, unlearn

SIX = ["bird/eagle", "insect/butterfly", "reptile/lizard", "vegetable/peanuts", "poultry/hatching-chick",
       "ball/soccer-ball"]


def recognised(ctx, column, model) -> torch.Tensor:
    with torch.no_grad():
        feats = torch.cat([ctx.image_features(ctx.inputs(column.views, slice(i, i + 64), model), model)
                           for i in range(0, len(column.views), 64)])
    return (feats @ ctx.superclass_emb.t()).argmax(1).cpu() == column.labels


def main(requests: list[str]) -> None:
    torch.set_num_threads(2)
    bundle = load_clip("embedded", None, "cpu", "fp32")
    gallery = Gallery.embedded()
    total = collections.Counter()
    for label in requests:
        superclass, subgroup = label.split("/")
        run = unlearn(bundle, ForgetRequest(superclass, subgroup), "ours", gallery=gallery)
        task, ctx = run.task, Context(bundle, run.task)
        column = task.test["retain"]
        lost = recognised(ctx, column, ctx.original) & ~recognised(
            ctx, column, edited_model(bundle, run.result.delta, run.result.alpha))
        styles = {it.style for it in task.forget.items}
        matched = torch.tensor([it.style in styles for it in column.views.items])
        counts = {"matched views": int(matched.sum()), "matched lost": int((lost & matched).sum()),
                  "other views": int((~matched).sum()), "other lost": int((lost & ~matched).sum())}
        total.update(counts)
        print(subgroup, counts, flush=True)
    print("all", dict(total))


if __name__ == "__main__":
    main(sys.argv[1:] or SIX)
