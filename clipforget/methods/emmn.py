"""EMMN (Chundawat, Tarun, Mandal & Kankanhalli, "Zero-shot machine unlearning", IEEE TIFS 2023:
error-minimising-maximising noise) as the paper adapts it to CLIP (its appendix A.1): maximise the
loss on the forgetting set while minimising it on the retaining set.

The source has no data, so it learns error-maximising noise for the forget class and
error-minimising noise for the retained ones, impairs the model on both, then repairs it on the
minimising noise alone. The paper has D_f and D_r, so the real images stand in for the two noises:

1. Impair: steps on  −w·L_f(D_f) + L_r(D_r),  L_f the zero-shot cross-entropy of forget images
   against their superclass (zero-shot probabilities stand in for a classifier's logits), L_r the
   retain loss of :class:`~clipforget.methods.common.RetainLoss`.
2. Repair: steps on L_r(D_r) alone.

[recon] the weight w, the step counts and learning rates, and the early stop of the impair stage
once the forget training views are at chance level (as GA stops: unbounded ascent destroys the
model). Without a retain set the impair stage is gradient ascent and there is no repair.
The noise-based method that clipforget called ``emmn`` before is ``unsir`` (``unsir.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..train.loop import LoopConfig, optimize
from .base import Context, Unlearner, register_method
from .common import RetainLoss, forget_loss, trainable


@dataclass
class EMMNConfig:
    batch_size: int = 32              # forget images and retain images per step (each)
    forget_weight: float = 1.0        # w: weight of the maximised forget loss against the retain loss
    target_accuracy: float | None = None  # impair stops when forget accuracy <= this; None: chance level
    early_stop: bool = True           # False: always run every impair step
    impair: LoopConfig = field(default_factory=lambda: LoopConfig(steps=40, lr=1e-4, grad_clip=1.0))
    repair: LoopConfig = field(default_factory=lambda: LoopConfig(steps=5, lr=1e-5, grad_clip=1.0))
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"impair.lr": (2e-5, 1e-4, 2e-4), "repair.lr": (1e-5, 1e-4), "forget_weight": (0.5, 1.0)}

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.forget_weight > 0:
            raise ValueError(f"forget_weight must be > 0, got {self.forget_weight}")
        if self.target_accuracy is not None and not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in [0, 1], got {self.target_accuracy}")


@register_method
class EMMN(Unlearner):
    name, Config = "emmn", EMMNConfig
    summary = "baseline: maximise the forget loss on the forget set while minimising the retain loss, then repair"
    learned = True                    # trains its delta: `emmn+soup` adds ours' restore

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        target = ctx.chance if cfg.target_accuracy is None else cfg.target_accuracy
        retain = RetainLoss(ctx) if len(task.retain) else None
        visual = ctx.model.visual
        visual.eval()

        def impair(step):
            loss = -cfg.forget_weight * forget_loss(ctx, ctx.inputs(task.forget, ctx.sample(task.forget, cfg.batch_size)))
            return loss + retain(ctx.sample(task.retain, cfg.batch_size)) if retain else loss

        with ctx.stage("impair"), trainable(list(visual.parameters())) as params:
            history = optimize(params, impair, cfg.impair, "impair", ctx.callbacks,
                               should_stop=(lambda step: ctx.accuracy(task.forget) <= target) if cfg.early_stop else None)
        ctx.log_history("impair", history)
        ctx.info["impair_steps"] = len(history)
        if retain is not None and cfg.repair.steps:
            with ctx.stage("repair"), trainable(list(visual.parameters())) as params:
                ctx.log_history("repair", optimize(params, lambda s: retain(ctx.sample(task.retain, cfg.batch_size)),
                                                   cfg.repair, "repair", ctx.callbacks))
