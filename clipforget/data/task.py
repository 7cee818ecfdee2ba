"""Forget requests and their deterministic data splits.

A :class:`ForgetRequest` names what to forget: a subgroup of a superclass (*poodle* of *dog*), a
style within a superclass (line-art *car*s), or a subgroup in one style. :func:`build_task` turns it
into images: the forget set D_f, the retain set D_r (sibling subgroups by default), a calibration
set D_m, and test sets for every column of the report. Every image is an augmented *view* of a
gallery image defined by (image path, split, view index), so splits never share a view and the
same request always gives the same pixels.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .augment import CLEAN, VIEWS, AugmentConfig, augment
from .gallery import Gallery, Item, display
from .prompts import class_prompts, coarse_prompt, fill
from .request import ForgetRequest, SplitConfig, resolve  # noqa: F401 - also this module's API

log = logging.getLogger(__name__)

SPLIT_OFFSETS = {"train": 1_000_000, "calib": 2_000_000, "test": 3_000_000}


@dataclass
class ViewSet:
    """Augmented views (uint8, N x 3 x S x S) and the gallery item each came from."""
    images: torch.Tensor
    items: list[Item]

    def __len__(self) -> int:
        return len(self.items)

    def __add__(self, other: "ViewSet") -> "ViewSet":
        return ViewSet(torch.cat([self.images, other.images]), self.items + other.items)

    def subset(self, idx) -> "ViewSet":
        idx = list(idx)
        return ViewSet(self.images[idx], [self.items[i] for i in idx])


@dataclass
class Column:
    """One column of the report: test images, the classes they are classified among, labels."""
    name: str
    views: ViewSet
    classes: list[str]                 # class names (prompts made by class_prompts)
    labels: torch.Tensor               # index into classes per image
    kind: str = "superclass"           # superclass | concept


@dataclass
class Task:
    request: ForgetRequest
    gallery: Gallery
    image_size: int
    superclasses: list[str]
    forget: ViewSet                    # D_f (training views)
    retain: ViewSet                    # D_r (training views)
    retain_subgroups: list[str]
    calib: dict[str, Column]           # D_m, split into columns
    test: dict[str, Column]
    warnings: list[str] = field(default_factory=list)

    @property
    def coarse_text(self) -> str:
        return coarse_prompt(self.request.superclass)

    @property
    def target_index(self) -> int:
        return self.superclasses.index(self.request.superclass)

    def caption(self, item: Item) -> str:
        """The text paired with a retain image in the CLIP loss: its own subgroup."""
        return fill("a {}", display(item.concept))

    def superclass_labels(self, views: ViewSet) -> torch.Tensor:
        return torch.tensor([self.superclasses.index(it.superclass) for it in views.items])


class ViewCache:
    """Loaded gallery pixels per path (at most one entry per gallery image), and the view sets made
    from them, least recently used dropped beyond ``max_view_bytes`` — shared by the tasks built
    on one gallery (an app runs many jobs on one cache)."""

    def __init__(self, gallery: Gallery, source_size: int = 96, max_view_bytes: int = 256 * 2**20,
                 keep_sources: bool = True):
        if max_view_bytes < 0:
            raise ValueError(f"max_view_bytes must be >= 0, got {max_view_bytes}")
        self.gallery = gallery
        self.source_size = source_size
        self.max_view_bytes = max_view_bytes
        # False: decode the images again for each new view set instead of keeping every gallery image's
        # pixels (~37 KB an image at 96 px) for the cache's lifetime: an app trades a few seconds per
        # job for that memory
        self.keep_sources = keep_sources
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._views: OrderedDict[tuple, ViewSet] = OrderedDict()
        self._view_bytes = 0

    @property
    def view_bytes(self) -> int:
        """Bytes of the view sets held by the cache (the tasks using them may hold more)."""
        return self._view_bytes

    def _sources(self, items: list[Item]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Pixels and uint8 mask of each item (kept in the cache when ``keep_sources``)."""
        out = self._cache if self.keep_sources else {}
        todo = [it for it in dict.fromkeys(items) if it.path not in self._cache]
        for i in range(0, len(todo), 256):      # in chunks: a whole column's float masks at once is ~140 MB
            chunk = todo[i:i + 256]
            imgs, masks = self.gallery.load(chunk, self.source_size)
            # masks are bilinear resizes of 0/1 masks in uint8 steps (/255): kept as uint8, exactly
            masks = (masks * 255).round().to(torch.uint8)
            for it, im, m in zip(chunk, imgs, masks):
                out[it.path] = (im, m)
        return out

    def views(self, items: list[Item], split: str, n: int, size: int, aug: AugmentConfig = VIEWS,
              clean_first: bool = False) -> ViewSet:
        """``n`` views per item; view k of an item is seeded by (path, split, k) alone. Memoised:
        the same request returns the same ViewSet object."""
        if not items:
            return ViewSet(torch.zeros(0, 3, size, size, dtype=torch.uint8), [])
        key = (tuple(it.path for it in items), split, n, size, aug, clean_first)
        hit = self._views.get(key)
        if hit is not None:
            self._views.move_to_end(key)
            return hit
        hit = self._views[key] = self._make_views(items, split, n, size, aug, clean_first)
        self._view_bytes += hit.images.nbytes
        while self._view_bytes > self.max_view_bytes and len(self._views) > 1:
            _, old = self._views.popitem(last=False)
            self._view_bytes -= old.images.nbytes
        return hit

    def _make_views(self, items, split, n, size, aug, clean_first) -> ViewSet:
        # view k of item i goes to row k·len(items) + i; one view at a time to uint8 (the float views
        # of a whole set never exist at once), the sources 256 items at a time
        out = torch.empty(n * len(items), 3, size, size, dtype=torch.uint8)
        for start in range(0, len(items), 256):
            chunk = items[start:start + 256]
            sources = self._sources(chunk)
            for i, it in enumerate(chunk, start):
                im, m = sources[it.path]
                for k in range(n):
                    g = torch.Generator().manual_seed(view_seed(it.path, split, k))
                    cfg = CLEAN if (clean_first and k == 0) else aug
                    out[k * len(items) + i] = (augment(im[None], m[None].float() / 255, size, g, cfg)[0] * 255).round()
        return ViewSet(out, [it for _ in range(n) for it in items])


