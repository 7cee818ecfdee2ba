"""What the checks share: zero-shot accuracy over the superclass prompts, and the "rest kept"
check (a model that forgot everything would pass every other check)."""
from __future__ import annotations

import random

import torch
from torch import nn

from ..data.gallery import Gallery
from ..data.prompts import class_prompts
from ..data.task import ForgetRequest, ViewCache, ViewSet
from ..embed import class_embeddings, encode_images
from ..models import ClipBundle
from .config import CertifyConfig


def superclass_texts(bundle: ClipBundle, gallery: Gallery, models: dict[str, nn.Module],
                     edits_text: bool = False) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The superclass names and, per model, their class embeddings. ``edits_text``: the run's delta
    edits the text tower, so each model's embeddings come from its own text tower; otherwise every
    model shares the original text tower and one encoding."""
    scs = gallery.superclasses()
    prompts = class_prompts(scs)
    if not edits_text:
        emb = class_embeddings(bundle, prompts)
        return scs, {which: emb for which in models}
    return scs, {which: class_embeddings(bundle, prompts, model) for which, model in models.items()}


@torch.no_grad()
def accuracy(bundle: ClipBundle, model: nn.Module, views: ViewSet, label: int | torch.Tensor,
              class_emb: torch.Tensor) -> float:
    """Zero-shot accuracy of ``views`` for one label or a label per view."""
    emb = encode_images(bundle, views.images, model)
    return float(((emb @ class_emb.t()).argmax(-1) == label).float().mean())


def kept_check(bundle: ClipBundle, models: dict[str, nn.Module], gallery: Gallery, cache: ViewCache,
          req: ForgetRequest, superclasses: list[str], sc_embs: dict[str, torch.Tensor], cfg: CertifyConfig) -> dict:
    """Zero-shot accuracy on held-out views of other superclasses' images, before and after: the
    certificate is about forgetting one thing, so it also checks the rest was not forgotten too."""
    pool = [it for it in gallery.select(kind="hierarchy") if it.superclass != req.superclass]
    if not pool:
        return {"images": 0, "before": None, "after": None}
    items = sorted(random.Random(cfg.seed).sample(pool, min(cfg.kept_images, len(pool))), key=pool.index)
    views = cache.views(items, "test", 1, bundle.image_size)
    labels = torch.tensor([superclasses.index(it.superclass) for it in views.items])
    return {"images": len(views), **{side(w): accuracy(bundle, m, views, labels, sc_embs[w]) for w, m in models.items()}}


def side(which: str) -> str:
    return "before" if which == "original" else "after"
