"""The embedded gallery, its hierarchy and the data API over galleries of any origin."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforget.data.gallery import Gallery, foreground_mask
from clipforget.data.hierarchy import load_hierarchy
from clipforget.data.task import ForgetRequest, ViewCache, build_task, resolve

REQUIRED = {"monkey", "dog", "cat", "car", "airplane", "truck", "boat", "bird", "fish", "horse", "flower", "fruit"}


def test_hierarchy_size_and_required_superclasses(gallery):
    assert len(gallery.superclasses()) >= 20
    assert len(gallery.subgroups()) >= 150
    assert REQUIRED <= set(gallery.superclasses())
    assert {"poodle", "guide-dog", "service-dog", "dog-face", "dog"} <= set(gallery.subgroups("dog"))
    assert {"taxi", "police-car", "racing-car", "automobile"} <= set(gallery.subgroups("car"))
    assert len(gallery.other_concepts()) >= 500


def test_every_subgroup_in_at_least_four_styles(gallery):
    for sg in gallery.subgroups():
        styles = {it.style for it in gallery.select(subgroup=sg)}
        assert len(styles) >= 4, sg
    assert len(gallery.styles()) == 5 and "line-art" in gallery.styles()


def test_manifest_files_licences_and_size():
    root = Path(__file__).resolve().parents[1] / "gallery"
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    assert set(rows[0]) >= {"path", "concept", "superclass", "subgroup", "style", "source_set"}
    assert all((root / r["path"]).is_file() for r in rows[::97])
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 30 * 2**20
    lic = (root / "LICENSES.md").read_text()
    for needle in ("CC-BY-4.0", "CC-BY-SA-4.0", "Apache-2.0", "MIT"):
        assert needle in lic
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
    a = build_task(gallery, ForgetRequest("dog", "poodle"), 64, cache=ViewCache(gallery))
    b = build_task(gallery, ForgetRequest("dog", "poodle"), 64, cache=ViewCache(gallery))
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
                for i in range(2):
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
    assert len(g) == 6 and g.subgroups("tool") == ["hammer"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.jpg,a\n")
    with pytest.raises(ValueError, match="path, superclass, subgroup"):
        Gallery.open(bad)


def test_hierarchy_file_matches_gallery(gallery):
    h = load_hierarchy()
    assert gallery.hierarchy == h.superclasses
