"""The held-out protocol: D_f, D_m and the test columns are disjoint sets of image files."""
from __future__ import annotations

import pytest
import torch

from clipforget.data.gallery import Gallery
from clipforget.data.task import (ClassRequest, ForgetRequest, SplitConfig, ViewCache, build_class_task, build_task,
                                  split_forget)

SMALL = SplitConfig(train_views=1, forget_views=1, calib_views=1, calib_target_views=1, test_views=1)


@pytest.fixture(scope="module")
def small_cache(gallery):
    """One view cache for the module: each gallery image is decoded once (the splits are by file)."""
    return ViewCache(gallery, source_size=32)


def files(views) -> set[str]:
    return {it.path for it in views.items}


def assert_disjoint(task, replay_pool: bool = True) -> None:
    """No file is shared between what the method trains on (D_f, D_r), D_m and the tests, in any column.
    ``replay_pool``: the gallery has files no column reads (the embedded one does)."""
    trained = files(task.forget) | files(task.retain)
    calib = {name: files(col.views) for name, col in task.calib.items()}
    test = {name: files(col.views) for name, col in task.test.items()}
    all_calib = set().union(*calib.values())
    for name, paths in test.items():
        assert paths, f"test column {name} is empty"
        assert not paths & trained, f"test column {name} shares files with the training sets"
        assert not paths & all_calib, f"test column {name} shares files with D_m"
    for name, paths in calib.items():
        assert not paths & trained, f"calibration column {name} shares files with the training sets"
    # the trained-on column is exactly the forget examples, reported apart
    assert files(task.trained["forget_examples"].views) == files(task.forget)
    # the replay files are read by no column, never show the request's superclass nor an unseen style
    replay = files(task.replay)
    assert bool(replay) == replay_pool, "replay: a sample of the files no column reads, empty only if there are none"
    assert not replay & (trained | all_calib | set().union(*test.values()))
    assert all(it.superclass != task.request.superclass and not it.unseen_style for it in task.replay.items)


@pytest.mark.parametrize("request_", [ForgetRequest("dog", "poodle"), ForgetRequest("car", style="line-art"),
                                      ForgetRequest("bird", "bird"), ForgetRequest("ball", "bowling")],
                         ids=lambda r: r.label)
def test_every_column_is_disjoint_by_file(gallery, request_, small_cache):
    if request_.subgroup and request_.subgroup not in gallery.subgroups(request_.superclass):
        pytest.skip(f"{request_.label} is not in this gallery")
    task = build_task(gallery, request_, 32, SMALL, small_cache)
    assert_disjoint(task)
    assert {"target", "retain", "other_superclasses"} <= set(task.test)
    # held-out images of the subgroup itself: the target column is other drawings of the same subgroup
    if request_.subgroup:
        assert {it.subgroup for it in task.test["target"].views.items} == {request_.subgroup}


def test_whole_class_task_is_disjoint_by_file(gallery, small_cache):
    assert_disjoint(build_class_task(gallery, ClassRequest("dog"), 32, SMALL, small_cache))


def test_replay_is_a_seeded_sample_of_its_size_and_can_be_switched_off(gallery, small_cache):
    request = ForgetRequest("dog", "poodle")
    a = build_task(gallery, request, 32, SMALL, small_cache)
    b = build_task(gallery, request, 32, SMALL, ViewCache(gallery, source_size=32))
    assert "replay" not in a.__dict__               # its views are made only when a method asks for them
    assert len(a.replay) == SMALL.replay_images == 128 and a.replay.images.shape[1:] == (3, 32, 32)
    assert torch.equal(a.replay.images, b.replay.images)
    assert [it.path for it in a.replay.items] == [it.path for it in b.replay.items]
    off = build_task(gallery, request, 32, SplitConfig(**{**SMALL.__dict__, "replay_images": 0}), small_cache)
    assert len(off.replay) == 0
    assert off.files() == a.files()          # the columns do not depend on the replay sample
    with pytest.raises(ValueError, match="replay_images"):
        SplitConfig(replay_images=-1)


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_folds_rotate_the_held_out_files(gallery, fold):
    items = gallery.select(superclass="dog", subgroup="poodle", unseen_style=False)
    cfg = SplitConfig(fold=fold)
    s = split_forget(items, cfg, "poodle")
    assert len(s.test) == cfg.test_images and len(s.calib) == cfg.calib_images
    assert len(s.train) == len(items) - cfg.test_images - cfg.calib_images
    assert not (set(s.test) & set(s.calib)) and not (set(s.test) | set(s.calib)) & set(s.train)
    assert s == split_forget(items, cfg, "poodle")                          # deterministic
    others = [split_forget(items, SplitConfig(fold=f), "poodle").test for f in range(3) if f != fold]
    for other in others:                                                    # each fold holds out other files
        assert set(other) != set(s.test)


