"""UNSIR (Tarun, Chundawat, Mandal & Kankanhalli, "Fast yet effective machine unlearning", IEEE
TNNLS 2023): learn error-maximising noise for the forget class, impair the model on noise + retain,
repair on retain. The forget images themselves are never used: only their class label.

This was clipforget's ``emmn`` until the paper's EMMN (A.1: maximise the loss on D_f, minimise it on
D_r; see ``emmn.py``) took that name; it is kept as its own baseline.

1. Noise: a batch of inputs N maximising the forget loss (zero-shot cross-entropy towards the
   target superclass) of the original model, with an L2 penalty: max_N CE(g(N), y_T) − λ‖N‖.
2. Impair: a few steps at a high learning rate on CE(g(N), y_T) + the retain loss.
3. Repair: a few steps on the retain loss alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..train.loop import frozen
from ..train.loop import LoopConfig, optimize
from .base import Context, Unlearner, register_method
from .common import RetainLoss, forget_loss, trainable


@dataclass
class UNSIRConfig:
    noise_images: int = 32            # size of the error-maximising noise batch
    noise_l2: float = 0.1             # λ: penalty on the noise's RMS
    noise_loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=20, lr=0.1, grad_clip=None))
    batch_size: int = 32              # retain images per impair / repair step
    impair: LoopConfig = field(default_factory=lambda: LoopConfig(steps=10, lr=2e-5, grad_clip=1.0))
    repair: LoopConfig = field(default_factory=lambda: LoopConfig(steps=10, lr=1e-5, grad_clip=1.0))
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"impair.lr": (1e-5, 2e-5, 1e-4), "repair.lr": (1e-5, 1e-4), "noise_l2": (0.01, 0.1)}

    def __post_init__(self):
        if self.noise_images < 1:
            raise ValueError(f"noise_images must be >= 1, got {self.noise_images}")
        if self.noise_l2 < 0:
            raise ValueError(f"noise_l2 must be >= 0, got {self.noise_l2}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def error_maximising_noise(ctx: Context, cfg: UNSIRConfig) -> tuple[torch.Tensor, dict]:
    """Noise inputs (model input space) that maximise the forget loss of the original model."""
    size = ctx.task.image_size
    dtype = next(ctx.original.visual.parameters()).dtype
    noise = torch.randn(cfg.noise_images, 3, size, size, generator=ctx.generator).to(ctx.bundle.device, dtype)
    noise.requires_grad_(True)
    was = ctx.original.visual.training
    ctx.original.visual.eval()
    with torch.no_grad():
        before = float(forget_loss(ctx, noise, ctx.original))

    def loss_fn(step):
        return -forget_loss(ctx, noise, ctx.original) + cfg.noise_l2 * noise.pow(2).mean().sqrt()

    with frozen(ctx.original.visual):    # gradients flow to the noise only, never into the original
        history = optimize([noise], loss_fn, cfg.noise_loop, "noise", ctx.callbacks)
    ctx.original.visual.train(was)
    noise = noise.detach()
    with torch.no_grad():
        after = float(forget_loss(ctx, noise, ctx.original))
    ctx.log_history("noise", history)
    return noise, {"forget_loss_initial_noise": before, "forget_loss_learned_noise": after}


@register_method
class UNSIR(Unlearner):
    name, Config = "unsir", UNSIRConfig
    summary = "baseline (UNSIR): error-maximising noise for the forget class, impair on noise + retain, repair on retain"
    learned = True                    # trains its delta: `unsir+soup` adds ours' restore

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        with ctx.stage("noise"):
            noise, info = error_maximising_noise(ctx, cfg)
        ctx.info.update(info)
        retain = RetainLoss(ctx) if len(task.retain) else None
        visual = ctx.model.visual
        visual.eval()

        def impair(step):
            loss = forget_loss(ctx, noise)
            return loss + retain(ctx.sample(task.retain, cfg.batch_size)) if retain else loss

        with ctx.stage("impair"), trainable(list(visual.parameters())) as params:
            ctx.log_history("impair", optimize(params, impair, cfg.impair, "impair", ctx.callbacks))
        if retain is not None:
            with ctx.stage("repair"), trainable(list(visual.parameters())) as params:
                ctx.log_history("repair", optimize(params, lambda s: retain(ctx.sample(task.retain, cfg.batch_size)),
                                                   cfg.repair, "repair", ctx.callbacks))
