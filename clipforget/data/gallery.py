"""Galleries: the embedded emoji gallery, a user's image folder, or a CSV manifest — one API.

A gallery is a table of images, each with ``concept``, ``superclass``, ``subgroup``, ``style`` and
``kind`` ("hierarchy" for images inside the superclass -> subgroup hierarchy, "other" for the pool
of unrelated concepts used as "other data" in zero-shot checks).
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_file
from .hierarchy import load_hierarchy
from .images import open_image

GALLERY_ENV = "CLIPFORGET_GALLERY"
MASKS_FILE = "masks.npz"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def default_gallery_dir() -> Path:
    """The embedded gallery: $CLIPFORGET_GALLERY, else ``gallery/`` next to the package."""
    env = os.environ.get(GALLERY_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "gallery"


def suggest(name: str, choices, kind: str) -> str:
    """Error text for an unknown name, with close matches."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        f"; choose one of: {', '.join(choices[:12])}{' …' if len(choices) > 12 else ''}"
    return f"{kind} {name!r} not in gallery{hint}"


@dataclass(frozen=True)
class Item:
    path: str          # relative to the gallery root
    concept: str
    superclass: str    # "" for the other pool
    subgroup: str      # "" for the other pool
    style: str         # "" when the gallery has no style level
    kind: str          # "hierarchy" | "other"
    unseen: bool = False   # other-pool concept never used to train the embedded model
    unseen_style: bool = False   # drawn in a style never used to train the embedded model


def display(name: str) -> str:
    """'guide-dog' -> 'guide dog'."""
    return name.replace("-", " ").replace("_", " ")


