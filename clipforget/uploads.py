"""Uploaded example images: checked, renamed and stored under the runs folder — all or nothing.

    batch = store_uploads(["/tmp/gradio/abc/poodle 1.jpg", ("p2.png", data)], "runs/app")
    batch.paths        # [runs/app/uploads/<id>/00-poodle_1.png, runs/app/uploads/<id>/01-p2.png]

Every file is checked before anything is kept: its size (before it is read), its type by content
(Pillow identifies the bytes; the name's extension is ignored), its pixel count (decompression
bombs are refused by :func:`clipforget.data.images.open_image`). Names are reduced to a safe
basename, so ``../../etc/passwd`` or ``C:\\x\\y.png`` cannot leave the upload folder, and every
image is re-encoded as PNG (no metadata, no polyglot file is ever served back).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from PIL import Image, UnidentifiedImageError

from .data.images import MAX_PIXELS, ImageError, open_image
from .io import atomic_dir, atomic_file

UPLOADS = "uploads"
Upload = Union[str, Path, tuple[str, bytes]]        # a file on disk, or (original name, content)
BATCH_ID = re.compile(r"[0-9a-f]{32}")


class UploadError(ValueError):
    """An upload that was refused; the message names the file and says what to do."""


@dataclass
class UploadConfig:
    max_bytes: int = 10 * 2**20      # per file
    max_files: int = 16              # per batch
    max_pixels: int = 40_000_000     # per image (decompression-bomb guard; <= the loader's own limit)
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")   # Pillow format names
    keep_batches: int = 50           # older upload batches are deleted when a new one is stored

    def __post_init__(self):
        for name in ("max_bytes", "max_files", "max_pixels", "keep_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_pixels > MAX_PIXELS:
            raise ValueError(f"max_pixels must be <= {MAX_PIXELS:,} (the image loader's limit), "
                             f"got {self.max_pixels:,}")
        self.formats = tuple(f.upper() for f in self.formats)
        if not self.formats:
            raise ValueError("formats must name at least one image format")


@dataclass
class UploadBatch:
    id: str
    dir: Path
    paths: list[Path]           # stored PNGs, in upload order
    names: list[str]            # the sanitised original names


def sanitize_name(name: str, fallback: str = "image", max_len: int = 64) -> str:
    """A safe file stem from an uploaded name: the last path component (either slash), ASCII
    letters, digits, '.', '_' and '-' only, no leading dots, at most ``max_len`` characters."""
    base = re.split(r"[\\/]", str(name or ""))[-1]
    base = "".join(c for c in unicodedata.normalize("NFKD", base) if not unicodedata.combining(c))
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    stem = re.sub(r"\.{2,}", ".", stem)[:max_len].strip("._-")
    return stem or fallback


def _size_of(up: Upload) -> int:
    if isinstance(up, tuple):
        return len(up[1])
    try:
        return os.stat(up).st_size
    except OSError as e:
        raise UploadError(f"cannot read the upload {Path(up).name!r}: {e.strerror}") from e


def _name_of(up: Upload) -> str:
    return up[0] if isinstance(up, tuple) else Path(up).name


def check_image(path: Path, shown: str, cfg: UploadConfig) -> Image.Image:
    """The RGB image in ``path``, or :class:`UploadError` saying why it was refused."""
    try:
        with Image.open(path) as probe:
            fmt = probe.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard, above ours (a warning only where warnings are turned into errors)
        limit = min(cfg.max_pixels, Image.MAX_IMAGE_PIXELS or cfg.max_pixels)
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise UploadError(f"{shown!r} has {f'{int(n[1]):,}' if n else 'too many'} pixels, more than the limit of "
                          f"{limit:,} pixels per image — downscale it") from None
    except UnidentifiedImageError:
        raise UploadError(f"{shown!r} is not an image (its content is not a known image format); upload "
                          f"{', '.join(cfg.formats)} files") from None
    except OSError as e:
        raise UploadError(f"{shown!r} could not be read as an image ({e}); re-export it as PNG or JPEG") from None
    if fmt not in cfg.formats:
        raise UploadError(f"{shown!r} is a {fmt} image; upload one of {', '.join(cfg.formats)}")
    try:
        return open_image(path, max_pixels=cfg.max_pixels)
    except ImageError as e:
        # the loader's message names the temporary path; name the upload instead
        raise UploadError(str(e).replace(str(path), repr(shown))) from None


def store_uploads(files: Iterable[Upload], runs_dir: str | Path, config: UploadConfig | None = None) -> UploadBatch:
    """Check every upload and store them as PNGs in ``runs_dir/uploads/<batch id>/``; if one is
    refused, nothing is stored and :class:`UploadError` names it."""
    cfg = config or UploadConfig()
    files = list(files)
    if not files:
        raise UploadError("no images uploaded; add a few example images of what to forget")
    if len(files) > cfg.max_files:
        raise UploadError(f"{len(files)} files uploaded; at most {cfg.max_files} at a time")
    for up in files:          # sizes first: nothing big is read
        size = _size_of(up)
        if size > cfg.max_bytes:
            raise UploadError(f"{sanitize_name(_name_of(up))!r} is {size / 2**20:.1f} MiB; the limit is "
                              f"{cfg.max_bytes / 2**20:.0f} MiB per image — downscale it")
        if size == 0:
            raise UploadError(f"{sanitize_name(_name_of(up))!r} is empty")
    root = Path(runs_dir) / UPLOADS
    batch_id = uuid.uuid4().hex
    names, paths = [], []
    with atomic_dir(root / batch_id) as tmp:
        for i, up in enumerate(files):
            shown = sanitize_name(_name_of(up))
            if isinstance(up, tuple):
                fd, raw = tempfile.mkstemp(prefix=".upload.", dir=tmp)
                with os.fdopen(fd, "wb") as f:
                    f.write(up[1])
                src = Path(raw)
            else:
                src = Path(up)
            try:
                img = check_image(src, shown, cfg)
            finally:
                if isinstance(up, tuple):
                    src.unlink(missing_ok=True)
            buf = io.BytesIO()
            img.save(buf, "PNG")
            out = f"{i:02d}-{shown}.png"
            with atomic_file(tmp / out) as f:
                f.write(buf.getvalue())
            names.append(shown)
            paths.append(out)
    prune(root, cfg.keep_batches, keep=batch_id)
    final = root / batch_id
    return UploadBatch(batch_id, final, [final / p for p in paths], names)


def open_batch(runs_dir: str | Path, batch_id: str) -> UploadBatch:
    """A stored batch by id (an id is 32 hex characters, never a path)."""
    if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
        raise UploadError(f"invalid upload id {str(batch_id)[:80]!r}")
    d = Path(runs_dir) / UPLOADS / batch_id
    if not d.is_dir():
        raise UploadError(f"no upload batch {batch_id}; upload the images again")
    paths = sorted(d.glob("*.png"))
    return UploadBatch(batch_id, d, paths, [p.stem.split("-", 1)[-1] for p in paths])


def prune(root: Path, keep_batches: int, keep: str | None = None) -> None:
    """Delete all but the newest ``keep_batches`` batches (never ``keep``)."""
    batches = sorted((p for p in root.iterdir() if p.is_dir() and BATCH_ID.fullmatch(p.name)),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for p in batches[keep_batches:]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
