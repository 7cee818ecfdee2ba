"""The relearning attack: fine-tune the unlearned image tower on a small sample of the forgotten
subgroup (and, as a control, on an unrelated subgroup) and follow the target accuracy on *other*
images of the subgroup. Fine-tuning goes through the one loop, ``train.loop.optimize``."""
from __future__ import annotations

import random
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.gallery import Gallery, Item
from ..data.task import ForgetRequest, ViewCache, ViewSet
from ..embed import to_input
from ..models import ClipBundle
from ..train.loop import Callback, LoopConfig, emit, optimize
from .config import CertifyConfig, RelearnConfig
from .zeroshot import accuracy


def split_groups(items: list[Item], fraction: float, seed: int) -> tuple[str, list[Item], list[Item]]:
    """Split a subgroup's images into a relearning sample and evaluation images that share no
    image. Images are grouped by style when they span several styles (one image per style in the
    embedded gallery), else by subgroup (a style request), else by image. Returns (mode, sample,
    evaluation); mode "views" (a single image) means sample and evaluation are disjoint augmented
    views of the same image — a weaker test, and the certificate says so."""
    mode, key = group_key(items)
    if mode == "views":
        return mode, list(items), list(items)
    groups = sorted({key(it) for it in items})
    rng = random.Random(seed)
    n = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    sample = set(rng.sample(groups, n))
    return mode, [it for it in items if key(it) in sample], [it for it in items if key(it) not in sample]


def group_key(items: list[Item]) -> tuple[str, Callable[[Item], str]]:
    for mode, key in (("style", lambda it: it.style), ("subgroup", lambda it: it.subgroup or it.concept),
                      ("image", lambda it: it.path)):
        if len({key(it) for it in items}) >= 2:
            return mode, key
    return "views", lambda it: it.path


def _trainable_copy(bundle: ClipBundle, delta: dict, alpha: float) -> nn.Module:
    from ..pipeline import edited_model
    model = edited_model(bundle, delta, alpha)
    for p in model.visual.parameters():
        p.requires_grad_(True)
    return model


def relearn_curve(bundle: ClipBundle, model: nn.Module, sample: ViewSet, sample_label: int, anchors: ViewSet,
                  anchor_labels: torch.Tensor, evaluate: ViewSet, eval_label: int, class_emb: torch.Tensor,
                  cfg: RelearnConfig, seed: int, stage: str, callbacks: Iterable[Callback] = ()) -> list[dict]:
    """Fine-tune ``model``'s image tower on batches of half ``sample`` views (labelled
    ``sample_label``) and half ``anchors`` (their own labels) — zero-shot cross-entropy over the
    superclass prompts — and measure the accuracy of ``evaluate`` for ``eval_label`` at step 0 and
    every ``eval_every`` steps. BatchNorm stays in eval mode (a few images would wreck its running
    statistics). ``model`` is modified."""
    model.visual.eval()
    class_emb = class_emb.to(bundle.device)
    scale = float(model.logit_scale.exp().clamp(max=100))
    g = torch.Generator().manual_seed(seed)
    curve = [{"step": 0, "accuracy": accuracy(bundle, model, evaluate, eval_label, class_emb)}]
    half = cfg.batch_size // 2

    def loss_fn(step):
        i = torch.randint(len(sample), (cfg.batch_size - half,), generator=g)
        j = torch.randint(len(anchors), (half,), generator=g)
        x = to_input(bundle, torch.cat([sample.images[i], anchors.images[j]]), model)
        y = torch.cat([torch.full((len(i),), sample_label), anchor_labels[j]]).to(bundle.device)
        logits = scale * F.normalize(model.encode_image(x).float(), dim=-1) @ class_emb.t()
        return F.cross_entropy(logits, y)

    done = 0
    while done < cfg.steps:
        loop = LoopConfig(steps=min(cfg.eval_every, cfg.steps - done), lr=cfg.lr, grad_clip=1.0)
        offset = done

        def shifted(event, offset=offset):
            emit(callbacks, **{**event, "step": offset + event.get("step", 0), "total": cfg.steps,
                               "fraction": (offset + event.get("step", 0)) / cfg.steps})
        optimize(list(model.visual.parameters()), loss_fn, loop, stage=stage, callbacks=[shifted])
        done += loop.steps
        curve.append({"step": done, "accuracy": accuracy(bundle, model, evaluate, eval_label, class_emb)})
    return curve


