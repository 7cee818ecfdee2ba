"""Images the app makes from the gallery: one card per subgroup showing it in every style, and an
image of the forgotten subgroup framed in red. Each is a PNG cached under the runs folder."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

from ..data.gallery import Gallery, Item, display
from ..io import atomic_file

THUMB = 96                      # px of one style cell in a subgroup card
MARK = (220, 38, 38)            # red frame around images of the forgotten subgroup


def subgroup_cards(gallery: Gallery, cache_dir: Path, superclass: str) -> list[tuple[str, str]]:
    """One thumbnail per subgroup showing it in every style, with its name as caption."""
    out = []
    for sg in gallery.subgroups(superclass):
        items = gallery.select(superclass=superclass, subgroup=sg)
        out.append((str(card(gallery, cache_dir, superclass, sg, items)), display(sg)))
    return out


def card(gallery: Gallery, cache_dir: Path, superclass: str, subgroup: str, items: list[Item]) -> Path:
    from PIL import Image
    key = hashlib.sha256(f"{gallery.root}|{superclass}|{subgroup}|{[i.path for i in items]}".encode())
    path = cache_dir / "cards" / f"{key.hexdigest()[:16]}.png"
    if path.is_file():
        return path
    items = sorted(items, key=lambda it: it.style)[:9]
    cols = min(3, len(items))
    rows = -(-len(items) // cols)
    img = Image.new("RGB", (cols * THUMB, rows * THUMB), (255, 255, 255))
    for i, it in enumerate(items):
        thumb = gallery.open_image(it)
        thumb.thumbnail((THUMB - 6, THUMB - 6))
        x, y = (i % cols) * THUMB, (i // cols) * THUMB
        img.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
    _save_png(img, path)
    return path


def marked(gallery: Gallery, cache_dir: Path, item: Item) -> Path:
    """The image with a red frame: the forgotten subgroup, visible at a glance."""
    from PIL import Image, ImageOps
    path = cache_dir / "marked" / (hashlib.sha256(str(gallery.root / item.path).encode()).hexdigest()[:16] + ".png")
    if not path.is_file():
        img = gallery.open_image(item).resize((88, 88), Image.BICUBIC)
        _save_png(ImageOps.expand(img, border=4, fill=MARK), path)
    return path


def _save_png(img, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    with atomic_file(path) as f:
        f.write(buf.getvalue())
