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

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.gallery import display
from ..train.loop import LoopConfig, optimize

log = logging.getLogger(__name__)


@dataclass
class StandInConfig:
    enabled: bool = True             # on a sample of 11 subgroups: median Score 84.8 -> 92.5 (docs/results/sweep-ours.md)
    images: int = 64                 # retain images turned into stand-ins (a seeded sample)
    steps: int = 30                  # Adam steps on δ
    lr: float = 0.01                 # in [0, 1] pixel units
    epsilon: float = 0.1             # ‖δ‖_∞ bound, in [0, 1] pixel units
    superclass_weight: float = 1.0   # keep them the superclass ("a dog that is a poodle")

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


def stand_ins(ctx, cfg: StandInConfig) -> StandIns | None:
    """The stand-in images (None when disabled, or without a subgroup or retain images)."""
    task = ctx.task
    if not cfg.enabled or task.request.subgroup is None or not len(task.retain):
        return None
    visual = ctx.original.visual
    device = ctx.bundle.device
    idx = ctx.sample_indices(len(task.retain), cfg.images)
    x = task.retain.images[idx].float().div(255).to(device)
    sub_emb, sub_index = subgroup_texts(ctx)
    was = visual.training
    visual.eval()
    delta = torch.zeros_like(x, requires_grad=True)
    sub_labels = torch.full((len(x),), sub_index, device=device)
    sup_labels = torch.full((len(x),), task.target_index, device=device)
    flags = [(p, p.requires_grad) for p in visual.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    def loss_fn(step):
        feats = F.normalize(ctx.original.encode_image(ctx.bundle.normalize((x + delta).clamp(0, 1))).float(), dim=-1)
        loss = F.cross_entropy(ctx.logit_scale * feats @ sub_emb.t(), sub_labels)
        if cfg.superclass_weight > 0:
            loss = loss + cfg.superclass_weight * F.cross_entropy(ctx.logit_scale * feats @ ctx.superclass_emb.t(),
                                                                  sup_labels)
        return loss

    def project(step):
        with torch.no_grad():
            delta.clamp_(-cfg.epsilon, cfg.epsilon)

    try:
        optimize([delta], loss_fn, LoopConfig(steps=cfg.steps, lr=cfg.lr, grad_clip=None), "stand-ins",
                 ctx.callbacks, after_step=project)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        visual.train(was)
    images = (x + delta.detach()).clamp(0, 1)

    @torch.no_grad()
    def recognised(imgs):
        feats = F.normalize(ctx.original.encode_image(ctx.bundle.normalize(imgs)).float(), dim=-1)
        return float(((feats @ sub_emb.t()).argmax(-1) == sub_index).float().mean())

    before, after = recognised(x), recognised(images)
    log.info("stand-ins: %d retain images; taken for %s by the original model %.0f%% -> %.0f%%", len(images),
             task.request.subgroup, 100 * before, 100 * after)
    dtype = next(ctx.model.visual.parameters()).dtype
    return StandIns(ctx.bundle.normalize(images).to(dtype), idx, images.cpu(), before, after)