def test_every_file_is_held_out_in_some_fold(gallery):
    items = gallery.select(superclass="dog", subgroup="poodle", unseen_style=False)
    cfg = SplitConfig()
    folds = -(-len(items) // cfg.test_images)
    seen = set().union(*(split_forget(items, SplitConfig(fold=f), "poodle").test for f in range(folds)))
    assert {it.path for it in seen} == {it.path for it in items}


def test_named_examples_are_the_training_files_and_the_rest_is_held_out(gallery, small_cache):
    items = gallery.select(superclass="dog", subgroup="poodle", unseen_style=False)
    styles = sorted({it.style for it in items})[:3]
    task = build_task(gallery, ForgetRequest("dog", "poodle", examples=tuple(styles)), 32, SMALL,
                      small_cache)
    assert {it.style for it in task.forget.items} == set(styles)
    held = files(task.test["target"].views) | files(task.calib["target"].views)
    assert held == {it.path for it in items} - files(task.forget)
    assert_disjoint(task)
    with pytest.raises(ValueError, match="match no image"):
        split_forget(items, SplitConfig(), "poodle", examples=("no-such-style",))


def test_too_few_files_is_a_clear_error(tmp_path):
    from PIL import Image
    for sub, n in (("poodle", 3), ("beagle", 6)):
        for i in range(n):
            (tmp_path / "dog" / sub).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "dog" / sub / f"{i}.png")
    g = Gallery.from_folder(tmp_path)
    with pytest.raises(ValueError, match=r"poodle has 3 image\(s\).*at least 6 different images"):
        build_task(g, ForgetRequest("dog", "poodle"), 32, SMALL)
    task = build_task(g, ForgetRequest("dog", "beagle"), 32, SMALL)     # 6 files: 3 test, 2 calibration, 1 example
    assert (len(task.test["target"].views), len(task.calib["target"].views), len(task.forget)) == (3, 2, 1)
    assert_disjoint(task, replay_pool=False)     # a folder of one superclass: every file is in some column


def test_unseen_styles_are_only_in_their_own_column(gallery, small_cache):
    if not gallery.unseen_styles():
        pytest.skip("this gallery marks no unseen style")
    task = build_task(gallery, ForgetRequest("dog", "poodle"), 32, SMALL, small_cache)
    unseen = set(gallery.unseen_styles())
    assert {it.style for it in task.test["unseen_styles"].views.items} <= unseen
    assert not any(it.subgroup == "poodle" for it in task.test["unseen_styles"].views.items)
    for name, col in {**task.calib, **{n: c for n, c in task.test.items() if n != "unseen_styles"}}.items():
        assert not {it.style for it in col.views.items} & unseen, name
    assert not {it.style for it in task.forget.items + task.retain.items} & unseen


# ---- edge cases of the file splits (each of these once left a column empty or a file on two sides) ----

def _folder(root, spec: dict) -> Gallery:
    """A folder gallery: {"superclass/subgroup": n files} (``_other/concept`` for the other pool)."""
    from PIL import Image
    for k, (where, n) in enumerate(spec.items()):
        (root / where).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (k * 10 % 256, i * 20 % 256, 0)).save(root / where / f"{i}.png")
    return Gallery.from_folder(root)


