"""Stage 0 — stand-ins [recon]: images the original model takes for the subgroup, in every style.

A handful of forget examples shows the subgroup in a few drawing styles; an edit trained on them
alone learns what separates *those* images from their siblings, and a poodle drawn in another style
stays a dog. The original model, though, recognises the subgroup across styles by its name (its
subgroup-text similarity separates held-out poodles from held-out siblings far better than the
examples do). This stage turns that knowledge into training images: retain images (siblings, in
every style the retain set has) get a small bounded perturbation δ, optimised through the FROZEN
original tower so that the model calls them the subgroup —

    min_δ CE(s·f₀(x+δ)·T_subᵀ, subgroup) + CE(s·f₀(x+δ)·T_superᵀ, superclass),  ‖δ‖_∞ ≤ ε,

i.e. "a dog the model takes for a poodle". The forget stage and remind's forget term then treat
them as forget images: what the edit must key on is what makes the model say *poodle*, in any
style, not what the examples look like. They are never evaluation images (the test and
calibration files are untouched).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.gallery import display
from ..data.prompts import article
from ..embed import to_input
from ..train.loop import LoopConfig, frozen, optimize
from ..trunk import Prepared, run_stages

log = logging.getLogger(__name__)


@dataclass
class StandInConfig:
    enabled: bool = True             # on a sample of 11 subgroups: median Score 84.8 -> 92.5 (docs/results/sweep-ours.md)
    images: int = 64                 # retain images turned into stand-ins (a seeded sample)
    steps: int = 30                  # Adam steps on δ
    lr: float = 0.01                 # in [0, 1] pixel units
    epsilon: float = 0.1             # ‖δ‖_∞ bound, in [0, 1] pixel units
    superclass_weight: float = 1.0   # keep them the superclass ("a dog that is a poodle")
    keep_ins: bool = False           # also the mirror images, forget examples the model takes for a sibling,
                                     # distilled as retain rows by remind (:func:`keep_ins`) [recon]
    restyled: bool = False           # also forget examples the model takes for the subgroup drawn in another of the
                                     # gallery's styles, forgotten with the stand-ins (:func:`restyled`) [recon]

    def __post_init__(self):
        if self.images < 1 or self.steps < 0:
            raise ValueError("stand_ins.images must be >= 1 and stand_ins.steps >= 0")
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"stand_ins.epsilon must be in (0, 1], got {self.epsilon}")


def subgroup_texts(ctx) -> tuple[torch.Tensor, int]:
    """Embeddings of the subgroup and its retain subgroups' prompts (the class set the stand-ins
    are recognised among) and the index of the subgroup in it."""
    task = ctx.task
    names = [task.request.subgroup] + [s for s in task.retain_subgroups if s != task.request.subgroup]
    return ctx.texts.classes([display(n) for n in names]).to(ctx.bundle.device), 0


@dataclass
class StandIns:
    inputs: torch.Tensor          # model inputs (normalised) of the stand-in images
    sources: torch.Tensor         # the retain image (index into task.retain) each one comes from
    images01: torch.Tensor        # the stand-ins in [0, 1] pixels
    recognised_before: float      # share the original model took for the subgroup before / after δ
    recognised_after: float
    keep: "StandIns | None" = None  # keep-ins (:func:`keep_ins`; sources index the forget set); None: off
    restyled: "StandIns | None" = None  # restyled examples (:func:`restyled`; sources index the forget set); None: off


@contextlib.contextmanager
def frozen_original(ctx):
    """The original image tower in eval mode with no gradient into its weights inside the block
    (both restored after): what every perturbation here is optimised through."""
    visual = ctx.original.visual
    was = visual.training
    visual.eval()
    try:
        with frozen(visual):
            yield visual
    finally:
        visual.train(was)


def perturbed(ctx, x: torch.Tensor, loss_of, cfg: StandInConfig, name: str) -> torch.Tensor:
    """``x`` ([0, 1] pixels) plus a bounded δ (‖δ‖_∞ ≤ ε) that minimises ``loss_of(features)`` through
    the FROZEN original tower (normalised features of x + δ); the perturbed images in [0, 1]."""
    delta = torch.zeros_like(x, requires_grad=True)

    def loss_fn(step):
        return loss_of(F.normalize(ctx.original.encode_image(to_input(ctx.bundle, (x + delta).clamp(0, 1),
                                                                       ctx.original)).float(), dim=-1))

    def project(step):
        with torch.no_grad():
            delta.clamp_(-cfg.epsilon, cfg.epsilon)

    with frozen_original(ctx):
        optimize([delta], loss_fn, LoopConfig(steps=cfg.steps, lr=cfg.lr, grad_clip=None), name,
                 ctx.callbacks, after_step=project)
    return (x + delta.detach()).clamp(0, 1)


def superclass_kept(ctx, feats: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The term that keeps perturbed images their superclass (the stand-ins': ``superclass_weight``)."""
    if weight <= 0:
        return feats.new_zeros(())
    labels = torch.full((len(feats),), ctx.task.target_index, device=feats.device)
    return weight * F.cross_entropy(ctx.logit_scale * feats @ ctx.superclass_emb.t(), labels)


