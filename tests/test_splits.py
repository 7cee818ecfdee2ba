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
