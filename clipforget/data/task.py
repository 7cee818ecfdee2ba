"""Forget requests and their deterministic data splits.

A :class:`ForgetRequest` names what to forget: a subgroup of a superclass (*poodle* of *dog*), a
style within a superclass (line-art *car*s), or a subgroup in one style. :func:`build_task` turns it
into images: the forget set D_f, the retain set D_r (sibling subgroups by default), a calibration
set D_m, and test sets for every column of the report. D_f, D_m and the tests are disjoint sets of
gallery images (files) — on the embedded gallery, disjoint drawing styles of a subgroup — so every
figure about forgetting is measured on images the method never saw; the same holds for the retain
side and the other columns. Every image is an augmented *view* of a gallery image defined by
(image path, split, view index), so the same request always gives the same pixels.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from .augment import CLEAN, STYLE_VIEWS, VIEWS, AugmentConfig, AugmentDraw, apply, draw
from .gallery import Gallery, Item, display
from .prompts import class_prompts, coarse_prompt, fill
from .request import (ClassRequest, FileSplit, ForgetRequest, NoSuchFold, SplitConfig, file_order,  # noqa: F401
                      pool_warning, resolve, split_forget, split_groups, split_pool)          # also this module's API

log = logging.getLogger(__name__)

SPLIT_OFFSETS = {"train": 1_000_000, "calib": 2_000_000, "test": 3_000_000}
# views are transformed in batches of at most this many output pixels (64 px: 64 images; 224 px: 5): the
# transform's float intermediates are at the source size, so a larger batch only raises the peak memory
# (2 ** 22: a 135 MB higher peak while building a default task, at the same speed)
VIEW_BATCH_PIXELS = 2 ** 18


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
    calib: dict[str, Column]           # D_m, split into columns (files disjoint from D_f, D_r and test)
    test: dict[str, Column]            # held-out columns: the report and the Score
    trained: dict[str, Column] = field(default_factory=dict)   # trained-on files (forget_examples), outside the Score
    warnings: list[str] = field(default_factory=list)
    split: SplitConfig | None = None   # the split it was built with: with the request and the gallery, it
                                       # rebuilds every column's images (run.json records it)
    replay_items: list[Item] = field(default_factory=list)   # files no column reads (:func:`replay_items`)
    views_of: Callable[[list[Item]], ViewSet] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def replay(self) -> ViewSet:
        """One training view of each replay file, made the first time it is asked for (remind's
        replay is the only reader, so a run without it never loads them)."""
        if not self.replay_items or self.views_of is None:
            return ViewSet(torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8), [])
        return self.views_of(self.replay_items)

    def files(self) -> set[str]:
        """Paths of every file the task trains on, calibrates on or tests on (replay excluded)."""
        sets = [self.forget, self.retain] + [c.views for c in (*self.calib.values(), *self.test.values(),
                                                               *self.trained.values())]
        return {it.path for v in sets for it in v.items}

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
            # one batched transform per sub-batch of at most VIEW_BATCH_PIXELS output pixels, each
            # view with its own generator (seeded by path, split, k)
            per = max(1, VIEW_BATCH_PIXELS // (size * size))
            for sub in range(0, len(chunk), per):
                part = chunk[sub:sub + per]
                ims = torch.stack([sources[it.path][0] for it in part])
                masks = torch.stack([sources[it.path][1] for it in part]).float() / 255
                for k in range(n):
                    cfg = CLEAN if (clean_first and k == 0) else aug
                    d = AugmentDraw.cat([draw(1, torch.Generator().manual_seed(view_seed(it.path, split, k)), cfg)
                                         for it in part])
                    row = k * len(items) + start + sub
                    out[row:row + len(part)] = (apply(ims, masks, size, d) * 255).round()
        return ViewSet(out, [it for _ in range(n) for it in items])


def view_seed(path: str, split: str, k: int) -> int:
    h = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16)
    return (h + SPLIT_OFFSETS[split] + k * 7919) % (2**63)


class ColumnBuilder:
    """Columns of a task: views of a list of images, labelled by superclass or by concept."""

    def __init__(self, gallery: Gallery, image_size: int, cache: ViewCache, progress: Callable[[dict], None] | None = None):
        self.gallery, self.image_size, self.cache = gallery, image_size, cache
        self.superclasses = gallery.superclasses()
        self.concepts = gallery.other_concepts()
        self._sc = {s: i for i, s in enumerate(self.superclasses)}
        self._c = {c: i for i, c in enumerate(self.concepts)}
        self.progress, self.done, self.total = progress, 0, 0    # view sets built / to build ("data" stage)

    def views(self, items: list[Item], split: str, n: int, aug: AugmentConfig = VIEWS) -> ViewSet:
        v = self.cache.views(items, split, n, self.image_size, aug)
        self.done += 1
        if self.progress is not None:
            self.progress({"stage": "data", "step": self.done, "total": max(self.total, self.done),
                           "fraction": self.done / max(self.total, self.done)})
        return v

    def shared_plan(self, others: list[Item], cfg: SplitConfig, exclude, used: set[str] = frozenset()) -> dict:
        """The items of the shared columns (other superclasses, other concepts, unseen styles),
        chosen before any view is made so that a task knows how many view sets it builds. ``used``:
        paths of the files the task trains on or holds out for its own columns — none of them goes
        into a shared column (a gallery may list one file twice, e.g. as a subgroup's and as an
        other concept). ``plan["warnings"]``: the columns the Score loses for want of files (a
        small column is only logged)."""
        concepts = [it for it in self.gallery.select(kind="other", unseen=False, unseen_style=False)
                    if it.path not in used]
        plan = {"other_superclasses": (self.superclass, split_pool(others, cfg.calib_other_images,
                                                                    cfg.max_other_images, cfg.seed)),
                "other_concepts": (self.concept, split_pool(concepts, cfg.calib_concept_images,
                                                            cfg.max_other_images, cfg.seed)),
                "unseen_styles": split_pool([it for it in self.gallery.select(kind="hierarchy", unseen_style=True)
                                             if not exclude(it) and it.path not in used],
                                            0, cfg.max_other_images, cfg.seed).test,
                "warnings": []}
        for name, pool, n_calib, knob in (("other_superclasses", others, cfg.calib_other_images, "calib_other_images"),
                                          ("other_concepts", concepts, cfg.calib_concept_images,
                                           "calib_concept_images")):
            warning = pool_warning(name, pool, n_calib, knob, plan[name][1])
            if warning is not None:
                log.warning(warning[0])
                if warning[1]:
                    plan["warnings"].append(warning[0])
        return plan

    @staticmethod
    def shared_count(plan: dict) -> int:
        """View sets :meth:`shared_columns` builds for ``plan``."""
        pools = [plan[name][1] for name in ("other_superclasses", "other_concepts")]
        return sum(bool(pool.test) + bool(pool.calib) for pool in pools) + bool(plan["unseen_styles"])

    def superclass(self, name: str, items: list[Item], split: str, n: int) -> Column:
        v = self.views(items, split, n)
        return Column(name, v, self.superclasses, torch.tensor([self._sc[it.superclass] for it in v.items], dtype=torch.long))

    def concept(self, name: str, items: list[Item], split: str, n: int) -> Column:
        v = self.views(items, split, n)
        return Column(name, v, self.concepts, torch.tensor([self._c[it.concept] for it in v.items], dtype=torch.long),
                      "concept")

    def shared_columns(self, calib: dict, test: dict, plan: dict) -> None:
        """Other superclasses, other concepts and unseen styles (:meth:`shared_plan`): D_m and test
        disjoint by file."""
        for name in ("other_superclasses", "other_concepts"):
            column, pool = plan[name]
            if pool.test:
                test[name] = column(name, pool.test, "test", 1)
            if pool.calib:
                calib[name] = column(name, pool.calib, "calib", 1)
        if plan["unseen_styles"]:   # the analogue of the paper's zero-shot datasets: drawing styles the model never trained on
            test["unseen_styles"] = self.superclass("unseen_styles", plan["unseen_styles"], "test", 1)


def build_task(gallery: Gallery, request: ForgetRequest, image_size: int, cfg: SplitConfig = SplitConfig(),
               cache: ViewCache | None = None, progress: Callable[[dict], None] | None = None,
               exclude: frozenset[str] = frozenset()) -> Task:
    """The request's images as disjoint files: forget examples D_f, retain training images D_r, the
    calibration set D_m and the test columns (held out from both). ``forget_examples`` — the files
    D_f is made of, seen through test augmentations — is reported apart, outside the Score.
    ``progress`` gets a "data" event after each set of views (step / total view sets). ``exclude``:
    paths no shared column (other superclasses, other concepts, unseen styles) nor the replay files
    may take — another merged request's subgroup (:func:`request_files`)."""
    cache = cache or ViewCache(gallery)
    forget_items, retain_items, retain_names, warnings = resolve(gallery, request)
    for w in warnings:
        log.warning(w)
    r = request
    cols = ColumnBuilder(gallery, image_size, cache, progress)
    forget = split_forget(forget_items, cfg, r.label, r.examples)
    retain = split_groups(retain_items, cfg)
    used = {it.path for it in forget_items} | {it.path for it in retain_items} | exclude
    others = [it for it in gallery.select(kind="hierarchy", unseen_style=False)
              if it.superclass != r.superclass and it.path not in used]

    def requested(it: Item) -> bool:
        return it.superclass == r.superclass and r.subgroup in (None, it.subgroup) and r.style in (None, it.style)

    main = [it for it in retain.test if not (r.subgroup and it.subgroup == r.subgroup)]
    same_sub = [it for it in retain.test if r.subgroup and it.subgroup == r.subgroup]
    plan = cols.shared_plan(others, cfg, requested, used)
    warnings = [*warnings, *plan["warnings"]]
    # target test + calib, forget_examples, D_f, D_r; the retain columns; the shared ones
    cols.total = 5 + bool(main) + bool(same_sub) + bool(retain.calib) + cols.shared_count(plan)
    test = {"target": cols.superclass("target", forget.test, "test", cfg.test_views)}
    calib = {"target": cols.superclass("target", forget.calib, "calib", cfg.calib_target_views)}
    if main:
        test["retain"] = cols.superclass("retain", main, "test", cfg.test_views)
    if same_sub:
        test["other_styles"] = cols.superclass("other_styles", same_sub, "test", cfg.test_views)
    if retain.calib:
        calib["retain"] = cols.superclass("retain", retain.calib, "calib", cfg.calib_views)
    cols.shared_columns(calib, test, plan)
    trained = {"forget_examples": cols.superclass("forget_examples", forget.train, "test", cfg.test_views)}
    return with_replay(Task(request, gallery, image_size, cols.superclasses,
                            forget=cols.views(forget.train, "train", cfg.forget_views,
                                              STYLE_VIEWS if cfg.style_views else VIEWS),
                            retain=cols.views(retain.train, "train", cfg.train_views),
                            retain_subgroups=retain_names, calib=calib, test=test, trained=trained,
                            warnings=warnings, split=cfg), cols, cfg, exclude)