def view_seed(path: str, split: str, k: int) -> int:
    h = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16)
    return (h + SPLIT_OFFSETS[split] + k * 7919) % (2**63)


def build_task(gallery: Gallery, request: ForgetRequest, image_size: int, cfg: SplitConfig = SplitConfig(),
               cache: ViewCache | None = None) -> Task:
    cache = cache or ViewCache(gallery)
    forget_items, retain_items, retain_names, warnings = resolve(gallery, request)
    for w in warnings:
        log.warning(w)
    r = request
    rng = random.Random(cfg.seed)
    superclasses = gallery.superclasses()
    sc_index = {s: i for i, s in enumerate(superclasses)}
    forget_paths = {it.path for it in forget_items}
    retain_paths = {it.path for it in retain_items}

    def sc_column(name, items, split, n):
        v = cache.views(items, split, n, image_size)
        return Column(name, v, superclasses, torch.tensor([sc_index[it.superclass] for it in v.items]))

    others = [it for it in gallery.select(kind="hierarchy") if it.superclass != r.superclass
              and it.path not in forget_paths and it.path not in retain_paths]
    concepts_all = gallery.other_concepts()
    concept_items = gallery.select(kind="other", unseen=False)
    c_index = {c: i for i, c in enumerate(concepts_all)}

    def concept_column(name, items, split, n):
        v = cache.views(items, split, n, image_size)
        return Column(name, v, concepts_all, torch.tensor([c_index[it.concept] for it in v.items]), "concept")

    def cap(items, k):
        return items if k is None or len(items) <= k else sorted(rng.sample(items, k), key=items.index)

    test = {"target": sc_column("target", forget_items, "test", cfg.test_views)}
    if retain_items:
        main_retain = [it for it in retain_items if not (r.subgroup and it.subgroup == r.subgroup)]
        same_sub = [it for it in retain_items if r.subgroup and it.subgroup == r.subgroup]
        if main_retain:
            test["retain"] = sc_column("retain", main_retain, "test", cfg.test_views)
        if same_sub:
            test["other_styles"] = sc_column("other_styles", same_sub, "test", cfg.test_views)
    test["other_superclasses"] = sc_column("other_superclasses", cap(others, cfg.max_other_images), "test", 1)
    if concept_items:
        test["other_concepts"] = concept_column("other_concepts", cap(concept_items, cfg.max_other_images), "test", 1)

    calib = {"target": sc_column("target", forget_items, "calib", cfg.calib_target_views)}
    if retain_items:
        calib["retain"] = sc_column("retain", retain_items, "calib", cfg.calib_views)
    calib["other_superclasses"] = sc_column("other_superclasses", cap(others, cfg.calib_other_images), "calib", 1)
    if concept_items:
        calib["other_concepts"] = concept_column("other_concepts", cap(concept_items, cfg.calib_concept_images),
                                                 "calib", 1)
    return Task(request, gallery, image_size, superclasses,
                forget=cache.views(forget_items, "train", cfg.forget_views, image_size),
                retain=cache.views(retain_items, "train", cfg.train_views, image_size),
                retain_subgroups=retain_names, calib=calib, test=test, warnings=warnings)


def superclass_prompts(superclasses: list[str]) -> list[list[str]]:
    return class_prompts(superclasses)
