"""Zero-shot accuracy of the report's columns, with text embeddings computed once.

Most methods edit the image tower only: class (prompt) embeddings then come from the original
model and are shared by the before / after / α-grid evaluations. A delta with text-side keys
(CLIP-LIP) changes them: evaluating θ₀ + α·Δ then uses a :class:`TextCache` of the edited model
at that α (``TextCache(bundle, model)``), which computes each class list's embeddings once.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..data.prompts import class_prompts
from ..data.task import Column
from ..embed import class_embeddings, encode_images
from ..models import ClipBundle


class TextCache:
    """Class embeddings per tuple of class names (prompt ensemble), from one model's text tower:
    ``model``, default the bundle's (the original). Every TextCache of one model in a process shares
    what any of them computed while that model's text tower is unchanged (the evaluator of each
    run, the app's jobs, the α points of a text-side delta that revisit one α)."""

    def __init__(self, bundle: ClipBundle, model: nn.Module | None = None):
        self.bundle = bundle
        self.model = model

    def classes(self, names: list[str]) -> torch.Tensor:
        model = self.model if self.model is not None else self.bundle.model
        cache = _shared_cache(model)
        key = tuple(names)
        if key not in cache:
            cache[key] = class_embeddings(self.bundle, class_prompts(names), model)
        return cache[key]


# model -> (its text-side state, {class names: embeddings}); an entry dies with its model
_SHARED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def _text_state(model: nn.Module) -> tuple:
    """Changes when a text-side parameter or buffer is replaced or modified in place (``_version``
    counts in-place writes, ``load_state_dict`` included). Writes through ``.data`` are not counted
    by torch: code that edits a text tower that way must build a new model (none here does)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return tuple((t.data_ptr(), t._version) for n, t in tensors if not n.startswith("visual."))


def _shared_cache(model: nn.Module) -> dict:
    state = _text_state(model)
    entry = _SHARED.get(model)
    if entry is None or entry[0] != state:
        entry = (state, {})
        _SHARED[model] = entry
    return entry[1]


def predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    return (image_emb @ class_emb.t()).argmax(-1)


def recognised(scores: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per row of ``scores`` (images × classes): is its label's score above the best other class's
    less ``margin``? (``margin`` > 0: a view still within it counts as recognised.)"""
    scores, labels = scores.cpu(), labels.cpu()
    own = scores.gather(1, labels[:, None])[:, 0]
    others = scores.scatter(1, labels[:, None], float("-inf")).max(1).values
    return own + margin > others


def column_accuracy(bundle: ClipBundle, column: Column, texts: TextCache,
                    model: nn.Module | None = None, image_emb: torch.Tensor | None = None,
                    margin: float = 0.0) -> float:
    """Zero-shot accuracy of ``column``. With ``margin`` > 0 (cosine similarity) an image also
    counts as recognised while its label's similarity is within ``margin`` of the best other class's
    — a stricter test of "forgotten" (0: the argmax)."""
    emb = image_emb if image_emb is not None else encode_images(bundle, column.views.images, model)
    class_emb = texts.classes(column.classes)
    if margin <= 0:
        return float((predict(emb, class_emb) == column.labels).float().mean())
    return float(recognised(emb @ class_emb.t(), column.labels, margin).float().mean())


def evaluate_columns(bundle: ClipBundle, columns: dict[str, Column], texts: TextCache,
                     model: nn.Module | None = None) -> dict[str, float]:
    return {name: column_accuracy(bundle, col, texts, model) for name, col in columns.items()}
