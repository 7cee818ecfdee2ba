"""Remind's first step — alignment [paper Eq. 4]: an additive perturbation δ per retain image,
optimised so that, through the ORIGINAL image tower, each BatchNorm layer's batch mean/variance of
its input matches that layer's running mean/variance:
    min_δ Σ_l ‖μ_l(x+δ) − μ_l^BN‖₂ + ‖σ²_l(x+δ) − σ²_l^BN‖₂     (x+δ clamped to [0, 1]).
Towers without BatchNorm (ViT) [recon]: the same with each LayerNorm's input moments matched to
moments measured on a reference image set (``vit_fallback="layernorm"``), or no alignment
(``"skip"``), with a logged note either way. Which norm layers a tower has comes from its adapter
(:mod:`clipforget.towers`). :mod:`.remind` calls :func:`align_images`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..towers import adapter_for
from ..train.loop import LoopConfig, frozen, optimize

log = logging.getLogger(__name__)

# the autograd graph an alignment chunk may hold to run in one pass (forward once a step, not twice),
# unless the run passes its own budget (``Context.activation_budget``; the app's is small): the
# embedded model's 128 images at 64 px take ~0.4 GiB more at the peak and ~35 % less time
ONE_PASS_BUDGET = 1 << 30
MICRO_BATCH = 16                      # images a pass otherwise


def graph_bytes(run, x: torch.Tensor, stats: "NormStats") -> int:
    """Bytes of the storages behind the tensors autograd saves for one forward of ``x`` through
    ``run`` with ``stats`` recording, each storage once (a view or an expanded tensor is its
    storage's size, not its shape's)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), stats:
        run(x)
    return sum(storages.values())


@dataclass
class AlignConfig:
    enabled: bool = True
    steps: int = 15                  # Adam steps on δ
    lr: float = 0.01                 # in [0, 1] pixel units
    chunk: int = 256                 # images whose statistics are matched together
    micro_batch: int | None = None   # images per forward/backward pass: bounds memory, not the result; None:
                                     # the whole chunk in one pass when its graph fits the run's activation
                                     # budget (default ONE_PASS_BUDGET), else 16 at a time [recon]
    content_weight: float = 1000.0   # + w·mean(1 − cos(g₀(x+δ), g₀(x))): keep what the original model sees [recon]
    keep_originals: bool = True      # fine-tune on the retain images *and* their aligned copies; progress is
                                     # checked on the real images [recon]
    max_images: int | None = 128     # align at most this many retain images (a seeded random subset) [recon]
    vit_fallback: str = "layernorm"  # towers without BatchNorm: layernorm | skip

    def __post_init__(self):
        if self.vit_fallback not in ("layernorm", "skip"):
            raise ValueError(f"vit_fallback must be 'layernorm' or 'skip', got {self.vit_fallback!r}")
        if self.steps < 0 or self.chunk < 2 or (self.micro_batch is not None and self.micro_batch < 1):
            raise ValueError("align steps must be >= 0, chunk >= 2 and micro_batch >= 1")
        if self.content_weight < 0:
            raise ValueError(f"content_weight must be >= 0, got {self.content_weight}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {self.max_images}")


