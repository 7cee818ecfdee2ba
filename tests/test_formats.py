"""Real data formats: CIFAR-10 python batches (restricted unpickling) and ImageNet-style class
folders, each with a Breeds-like hierarchy JSON, on small files generated here."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from clipforget.data.formats import class_folder_gallery, cifar10_gallery, load_pickle
from clipforget.data.task import ForgetRequest, SplitConfig, build_task

LABELS = ["airplane", "automobile", "bird", "cat"]


def write_cifar(root, n=12, seed=0):
    """A miniature cifar-10-batches-py: one train and one test batch, in CIFAR's pickle layout."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [s.encode() for s in LABELS], b"num_cases_per_batch": n, b"num_vis": 3072},
                    f, protocol=2)
    batches = {}
    for name in ("data_batch_1", "test_batch"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [i % len(LABELS) for i in range(n)]
        batches[name] = (data, labels)
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, f, protocol=2)
    return batches


def write_hierarchy(path, supers, names=None):
    path.write_text(json.dumps({"superclasses": supers, **({"names": names} if names else {})}))
    return path


def test_cifar_batches_become_a_gallery_with_exact_pixels(tmp_path):
    batches = write_cifar(tmp_path / "cifar")
    h = write_hierarchy(tmp_path / "h.json", {"vehicle": ["airplane", "automobile"], "animal": ["bird"]})
    g = cifar10_gallery(tmp_path / "cifar", h, tmp_path / "png", split="test")
    assert len(g) == 12
    assert g.superclasses() == ["vehicle", "animal"] or set(g.superclasses()) == {"vehicle", "animal"}
    assert set(g.subgroups("vehicle")) == {"airplane", "automobile"}
    assert g.other_concepts() == ["cat"]                       # not in the hierarchy: the other pool
    # pixel 0 of the test batch round-trips exactly (CHW rows of 1024 -> HWC PNG)
    data, labels = batches["test_batch"]
    first = next(it for it in g.items if it.path.endswith("test_batch_00000.png"))
    assert first.subgroup == LABELS[labels[0]]
    png = np.asarray(Image.open(g.root / first.path))
    assert np.array_equal(png, data[0].reshape(3, 32, 32).transpose(1, 2, 0))
    both = cifar10_gallery(tmp_path / "cifar", h, tmp_path / "png", split="all", per_class=4)
    assert len(both) == 4 * len(LABELS)


def test_cifar_gallery_feeds_a_forget_task(tmp_path):
    write_cifar(tmp_path / "cifar", n=24)
    h = write_hierarchy(tmp_path / "h.json", {"vehicle": ["airplane", "automobile"], "animal": ["bird", "cat"]})
    g = cifar10_gallery(tmp_path / "cifar", h, tmp_path / "png")
    split = SplitConfig(train_views=1, forget_views=1, calib_views=1, calib_target_views=1, test_views=1)
    task = build_task(g, ForgetRequest("vehicle", "airplane"), 32, split)
    assert {it.subgroup for it in task.forget.items} == {"airplane"}
    assert {it.subgroup for it in task.retain.items} == {"automobile"}
    assert task.forget.images.dtype == torch.uint8 and task.forget.images.shape[1:] == (3, 32, 32)


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_anything_but_numpy(tmp_path):
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        load_pickle(bad)
    ok = tmp_path / "ok"
    ok.write_bytes(pickle.dumps({b"x": np.arange(6, dtype=np.uint8).reshape(2, 3)}))
    assert np.array_equal(load_pickle(ok)[b"x"], np.arange(6).reshape(2, 3))


def test_class_folders_with_wordnet_ids_and_names(tmp_path):
    root = tmp_path / "imagenet"
    for wnid in ("n02113624", "n02113712", "n02085620", "n01440764"):
        (root / wnid).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 60, 10, 200)).save(root / wnid / f"{wnid}_{i}.JPEG")
    h = write_hierarchy(tmp_path / "breeds.json", {"dog": ["n02113624", "n02113712", "n02085620"]},
                        {"n02113624": "toy-poodle", "n02113712": "miniature-poodle", "n02085620": "chihuahua"})
    g = class_folder_gallery(root, h)
    assert g.superclasses() == ["dog"]
    assert set(g.subgroups("dog")) == {"toy-poodle", "miniature-poodle", "chihuahua"}
    assert g.other_concepts() == ["n01440764"]
    imgs, _ = g.load(g.select(subgroup="chihuahua"), 16)
    assert imgs.shape == (3, 3, 16, 16)


def test_hierarchy_errors_name_the_problem(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "x.png")
    with pytest.raises(ValueError, match="no images"):
        class_folder_gallery(root, write_hierarchy(tmp_path / "h.json", {"s": ["a", "missing"]}))
    with pytest.raises(ValueError, match="listed under both"):
        class_folder_gallery(root, write_hierarchy(tmp_path / "h2.json", {"s": ["a"], "t": ["a"]}))
