"""Retrieval leakage: recall@k of the forgotten images for the coarse label, the subgroup name and
paraphrases, with the original and the unlearned model."""
from __future__ import annotations

import random
from typing import Iterable

import torch
from torch import nn

from ..data.gallery import Gallery, Item, display
from ..data.prompts import article
from ..data.task import ForgetRequest
from ..embed import encode_images, encode_texts
from ..models import ClipBundle
from ..train.loop import Callback, emit
from .config import CertifyConfig
from .zeroshot import side


def retrieval_queries(req: ForgetRequest, gallery: Gallery, paraphrases: Iterable[str]) -> list[tuple[str, str]]:
    """(kind, query): the coarse label, the subgroup name and paraphrases of both."""
    sc = display(req.superclass)
    names = [("coarse", sc)] + ([("subgroup", display(req.subgroup))] if req.subgroup else [])
    bases = [(kind, f"{article(name)} {name}") for kind, name in names]
    out = []
    if req.style:                  # the style's own phrase first: "a black and white line drawing of a car"
        phrase = gallery.style_phrase(req.style)
        out += [(kind, f"{article(phrase)} {phrase} of {q}") for kind, q in bases]
    for (kind, name), base in zip(names, bases):
        out.append(base)
        out += [(f"{kind} paraphrase", t.format(name)) for t in paraphrases]
    if req.subgroup:
        x = display(req.subgroup)
        out.append(("subgroup", f"{article(x)} {x}, a kind of {sc}"))
    seen, uniq = set(), []
    for k, q in out:
        q = _fix_article(q)
        if q not in seen:
            seen.add(q)
            uniq.append((k, q))
    return uniq


def _fix_article(text: str) -> str:
    """'a picture of a owl' -> 'a picture of an owl' (templates are filled blindly)."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = article(words[i + 1])
    return " ".join(words)


def retrieval_check(bundle: ClipBundle, models: dict[str, nn.Module], gallery: Gallery, req: ForgetRequest,
               forget_items: list[Item], cfg: CertifyConfig, callbacks: list[Callback], edits_text: bool = False,
                    chunk: int = 512) -> dict:
    """Recall of the forget images among the top k of each query, per model. ``edits_text``: the
    run edits the text tower, so the unlearned model embeds the queries with its own."""
    rc = cfg.retrieval
    forget_paths = {it.path for it in forget_items}
    near = [it for it in gallery.items if it.superclass == req.superclass or it.path in forget_paths]
    rest = [it for it in gallery.items if it.superclass != req.superclass and it.path not in forget_paths]
    if rc.pool is not None and len(rest) > rc.pool:
        rest = sorted(random.Random(cfg.seed).sample(rest, rc.pool), key=rest.index)
    pool = near + rest
    relevant = torch.tensor([it.path in forget_paths for it in pool])
    queries = retrieval_queries(req, gallery, rc.paraphrases)
    texts = [q for _, q in queries]
    q_original = encode_texts(bundle, texts)
    q_embs = {which: encode_texts(bundle, texts, model) if edits_text and which != "original" else q_original
              for which, model in models.items()}
    k = min(rc.k, len(pool))
    rows = [{"kind": kind, "query": q} for kind, q in queries]
    parts = [pool[i:i + chunk] for i in range(0, len(pool), chunk)]
    embs: dict[str, list[torch.Tensor]] = {w: [] for w in models}
    for i, part in enumerate(parts):      # in chunks: bounded memory, and a cancel is seen between them
        emit(callbacks, stage="certify: retrieval", step=i, total=len(parts), fraction=i / len(parts))
        images, _ = gallery.load(part, bundle.image_size)
        for which, model in models.items():
            embs[which].append(encode_images(bundle, images, model))
    for which in models:
        emb = torch.cat(embs[which])
        top = (q_embs[which] @ emb.t()).topk(k, dim=1).indices
        for row, idx in zip(rows, top):
            row[side(which)] = float(relevant[idx].sum()) / float(relevant.sum())
    return {"k": k, "pool": len(pool), "relevant": int(relevant.sum()), "queries": rows}