def test_a_small_pool_still_gives_the_test_its_column_and_says_it_is_small(tmp_path, caplog):
    """30 other-superclass files (fewer than calib_other_images + 1 = 121) once all went to D_m and
    the test lost the column without a word."""
    g = _folder(tmp_path, {"dog/poodle": 8, "dog/beagle": 8, "cat/a": 10, "cat/b": 10, "cat/c": 10,
                           "_other/cup": 1})
    with caplog.at_level("WARNING", logger="clipforget"):
        task = build_task(g, ForgetRequest("dog", "poodle"), 32, SMALL)
    test, calib = files(task.test["other_superclasses"].views), files(task.calib["other_superclasses"].views)
    assert len(test) == 15 and len(calib) == 15 and not test & calib
    assert "the other_superclasses column is small: 30 files" in caplog.text
    # one other-concept file: D_m keeps it, the test has no column, and the run's warnings say so
    assert "other_concepts" not in task.test
    assert any(w.startswith("the other_concepts column is missing from the Score") for w in task.warnings)
    assert_disjoint(task, replay_pool=False)


@pytest.mark.parametrize("n, calib, test", [(0, 0, 0), (1, 1, 0), (2, 1, 1), (3, 1, 2), (120, 60, 60),
                                            (121, 120, 1), (500, 120, 380)])
def test_split_pool_halves_a_pool_no_larger_than_its_calibration_share(gallery, n, calib, test):
    from clipforget.data.task import split_pool
    items = gallery.select(kind="hierarchy")[:n]
    s = split_pool(items, 120, None, 0)
    assert (len(s.calib), len(s.test)) == (calib, test) and not set(s.calib) & set(s.test)
    assert split_pool(items, 0, None, 0).test == items          # unseen styles: no D_m share, every file tested


def test_a_file_listed_twice_in_a_manifest_is_refused(tmp_path):
    import csv
    g = _folder(tmp_path, {"dog/poodle": 8, "dog/beagle": 8})
    rows = [(it.path, it.superclass, it.subgroup) for it in g.items] + [("./dog/poodle/0.png", "dog", "poodle")]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "superclass", "subgroup"), *rows])
    with pytest.raises(ValueError, match=r"1 path\(s\) listed more than once: 'dog/poodle/0.png' \(rows 10, 18\).*"
                                         "remove the repeated rows"):
        Gallery.from_manifest(tmp_path / "m.csv")


def test_a_file_in_the_hierarchy_and_the_other_pool_stays_out_of_the_other_concepts_column(tmp_path):
    """A gallery built in code may list one file as a subgroup's and as an other concept: the other
    concepts column must not test (or calibrate on) a file the task trains on."""
    from dataclasses import replace
    g = _folder(tmp_path, {"dog/poodle": 8, "dog/beagle": 8, "cat/a": 10, "_other/cup": 10})
    twice = [replace(it, concept="poodle-photo", superclass="", subgroup="", kind="other")
             for it in g.select(subgroup="poodle")]
    g = Gallery(tmp_path, g.items + twice)
    task = build_task(g, ForgetRequest("dog", "poodle"), 32, replace(SMALL, calib_concept_images=4))
    request_files = {it.path for it in g.select(superclass="dog", kind="hierarchy")}
    concepts = files(task.test["other_concepts"].views) | files(task.calib["other_concepts"].views)
    assert concepts and not concepts & request_files
    assert_disjoint(task, replay_pool=False)


def test_empty_forget_examples_are_an_error(gallery):
    items = gallery.select(superclass="dog", subgroup="poodle", unseen_style=False)
    with pytest.raises(ValueError, match="no forget examples: name at least one style or file"):
        split_forget(items, SplitConfig(), "poodle", examples=())


