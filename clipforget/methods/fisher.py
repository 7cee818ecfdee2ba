"""Fisher forgetting (Golatkar et al., as Unlearn-Sparse runs it): estimate the diagonal Fisher
F of the retain loss, then add Gaussian noise to every weight with variance scale/F, capped:

    θ ← θ + N(0, σ²),  σ = min(√(scale / (F + ε)), cap)

Weights the retain set relies on (large F) barely move; weights it does not need — among them
those that only serve the forget set — are scrambled. The loss is the zero-shot cross-entropy of
retain images against their superclass (zero-shot logits stand in for a classifier's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Context, Unlearner, register_method
from .common import diagonal_fisher, forget_loss


def noise_std(fisher: torch.Tensor, scale: float, cap: float, eps: float = 1e-8) -> torch.Tensor:
    """σ = min(√(scale / (F + ε)), cap): the noise variance scales with 1/F."""
    return (scale / (fisher + eps)).sqrt().clamp(max=cap)


@dataclass
class FisherConfig:
    scale: float = 0.2                # variance numerator: σ² = scale / F
    cap: float = 1e-2                 # upper bound on σ (weights the retain set never uses)
    samples: int = 64                 # retain images for the Fisher estimate (one backward each)
    seed: int = 0

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not self.cap > 0:
            raise ValueError(f"cap must be > 0, got {self.cap}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@register_method
class FisherForgetting(Unlearner):
    name, Config = "fisher", FisherConfig
    summary = "baseline: Gaussian noise on every weight with variance scale / (retain Fisher), capped"

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        data = task.retain if len(task.retain) else task.forget   # no retain set: Fisher of D_f
        visual = ctx.model.visual
        visual.eval()
        params = [p for p in visual.parameters() if p.is_floating_point()]
        idx = ctx.sample(data, cfg.samples)
        labels = task.superclass_labels(data)
        with ctx.stage("fisher"):
            def per_sample(i):
                x = ctx.inputs(data, idx[i:i + 1])
                logits = ctx.superclass_logits(x)
                return torch.nn.functional.cross_entropy(logits, labels[idx[i:i + 1]].to(logits.device))
            fisher = diagonal_fisher(params, per_sample, len(idx))
        with ctx.stage("noise"), torch.no_grad():
            means = []
            for p, f in zip(params, fisher):
                std = noise_std(f, cfg.scale, cfg.cap).to(p.device)
                p.add_((torch.randn(p.shape, generator=ctx.generator).to(p.device) * std).to(p.dtype))
                means.append(float(std.mean()))
        ctx.info.update(mean_noise_std=sum(means) / len(means),
                        forget_loss_after=float(forget_loss(ctx, ctx.inputs(task.forget, slice(0, 64))).detach()))