@torch.no_grad()
def _similarities(ctx, imgs: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """The original model's cosine of each image ([0, 1] pixels) with each of ``texts``."""
    return F.normalize(ctx.original.encode_image(to_input(ctx.bundle, imgs, ctx.original)).float(), dim=-1) @ texts.t()


def _taken_for(ctx, imgs: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Index into ``texts`` the original model takes each image for."""
    return _similarities(ctx, imgs, texts).argmax(-1)


def stand_ins(ctx, cfg: StandInConfig) -> StandIns | None:
    """The stand-in images (None when disabled, or without a subgroup or retain images)."""
    task = ctx.task
    if not cfg.enabled or task.request.subgroup is None or not len(task.retain):
        return None
    device = ctx.bundle.device
    idx = ctx.sample_indices(len(task.retain), cfg.images)
    x = task.retain.images[idx].float().div(255).to(device)
    sub_emb, sub_index = subgroup_texts(ctx)
    sub_labels = torch.full((len(x),), sub_index, device=device)
    images = perturbed(ctx, x, lambda f: F.cross_entropy(ctx.logit_scale * f @ sub_emb.t(), sub_labels)
                       + superclass_kept(ctx, f, cfg.superclass_weight), cfg, "stand-ins")
    before = float((_taken_for(ctx, x, sub_emb) == sub_index).float().mean())
    after = float((_taken_for(ctx, images, sub_emb) == sub_index).float().mean())
    log.info("stand-ins: %d retain images; taken for %s by the original model %.0f%% -> %.0f%%", len(images),
             task.request.subgroup, 100 * before, 100 * after)
    dtype = next(ctx.model.visual.parameters()).dtype
    keep = keep_ins(ctx, cfg) if cfg.keep_ins else None
    styled = restyled(ctx, cfg) if cfg.restyled else None
    return StandIns(ctx.bundle.normalize(images).to(dtype), idx, images.cpu(), before, after, keep, styled)


def keep_ins(ctx, cfg: StandInConfig) -> StandIns | None:
    """The stand-ins' mirror [recon]: forget examples with a bounded δ that makes the original take
    them for the sibling it finds closest (still the superclass) — "a poodle the model takes for
    another dog". Remind distils them towards the teacher, which keeps what the original no longer
    reads as the subgroup: the edit is shown the boundary from both sides, so it has to key on what
    makes the model say the subgroup, not on what the examples look like. None without a sibling;
    ``recognised_*``: the share taken for the subgroup among it and its siblings."""
    texts, sub_index = subgroup_texts(ctx)
    if len(texts) < 2:
        return None
    device = ctx.bundle.device
    forget = ctx.task.forget
    idx = ctx.sample_indices(len(forget), cfg.images)
    x = forget.images[idx].float().div(255).to(device)
    scores = _similarities(ctx, x, texts)
    before = float((scores.argmax(-1) == sub_index).float().mean())
    scores[:, sub_index] = -float("inf")
    nearest = scores.argmax(-1)           # the sibling each example is closest to
    images = perturbed(ctx, x, lambda f: F.cross_entropy(ctx.logit_scale * f @ texts.t(), nearest)
                       + superclass_kept(ctx, f, cfg.superclass_weight), cfg, "keep-ins")
    after = float((_taken_for(ctx, images, texts) == sub_index).float().mean())
    log.info("keep-ins: %d forget examples; taken for %s by the original model %.0f%% -> %.0f%%", len(images),
             ctx.task.request.subgroup, 100 * before, 100 * after)
    dtype = next(ctx.model.visual.parameters()).dtype
    return StandIns(ctx.bundle.normalize(images).to(dtype), idx, images.cpu(), before, after)


def restyled(ctx, cfg: StandInConfig) -> StandIns | None:
    """Forget examples with a bounded δ that makes the original read each as the subgroup drawn in
    another of the gallery's (trained) styles — "a poodle, as the model would see one drawn in
    another style" [recon]: forgotten with the stand-ins, they carry the examples' subgroup into the
    styles the examples lack. The style of each is drawn (seeded) among the styles other than its
    own, read through the captions the embedded model was trained on ("a {style phrase} of a
    {subgroup}"); the subgroup (against its siblings) and the superclass are kept. None when the
    gallery has fewer than two trained styles; ``recognised_*``: the share read as its new style."""
    task = ctx.task
    gallery = task.gallery
    unseen = set(gallery.unseen_styles())
    styles = [s for s in gallery.styles() if s not in unseen]
    if len(styles) < 2:
        return None
    device = ctx.bundle.device
    forget = task.forget
    idx = ctx.sample_indices(len(forget), cfg.images)
    x = forget.images[idx].float().div(255).to(device)
    name = display(task.request.subgroup)
    phrases = [gallery.style_phrase(s) for s in styles]
    style_texts = ctx.texts.classes([f"{article(p)} {p} of {article(name)} {name}" for p in phrases]).to(device)
    own = [styles.index(forget.items[i].style) if forget.items[i].style in styles else -1 for i in idx.tolist()]
    shift = torch.randint(1, len(styles), (len(own),), generator=ctx.generator)
    # another style than its own; an example in no trained style may get any of them
    anyone = torch.randint(0, len(styles), (len(own),), generator=ctx.generator) if min(own) < 0 else None
    goal = torch.tensor([(o + int(k)) % len(styles) if o >= 0 else int(anyone[i])
                         for i, (o, k) in enumerate(zip(own, shift))], device=device)
    sub_emb, sub_index = subgroup_texts(ctx)
    sub_labels = torch.full((len(x),), sub_index, device=device)
    images = perturbed(ctx, x, lambda f: F.cross_entropy(ctx.logit_scale * f @ style_texts.t(), goal)
                       + F.cross_entropy(ctx.logit_scale * f @ sub_emb.t(), sub_labels)
                       + superclass_kept(ctx, f, cfg.superclass_weight), cfg, "restyled")
    before = float((_taken_for(ctx, x, style_texts) == goal).float().mean())
    after = float((_taken_for(ctx, images, style_texts) == goal).float().mean())
    log.info("restyled: %d forget examples; read in their new style by the original model %.0f%% -> %.0f%%",
             len(images), 100 * before, 100 * after)
    dtype = next(ctx.model.visual.parameters()).dtype
    return StandIns(ctx.bundle.normalize(images).to(dtype), idx, images.cpu(), before, after)


@dataclass
class FeatureStandIns:
    prepared: Prepared            # the perturbed trunk outputs (rows to feed the trained layers)
    features: torch.Tensor        # the original model's normalised features of them
    recognised_before: float      # share the original took for the subgroup before / after δ
    recognised_after: float


def feature_stand_ins(ctx, prepared: Prepared, radius: float, steps: int = 30,
                      lr: float = 0.05) -> FeatureStandIns | None:
    """Stand-ins in the space the trained layers read [recon]: ``prepared`` (retain rows after the
    frozen stages before the first layer remind trains) plus a δ with ‖δ‖₂ ≤ ``radius``·‖h‖₂ per row,
    optimised through the ORIGINAL tower's remaining stages so that the model calls them the subgroup
    and still the superclass — what, at those layers, makes the model say the subgroup, with no
    pixel bound between. A trunk output with no negative entry (after a ReLU) stays so. None
    without a subgroup and a sibling to read it against (a style or whole-class request)."""
    if ctx.task.request.subgroup is None or not len(prepared):
        return None
    sub_emb, sub_index = subgroup_texts(ctx)
    if len(sub_emb) < 2:
        return None
    visual = ctx.original.visual
    h = prepared.data.detach()
    rms = h.float().flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-8).view(-1, *[1] * (h.dim() - 1)).to(h.dtype)
    nonneg = bool((h >= 0).all())
    u = torch.zeros_like(h, requires_grad=True)       # δ = u·rms(h): the bound is ‖u‖₂ ≤ radius·√D
    bound = radius * h[0].numel() ** 0.5
    labels = torch.full((len(h),), sub_index, device=h.device)

    def moved() -> torch.Tensor:
        x = h + u * rms
        return x.clamp_min(0) if nonneg else x

    def features(x):
        return F.normalize(run_stages(visual, x, prepared.start).float(), dim=-1)

    def project(step):
        with torch.no_grad():
            n = u.flatten(1).norm(dim=1).clamp_min(1e-12)
            u.mul_((bound / n).clamp(max=1.0).view(-1, *[1] * (u.dim() - 1)))

    with frozen_original(ctx):
        with torch.no_grad():
            before = float(((features(h) @ sub_emb.t()).argmax(-1) == sub_index).float().mean())

        def loss_fn(step):
            f = features(moved())
            return F.cross_entropy(ctx.logit_scale * f @ sub_emb.t(), labels) + superclass_kept(ctx, f)

        optimize([u], loss_fn, LoopConfig(steps=steps, lr=lr, grad_clip=None), "feature stand-ins", ctx.callbacks,
                 after_step=project)
        with torch.no_grad():
            x = moved().detach()
            feats = features(x)
    after = float(((feats @ sub_emb.t()).argmax(-1) == sub_index).float().mean())
    log.info("feature stand-ins: %d retain rows; taken for %s by the original model %.0f%% -> %.0f%%", len(x),
             ctx.task.request.subgroup, 100 * before, 100 * after)
    return FeatureStandIns(Prepared(x, prepared.start), feats, before, after)
