"""Task negation (Ilharco et al., task arithmetic): θ₀ − λ·(θ_ft(D_f) − θ₀).

Fine-tune a copy on the forget set (cross-entropy of the zero-shot superclass logits towards the
target superclass: the "task" of recognising D_f), take the task vector τ = θ_ft − θ₀ and subtract
λ·τ from the original. λ is fixed, or picked on the calibration set D_m (as Ilharco et al. pick it
on held-out data): the λ of the grid with the best non-target accuracy among those whose target
accuracy is at or below chance; none feasible -> the λ with the lowest target accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..eval.zeroshot import column_accuracy
from ..train.loop import LoopConfig, optimize
from .base import Context, Unlearner, register_method
from .common import forget_loss, trainable


def negate(theta0: dict, tau: dict, lam: float) -> dict:
    """θ₀ − λ·τ over the floating-point entries (others from θ₀)."""
    return {k: (theta0[k].float() - lam * tau[k].float()).to(theta0[k].dtype) if k in tau else theta0[k]
            for k in theta0}


@dataclass
class TaskNegationConfig:
    lam: float | None = None          # negation strength λ; None: pick from lam_grid on D_m
    lam_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0)   # candidates when lam is None
    batch_size: int = 64              # forget images per fine-tuning step
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=20, lr=1e-5, grad_clip=1.0))
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"loop.lr": (3e-6, 1e-5, 3e-5, 1e-4), "loop.steps": (10, 20, 40)}

    def __post_init__(self):
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.lam is None and not self.lam_grid:
            raise ValueError("lam_grid must not be empty when lam is None")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@register_method
class TaskNegation(Unlearner):
    name, Config = "task_negation", TaskNegationConfig
    summary = "baseline: task arithmetic, θ₀ − λ·(θ fine-tuned on the forget set − θ₀)"
    learned = True                    # trains its delta: `task_negation+soup` adds ours' restore

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        visual = ctx.model.visual
        visual.eval()

        def loss_fn(step):
            return forget_loss(ctx, ctx.inputs(task.forget, ctx.sample(task.forget, cfg.batch_size)))

        with ctx.stage("finetune"), trainable(list(visual.parameters())) as params:
            ctx.log_history("finetune", optimize(params, loss_fn, cfg.loop, "finetune", ctx.callbacks))
        tau = ctx.current_delta()
        with ctx.stage("negate"):
            lam, curve = (cfg.lam, []) if cfg.lam is not None else self.pick_lambda(ctx, tau)
            ctx.set_visual(negate(ctx.theta0, tau, lam))
        ctx.info.update(lam=lam, lam_curve=curve)

    @torch.no_grad()
    def pick_lambda(self, ctx: Context, tau: dict) -> tuple[float, list[dict]]:
        curve = []
        for lam in self.config.lam_grid:
            ctx.set_visual(negate(ctx.theta0, tau, lam))
            curve.append({"lam": lam, **{n: column_accuracy(ctx.bundle, c, ctx.texts, ctx.model)
                                        for n, c in ctx.task.calib.items()}})

        def keep(r):
            vals = [v for k, v in r.items() if k not in ("lam", "target")]
            return sum(vals) / max(1, len(vals))
        feasible = [r for r in curve if r["target"] <= ctx.chance + 1e-9]
        best = max(feasible, key=keep) if feasible else min(curve, key=lambda r: (r["target"], -keep(r)))
        return best["lam"], curve
