"""Zero-shot accuracy of the report's columns, with text embeddings computed once.

Most methods edit the image tower only: class (prompt) embeddings then come from the original
model and are shared by the before / after / α-grid evaluations. A delta with text-side keys
(CLIP-LIP) changes them: evaluating θ₀ + α·Δ then uses a :class:`TextCache` of the edited model
at that α (``TextCache(bundle, model)``), which computes each class list's embeddings once.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.prompts import class_prompts
from ..data.task import Column
from ..embed import class_embeddings, encode_images
from ..models import ClipBundle


class TextCache:
    """Class embeddings per tuple of class names (prompt ensemble), from one model's text tower:
    ``model``, default the bundle's (the original)."""

    def __init__(self, bundle: ClipBundle, model: nn.Module | None = None):
        self.bundle = bundle
        self.model = model
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    def classes(self, names: list[str]) -> torch.Tensor:
        key = tuple(names)
        if key not in self._cache:
            self._cache[key] = class_embeddings(self.bundle, class_prompts(names), self.model)
        return self._cache[key]


def predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    return (image_emb @ class_emb.t()).argmax(-1)


def column_accuracy(bundle: ClipBundle, column: Column, texts: TextCache,
                    model: nn.Module | None = None, image_emb: torch.Tensor | None = None) -> float:
    emb = image_emb if image_emb is not None else encode_images(bundle, column.views.images, model)
    return float((predict(emb, texts.classes(column.classes)) == column.labels).float().mean())


def evaluate_columns(bundle: ClipBundle, columns: dict[str, Column], texts: TextCache,
                     model: nn.Module | None = None) -> dict[str, float]:
    return {name: column_accuracy(bundle, col, texts, model) for name, col in columns.items()}