class Gallery:
    """A list of :class:`Item` over a root folder, with the queries the rest of the library uses."""

    def __init__(self, root: str | Path, items: list[Item], name: str = "gallery"):
        self.root = Path(root)
        self.items = list(items)
        self.name = name
        if not self.items:
            raise ValueError(f"gallery at {self.root} has no images; check the folder layout "
                             "(root/superclass/subgroup/*.jpg) or the manifest")

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def embedded(cls) -> "Gallery":
        return cls.from_manifest(default_gallery_dir() / "manifest.csv", name="embedded")

    @classmethod
    def from_manifest(cls, manifest: str | Path, name: str | None = None) -> "Gallery":
        """CSV with columns path, superclass, subgroup[, style, concept, kind, unseen_style ("1"/"0")];
        paths relative to the CSV's folder (or absolute). A path listed in two rows is refused: the
        splits are by file, and two rows of one file could put it on both sides of a split."""
        manifest = Path(manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"gallery manifest {manifest} not found; build the embedded "
                                    "gallery with `clipforget build-gallery` or point to your own CSV")
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"path", "superclass", "subgroup"} <= set(rows[0]):
            raise ValueError(f"{manifest}: a manifest needs the columns path, superclass, subgroup "
                             f"(optional: style, concept, kind); found {sorted(rows[0])}")
        rows_of: dict[str, list[int]] = {}
        for i, r in enumerate(rows, start=2):           # row 1 is the header; "a.png" and "./a.png" are one file
            rows_of.setdefault(os.path.normpath(r["path"]), []).append(i)
        repeated = {path: lines for path, lines in rows_of.items() if len(lines) > 1}
        if repeated:      # one file twice: a split boundary could fall between its rows (trained on and tested on)
            listed = "; ".join(f"{path!r} (rows {', '.join(map(str, lines))})"
                               for path, lines in list(repeated.items())[:8])
            raise ValueError(f"{manifest}: {len(repeated)} path(s) listed more than once: {listed}"
                             f"{' …' if len(repeated) > 8 else ''}; each image file must appear in one row only: "
                             "remove the repeated rows (a file is one subgroup's or one other concept's, not both)")
        unseen = unseen_concepts([r.get("concept") or r["subgroup"] for r in rows
                                  if (r.get("kind") or "hierarchy") == "other"])
        items = []
        for r in rows:
            kind = r.get("kind") or ("hierarchy" if r["superclass"] else "other")
            concept = r.get("concept") or r["subgroup"] or Path(r["path"]).stem
            items.append(Item(r["path"], concept, r["superclass"], r["subgroup"], r.get("style", ""),
                              kind, kind == "other" and concept in unseen,
                              (r.get("unseen_style") or "0").strip() == "1"))
        return cls(manifest.parent, items, name or manifest.parent.name)

    @classmethod
    def from_folder(cls, root: str | Path, styled: bool | None = None) -> "Gallery":
        """``root/superclass/subgroup/*.jpg`` or, with a style level, ``root/superclass/subgroup/style/*``.
        A top-level folder named ``_other`` holds ``_other/concept/*`` for the other pool. Hidden
        files and folders (``.DS_Store``, macOS ``._name.jpg`` resource forks, ``.ipynb_checkpoints``)
        are skipped."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"gallery {root} is a file, not a folder; pass an image folder "
                                     "(root/superclass/subgroup/*.jpg) or a manifest .csv")
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        items = []
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            parts = path.relative_to(root).parts[:-1]
            if parts and parts[0] == "_other":
                if len(parts) >= 2:
                    items.append(Item(str(path.relative_to(root)), parts[1], "", "", "", "other"))
                continue
            has_style = len(parts) == 3 if styled is None else styled
            if len(parts) != (3 if has_style else 2):
                raise ValueError(f"{path}: expected root/superclass/subgroup/"
                                 f"{'style/' if has_style else ''}image, got {'/'.join(parts)}")
            style = parts[2] if has_style else ""
            items.append(Item(str(path.relative_to(root)), parts[1], parts[0], parts[1], style, "hierarchy"))
        return cls(root, items, root.name)

    @classmethod
    def open(cls, spec: "str | Path | Gallery | None" = None) -> "Gallery":
        """None/'embedded' -> embedded gallery; a .csv -> manifest; a folder with manifest.csv ->
        manifest; any other folder -> folder layout; a Gallery -> itself."""
        if isinstance(spec, Gallery):
            return spec
        if spec in (None, "", "embedded"):
            return cls.embedded()
        p = Path(spec)
        if p.suffix.lower() == ".csv":
            return cls.from_manifest(p)
        if (p / "manifest.csv").is_file():
            return cls.from_manifest(p / "manifest.csv")
        return cls.from_folder(p)

    # ---- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @cached_property
    def hierarchy(self) -> dict[str, list[str]]:
        """superclass -> subgroups, in first-seen order."""
        out: dict[str, list[str]] = {}
        for it in self.items:
            if it.kind == "hierarchy" and it.subgroup not in out.setdefault(it.superclass, []):
                out[it.superclass].append(it.subgroup)
        return out

    def superclasses(self) -> list[str]:
        return list(self.hierarchy)

    def subgroups(self, superclass: str | None = None) -> list[str]:
        if superclass is None:
            return [sg for sgs in self.hierarchy.values() for sg in sgs]
        self.check(superclass=superclass)
        return list(self.hierarchy[superclass])

    def styles(self) -> list[str]:
        return sorted({it.style for it in self.items if it.style})

    def unseen_styles(self) -> list[str]:
        """Styles whose images never train the embedded model (sorted; empty for most galleries)."""
        return sorted({it.style for it in self.items if it.style and it.unseen_style})

    def other_concepts(self, include_unseen: bool = True) -> list[str]:
        return sorted({it.concept for it in self.items if it.kind == "other"
                       and (include_unseen or not it.unseen)})

    def style_phrase(self, style: str) -> str:
        styles = load_hierarchy().styles
        return styles[style]["phrase"] if style in styles else display(style)

    def check(self, superclass: str | None = None, subgroup: str | None = None,
              style: str | None = None) -> None:
        """Raise ValueError with close-match suggestions for unknown names."""
        if superclass is not None and superclass not in self.hierarchy:
            raise ValueError(suggest(superclass, self.hierarchy, "superclass"))
        if subgroup is not None:
            pool = self.hierarchy[superclass] if superclass else self.subgroups()
            if subgroup not in pool:
                where = f" of superclass {superclass!r}" if superclass else ""
                raise ValueError(suggest(subgroup, pool, "subgroup") + where)
        if style is not None and style not in self.styles():
            raise ValueError(suggest(style, self.styles() or ["(this gallery has no styles)"], "style"))

    def select(self, superclass=None, subgroup=None, style=None, kind=None, exclude_style=None,
               unseen=None, unseen_style: bool | None = None) -> list[Item]:
        return [it for it in self.items
                if (superclass is None or it.superclass == superclass)
                and (subgroup is None or it.subgroup == subgroup)
                and (style is None or it.style == style)
                and (exclude_style is None or it.style != exclude_style)
                and (kind is None or it.kind == kind)
                and (unseen is None or it.unseen == unseen)
                and (unseen_style is None or it.unseen_style == unseen_style)]

    @cached_property
    def content_hash(self) -> str:
        """Hash of the item table (and GALLERY_HASH if the gallery ships one)."""
        h = hashlib.sha256()
        shipped = self.root / "GALLERY_HASH"
        if shipped.is_file():
            h.update(shipped.read_bytes())
        for it in self.items:
            h.update(f"{it.path}|{it.concept}|{it.superclass}|{it.subgroup}|{it.style}|{it.kind}\n".encode())
        return h.hexdigest()[:16]

    # ---- pixels -------------------------------------------------------------------------------
    def load(self, items: list[Item], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, 3, size, size) and float foreground masks (N, 1, size, size).

        The mask marks pixels not reachable from the border through near-white pixels, so a
        background can be swapped without recolouring white parts inside an icon."""
        import torch          # here, not at the top: the app's page lists the gallery before torch loads
        imgs = np.zeros((len(items), size, size, 3), np.uint8)
        masks = np.ones((len(items), size, size), np.float32)
        for i, it in enumerate(items):
            img = open_image(self.root / it.path)
            stored = self.stored_mask(it.path)
            if stored is not None:
                m = Image.fromarray(stored * 255).resize((size, size), Image.BILINEAR)
                masks[i] = np.asarray(m, np.float32) / 255.0
            imgs[i] = np.asarray(img.resize((size, size), Image.BICUBIC))
        return (torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(masks)[:, None])

    @cached_property
    def _packed_masks(self) -> tuple[dict[str, int], tuple[int, int], np.ndarray] | None:
        """(row of each path, mask shape, bit-packed rows) of ``masks.npz``, or None without it."""
        path = self.root / MASKS_FILE
        if not path.is_file():
            return None
        with np.load(path) as z:
            paths, shape, bits = list(z["paths"]), tuple(z["shape"]), z["bits"]
        return {p: i for i, p in enumerate(paths)}, shape, bits

    def stored_mask(self, path: str) -> np.ndarray | None:
        """The foreground mask shipped with the gallery for ``path`` (``masks.npz``, written by the
        gallery build for icons on white; 0/1 uint8), or None. Galleries without it (photos) get
        all-foreground masks: background swapping is an augmentation for icons only. The masks stay
        bit-packed in memory (an eighth of their unpacked size) and are unpacked one at a time."""
        packed = self._packed_masks
        if packed is None or path not in packed[0]:
            return None
        index, shape, bits = packed
        return np.unpackbits(bits[index[path]])[:shape[0] * shape[1]].reshape(shape)

    def open_image(self, item: Item) -> Image.Image:
        return open_image(self.root / item.path)


