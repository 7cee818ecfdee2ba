"""``clipforget eval``: zero-shot quality of a model on a gallery's held-out augmented views."""
from __future__ import annotations

from collections import Counter
from math import comb

import torch

from ..data.augment import VIEWS, AugmentConfig
from ..data.gallery import Gallery
from ..data.prompts import STYLE_TEMPLATES, class_prompts, subgroup_prompts
from ..data.task import ViewCache
from ..embed import class_embeddings, encode_images
from ..models import ClipBundle
from .zeroshot import predict

DISTRIBUTIONS = {"held-out views": VIEWS, "training-distribution views": AugmentConfig()}


def evaluate_model(bundle: ClipBundle, gallery: Gallery, views: int = 2, cache: ViewCache | None = None,
                   distributions: tuple[str, ...] = tuple(DISTRIBUTIONS)) -> list[dict]:
    """Rows of {task, images, classes, top1 per view distribution, chance}. The held-out views
    (``VIEWS``) and the training distribution (stronger rotation, any background colour) are scored
    on the styles the model trains on (``distributions``: which of the two); clean images give the
    superclass and subgroup rows of those styles and, when the gallery has styles held out of
    training (``unseen_style``), the superclass row of those styles."""
    cache = cache or ViewCache(gallery)
    size = bundle.image_size
    hier = gallery.select(kind="hierarchy", unseen_style=False)
    unseen_hier = gallery.select(kind="hierarchy", unseen_style=True)
    scs, sgs, concepts = gallery.superclasses(), gallery.subgroups(), gallery.other_concepts()
    styles = [s for s in gallery.styles() if s not in gallery.unseen_styles()]   # a style row over trained styles
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

    def superclass_labels(items):
        return torch.tensor([scs.index(it.superclass) for it in items])

    for dist in distributions:
        aug = DISTRIBUTIONS[dist]
        hv = cache.views(hier, "test", views, size, aug)
        emb = encode_images(bundle, hv.images)
        add("superclass", dist, emb, "superclass", torch.tensor([scs.index(it.superclass) for it in hv.items]), len(scs))
        add("subgroup", dist, emb, "subgroup", torch.tensor([sgs.index(it.subgroup) for it in hv.items]), len(sgs))
        if "style" in texts:
            add("style", dist, emb, "style", torch.tensor([styles.index(it.style) for it in hv.items]), len(styles))
        if unseen_hier:
            uv = cache.views(unseen_hier, "test", views, size, aug)
            add("superclass, unseen styles", dist, encode_images(bundle, uv.images), "superclass",
                superclass_labels(uv.items), len(scs))
        for task, unseen in (("other concepts", False), ("unseen concepts", True)):
            items = gallery.select(kind="other", unseen=unseen, unseen_style=False) if concepts else []
            if items:
                ov = cache.views(items, "test", 1, size, aug)
                add(task, dist, encode_images(bundle, ov.images), "concept",
                    torch.tensor([concepts.index(it.concept) for it in ov.items]), len(concepts))
    # clean images: superclass and subgroup of the trained styles, superclass of the unseen styles
    clean = cache.views(hier, "test", 1, size, clean_first=True)
    c_emb = encode_images(bundle, clean.images)
    add("superclass, clean", "clean images", c_emb, "superclass", superclass_labels(clean.items), len(scs))
    add("subgroup, clean", "clean images", c_emb, "subgroup",
        torch.tensor([sgs.index(it.subgroup) for it in clean.items]), len(sgs))
    if unseen_hier:
        uc = cache.views(unseen_hier, "test", 1, size, clean_first=True)
        add("superclass, unseen styles", "clean images", encode_images(bundle, uc.images), "superclass",
            superclass_labels(uc.items), len(scs))
    # text -> image on clean images: does "a <subgroup>" retrieve its subgroup in the top 5?
    q = class_embeddings(bundle, class_prompts(sgs))
    top5 = (q @ c_emb.t()).topk(5, dim=1).indices
    hits = [any(clean.items[j].subgroup == sg for j in top5[i].tolist()) for i, sg in enumerate(sgs)]
    per_subgroup = Counter(it.subgroup for it in clean.items)
    rows["t2i"] = {"task": "text->image hit@5", "images": len(clean), "classes": len(sgs),
                   "chance": hit_chance([per_subgroup[sg] for sg in sgs], len(clean), 5),
                   "clean images": sum(hits) / len(hits)}
    return list(rows.values())


def hit_chance(sizes: list[int], n: int, k: int = 5) -> float:
    """The hit@k a retrieval that ranks at random would score: for a query whose subgroup has ``m``
    of the ``n`` images, a random k of them miss it all with probability C(n − m, k) / C(n, k);
    the mean over the queries (``sizes``: m per query) of 1 minus that."""
    if not sizes:
        return float("nan")
    k = min(k, n)
    return sum(1 - comb(n - m, k) / comb(n, k) for m in sizes) / len(sizes) if n else 0.0


def format_table(rows: list[dict]) -> str:
    cols = ["held-out views", "training-distribution views", "clean images"]
    lines = [f"{'task':26s} {'images':>7s} {'classes':>8s} {'held-out':>9s} {'train-aug':>9s} {'clean':>7s} "
             f"{'chance':>7s}"]
    for r in rows:
        vals = [f"{r[c]:{w}.3f}" if c in r else f"{'':{w}s}" for c, w in zip(cols, (9, 9, 7))]
        lines.append(f"{r['task']:26s} {r['images']:7d} {r['classes']:8d} {' '.join(vals)} {r['chance']:7.3f}")
    lines.append("held-out: held-out augmented views (rotation ±10°, scale 0.85–1.1, shift 8 %, white/light "
                 "background); train-aug: the training augmentation; clean: the images as rendered. Rows score "
                 "the styles the model trains on, except 'unseen styles' (styles never trained on)")
    return "\n".join(lines)
