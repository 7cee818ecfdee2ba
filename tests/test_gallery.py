"""The embedded gallery, its hierarchy and the data API over galleries of any origin."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforget.data.build import LICENSES, OPEN_LICENCES, build_gallery
from clipforget.data.gallery import Gallery, foreground_mask
from clipforget.data.hierarchy import Hierarchy, load_hierarchy
from clipforget.data.task import ForgetRequest, SplitConfig, ViewCache, build_task, resolve
from clipforget.train.embedded import training_items

REQUIRED = {"monkey", "dog", "cat", "car", "airplane", "truck", "boat", "bird", "fish", "horse", "flower", "fruit"}


OLD_STYLES = {"twemoji", "openmoji", "noto", "fluent-flat", "line-art"}


def test_hierarchy_size_and_required_superclasses(gallery):
    assert 24 <= len(gallery.superclasses()) <= 27
    assert 160 <= len(gallery.subgroups()) <= 180
    assert REQUIRED <= set(gallery.superclasses())
    assert {"poodle", "dog-face", "dog"} <= set(gallery.subgroups("dog"))
    assert {"taxi", "police-car", "racing-car", "automobile"} <= set(gallery.subgroups("car"))
    assert len(gallery.other_concepts()) >= 400


def test_every_subgroup_in_at_least_eight_trained_styles(gallery):
    """Held-out splits by drawing style (examples / calibration / test styles) need many styles."""
    need = load_hierarchy().min_trained_styles
    assert need >= 8
    for sg in gallery.subgroups():
        styles = {it.style for it in gallery.select(subgroup=sg, unseen_style=False)}
        assert len(styles) >= need, (sg, sorted(styles))
    assert len(gallery.styles()) == 12 and OLD_STYLES <= set(gallery.styles())
    assert ("automobile", "line-art") in {(it.subgroup, it.style) for it in gallery.select(superclass="car")}
    assert len({it.style for it in gallery.select(subgroup="poodle", unseen_style=False)}) >= 8


def test_unseen_styles_are_marked_and_never_trained_on(gallery):
    unseen = gallery.unseen_styles()
    assert len(unseen) >= 2 and unseen == sorted(unseen) == load_hierarchy().unseen_styles
    assert set(unseen) <= set(gallery.styles()) and not set(unseen) & OLD_STYLES
    assert {it.style for it in gallery.select(unseen_style=True)} == set(unseen)
    assert not {it.style for it in gallery.select(unseen_style=False)} & set(unseen)
    # every superclass can be scored on the unseen styles
    assert {it.superclass for it in gallery.select(kind="hierarchy", unseen_style=True)} == set(gallery.superclasses())
    train = training_items(gallery)
    assert train and not any(it.unseen_style or it.unseen for it in train)
    assert {it.style for it in train} == set(gallery.styles()) - set(unseen)
    assert len(train) == len([it for it in gallery.items if not it.unseen and it.style not in unseen])


def test_manifest_files_licences_and_size():
    root = Path(__file__).resolve().parents[1] / "gallery"
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    assert set(rows[0]) >= {"path", "concept", "superclass", "subgroup", "style", "source_set", "unseen_style"}
    assert {r["unseen_style"] for r in rows} == {"0", "1"}
    assert all((root / r["path"]).is_file() for r in rows[::97])
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 40 * 2**20
    lic = (root / "LICENSES.md").read_text()
    for needle in ("CC-BY-4.0", "CC-BY-SA-4.0", "Apache-2.0", "MIT"):
        assert needle in lic
    # every style's set is listed with its package, author and an open licence
    listed = {line.split("|")[1].strip().strip("`"): line for line in lic.splitlines() if line.startswith("| `")}
    for style, spec in load_hierarchy().styles.items():
        title, author, spdx, _ = LICENSES[spec["set"]]
        assert spdx in OPEN_LICENCES, style
        line = listed[style]
        assert title in line and author in line and spdx in line and f"{spec['package']}@{spec['version']}" in line
    assert {r["style"] for r in rows} == set(listed)
    img = Image.open(root / rows[0]["path"])
    assert img.size[0] >= 96 and img.mode == "RGB"


def test_unknown_names_get_suggestions(gallery):
    with pytest.raises(ValueError, match="did you mean 'poodle'"):
        gallery.check(superclass="dog", subgroup="poodel")
    with pytest.raises(ValueError, match="superclass 'dgo'.*'dog'"):
        gallery.check(superclass="dgo")
    with pytest.raises(ValueError, match="style 'line-arts'.*'line-art'"):
        gallery.check(style="line-arts")


def test_splits_are_deterministic_and_disjoint(gallery):
    # the request's own columns at the default split; 40 test images of each other column (all of
    # them: ~7,000 views to make twice)
    split = SplitConfig(max_other_images=40)
    a = build_task(gallery, ForgetRequest("dog", "poodle"), 64, split, cache=ViewCache(gallery))
    b = build_task(gallery, ForgetRequest("dog", "poodle"), 64, split, cache=ViewCache(gallery))
    assert torch.equal(a.test["other_concepts"].views.images, b.test["other_concepts"].views.images)
    assert torch.equal(a.forget.images, b.forget.images)
    assert torch.equal(a.test["retain"].views.images, b.test["retain"].views.images)
    assert {it.subgroup for it in a.forget.items} == {"poodle"}
    assert "poodle" not in {it.subgroup for it in a.retain.items}
    assert set(a.retain_subgroups) == set(gallery.subgroups("dog")) - {"poodle"}
    # the train and test views of the same images differ
    n = len(a.test["target"].views)
    assert not torch.equal(a.forget.images[:n], a.test["target"].views.images)


def test_view_cache_is_bounded_and_memoised(gallery):
    """An app runs many jobs on one ViewCache: view sets beyond the byte bound are dropped, least
    recently used first; a view set still cached is returned as the same object."""
    cache = ViewCache(gallery, max_view_bytes=3 * 3 * 32 * 32 * 4)      # room for 3 sets of 4 views
    items = gallery.select(superclass="dog")
    sets = [cache.views(items[i:i + 1], "test", 4, 32) for i in range(3)]
    assert cache.view_bytes == 3 * sets[0].images.nbytes
    assert cache.views(items[0:1], "test", 4, 32) is sets[0]             # hit: now the most recent
    cache.views(items[3:4], "test", 4, 32)                               # evicts set 1, the oldest
    assert cache.view_bytes <= cache.max_view_bytes
    assert cache.views(items[0:1], "test", 4, 32) is sets[0]
    again = cache.views(items[1:2], "test", 4, 32)
    assert again is not sets[1] and torch.equal(again.images, sets[1].images)   # rebuilt, same pixels
    with pytest.raises(ValueError, match="max_view_bytes"):
        ViewCache(gallery, max_view_bytes=-1)


def test_view_cache_without_sources_makes_the_same_views(gallery):
    """The app's cache decodes images again per view set instead of keeping their pixels: the same
    views, view k of every item in item order, and no pixels held afterwards."""
    items = gallery.select(superclass="dog")[:5] + gallery.select(superclass="cat")[:3]
    kept = ViewCache(gallery).views(items, "calib", 3, 32, clean_first=True)
    light = ViewCache(gallery, keep_sources=False)
    fresh = light.views(items, "calib", 3, 32, clean_first=True)
    assert torch.equal(fresh.images, kept.images)
    assert [it.path for it in fresh.items] == [it.path for _ in range(3) for it in items]
    assert light._cache == {}
    one = ViewCache(gallery).views(items[2:3], "calib", 3, 32, clean_first=True)   # row k·n + i is view k of item i
    assert torch.equal(fresh.images[[2, 10, 18]], one.images)


def test_a_view_is_the_same_made_alone_or_in_a_batch(gallery, monkeypatch):
    """Views are transformed a sub-batch at a time, each with the draws of its own seeded generator:
    every view equals augment() of that image alone with that generator (style changes included)."""
    from clipforget.data import task as task_mod
    from clipforget.data.augment import STYLE_VIEWS, augment
    items = gallery.select(superclass="cat")[:7]
    monkeypatch.setattr(task_mod, "VIEW_BATCH_PIXELS", 3 * 32 * 32)      # sub-batches of 3, 3, 1
    cache = ViewCache(gallery, source_size=48)
    sources = cache._sources(items)
    for cfg in (STYLE_VIEWS, task_mod.VIEWS):
        views = cache.views(items, "train", 2, 32, cfg)
        for k in range(2):
            for i, it in enumerate(items):
                g = torch.Generator().manual_seed(task_mod.view_seed(it.path, "train", k))
                im, m = sources[it.path]
                alone = (augment(im[None], m[None].float() / 255, 32, g, cfg)[0] * 255).round().to(torch.uint8)
                assert torch.equal(views.images[k * len(items) + i], alone), (cfg, k, it.path)


def test_style_and_subgroup_in_style_requests(gallery):
    forget, retain, _, _ = resolve(gallery, ForgetRequest("car", style="line-art"))
    assert {it.style for it in forget} == {"line-art"} and {it.superclass for it in forget} == {"car"}
    assert "line-art" not in {it.style for it in retain}
    forget, retain, _, _ = resolve(gallery, ForgetRequest("dog", "poodle", "line-art"))
    assert [(it.subgroup, it.style) for it in forget] == [("poodle", "line-art")]
    assert ("poodle", "twemoji") in {(it.subgroup, it.style) for it in retain}


def test_foreground_mask_keeps_white_inside_the_object():
    img = Image.new("RGB", (20, 20), "white")
    for x in range(4, 16):
        for y in range(4, 16):
            img.putpixel((x, y), (0, 0, 0) if x in (4, 15) or y in (4, 15) else (255, 255, 255))
    m = foreground_mask(img)
    assert m[0, 0] == 0 and m[10, 10] == 1 and m[4, 4] == 1


def _write_folder(root: Path, styled: bool):
    rng = np.random.default_rng(0)
    for sc, sgs in {"fruit": ["apple", "pear"], "tool": ["hammer"]}.items():
        for sg in sgs:
            for st in (["a", "b"] if styled else [None]):
                d = root / sc / sg / st if st else root / sc / sg
                d.mkdir(parents=True, exist_ok=True)
                for i in range(6):      # enough files to hold out test and calibration images
                    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


@pytest.mark.parametrize("styled", [False, True])
def test_user_folder_gallery(tmp_path, styled):
    _write_folder(tmp_path, styled)
    g = Gallery.open(tmp_path)
    assert g.superclasses() == ["fruit", "tool"]
    assert g.subgroups("fruit") == ["apple", "pear"]
    assert g.styles() == (["a", "b"] if styled else [])
    task = build_task(g, ForgetRequest("fruit", "apple"), 32)
    assert {it.subgroup for it in task.retain.items} == {"pear"}
    assert task.forget.images.shape[1:] == (3, 32, 32)


def test_csv_manifest_gallery(tmp_path):
    _write_folder(tmp_path, False)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "superclass", "subgroup"])
        for p in sorted(tmp_path.rglob("*.jpg")):
            rel = p.relative_to(tmp_path)
            w.writerow([str(rel), rel.parts[0], rel.parts[1]])
    g = Gallery.open(tmp_path / "list.csv")
    assert len(g) == 18 and g.subgroups("tool") == ["hammer"]      # 3 subgroups x 6 files
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.jpg,a\n")
    with pytest.raises(ValueError, match="path, superclass, subgroup"):
        Gallery.open(bad)


def test_hierarchy_file_matches_gallery(gallery):
    h = load_hierarchy()
    assert gallery.hierarchy == h.superclasses


def test_manifest_without_unseen_style_column(tmp_path):
    """Older manifests and user CSVs have no unseen_style column: every item counts as seen."""
    _write_folder(tmp_path, True)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "superclass", "subgroup", "style"])
        for p in sorted(tmp_path.rglob("*.jpg")):
            rel = p.relative_to(tmp_path)
            w.writerow([str(rel), rel.parts[0], rel.parts[1], rel.parts[2]])
    g = Gallery.open(tmp_path / "list.csv")
    assert g.unseen_styles() == [] and not any(it.unseen_style for it in g.items)
    assert len(g.select(unseen_style=False)) == len(g) and g.select(unseen_style=True) == []
    assert len(training_items(g)) == len(g)


def _fake_icons(root: Path) -> Path:
    """Two tiny iconify sets: 'twemoji' (dashed names) and 'fxemoji' (dash-less names, its own
    spelling of one concept)."""
    def body(colour, y):
        return f'<rect x="2" y="{y}" width="12" height="8" fill="{colour}"/>'
    sets = {"twemoji": {"red-apple": body("red", 2), "pear": body("green", 3), "hammer": body("gray", 4),
                        "rock": body("black", 5), "kite": body("blue", 6)},
            "fxemoji": {"redapple": body("#c00", 2), "pearside": body("#0c0", 3), "hammer": body("#888", 4),
                        "rock": body("#222", 5), "kite": body("#00c", 6)}}
    for name, icons in sets.items():
        (root / name).mkdir(parents=True)
        (root / name / "icons.json").write_text(json.dumps(
            {"prefix": name, "width": 16, "height": 16, "icons": {k: {"body": v} for k, v in icons.items()}}))
    return root


def _fake_hierarchy(unseen: str) -> Hierarchy:
    styles = {"twemoji": {"set": "twemoji", "package": "@iconify-json/twemoji", "version": "1.2.5",
                          "phrase": "flat cartoon icon"},
              "fxemoji": {"set": "fxemoji", "package": "@iconify-json/fxemoji", "version": "1.2.2",
                          "phrase": "smooth pastel cartoon", "strip_dashes": True, "names": {"pear": "pearside"}}}
    styles[unseen]["unseen"] = True
    other = {"exclude_tokens": ["kite"], "min_sets": 2, "unseen_fraction": 0.0}
    return Hierarchy({"fruit": ["red-apple", "pear"], "tool": ["hammer"]}, styles, other, min_trained_styles=1)


def test_build_gallery_is_reproducible_and_marks_unseen_styles(tmp_path):
    icons = _fake_icons(tmp_path / "icons")
    h = _fake_hierarchy("fxemoji")
    a = build_gallery(tmp_path / "a", icons, size=32, hierarchy=h)
    build_gallery(tmp_path / "b", icons, size=32, hierarchy=h)
    assert (tmp_path / "a" / "GALLERY_HASH").read_text() == (tmp_path / "b" / "GALLERY_HASH").read_text()
    assert a["subgroups"] == 3 and a["other_concepts"] == 1 and a["unseen_styles"] == ["fxemoji"]
    g = Gallery.from_manifest(tmp_path / "a" / "manifest.csv")
    assert g.styles() == ["fxemoji", "twemoji"] and g.unseen_styles() == ["fxemoji"]
    assert {(it.concept, it.style) for it in g.items} == {(c, s) for c in ("red-apple", "pear", "hammer", "rock")
                                                          for s in ("twemoji", "fxemoji")}
    assert all(it.unseen_style == (it.style == "fxemoji") for it in g.items)
    assert {it.style for it in training_items(g)} == {"twemoji"}
    # the mapped names rendered the set's own icons (a green pear, not a missing one)
    pear = np.asarray(Image.open(tmp_path / "a" / "images" / "fxemoji" / "pear.png"))
    assert pear[16, 16, 1] > 150 and pear[16, 16, 0] < 80
    lic = (tmp_path / "a" / "LICENSES.md").read_text()
    assert "Firefox OS Emoji" in lic and "Apache-2.0" in lic and "Twemoji" in lic and "CC-BY-4.0" in lic


def test_build_gallery_refuses_subgroups_in_too_few_trained_styles(tmp_path):
    icons = _fake_icons(tmp_path / "icons")
    h = _fake_hierarchy("twemoji")
    strict = Hierarchy(h.superclasses, h.styles, h.other_rules, min_trained_styles=2)
    with pytest.raises(ValueError, match="fewer than 2 trained styles"):
        build_gallery(tmp_path / "g", icons, size=32, hierarchy=strict)
