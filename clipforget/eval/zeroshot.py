"""Zero-shot accuracy of the report's columns, with text embeddings computed once.

Every method in clipforget edits the image tower only, so class (prompt) embeddings come from the
original model and are shared by the before / after / α-grid evaluations.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.prompts import class_prompts
from ..data.task import Column
from ..embed import class_embeddings, encode_images
from ..models import ClipBundle


class TextCache:
    """Class embeddings per tuple of class names (prompt ensemble), from one model's text tower."""

    def __init__(self, bundle: ClipBundle):
        self.bundle = bundle
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    def classes(self, names: list[str]) -> torch.Tensor:
        key = tuple(names)
        if key not in self._cache:
            self._cache[key] = class_embeddings(self.bundle, class_prompts(names))
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
