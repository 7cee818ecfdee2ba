"""THE optimisation loop: every method and stage that trains goes through :func:`optimize`.

A method supplies ``loss_fn(step) -> loss`` (it draws its own batch), the parameters to train and
a :class:`LoopConfig`; a ``loss_fn`` that back-propagates itself (in micro-batches, to bound memory)
returns the loss as a float instead of a tensor, its gradients already in ``.grad``. The loop owns
the optimiser, gradient clipping, the non-finite-loss check, early stopping, per-step hooks (EMA)
and progress events for the callbacks.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .events import Callback, Cancelled  # noqa: F401 - Cancelled: also this module's API


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No gradient flows into ``module``'s parameters inside the block (flags restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the stage is aborted with the reason."""


@dataclass
class LoopConfig:
    steps: int = 20                   # maximum optimisation steps
    lr: float = 1e-3
    optimizer: str = "adam"           # adam | adamw | sgd
    weight_decay: float = 0.0
    momentum: float = 0.9             # sgd only
    grad_clip: float | None = 1.0     # max global grad norm; None: off
    check_every: int = 1              # steps between early-stopping checks

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be adam, adamw or sgd, got {self.optimizer!r}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")


HALF_PRECISION = ("fp16 weights cannot be trained: Adam's ε (1e-8) and small gradients underflow in half "
                  "precision and the first step turns the weights to inf. Load the model in bf16 (the same "
                  "memory: --precision bf16) or fp32 to unlearn; fp16 serves inference (eval, search)")


def make_optimizer(params: list[torch.nn.Parameter], cfg: LoopConfig) -> torch.optim.Optimizer:
    if any(p.dtype == torch.float16 for p in params):
        raise ValueError(HALF_PRECISION)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def emit(callbacks: Iterable[Callback], **event) -> None:
    for cb in callbacks:
        cb(event)


def optimize(params: Iterable[torch.nn.Parameter], loss_fn: Callable[[int], torch.Tensor | float], cfg: LoopConfig,
             stage: str = "train", callbacks: Iterable[Callback] = (),
             should_stop: Callable[[int], bool] | None = None,
             after_step: Callable[[int], None] | None = None,
             metrics_fn: Callable[[], dict] | None = None) -> list[dict]:
    """Run up to ``cfg.steps`` steps of ``loss_fn``; return the per-step history.

    ``should_stop(step)`` is asked before the first step and every ``check_every`` steps (e.g.
    "forget accuracy <= target"); ``after_step(step)`` runs after each optimiser step (e.g. EMA).
    """
    params = [p for p in params if p.requires_grad]
    callbacks = list(callbacks)
    if not params:
        raise ValueError(f"stage {stage!r}: no trainable parameters")
    opt = make_optimizer(params, cfg)
    history: list[dict] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if should_stop is not None and step % cfg.check_every == 0 and should_stop(step):
            emit(callbacks, stage=stage, step=step, total=cfg.steps, fraction=1.0, message="target reached")
            break
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise NonFiniteLoss(f"stage {stage!r}: loss became {value} at step {step + 1}; lower the "
                                f"learning rate (now {cfg.lr}) or the number of steps")
        if isinstance(loss, torch.Tensor):
            loss.backward()
        grad_norm = None
        if cfg.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        # a finite loss can still leave non-finite weights (an absurd learning rate); early stopping
        # on accuracy would then accept them, so check the weights themselves
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):   # one device sync
            raise NonFiniteLoss(f"stage {stage!r}: the weights became NaN/inf at step {step + 1} (loss was "
                                f"{value:.4g}); lower the learning rate (now {cfg.lr}) or the number of steps")
        if after_step is not None:
            after_step(step)
        rec = {"step": step + 1, "loss": value, "seconds": time.perf_counter() - t0}
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        if metrics_fn is not None:
            rec.update(metrics_fn())
        history.append(rec)
        emit(callbacks, stage=stage, step=step + 1, total=cfg.steps, fraction=(step + 1) / max(1, cfg.steps),
             loss=value)
    return history
