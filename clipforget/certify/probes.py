"""Linear probes on frozen image embeddings, evaluated on held-out groups: is the forgotten
subgroup still separable from its siblings, and does a coarse-class probe fitted without it still
recognise it?"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from ..data.gallery import Gallery, Item
from ..data.task import ForgetRequest, ViewCache, ViewSet
from ..embed import encode_images
from ..models import ClipBundle
from ..train.loop import LoopConfig, optimize
from .config import CertifyConfig, ProbeConfig
from .relearn import group_key
from .zeroshot import side


def fit_probe(x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig, seed: int) -> nn.Linear:
    """Logistic regression on (N, D) features with 0/1 labels, classes weighted equally."""
    torch.manual_seed(seed)
    probe = nn.Linear(x.shape[1], 1)
    pos = float(y.sum())
    weight = torch.where(y > 0, len(y) / (2 * max(pos, 1.0)), len(y) / (2 * max(len(y) - pos, 1.0)))
    # features are unit vectors: a fixed gain keeps the optimisation well scaled
    xs = x * 10.0

    def loss_fn(step):
        return F.binary_cross_entropy_with_logits(probe(xs).squeeze(-1), y.float(), weight=weight)

    optimize(probe.parameters(), loss_fn, LoopConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                     optimizer="adamw", grad_clip=None), stage="probe")
    return probe


def _probe_predict(probe: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (probe(x * 10.0).squeeze(-1) > 0).long()


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    accs = [float((pred[y == c] == c).float().mean()) for c in (0, 1) if (y == c).any()]
    return sum(accs) / len(accs)


class Encoder:
    """Embeddings of views with the original and the unlearned model, memoised per ViewSet."""

    def __init__(self, bundle: ClipBundle, models: dict[str, nn.Module]):
        self.bundle, self.models = bundle, models
        self._memo: dict[tuple[str, int], tuple[ViewSet, torch.Tensor]] = {}

    def __call__(self, which: str, views: ViewSet) -> torch.Tensor:
        key = (which, id(views))
        hit = self._memo.get(key)
        if hit is None or hit[0] is not views:
            hit = (views, encode_images(self.bundle, views.images, self.models[which]))
            self._memo[key] = hit
        return hit[1]


def subgroup_probe(enc: Encoder, cache: ViewCache, size: int, forget_items: list[Item],
                    retain_items: list[Item], cfg: CertifyConfig) -> dict:
    """Forgotten subgroup vs its siblings (the retain set), leave-one-group-out: every fold holds
    out one style (or subgroup / image) of both classes and is scored by balanced accuracy."""
    pc = cfg.probe
    if not retain_items:
        return {"skipped": "no siblings to separate the subgroup from"}
    items = forget_items + retain_items
    mode, key = group_key(forget_items)
    groups = sorted({key(it) for it in forget_items})
    train_v = cache.views(items, "train", pc.train_views, size)
    test_v = cache.views(items, "test", pc.eval_views, size)
    forget_paths = {it.path for it in forget_items}

    def labels(v):
        return torch.tensor([int(it.path in forget_paths) for it in v.items])

    out = {"split": mode, "folds": len(groups) if mode != "views" else 1, "chance": 0.5,
           "positives": len(forget_items), "negatives": len(retain_items)}
    y_tr, y_te = labels(train_v), labels(test_v)
    for which in ("original", "unlearned"):
        x_tr, x_te = enc(which, train_v), enc(which, test_v)
        if mode == "views":
            probe = fit_probe(x_tr, y_tr, pc, cfg.seed)
            out[side(which)] = balanced_accuracy(_probe_predict(probe, x_te), y_te)
            continue
        preds, ys = [], []
        for g in groups:
            tr = torch.tensor([key(it) != g for it in train_v.items])
            te = torch.tensor([key(it) == g for it in test_v.items])
            if not (y_tr[tr] == 1).any() or not te.any():
                continue
            probe = fit_probe(x_tr[tr], y_tr[tr], pc, cfg.seed)
            preds.append(_probe_predict(probe, x_te[te]))
            ys.append(y_te[te])
        out[side(which)] = balanced_accuracy(torch.cat(preds), torch.cat(ys))
    return out


def coarse_probe(enc: Encoder, cache: ViewCache, size: int, gallery: Gallery, req: ForgetRequest,
                  forget_items: list[Item], cfg: CertifyConfig) -> dict:
    """A probe for the coarse class (target superclass vs the others) fitted on every image except
    the forgotten ones; the number is the share of the forgotten images' views it calls the coarse
    class. The forgotten images never train the probe: this is held-out by construction."""
    pc = cfg.probe
    forget_paths = {it.path for it in forget_items}
    pos = [it for it in gallery.select(superclass=req.superclass, kind="hierarchy") if it.path not in forget_paths]
    if not pos:
        return {"skipped": f"no other images of {req.superclass!r} to fit a probe for the coarse class"}
    neg = [it for it in gallery.select(kind="hierarchy") if it.superclass != req.superclass]
    if len(neg) > pc.max_negatives:
        neg = sorted(random.Random(cfg.seed).sample(neg, pc.max_negatives), key=neg.index)
    train_v = cache.views(pos + neg, "train", pc.train_views, size)
    y = torch.tensor([int(it.superclass == req.superclass) for it in train_v.items])
    held = cache.views(forget_items, "test", pc.eval_views, size)
    check = cache.views(pos, "test", 1, size)
    out = {"positives": len(pos), "negatives": len(neg), "forgotten_views": len(held)}
    for which in ("original", "unlearned"):
        probe = fit_probe(enc(which, train_v), y, pc, cfg.seed)
        out[side(which)] = float(_probe_predict(probe, enc(which, held)).float().mean())
        # sanity: the probe recognises held-out views of the rest of the superclass
        out[f"{side(which)}_rest_of_superclass"] = float(_probe_predict(probe, enc(which, check)).float().mean())
    return out
