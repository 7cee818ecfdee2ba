"""GA: gradient ascent on the forget loss over D_f (cross-entropy of the zero-shot superclass
logits against the target superclass, as the paper adapts GA to CLIP).

Stops as soon as the zero-shot accuracy on the forget views reaches the target (default: chance),
which is how GA is run in practice — unbounded ascent destroys the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..train.loop import LoopConfig, optimize
from .base import Context, Unlearner, register_method
from .common import forget_loss, trainable


@dataclass
class GAConfig:
    batch_size: int = 64              # forget images per step
    target_accuracy: float | None = None  # stop when forget accuracy <= this; None: chance level
    early_stop: bool = True           # False: always run every step of the loop
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=40, lr=1e-5, grad_clip=1.0))
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"loop.lr": (3e-6, 1e-5, 3e-5, 1e-4), "loop.steps": (20, 40, 80)}

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.target_accuracy is not None and not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in [0, 1], got {self.target_accuracy}")


@register_method
class GradientAscent(Unlearner):
    name, Config = "ga", GAConfig
    summary = "baseline: gradient ascent on the forget loss (zero-shot cross-entropy) over the forget set"
    learned = True                    # trains its delta: `ga+soup` adds ours' restore

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        target = ctx.chance if cfg.target_accuracy is None else cfg.target_accuracy
        visual = ctx.model.visual
        visual.eval()

        def loss_fn(step):
            return -forget_loss(ctx, ctx.inputs(task.forget, ctx.sample(task.forget, cfg.batch_size)))

        with ctx.stage("ascent"), trainable(list(visual.parameters())) as params:
            history = optimize(params, loss_fn, cfg.loop, "ascent", ctx.callbacks,
                               should_stop=(lambda step: ctx.accuracy(task.forget) <= target) if cfg.early_stop else None)
        ctx.log_history("ascent", history)
        ctx.info["steps"] = len(history)
