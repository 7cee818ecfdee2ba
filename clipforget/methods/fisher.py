"""Fisher forgetting (Golatkar, Achille & Soatto, "Eternal sunshine of the spotless net", CVPR
2020; noise as Jia et al.'s Unlearn-Sparse runs it): estimate the diagonal Fisher F of the loss on a
data set, then add Gaussian noise to every weight with variance scale/F, capped:

    θ ← θ + N(0, σ²),  σ = min(√(scale / (F + ε)), cap)

The loss is the zero-shot cross-entropy of the images against their superclass (zero-shot logits
stand in for a classifier's, as the paper adapts the baselines to CLIP).

- ``fisher``: F on the forgetting set D_f, as the paper's appendix A.1 describes its Fisher baseline.
  With σ² = scale/F, the weights D_f relies on (large F) get the least noise, and the noise falls on
  the weights D_f does not use; [recon] we follow the paper's data set and the noise rule as stated.
- ``fisher_retain``: F on the retain set D_r, as Golatkar et al. and Unlearn-Sparse do: the weights
  the retain set relies on barely move, the rest — among them those that only serve the forget set
  — are scrambled. This was clipforget's ``fisher`` until that name went to the paper's version;
  with no retain set it takes the Fisher of D_f.
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
    cap: float = 1e-2                 # upper bound on σ (weights the Fisher's data never uses)
    samples: int = 64                 # images for the Fisher estimate (one backward each)
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"scale": (0.05, 0.2, 1.0), "cap": (1e-3, 3e-3, 1e-2, 3e-2)}

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not self.cap > 0:
            raise ValueError(f"cap must be > 0, got {self.cap}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


class _Fisher(Unlearner):
    """Fisher forgetting with the Fisher of the data set :meth:`fisher_data` picks."""
    Config = FisherConfig

    def fisher_data(self, task):
        raise NotImplementedError

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        data = self.fisher_data(task)
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
            forget_after = float(forget_loss(ctx, ctx.inputs(task.forget, slice(0, 64))))
        ctx.info.update(fisher_set="forget" if data is task.forget else "retain",
                        mean_noise_std=sum(means) / len(means), forget_loss_after=forget_after)


@register_method
class FisherForgetting(_Fisher):
    name = "fisher"
    summary = "baseline: Gaussian noise on every weight with variance scale / (Fisher on the forget set), capped"

    def fisher_data(self, task):
        return task.forget


@register_method
class FisherRetain(_Fisher):
    name = "fisher_retain"
    summary = "baseline: Gaussian noise on every weight with variance scale / (retain Fisher), capped"

    def fisher_data(self, task):
        return task.retain if len(task.retain) else task.forget   # no retain set: Fisher of D_f