class NormStats:
    """Forward pre-hooks that sum each norm layer's input per channel — Σ(x − c) and Σ(x − c)²,
    with c the layer's target mean (a shift that keeps the variance exact in float32) — and the
    target moments to match (BatchNorm running stats, or LayerNorm moments of a reference). Which
    layers, and of which kind, is the tower adapter's answer (``norm_layers``).

    Sums add over batches, so the moments of a whole image set come from batches run one at a
    time: ``align_images`` matches the statistics of all its images without holding all their
    activations at once."""

    def __init__(self, visual: nn.Module):
        self.kind, self.layers = adapter_for(visual).norm_layers(visual)
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = (
            [(m.running_mean.detach().float(), m.running_var.detach().float()) for m in self.layers]
            if self.kind == "batchnorm" else [])
        self.sums: list[list[torch.Tensor]] = []     # per layer [Σ(x − c), Σ(x − c)², count]
        self.dtype = torch.float32    # of the sums; float64 where there is no target mean to shift by
        self._hooks = []

    def _record(self, i: int, x: torch.Tensor) -> None:
        x = x.to(self.dtype)
        if self.kind == "layernorm":  # (..., C): statistics over every position
            x = x.reshape(-1, x.shape[-1])
        channels = x.shape[1]         # (N, C, ...) or (positions, C)
        dims = [0] + list(range(2, x.ndim))
        c = self.shift(i).to(x.dtype)
        d = x - (c.view(channels, *[1] * (x.ndim - 2)) if c.ndim else c)
        s = [d.sum(dims), (d * d).sum(dims), torch.tensor(float(x.numel() // channels), dtype=x.dtype)]
        if i < len(self.sums):
            self.sums[i] = [a + b for a, b in zip(self.sums[i], s)]
        else:
            self.sums.append(s)

    def shift(self, i: int) -> torch.Tensor:
        return self.targets[i][0] if self.targets else torch.zeros(())

    def __enter__(self):
        """Start a pass: the sums restart at zero and add up over every forward until exit."""
        self.sums = []
        self._hooks = [m.register_forward_pre_hook(lambda m, inp, i=i: self._record(i, inp[0]))
                       for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    def moments(self, sums: list[list[torch.Tensor]] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (mean, variance) of everything seen in the pass (or of ``sums``)."""
        out = []
        for i, (s1, s2, n) in enumerate(self.sums if sums is None else sums):
            m = s1 / n
            out.append((self.shift(i) + m, s2 / n - m * m))
        return out

    def loss(self, sums: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        return sum(torch.linalg.vector_norm(mu - tm) + torch.linalg.vector_norm(var - tv)
                   for (mu, var), (tm, tv) in zip(self.moments(sums), self.targets))


def pass_size(ctx, cfg: AlignConfig, run, images01: torch.Tensor, stats: "NormStats") -> int:
    """Images per forward/backward pass of the alignment: ``cfg.micro_batch`` when given, else the
    whole chunk when its autograd graph (what one more image adds, measured on one- and two-image
    probes; weights autograd saves count once) fits the run's activation budget, else MICRO_BATCH."""
    if cfg.micro_batch is not None:
        return cfg.micro_batch
    budget = ONE_PASS_BUDGET if ctx.activation_budget is None else ctx.activation_budget
    n = min(cfg.chunk, len(images01))
    one, two = (graph_bytes(run, images01[:k].to(ctx.bundle.device).requires_grad_(), stats) for k in (1, 2))
    return n if max(two - one, 1) * n + one <= budget else MICRO_BATCH


def drift_of(feats: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Σ (1 − cos) of the tower's features to the original model's (normalised) ``content``."""
    return (1 - (F.normalize(feats.float(), dim=-1) * content).sum(-1)).sum()


def align_images(ctx, images01: torch.Tensor, cfg: AlignConfig, reference01: torch.Tensor | None = None):
    """Return (aligned images in [0, 1], info). ``images01``: float (N, 3, H, W).

    The statistics of a chunk are those of all its images; forward and backward passes run
    :func:`pass_size` images at a time. A chunk that fits one pass runs forward once per step, with
    its statistics' graph kept, and backward once. A larger chunk, per step: one pass without gradients sums the statistics
    of the chunk at x + δ; the gradient of the statistics loss with respect to those sums (a few
    small tensors) then weights the same sums of each micro-batch, whose backward pass adds its
    images' part of the exact gradient."""
    visual = ctx.original.visual
    stats = NormStats(visual)
    if not cfg.enabled or cfg.steps == 0:
        return images01, {"aligned": False}
    if stats.kind == "none" or (stats.kind == "layernorm" and cfg.vit_fallback == "skip"):
        log.warning("image tower has no BatchNorm; alignment skipped (vit_fallback=%s)", cfg.vit_fallback)
        return images01, {"aligned": False, "note": "no BatchNorm: alignment skipped"}
    was = visual.training
    visual.eval()
    device = ctx.bundle.device
    dtype = next(visual.parameters()).dtype

    def run(x01):                     # the original tower on [0, 1] images
        return visual(ctx.bundle.normalize(x01.to(device)).to(dtype))

    def batches(n):
        return [slice(j, j + per_pass) for j in range(0, n, per_pass)]

    def measure(images01):            # one pass without gradients: ``stats`` sums over all the images
        with torch.no_grad(), stats:
            for b in batches(len(images01)):
                run(images01[b])

    with frozen(visual):
        per_pass = pass_size(ctx, cfg, run, images01, stats)
        if stats.kind == "layernorm":
            log.warning("image tower has no BatchNorm; aligning LayerNorm input moments to a reference set [recon]")
            if reference01 is None:
                raise ValueError("LayerNorm alignment needs reference images")
            stats.dtype = torch.float64
            measure(reference01)
            stats.targets = [(m.float(), v.float()) for m, v in stats.moments()]
            stats.dtype = torch.float32
        out, before, after = [], [], []
        for i in range(0, len(images01), cfg.chunk):
            x = images01[i:i + cfg.chunk].to(device)
            n = len(x)
            delta = torch.zeros_like(x, requires_grad=True)
            with torch.no_grad():
                content = torch.cat([F.normalize(run(x[b]).float(), dim=-1) for b in batches(n)])

            def one_pass(x=x, delta=delta, content=content, n=n):
                """The chunk in one pass: its statistics keep their graph; one backward."""
                with stats:
                    feats = run((x + delta).clamp(0, 1))
                stat_loss = stats.loss()
                drift = drift_of(feats, content) if cfg.content_weight > 0 else torch.zeros(())
                (stat_loss + cfg.content_weight * drift / n).backward()
                return float(stat_loss.detach()), float(drift.detach())

            def micro_batched(x=x, delta=delta, content=content, n=n):
                measure((x + delta.detach()).clamp(0, 1))     # the chunk's statistics at x + δ
                sums = [[s.requires_grad_() for s in layer[:2]] + layer[2:] for layer in stats.sums]
                stat_loss = stats.loss(sums)
                grads = torch.autograd.grad(stat_loss, [s for layer in sums for s in layer[:2]])
                drift_sum = 0.0
                for b in batches(n):                   # backward, a micro-batch at a time
                    with stats:
                        feats = run((x[b] + delta[b]).clamp(0, 1))
                    part = sum((g * s).sum() for g, s in zip(grads, (s for layer in stats.sums for s in layer[:2])))
                    if cfg.content_weight > 0:
                        drift = drift_of(feats, content[b])
                        part = part + cfg.content_weight * drift / n
                        drift_sum += float(drift.detach())
                    part.backward()
                return float(stat_loss.detach()), drift_sum

            def loss_fn(step, n=n):
                stat, drift_sum = one_pass() if n <= per_pass else micro_batched()
                if step == 0:
                    before.append(stat)
                return stat + cfg.content_weight * drift_sum / n

            optimize([delta], loss_fn, LoopConfig(steps=cfg.steps, lr=cfg.lr, grad_clip=None), "align",
                     ctx.callbacks)
            final = (x + delta).detach().clamp(0, 1)
            measure(final)
            after.append(float(stats.loss()))
            out.append(final.cpu())
    visual.train(was)
    info = {"aligned": True, "norm": stats.kind, "stat_loss_before": sum(before) / len(before),
            "stat_loss_after": sum(after) / len(after)}
    log.info("alignment: statistics loss %.4f -> %.4f", info["stat_loss_before"], info["stat_loss_after"])
    return torch.cat(out), info
