"""Real data in its usual formats -> a :class:`Gallery`, with a Breeds-like hierarchy JSON.

- CIFAR-10's python batches (``data_batch_1..5``, ``test_batch``, ``batches.meta``): pickles of
  numpy arrays, read with a restricted unpickler that reconstructs numpy arrays and nothing else
  (a pickle naming any other callable is refused), then written once as PNGs so the gallery API
  (paths + lazy loading) applies unchanged.
- ImageNet-style class folders (``root/<class>/*.JPEG``, e.g. WordNet ids as folder names).

The hierarchy JSON maps superclasses to subgroups (class names or folder names), optionally with
readable names::

    {"superclasses": {"vehicle": ["airplane", "automobile", "ship", "truck"]},
     "names": {"n02113624": "toy-poodle"}}          # optional; a plain {"vehicle": [...]} works too

Classes not listed become the gallery's "other concepts" pool (kind "other").
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import write_bytes
from .gallery import IMAGE_SUFFIXES, Gallery, Item

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)

# what a pickle of numpy arrays needs (numpy 1.x and 2.x module names)
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),      # protocol-2 pickles written by Python 3 store bytes through it (pure, no I/O)
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and numpy arrays; refuses every other global (no code runs)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed "
                                     "in a CIFAR batch file")


def load_pickle(path: str | Path):
    """A CIFAR-style pickle (python 2 or 3), restricted to builtins and numpy arrays."""
    data = Path(path).read_bytes()
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _key(d: dict, name: str):
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise KeyError(f"missing {name!r}; keys: {sorted(map(str, d))}")


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def load_hierarchy_json(path: str | Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(superclass -> subgroup ids, id -> readable name) from a hierarchy JSON."""
    data = json.loads(Path(path).read_text())
    supers = data.get("superclasses", data) if isinstance(data, dict) else None
    names = data.get("names", {}) if isinstance(data, dict) and "superclasses" in data else {}
    if not isinstance(supers, dict) or not all(isinstance(v, list) and v for v in supers.values()):
        raise ValueError(f"{path}: expected {{\"superclasses\": {{superclass: [subgroup, ...]}}}} with non-empty lists")
    seen: dict[str, str] = {}
    for s, subs in supers.items():
        for sub in subs:
            if sub in seen:
                raise ValueError(f"{path}: subgroup {sub!r} listed under both {seen[sub]!r} and {s!r}")
            seen[sub] = s
    return {s: list(v) for s, v in supers.items()}, dict(names)


def _items_for(classes: dict[str, list[str]], hierarchy: dict[str, list[str]], names: dict[str, str]) -> list[Item]:
    """``classes``: class id -> relative image paths."""
    sc_of = {sub: s for s, subs in hierarchy.items() for sub in subs}
    missing = sorted(set(sc_of) - set(classes))
    if missing:
        raise ValueError(f"hierarchy names subgroups with no images: {missing[:8]}; found classes: "
                         f"{sorted(classes)[:12]}")
    items = []
    for cls, paths in classes.items():
        concept = names.get(cls, cls)
        for p in paths:
            if cls in sc_of:
                items.append(Item(p, concept, sc_of[cls], concept, "", "hierarchy"))
            else:
                items.append(Item(p, concept, "", "", "", "other"))
    return items


def cifar10_gallery(root: str | Path, hierarchy: str | Path, out: str | Path, split: str = "test",
                    per_class: int | None = None) -> Gallery:
    """A gallery of CIFAR-10 images (``split``: test | train | all) written as PNGs under ``out``
    (kept and reused: files that exist are not rewritten). ``per_class`` caps images per class."""
    root, out = Path(root), Path(out)
    if split not in ("test", "train", "all"):
        raise ValueError(f"split must be test, train or all, got {split!r}")
    train = tuple(f for f in CIFAR_TRAIN if (root / f).is_file()) or CIFAR_TRAIN   # a subset of batches is fine
    files = {"test": CIFAR_TEST, "train": train, "all": train + CIFAR_TEST}[split]
    meta_path = root / "batches.meta"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: point to the extracted cifar-10-batches-py folder")
    label_names = [_text(n) for n in _key(load_pickle(meta_path), "label_names")]
    sup, names = load_hierarchy_json(hierarchy)
    classes: dict[str, list[str]] = {n: [] for n in label_names}
    for fname in files:
        path = root / fname
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (split {split!r} needs {', '.join(files)})")
        batch = load_pickle(path)
        data = np.asarray(_key(batch, "data"), dtype=np.uint8)
        labels = [int(x) for x in _key(batch, "labels")]
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"{path}: expected data (N, 3072) uint8 and N labels, got {data.shape} and {len(labels)}")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for i, (img, lab) in enumerate(zip(images, labels)):
            name = label_names[lab]
            if per_class is not None and len(classes[name]) >= per_class:
                continue
            rel = f"{name}/{fname}_{i:05d}.png"
            dest = out / rel
            if not dest.is_file():
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "PNG")
                write_bytes(dest, buf.getvalue())
            classes[name].append(rel)
    return Gallery(out, _items_for({c: p for c, p in classes.items() if p}, sup, names), f"cifar10-{split}")


def class_folder_gallery(root: str | Path, hierarchy: str | Path) -> Gallery:
    """ImageNet-style ``root/<class>/*`` (any depth below the class folder) with a hierarchy JSON."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    sup, names = load_hierarchy_json(hierarchy)
    classes: dict[str, list[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        paths = sorted(str(p.relative_to(root)) for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if paths:
            classes[d.name] = paths
    return Gallery(root, _items_for(classes, sup, names), root.name)
