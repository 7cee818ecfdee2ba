"""``clipforget eval``: zero-shot quality of a model on a gallery's held-out augmented views."""
from __future__ import annotations

import torch

from ..data.augment import VIEWS, AugmentConfig
from ..data.gallery import Gallery
from ..data.prompts import STYLE_TEMPLATES, class_prompts, subgroup_prompts
from ..data.task import ViewCache
from ..embed import class_embeddings, encode_images
from ..models import ClipBundle
from .zeroshot import predict

DISTRIBUTIONS = {"held-out views": VIEWS, "training-distribution views": AugmentConfig()}


def evaluate_model(bundle: ClipBundle, gallery: Gallery, views: int = 2, cache: ViewCache | None = None) -> list[dict]:
    """Rows of {task, images, classes, top1 per view distribution, chance}. Floors are checked on
    the held-out views (``VIEWS``); the training distribution (stronger rotation, any background
    colour) is reported beside them."""
    cache = cache or ViewCache(gallery)
    size = bundle.image_size
    hier = gallery.select(kind="hierarchy")
    scs, sgs, concepts, styles = gallery.superclasses(), gallery.subgroups(), gallery.other_concepts(), gallery.styles()
    sc_of = {it.subgroup: it.superclass for it in hier}
    texts = {"superclass": class_embeddings(bundle, class_prompts(scs)),
             "subgroup": class_embeddings(bundle, subgroup_prompts(sgs, sc_of))}
    if concepts:
        texts["concept"] = class_embeddings(bundle, class_prompts(concepts))
    if len(styles) > 1:
        texts["style"] = class_embeddings(bundle, class_prompts([gallery.style_phrase(s) for s in styles],
                                                                STYLE_TEMPLATES))
    rows: dict[str, dict] = {}

    def add(task, dist, emb, key, labels, n_classes):
        acc = float((predict(emb, texts[key]) == labels).float().mean())
        row = rows.setdefault(task, {"task": task, "images": len(labels), "classes": n_classes,
                                     "chance": 1 / n_classes})
        row[dist] = acc

    for dist, aug in DISTRIBUTIONS.items():
        hv = cache.views(hier, "test", views, size, aug)
        emb = encode_images(bundle, hv.images)
        add("superclass", dist, emb, "superclass", torch.tensor([scs.index(it.superclass) for it in hv.items]), len(scs))
        add("subgroup", dist, emb, "subgroup", torch.tensor([sgs.index(it.subgroup) for it in hv.items]), len(sgs))
        if "style" in texts:
            add("style", dist, emb, "style", torch.tensor([styles.index(it.style) for it in hv.items]), len(styles))
        for task, unseen in (("other concepts", False), ("unseen concepts", True)):
            items = gallery.select(kind="other", unseen=unseen) if concepts else []
            if items:
                ov = cache.views(items, "test", 1, size, aug)
                add(task, dist, encode_images(bundle, ov.images), "concept",
                    torch.tensor([concepts.index(it.concept) for it in ov.items]), len(concepts))
    # text -> image on clean images: does "a <subgroup>" retrieve its subgroup in the top 5?
    clean = cache.views(hier, "test", 1, size, clean_first=True)
    c_emb = encode_images(bundle, clean.images)
    q = class_embeddings(bundle, class_prompts(sgs))
    top5 = (q @ c_emb.t()).topk(5, dim=1).indices
    hits = [any(clean.items[j].subgroup == sg for j in top5[i].tolist()) for i, sg in enumerate(sgs)]
    rows["t2i"] = {"task": "text->image hit@5", "images": len(clean), "classes": len(sgs),
                   "chance": min(1.0, 5 * 5 / len(clean)), "clean images": sum(hits) / len(hits)}
    return list(rows.values())


def format_table(rows: list[dict]) -> str:
    cols = ["held-out views", "training-distribution views", "clean images"]
    lines = [f"{'task':20s} {'images':>7s} {'classes':>8s} {'held-out':>9s} {'train-aug':>9s} {'chance':>7s}"]
    for r in rows:
        vals = [f"{r[c]:9.3f}" if c in r else f"{'':9s}" for c in cols[:2]]
        if "clean images" in r:
            vals[0] = f"{r['clean images']:9.3f}"
        lines.append(f"{r['task']:20s} {r['images']:7d} {r['classes']:8d} {vals[0]} {vals[1]} {r['chance']:7.3f}")
    lines.append("held-out: held-out augmented views (rotation ±10°, scale 0.85–1.1, shift 8 %, white/light "
                 "background); train-aug: the training augmentation; text->image on clean images")
    return "\n".join(lines)
