"""LIP (Foster et al., "Zero-shot machine unlearning at scale via Lipschitz regularization"):
make the model locally smooth — insensitive — around each forget image:

    min  mean_i mean_{k≤N} ‖g(x_i) − g(x_i+ε_k)‖ / ‖ε_k‖     (N = 10 noisy copies, ε ~ N(0, σ²))

on the image embeddings plus on the image–text similarities to the superclass prompts (the
paper's CLIP adaptation). Noise is in the model's normalised input space.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..train.loop import LoopConfig, optimize
from .base import Context, Unlearner, register_method
from .common import lipschitz_ratio, trainable


@dataclass
class LIPConfig:
    copies: int = 10                  # N noisy copies per forget image
    sigma: float = 1.0                # std of ε in normalised input units
    batch_size: int = 8               # forget images per step (x copies forward passes)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=30, lr=1e-2, grad_clip=1.0, optimizer="sgd"))
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"loop.lr": (1e-3, 1e-2, 1e-1), "sigma": (0.1, 0.5, 1.0)}

    def __post_init__(self):
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@register_method
class Lipschitz(Unlearner):
    name, Config = "lip", LIPConfig
    summary = "baseline: minimise the Lipschitz ratio ‖g(x)−g(x+ε)‖/‖ε‖ around forget images (N noisy copies)"
    learned = True                    # trains its delta: `lip+soup` adds ours' restore

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        visual = ctx.model.visual
        visual.eval()
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def loss_fn(step):
            x = ctx.inputs(task.forget, ctx.sample(task.forget, cfg.batch_size))
            return lipschitz_ratio(ctx, x, cfg.copies, cfg.sigma, gen)

        with ctx.stage("lipschitz"), trainable(list(visual.parameters())) as params:
            ctx.log_history("lipschitz", optimize(params, loss_fn, cfg.loop, "lipschitz", ctx.callbacks))
