"""The frozen trunk: compute the unchanged early stages of the image tower once per image.

Forgetting edits a few late layers of the image tower. Every stage before the first edited one
gives the same output for θ₀, for the unlearned weights and for every soup θ₀ + α·Δ, so its output
can be computed once per image and shared — by the training steps of a stage, by the points of an
α-curve or α-grid, by before and after. This is exact, not an approximation (the tests compare it
with full forward passes).

    enc = TrunkEncoder(visual, edited=["layer4.0.conv2", "attnpool.c_proj"])
    t = enc.prepare(x)          # once per image set (no grad); x itself when no split is possible
    feats = enc(t[idx])         # per step / per α: the later stages only, differentiable

Where a tower may be split is its adapter's knowledge (:mod:`clipforget.towers`): open_clip's
``ModifiedResNet`` (the paper's RN50/RN101 and the embedded model) splits between its six stages,
``VisionTransformer`` between its blocks; a tower whose adapter has no stages (timm towers) runs in
full, and so does a trunk whose cached output would exceed ``budget_bytes`` (a real CLIP at 224 px
on thousands of images).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .embed import ENCODE_BATCH, to_input
from .towers import adapter_for
from .towers.base import strip_prefixes, unwrap


def stage_of(visual: nn.Module, name: str) -> str | None:
    """The stage of ``visual`` holding a module or parameter name (``visual.`` / peft prefixes
    allowed); None when the name is in no stage."""
    return adapter_for(visual).stage_of(strip_prefixes(name))


def stages(visual: nn.Module) -> tuple[str, ...]:
    """The tower's stages in forward order; () when it cannot be split."""
    base = unwrap(visual)
    return adapter_for(base).stages(base)


def split_index(visual: nn.Module, edited: Iterable[str]) -> int | None:
    """Index into :func:`stages` of the first stage that ``edited`` names touch, or None when the
    tower cannot be split (no stages, nothing edited, a name in no stage, or the first stage is
    edited)."""
    order = stages(visual)
    if not order:
        return None
    touched = {stage_of(visual, n) for n in edited}
    if not touched or not touched <= set(order):
        return None
    first = min(order.index(s) for s in touched)
    return first or None            # 0: the first stage is edited, nothing to share