def foreground_mask(img: Image.Image, thresh: int = 12) -> np.ndarray:
    """1 where the pixel is part of the object, 0 for the background connected to the border."""
    w, h = img.size
    padded = Image.new("RGB", (w + 2, h + 2), (255, 255, 255))
    padded.paste(img.convert("RGB"), (1, 1))
    sentinel = (255, 0, 254)
    ImageDraw.floodfill(padded, (0, 0), sentinel, thresh=thresh)
    arr = np.asarray(padded)[1:-1, 1:-1]
    return 1.0 - np.all(arr == sentinel, axis=-1).astype(np.float32)


def unseen_concepts(concepts, fraction: float | None = None) -> set[str]:
    """The other-pool concepts held out of embedded-model training, chosen by name hash."""
    if fraction is None:
        fraction = load_hierarchy().other_rules.get("unseen_fraction", 0.1)
    return {c for c in set(concepts)
            if int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction}


def write_masks(root: str | Path, items: list[Item]) -> Path:
    """Compute foreground masks of ``items`` (icons on white) and store them bit-packed."""
    root = Path(root)
    masks, paths = [], []
    for it in items:
        masks.append(foreground_mask(open_image(root / it.path)).astype(np.uint8))
        paths.append(it.path)
    shape = masks[0].shape
    bits = np.packbits(np.stack(masks).reshape(len(masks), -1), axis=1)
    out = root / MASKS_FILE
    with atomic_file(out) as f:
        np.savez_compressed(f, paths=np.array(paths), shape=np.array(shape), bits=bits)
    return out