def relearning_attack(bundle: ClipBundle, delta: dict, alpha: float, gallery: Gallery, cache: ViewCache,
                      req: ForgetRequest, forget_items: list[Item], superclasses: list[str], sc_embs: dict[str, torch.Tensor],
                      cfg: CertifyConfig, callbacks: list[Callback]) -> dict:
    """Relearn the forgotten subgroup from a small sample (and, as a control, an unrelated
    subgroup), each on a fresh copy of θ₀ + α·Δ; target accuracy on held-out images per step.
    ``sc_embs``: the class embeddings of the original and of the unlearned model (its own text
    tower's when the run edits it); the attack fine-tunes the image tower against the latter."""
    size = bundle.image_size
    target = superclasses.index(req.superclass)
    rc = cfg.relearn
    mode, sample, held = split_groups(forget_items, rc.sample_fraction, cfg.seed)
    relearn_views = cache.views(sample, "train", rc.train_views, size)
    eval_views = cache.views(held, "test", rc.eval_views, size)
    control = _control_subgroup(gallery, req, rc.control, cfg.seed)
    c_items = gallery.select(superclass=control[0], subgroup=control[1],
                             style=req.style if req.style and not req.subgroup else None)
    _, c_sample, _ = split_groups(c_items, rc.sample_fraction, cfg.seed)
    c_train = cache.views(c_sample, "train", rc.train_views, size)
    c_index = superclasses.index(control[0])
    anchor_pool = [it for it in gallery.select(kind="hierarchy")
                   if it.superclass != req.superclass and it.subgroup != control[1]]
    anchor_items = sorted(random.Random(cfg.seed).sample(anchor_pool, min(rc.anchor_images, len(anchor_pool))),
                          key=anchor_pool.index)
    anchors = cache.views(anchor_items, "train", 1, size)
    anchor_labels = torch.tensor([superclasses.index(it.superclass) for it in anchors.items])
    original_acc = accuracy(bundle, bundle.model, eval_views, target, sc_embs["original"])
    curves = {}
    for name, views, label, what in (("forget", relearn_views, target, "the forgotten subgroup"),
                                     ("control", c_train, c_index, "a control subgroup")):
        model = _trainable_copy(bundle, delta, alpha)
        curves[name] = relearn_curve(bundle, model, views, label, anchors, anchor_labels, eval_views, target,
                                     sc_embs["unlearned"], rc, cfg.seed, f"certify: relearn on {what}", callbacks)
        del model
    curve = [{"step": a["step"], "forget_sample": a["accuracy"], "control_sample": b["accuracy"]}
             for a, b in zip(curves["forget"], curves["control"])]
    recover_at = next((r["step"] for r in curve if original_acc and r["forget_sample"] >= 0.5 * original_acc), None)
    return {
        "split": mode,
        "split_note": _split_note(mode),
        "sample": sorted({_group_label(mode, it) for it in sample}),
        "evaluated_on": sorted({_group_label(mode, it) for it in held}),
        "sample_views": len(relearn_views), "evaluation_views": len(eval_views),
        "control": f"{control[0]}/{control[1]}",
        "control_views": len(c_train),
        "anchor_images": len(anchors),
        "steps": rc.steps, "lr": rc.lr,
        "original_accuracy": original_acc,
        "chance": 1 / len(superclasses),
        "curve": curve,
        "steps_to_half_original": recover_at,
        # the peak over the attack: what an attacker who stops at the best step gets back
        "recovery": max(r["forget_sample"] for r in curve) / original_acc if original_acc else None,
        "control_recovery": max(r["control_sample"] for r in curve) / original_acc if original_acc else None,
    }


def _control_subgroup(gallery: Gallery, req: ForgetRequest, control: str | None, seed: int) -> tuple[str, str]:
    if control is not None:
        sc, sg = control.split("/")
        gallery.check(superclass=sc, subgroup=sg)
        if sc == req.superclass:
            raise ValueError(f"relearn.control {control!r} is in the forgotten superclass {req.superclass!r}; "
                             "pick an unrelated subgroup")
        return sc, sg
    others = [(sc, sg) for sc in gallery.superclasses() if sc != req.superclass for sg in gallery.subgroups(sc)]
    if not others:
        raise ValueError("the gallery has a single superclass: there is no unrelated subgroup for the control")
    return random.Random(seed).choice(others)


def _group_label(mode: str, it: Item) -> str:
    return {"style": it.style, "subgroup": it.subgroup or it.concept}.get(mode, it.path)


def _split_note(mode: str) -> str:
    return {"style": "relearned on the subgroup's images in some drawing styles, evaluated on its images "
                     "in the other styles (no image shared)",
            "subgroup": "relearned on some of the forgotten subgroups' images, evaluated on the others "
                        "(no image shared)",
            "image": "relearned on some of the subgroup's images, evaluated on the others (no image shared)",
            "views": "the forget set is a single image: relearned and evaluated on disjoint augmented views "
                     "of that image (a weaker test: same source image)"}[mode]
