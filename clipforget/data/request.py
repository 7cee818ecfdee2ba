"""What a forget request names and which gallery images it selects: no pixels and no torch here (the
app's page uses these before the model stack is imported). :mod:`clipforget.data.task` turns a
request into image splits.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from .gallery import Gallery, Item, display


@dataclass(frozen=True)
class ForgetRequest:
    superclass: str
    subgroup: str | None = None          # None: every subgroup of the superclass (a style request)
    style: str | None = None             # None: every style
    retain: tuple[str, ...] | None = None  # retain subgroups; None: the siblings
    examples: tuple[str, ...] | None = None  # which forget images the method may use: style names, or image
                                             # paths relative to the gallery root; the rest are held out.
                                             # None: a seeded choice (SplitConfig)

    def __post_init__(self):
        if not self.superclass:
            raise ValueError("superclass is required")
        if self.subgroup is None and self.style is None:
            raise ValueError("name a subgroup, a style, or both: forgetting a whole superclass is "
                             "not a subgroup request")
        for name in ("retain", "examples"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def label(self) -> str:
        what = display(self.subgroup) if self.subgroup else display(self.superclass)
        return f"{what} ({self.style})" if self.style else what

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ForgetRequest":
        return cls(d["superclass"], d.get("subgroup"), d.get("style"),
                   tuple(d["retain"]) if d.get("retain") is not None else None,
                   tuple(d["examples"]) if d.get("examples") is not None else None)


@dataclass(frozen=True)
class ClassRequest:
    """Forget a whole superclass (CCUP's setting). ForgetRequest refuses it on purpose — it is not a
    subgroup request — so :func:`clipforget.data.task.build_class_task` builds its task."""
    superclass: str
    subgroup: None = None
    style: None = None
    retain: None = None
    examples: None = None

    @property
    def label(self) -> str:
        return f"every {display(self.superclass)}"

    def to_dict(self) -> dict:
        return {"superclass": self.superclass, "subgroup": None, "style": None, "retain": None, "whole_class": True}


@dataclass
class SplitConfig:
    train_views: int = 12       # augmented views per retain image used for training
    forget_views: int = 32      # augmented views per forget image used for training (the forget set is small)
    calib_views: int = 2        # views per image in the calibration set D_m
    calib_target_views: int = 8  # views per forget image in D_m (the forget set has few images)
    test_views: int = 4         # views per image in the test columns
    calib_other_images: int = 120   # other-superclass images in D_m
    calib_concept_images: int = 120  # other-concept images in D_m
    max_other_images: int | None = None  # cap on test images of each other column, unseen styles too (None: all)
    test_images: int = 3        # held-out images (files) of the forget set, and of each retain subgroup, in the tests
    calib_images: int = 2       # held-out images of the forget set / each retain subgroup in D_m (none shared with test)
    fold: int = 0               # k-fold rotation: fold f holds out the next test_images files (fold 0 .. k-1)
    style_views: bool = False   # drawing-style changes (greyscale, colour swaps, line drawings) in the forget
                                # examples' training views (augment.STYLE_VIEWS) [recon]
    replay_images: int = 128    # gallery files no column reads (outside the request's superclass, in a trained
                                # style), one view each, that remind may replay (task.replay) [recon]; 0: none
    seed: int = 0

    def __post_init__(self):
        for name in ("train_views", "forget_views", "calib_views", "calib_target_views", "test_views",
                     "test_images", "calib_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fold < 0:
            raise ValueError(f"fold must be >= 0, got {self.fold}")
        if self.replay_images < 0:
            raise ValueError(f"replay_images must be >= 0, got {self.replay_images}")

    @property
    def min_forget_images(self) -> int:
        """Images a forget set needs: its held-out test and calibration images and one example."""
        return self.test_images + self.calib_images + 1


def resolve(gallery: Gallery, request: ForgetRequest) -> tuple[list[Item], list[Item], list[str], list[str]]:
    """forget items, retain items, retain subgroup names, warnings."""
    r = request
    gallery.check(superclass=r.superclass, subgroup=r.subgroup, style=r.style)
    warnings = []
    # images in the styles held out of the embedded model's training belong to the unseen-styles column only
    forget = gallery.select(superclass=r.superclass, subgroup=r.subgroup, style=r.style, unseen_style=False)
    if not forget:
        raise ValueError(f"no images for {r.label}: the gallery has no {r.subgroup or r.superclass!r} "
                         f"in style {r.style!r}; pick another style or subgroup")
    siblings = [s for s in gallery.subgroups(r.superclass) if s != r.subgroup] if r.subgroup else \
        gallery.subgroups(r.superclass)
    names = list(r.retain) if r.retain is not None else siblings
    for n in names:
        gallery.check(superclass=r.superclass if r.retain is None else None, subgroup=n)
    if r.subgroup and r.subgroup in names and r.style is None:
        raise ValueError(f"retain set contains the forget subgroup {r.subgroup!r}; remove it")
    forget_paths = {it.path for it in forget}
    retain = [it for n in names for it in gallery.select(subgroup=n, unseen_style=False) if it.path not in forget_paths]
    if r.style and r.subgroup:
        # a subgroup in one style: the same subgroup in the other styles is kept too
        retain += [it for it in gallery.select(subgroup=r.subgroup, exclude_style=r.style, unseen_style=False)
                   if it.path not in {x.path for x in retain}]
    if not retain:
        warnings.append(f"nothing to retain for {r.label}: the superclass {r.superclass!r} has no other "
                        "subgroup or style; only the other columns guard against over-forgetting")
    return forget, retain, names, warnings


# ---- which files go where: the held-out protocol (no pixels, no torch) ------------------------------

@dataclass
class FileSplit:
    """Disjoint sets of gallery images (files): what a method trains on, D_m, and the tests."""
    train: list[Item]
    calib: list[Item]
    test: list[Item]


def file_order(items: list[Item], seed: int) -> list[Item]:
    """A seeded order of ``items`` that depends on their paths only (not on gallery order)."""
    return sorted(items, key=lambda it: hashlib.sha256(f"{seed}|{it.path}".encode()).hexdigest())


def rotate(items: list, by: int) -> list:
    by %= max(1, len(items))
    return items[by:] + items[:by]


class NoSuchFold(ValueError):
    """A fold past the last one a forget set has (``fold · test_images`` ≥ its files): the sweep
    records the run as skipped instead of counting another fold's files twice."""


def fold_count(n: int, test_images: int) -> int:
    """Folds a pool of ``n`` files has at ``test_images`` held-out test files a fold: ceil(n / t)."""
    return -(-n // test_images)


def _check_fold(pool: list[Item], cfg: SplitConfig, label: str, what: str = "") -> None:
    """Folds must not wrap: fold f holds out files f·t .. f·t + t − 1 of the seeded order, and past
    the last fold those would be an earlier fold's again."""
    if cfg.fold * cfg.test_images >= len(pool):
        k = fold_count(len(pool), cfg.test_images)
        raise NoSuchFold(f"{label}: no fold {cfg.fold}: its {len(pool)} {what}file(s) give {k} fold(s) of "
                         f"split.test_images = {cfg.test_images} held-out test files each (folds 0 to {k - 1}); "
                         f"pick a fold below {k} (a sweep: at most --folds {k}), or add images")


def split_forget(items: list[Item], cfg: SplitConfig, label: str, examples: tuple[str, ...] | None = None) -> FileSplit:
    """The forget set's files: examples for the method, held-out calibration and test images.
    ``examples`` (style names or gallery paths) fixes the examples, and the other images are split
    into D_m and the test; otherwise fold ``cfg.fold`` of a seeded order holds out the next
    ``test_images`` files for the test and the ``calib_images`` after them for D_m. A fold past the
    last (``fold · test_images`` ≥ the files rotated: all of them, or the non-example rest) raises
    :class:`NoSuchFold` rather than wrap onto an earlier fold's files."""
    if examples is not None:
        if not examples:
            raise ValueError(f"{label}: no forget examples: name at least one style or file (an empty list or "
                             "folder names none; leave --forget-examples out for a seeded choice of the files)")
        chosen = [it for it in items if it.style in examples or it.path in examples]
        unknown = set(examples) - {it.style for it in chosen} - {it.path for it in chosen}
        if unknown:
            raise ValueError(f"forget examples {sorted(unknown)} match no image of {label}; name styles "
                             f"({', '.join(sorted({it.style for it in items if it.style})) or 'none'}) or image "
                             "paths relative to the gallery root")
        rest = [it for it in items if it not in chosen]
        if len(rest) < 2:
            raise ValueError(f"{label}: {len(items)} images, {len(chosen)} of them examples; at least 2 must stay "
                             "held out (1 calibration + 1 test): name fewer examples")
        _check_fold(rest, cfg, label, "non-example ")
        rest = rotate(file_order(rest, cfg.seed), cfg.fold * cfg.test_images)
        n_calib = min(cfg.calib_images, len(rest) - 1)
        return FileSplit(chosen, rest[:n_calib], rest[n_calib:])
    if len(items) < cfg.min_forget_images:
        need = (f"at least {cfg.min_forget_images} different images ({cfg.test_images} test + {cfg.calib_images} "
                "calibration + 1 example)")
        if cfg.min_forget_images == 3:    # 1 test + 1 calibration + 1 example: no split setting needs fewer
            advice = "add images (3 is the minimum: no split setting needs fewer)"
        elif len(items) < 3:
            advice = ("add images: even at split.test_images = split.calib_images = 1 it needs 3 files "
                      "(1 test + 1 calibration + 1 example), the minimum")
        else:
            advice = (f"add images, or lower split.test_images / split.calib_images so that test + calibration "
                      f"+ 1 <= {len(items)} (the minimum is 1 each: 3 files)")
        raise ValueError(f"{label} has {len(items)} image(s); forgetting with a held-out check needs {need}: {advice}")
    _check_fold(items, cfg, label)
    order = rotate(file_order(items, cfg.seed), cfg.fold * cfg.test_images)
    t, c = cfg.test_images, cfg.calib_images
    return FileSplit(order[t + c:], order[t:t + c], order[:t])


def split_groups(items: list[Item], cfg: SplitConfig, key=lambda it: it.subgroup) -> FileSplit:
    """Retain-side files, split within each group (subgroup): the same rule as the forget set, but a
    group with few images keeps at least one for training and gives up calibration, then test images.
    Unlike :func:`split_forget`, a fold past a group's last one wraps (the rotation is taken modulo
    the group's size), so a fold of the forget set never fails on a small retain group: such a group
    may hold out the same files at two folds."""
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(key(it), []).append(it)
    out = FileSplit([], [], [])
    for members in groups.values():
        order = rotate(file_order(members, cfg.seed), cfg.fold * cfg.test_images)
        t = min(cfg.test_images, len(order) - 1)
        c = min(cfg.calib_images, len(order) - 1 - t)
        out.test += order[:t]
        out.calib += order[t:t + c]
        out.train += order[t + c:]
    return out


def split_pool(items: list[Item], n_calib: int, max_test: int | None, seed: int) -> FileSplit:
    """Columns that nothing trains on (other superclasses, other concepts): a seeded sample of
    ``n_calib`` images for D_m, the rest (at most ``max_test``) for the test. A pool of at most
    ``n_calib`` files (a small folder of one's own) is halved instead — at least one file each
    side when it has two — so the test keeps the column; a single file goes to D_m. A pool of more
    than ``n_calib`` files (the embedded gallery's) is split as before."""
    order = file_order(items, seed)
    if 0 < len(order) <= n_calib:
        n_calib = max(1, len(order) // 2)
    test = order[n_calib:] if max_test is None else order[n_calib:n_calib + max_test]
    position = {it.path: i for i, it in enumerate(items)}
    return FileSplit([], order[:n_calib], sorted(test, key=lambda it: position[it.path]))


def pool_warning(name: str, pool: list[Item], n_calib: int, field: str, split: FileSplit) -> tuple[str, bool] | None:
    """(text, whether the Score loses the column) for a :func:`split_pool` column of a small
    ``pool``, or None: fewer than ``n_calib`` + 1 files (``field``: the SplitConfig knob)."""
    if n_calib <= 0 or len(pool) > n_calib:
        return None
    if not split.test:
        return (f"the {name} column is missing from the Score: {len(pool)} file(s) for it, and D_m and the test "
                f"need one each; add images to make it", True)
    return (f"the {name} column is small: {len(pool)} files for it (split.{field} is {n_calib}), so D_m gets "
            f"{len(split.calib)} and the test {len(split.test)}; add images for a steadier figure", False)