def replay_items(gallery: Gallery, superclass: str, used: set[str], cfg: SplitConfig) -> list[Item]:
    """A seeded sample of ``cfg.replay_images`` gallery files that no column of a task reads [recon]:
    not in ``used`` (every file the task trains, calibrates or tests on), outside the request's
    superclass (never another picture of what is forgotten) and in a style the model trained on (the
    unseen-styles column keeps its meaning). On the embedded gallery these are the other-pool concepts
    held out from the embedded model's training; a gallery with no such files has none."""
    if not cfg.replay_images:
        return []
    pool = [it for it in gallery.items if it.path not in used and it.superclass != superclass
            and not it.unseen_style]
    return file_order(pool, cfg.seed)[:cfg.replay_images]


def with_replay(task: Task, cols: "ColumnBuilder", cfg: SplitConfig, exclude: frozenset[str] = frozenset()) -> Task:
    task.replay_items = replay_items(task.gallery, task.request.superclass, task.files() | exclude, cfg)
    task.views_of = lambda items: cols.cache.views(items, "train", 1, cols.image_size)
    return task


def build_class_task(gallery: Gallery, request: ClassRequest, image_size: int, cfg: SplitConfig = SplitConfig(),
                     cache: ViewCache | None = None, retain_per_superclass: int = 4,
                     exclude: frozenset[str] = frozenset()) -> Task:
    """Forget a whole superclass (CCUP's setting). D_f: the superclass's images, split by file within
    each subgroup like a retain set; D_r: a few images of every other superclass (with their own
    texts; the "similar" data a user would keep); columns target / other superclasses / other
    concepts / unseen styles as :func:`build_task` builds them (``exclude`` as there, D_r too)."""
    cache = cache or ViewCache(gallery)
    gallery.check(superclass=request.superclass)
    cols = ColumnBuilder(gallery, image_size, cache)
    forget_items = gallery.select(superclass=request.superclass, kind="hierarchy", unseen_style=False)
    forget = split_groups(forget_items, cfg)
    if not forget.test:
        raise ValueError(f"{request.label}: every subgroup has a single image, so none can be held out for the "
                         "test; add images")
    if not forget.calib:     # restore would pick α on an empty target column (accuracy NaN): α = 0, silently
        raise ValueError(f"{request.label}: no subgroup has a file left for the calibration set D_m (each keeps one "
                         f"for training and holds out up to split.test_images = {cfg.test_images} for the test "
                         "first), so restore has no held-out target to calibrate on; add images so that some "
                         f"subgroup has at least {cfg.test_images + 2} files, or lower split.test_images")
    retain = []
    for s in cols.superclasses:
        if s != request.superclass:
            retain += file_order([it for it in gallery.select(superclass=s, kind="hierarchy", unseen_style=False)
                                  if it.path not in exclude], cfg.seed)[:retain_per_superclass]
    retain_paths = {it.path for it in retain} | exclude
    others = [it for it in gallery.select(kind="hierarchy", unseen_style=False)
              if it.superclass != request.superclass and it.path not in retain_paths]
    test = {"target": cols.superclass("target", forget.test, "test", 1)}
    calib = {"target": cols.superclass("target", forget.calib, "calib", 1)}
    plan = cols.shared_plan(others, cfg, lambda it: it.superclass == request.superclass,
                            {it.path for it in forget_items} | retain_paths)
    cols.shared_columns(calib, test, plan)
    trained = {"forget_examples": cols.superclass("forget_examples", forget.train, "test", 1)}
    train_views = max(1, cfg.train_views // 4)     # the forget set is a whole class: fewer views each
    return with_replay(Task(request, gallery, image_size, cols.superclasses,    # type: ignore[arg-type]
                            forget=cols.views(forget.train, "train", train_views),
                            retain=cols.views(retain, "train", cfg.train_views),
                            retain_subgroups=[], calib=calib, test=test, trained=trained,
                            warnings=plan["warnings"], split=cfg), cols, cfg, exclude)


def request_files(gallery: Gallery, request: ForgetRequest | ClassRequest) -> frozenset[str]:
    """Every file of what ``request`` asks to forget (its subgroup, style or superclass; unseen styles too)."""
    return frozenset(it.path for it in gallery.select(superclass=request.superclass,
                                                      subgroup=getattr(request, "subgroup", None),
                                                      style=getattr(request, "style", None)))


def superclass_prompts(superclasses: list[str]) -> list[list[str]]:
    return class_prompts(superclasses)
