"""FT: fine-tune the image tower on the retain set D_r only (catastrophic forgetting of D_f).

The forget images are never looked at: the method relies on D_f drifting away while D_r is
rehearsed. BatchNorm statistics stay frozen (eval mode), as in every clipforget method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..train.loop import LoopConfig, optimize
from .base import Context, Unlearner, register_method
from .common import RetainLoss, trainable


@dataclass
class FTConfig:
    batch_size: int = 64              # retain images per step
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=40, lr=1e-5, grad_clip=1.0))
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@register_method
class FineTune(Unlearner):
    name, Config = "ft", FTConfig
    summary = "baseline: fine-tune the image tower on the retain set only (never sees a forget image)"

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        if not len(task.retain):
            raise ValueError("ft needs a retain set; the request has none (pick retain subgroups)")
        loss = RetainLoss(ctx)
        visual = ctx.model.visual
        visual.eval()
        with ctx.stage("finetune"), trainable(list(visual.parameters())) as params:
            history = optimize(params, lambda step: loss(ctx.sample(task.retain, cfg.batch_size)), cfg.loop,
                               "finetune", ctx.callbacks)
        ctx.log_history("finetune", history)