def test_a_fold_past_the_last_is_an_error_not_a_wrap(gallery):
    from clipforget.data.task import NoSuchFold
    items = gallery.select(superclass="dog", subgroup="poodle", unseen_style=False)
    folds = -(-len(items) // 3)
    split_forget(items, SplitConfig(fold=folds - 1), "poodle")
    with pytest.raises(NoSuchFold, match=rf"poodle: no fold {folds}: its {len(items)} file\(s\) give {folds} fold"):
        split_forget(items, SplitConfig(fold=folds), "poodle")
    nine = items[:9]          # 9 files, 3 a fold: folds 0-2; fold 3 once gave fold 0's files again
    assert len({frozenset(split_forget(nine, SplitConfig(fold=f), "x").test) for f in range(3)}) == 3
    with pytest.raises(ValueError, match="give 3 fold"):
        split_forget(nine, SplitConfig(fold=3), "x")
    styles = sorted({it.style for it in items})[:4]    # named examples: the rest (len - 4 files) is rotated
    rest = len(items) - 4
    split_forget(items, SplitConfig(fold=-(-rest // 3) - 1), "poodle", tuple(styles))
    with pytest.raises(NoSuchFold, match=f"its {rest} non-example file"):
        split_forget(items, SplitConfig(fold=-(-rest // 3)), "poodle", tuple(styles))


def test_retain_groups_wrap_past_their_last_fold(gallery):
    """A small retain group must not fail a fold the forget set has: it wraps (documented)."""
    from clipforget.data.task import split_groups
    items = gallery.select(superclass="dog", subgroup="poodle", unseen_style=False)[:4]
    assert split_groups(items, SplitConfig(fold=4)) == split_groups(items, SplitConfig(fold=0))   # 4·3 ≡ 0 mod 4


@pytest.mark.parametrize("n, split, advice", [
    (2, SplitConfig(test_images=1, calib_images=1), "add images (3 is the minimum: no split setting needs fewer)"),
    (2, SplitConfig(), "even at split.test_images = split.calib_images = 1 it needs 3 files"),
    (4, SplitConfig(), "or lower split.test_images / split.calib_images so that test + calibration + 1 <= 4"),
])
def test_too_few_files_advice_is_one_that_can_work(gallery, n, split, advice):
    items = gallery.select(superclass="dog", subgroup="poodle", unseen_style=False)[:n]
    with pytest.raises(ValueError) as e:
        split_forget(items, split, "poodle")
    assert advice in str(e.value)
    if n < 3:
        assert "lower split" not in str(e.value)


def test_whole_class_task_without_calibration_files_is_a_clear_error(tmp_path):
    """Subgroups of 4 files: 1 for training and 3 for the test leave D_m no target image, and restore
    once picked α = 0 on the empty column (accuracy NaN) without a word."""
    g = _folder(tmp_path, {"dog/a": 4, "dog/b": 4, "cat/c": 4, "cat/d": 4})
    with pytest.raises(ValueError, match="no subgroup has a file left for the calibration set.*at least 5 files"):
        build_class_task(g, ClassRequest("dog"), 32, SMALL)
    task = build_class_task(g, ClassRequest("dog"), 32, SplitConfig(**{**SMALL.__dict__, "test_images": 2}))
    assert len(task.calib["target"].views) == 2       # 4 files: 1 training, 2 test, 1 calibration in each


def test_a_report_column_says_how_many_files_and_views_it_was_measured_on(gallery, small_cache):
    """A column's "images" counts augmented views (12 for 3 held-out files × 4 views): the report
    says files and views, and keeps "images" for its readers."""
    from clipforget.eval.report import markdown
    from clipforget.pipeline import column_size
    task = build_task(gallery, ForgetRequest("dog", "poodle"), 32, SplitConfig(**{**SMALL.__dict__, "test_views": 4}),
                      small_cache)
    size = column_size(task.test["target"])
    assert size == {"images": 12, "files": 3, "views_per_file": 4}
    report = {"method": "ours", "request": ForgetRequest("dog", "poodle").to_dict(), "alpha": 1.0, "score": 90.0,
              "columns": {"target": {"before": 1.0, "after": 0.0, **size},
                          "retain": {"before": 1.0, "after": 1.0, "images": 8}}}       # an older report: views only
    md = markdown(report)
    assert "| Target (forget) | 3 files × 4 views |" in md and "| Retain (siblings) | 8 views |" in md