def run_stages(visual: nn.Module, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """Stages ``[start, stop)`` of ``visual`` (to the end when ``stop`` is None) on ``x``."""
    base = unwrap(visual)
    adapter = adapter_for(base)
    for s in adapter.stages(base)[start:stop]:
        x = adapter.run_stage(base, s, x)
    return x


class Prepared:
    """Images prepared by a :class:`TrunkEncoder`: the output of stages ``[0, start)`` (``start``
    0: plain model inputs). Index it like a tensor to take a batch."""

    def __init__(self, data: torch.Tensor, start: int):
        self.data, self.start = data, start

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx) -> "Prepared":
        return Prepared(self.data[idx], self.start)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class TrunkEncoder:
    """Image features through ``visual`` with the stages before the first edited one precomputed.

    ``prepare`` runs the trunk in eval mode without gradients (BatchNorm with running statistics,
    as at inference); the caller keeps what it returns. ``__call__`` runs the rest in the tower's
    current mode and returns L2-normalised float features. Pass ``enabled=False`` when the trunk
    must not be frozen (e.g. BatchNorm in train mode updates its statistics)."""

    def __init__(self, visual: nn.Module, edited: Iterable[str], enabled: bool = True,
                 budget_bytes: int = 1 << 30, batch_size: int = ENCODE_BATCH):
        self.visual = visual
        self.start = (split_index(visual, edited) if enabled else None) or 0
        self.budget_bytes = budget_bytes
        self.batch_size = batch_size

    @property
    def split(self) -> bool:
        return self.start > 0

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, total: int | None = None) -> Prepared:
        """The trunk's output for model inputs ``x``; ``x`` itself when there is no split or the
        output for ``total`` images (default: ``len(x)``; pass the whole set's size when preparing
        it batch by batch) would not fit ``budget_bytes``."""
        if not self.split or len(x) == 0:
            return Prepared(x, 0)
        was = self.visual.training
        self.visual.eval()
        try:
            first = run_stages(self.visual, x[:self.batch_size], 0, self.start)
            if not self.fits(first, total or len(x)):
                return Prepared(x, 0)     # too big to keep: these images run the whole tower
            out = [first] + [run_stages(self.visual, x[i:i + self.batch_size], 0, self.start)
                             for i in range(self.batch_size, len(x), self.batch_size)]
        finally:
            self.visual.train(was)
        return Prepared(torch.cat(out), self.start)

    def fits(self, sample: torch.Tensor, total: int) -> bool:
        """Whether ``total`` images' trunk output, each the size of a row of ``sample``, fits the
        encoder's budget (so it can be kept whole)."""
        return sample[0].numel() * sample.element_size() * total <= self.budget_bytes

    @torch.no_grad()
    def advance(self, prepared: Prepared) -> Prepared:
        """``prepared`` (the output of an earlier split, e.g. the app's gallery trunk) run on to this
        encoder's split: stages ``[prepared.start, start)`` in eval mode."""
        if prepared.start > self.start:
            raise ValueError(f"prepared images are past this encoder's split ({prepared.start} > {self.start})")
        if prepared.start == self.start:
            return prepared
        was = self.visual.training
        self.visual.eval()
        try:
            return Prepared(run_stages(self.visual, prepared.data, prepared.start, self.start), self.start)
        finally:
            self.visual.train(was)

    def __call__(self, prepared: Prepared, visual: nn.Module | None = None) -> torch.Tensor:
        """Normalised features of prepared images through ``visual`` (default: the encoder's tower;
        another tower with the same trunk, e.g. a soup θ₀ + α·Δ, may be passed)."""
        visual = visual or self.visual
        x = prepared.data
        out = visual(x) if prepared.start == 0 else run_stages(visual, x, prepared.start)
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode(self, prepared: Prepared, visual: nn.Module | None = None) -> torch.Tensor:
        """Batched, no-grad, eval-mode :meth:`__call__` (for evaluation); float32 on the CPU."""
        visual = visual or self.visual
        was = visual.training
        visual.eval()
        try:
            return torch.cat([self(prepared[i:i + self.batch_size], visual).cpu()
                              for i in range(0, len(prepared), self.batch_size)])
        finally:
            visual.train(was)


@torch.no_grad()
def encode_pair(bundle, images: torch.Tensor, edited_model: nn.Module, edited: Iterable[str],
                batch_size: int = ENCODE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings (float32, CPU) of ``images`` (uint8 or [0, 1]) by the original model
    (``bundle.model``) and by ``edited_model``, a copy that differs from it only in the image-tower
    entries ``edited`` (names as in a delta: ``visual.…``). The stages before the first edited one
    run once per batch for both; nothing edited in the image tower: one pass, the same embeddings
    twice (its image tower is the original's). The same values as two :func:`encode_images` calls."""
    if len(images) == 0:
        raise ValueError("no images to encode")
    edited = [strip_prefixes(n) for n in edited if n.startswith("visual.")]
    original, other = bundle.model.visual, edited_model.visual
    start = split_index(original, edited) if edited else None
    modes = [(v, v.training) for v in (original, other)]
    for v, _ in modes:
        v.eval()
    try:
        out0, out1 = [], []
        for i in range(0, len(images), batch_size):
            x = to_input(bundle, images[i:i + batch_size], bundle.model)
            if not edited:                   # the image tower is the original's: one pass
                f0, f1 = original(x), None
            elif start:
                t = run_stages(original, x, 0, start)
                f0, f1 = run_stages(original, t, start), run_stages(other, t, start)
            else:
                f0, f1 = original(x), other(x)
            out0.append(f0.float().cpu())    # off the device batch by batch
            if f1 is not None:
                out1.append(f1.float().cpu())
    finally:
        for v, was in modes:
            v.train(was)
    emb0 = F.normalize(torch.cat(out0), dim=-1)
    return emb0, (F.normalize(torch.cat(out1), dim=-1) if edited else emb0)
