"""Helpers shared by the baselines: losses over zero-shot logits, trainable parameters, the
Lipschitz ratio, per-parameter diagonal Fisher, and text embeddings of a request's prompts.

As the paper adapts the classifier baselines to CLIP, the zero-shot logits over the superclass
prompts stand in for a classifier's logits: "the forget loss" is the cross-entropy of the forget
images against their superclass, "the retain loss" the CLIP loss of retain images against their own
captions (contrasted with every superclass prompt too) plus that cross-entropy.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.gallery import display
from ..data.prompts import class_prompts
from ..embed import class_embeddings
from ..stages.fisher import prunable_layers


def forget_loss(ctx, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """Cross-entropy of images ``x`` against the target superclass (zero-shot logits)."""
    logits = ctx.superclass_logits(x, model)
    target = torch.full((len(x),), ctx.task.target_index, device=logits.device)
    return F.cross_entropy(logits, target)


class RetainLoss:
    """CLIP loss of retain images against their own captions and their superclass prompt (both
    positives; a batch holds few distinct captions, so every superclass prompt is a negative too).
    ``superclass=False``: the plain CLIP loss, each image against its own caption among the retain
    set's captions, no superclass prompt."""

    def __init__(self, ctx, superclass: bool = True):
        self.ctx = ctx
        task = ctx.task
        device = ctx.bundle.device
        cap_emb, cap_ids = ctx.caption_embeddings(task.retain)
        self.texts = torch.cat([cap_emb, ctx.superclass_emb]) if superclass else cap_emb
        n = len(task.retain)
        self.pos = torch.zeros(n, len(self.texts), device=device)
        self.pos[torch.arange(n), cap_ids] = 1
        if superclass:
            self.pos[torch.arange(n), task.superclass_labels(task.retain).to(device) + len(cap_emb)] = 1

    def __call__(self, idx: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        ctx = self.ctx
        img = ctx.image_features(ctx.inputs(ctx.task.retain, idx), model)
        logits = ctx.logit_scale * img @ self.texts.t()
        pos = self.pos[idx.to(self.pos.device)]
        return -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()


@contextlib.contextmanager
def trainable(params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """``requires_grad`` on for ``params`` inside the block, off afterwards (the copy is frozen)."""
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)


def layer_params(visual: nn.Module, names: list[str] | None = None) -> list[nn.Parameter]:
    """Parameters of the named prunable layers, or of the whole tower when ``names`` is None."""
    if names is None:
        return list(visual.parameters())
    mods = dict(visual.named_modules())
    return [p for n in names for p in mods[n].parameters(recurse=False)]


def lipschitz_ratio(ctx, x: torch.Tensor, copies: int, sigma: float, generator: torch.Generator,
                    model: nn.Module | None = None, text_emb: torch.Tensor | None = None,
                    text_sigma: float = 0.0) -> torch.Tensor:
    """mean ‖g(x) − g(x+ε)‖/‖ε‖ over ``copies`` noisy copies per image, on the image embeddings
    plus on the image–text similarities (to ``text_emb``, default the superclass prompts).
    ``text_sigma`` > 0 perturbs the text embeddings too (the joint space of CLIP-LIP); the
    similarity term is then divided by the norm of the joint perturbation (ε, η)."""
    model = model or ctx.model
    text = ctx.superclass_emb if text_emb is None else text_emb
    eps = sigma * torch.randn((copies,) + tuple(x.shape), generator=generator).to(x.device, x.dtype)
    xn = (x.unsqueeze(0) + eps).flatten(0, 1)
    e0 = ctx.image_features(x, model)
    en = ctx.image_features(xn, model).view(copies, len(x), -1)
    eps_norm = eps.flatten(2).float().norm(dim=-1)                      # (copies, N)
    r_emb = (en - e0.unsqueeze(0)).norm(dim=-1) / eps_norm
    s0 = e0 @ text.t()
    if text_sigma > 0:
        eta = text_sigma * torch.randn((copies,) + tuple(text.shape), generator=generator).to(text.device)
        tn = F.normalize(text.unsqueeze(0) + eta, dim=-1)             # (copies, T, D)
        sn = torch.einsum("cnd,ctd->cnt", en, tn)
        joint = (eps_norm ** 2 + eta.flatten(1).norm(dim=-1, keepdim=True) ** 2).sqrt()
    else:
        sn = en @ text.t()
        joint = eps_norm
    r_sim = (sn - s0.unsqueeze(0)).norm(dim=-1) / joint
    return r_emb.mean() + r_sim.mean()


def diagonal_fisher(params: list[nn.Parameter], per_sample_loss, n: int) -> list[torch.Tensor]:
    """Diagonal empirical Fisher E[(∂ℓ_i/∂p)²] per parameter entry over ``n`` samples;
    ``per_sample_loss(i)`` returns sample i's loss (one backward each)."""
    out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    with trainable(params):
        for i in range(n):
            grads = torch.autograd.grad(per_sample_loss(i), params, allow_unused=True)
            for acc, g in zip(out, grads):
                if g is not None:
                    acc.add_(g.float() ** 2)
    return [f / max(1, n) for f in out]


def request_prompts(ctx, concepts: bool = False) -> tuple[list[str], list[str]]:
    """(forget names, retained names) of a request for text-only methods: the target's own name —
    its subgroup, or its superclass for whole-class requests — against every other superclass and
    the retain subgroups (and, with ``concepts``, the gallery's other concepts)."""
    task, r = ctx.task, ctx.task.request
    target = r.subgroup or r.superclass
    forget = [target]
    retained = [s for s in task.superclasses if s != target and (r.subgroup is not None or s != r.superclass)]
    retained += [s for s in task.retain_subgroups if s != target]
    if concepts:
        retained += [c for c in task.gallery.other_concepts() if c not in retained and c != target]
    return forget, list(dict.fromkeys(retained))


def prompt_embeddings(ctx, names: list[str]) -> torch.Tensor:
    """Normalised embeddings of every zero-shot prompt of ``names`` (one per prompt, not averaged),
    from the original text tower."""
    prompts = [[p] for ps in class_prompts(names) for p in ps]
    return class_embeddings(ctx.bundle, prompts, ctx.original).to(ctx.bundle.device)


def named_layers(visual: nn.Module) -> list[str]:
    return list(prunable_layers(visual))


__all__ = ["forget_loss", "RetainLoss", "trainable", "layer_params", "lipschitz_ratio", "diagonal_fisher",
           "request_prompts", "prompt_embeddings", "named_layers", "display"]
