"""Opening user images safely: every mode becomes RGB, bombs and broken files give clear errors."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64_000_000        # refuse larger images (decompression-bomb guard)
MAX_FILE_BYTES = 64 * 2**20    # refuse files above 64 MiB


class ImageError(ValueError):
    """An image that cannot be used; the message says which file and what to do."""


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an RGB image. Grayscale, palette, RGBA (composited on white), CMYK and
    16-bit images are converted; corrupted files, non-images and oversized images raise
    :class:`ImageError`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e.strerror}") from e
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image; rename or move it")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"image {path} is {size / 2**20:.0f} MiB; the limit is "
                         f"{MAX_FILE_BYTES // 2**20} MiB — downscale it first")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.width * img.height > max_pixels:
                raise ImageError(f"image {path} has {img.width}x{img.height} pixels, more than the "
                                 f"{max_pixels:,} allowed — downscale it first")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {path} looks like a decompression bomb ({e}); refusing to open it") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path} is not an image Pillow can read; remove it or convert it to PNG/JPEG") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {path} is corrupted or truncated ({e}); re-export or remove it") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited onto white, 16-bit scaled to 8-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / (hi - lo or 1.0) * 255).astype(np.uint8), "L")
    if img.mode in ("P", "La", "RGBa"):       # palette, premultiplied alpha
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
