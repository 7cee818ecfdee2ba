"""Retrieval over gallery embeddings: a FAISS inner-product index on L2-normalised vectors
(inner product = cosine similarity), plus the α-grid of gallery embeddings the app's slider reads.

    emb = encode_images(bundle, images)                 # (N, D), normalised
    index = build(emb)
    scores, ids = search(index, encode_texts(bundle, ["a poodle"]), k=12)

The α-grid: for an unlearning delta Δ, the gallery is encoded once per α on a grid with the model
θ₀ + α·Δ (:func:`encode_alpha_grid`). Methods edit a few late layers of the image tower, so the
trunk before the first edited stage is computed once and shared by every α (:mod:`.trunk`; exact,
checked against a full re-encode in the tests).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch

from .embed import encode_images, to_input
from .models import ClipBundle
from .trunk import TrunkEncoder

log = logging.getLogger(__name__)


def _as_f32(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def build(embeddings) -> faiss.Index:
    """An exact inner-product index over normalised (N, D) embeddings."""
    emb = _as_f32(embeddings)
    if emb.ndim != 2 or len(emb) == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("embeddings must be L2-normalised (inner product = cosine); "
                         f"norms range {norms.min():.3f}..{norms.max():.3f}")
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    return index


def search(index: faiss.Index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids), each (Q, k); ``k`` is capped at the index size."""
    q = _as_f32(queries)
    if q.ndim == 1:
        q = q[None]
    if q.shape[1] != index.d:
        raise ValueError(f"query dimension {q.shape[1]} does not match the index ({index.d})")
    k = max(1, min(int(k), index.ntotal))
    return index.search(q, k)


def save(index: faiss.Index, path: str | Path) -> Path:
    """Write ``index`` atomically (FAISS' own format)."""
    from .io import atomic_file
    path = Path(path)
    with atomic_file(path) as f:
        f.write(faiss.serialize_index(index).tobytes())
    return path


def load(path: str | Path) -> faiss.Index:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index {path} not found")
    return faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))


# ---- the α-grid ---------------------------------------------------------------------------------

def alpha_points(n: int = 11, extra: tuple[float, ...] = ()) -> list[float]:
    """``n`` even points over [0, 1] plus ``extra`` (e.g. the calibrated α), sorted, deduplicated."""
    if n < 2:
        raise ValueError(f"an α-grid needs at least 2 points, got {n}")
    pts = {round(i / (n - 1), 6) for i in range(n)} | {round(float(a), 6) for a in extra}
    return sorted(pts)


def nearest(points: list[float], alpha: float) -> float:
    """The grid point closest to ``alpha`` (ties go to the smaller α)."""
    return min(points, key=lambda a: (abs(a - alpha), a))


@torch.no_grad()
def encode_alpha_grid(bundle: ClipBundle, images: torch.Tensor, delta: dict, alphas: list[float],
                      progress: Callable[[int, int], None] | None = None,
                      batch_size: int = 256, trunk_budget_bytes: int = 512 * 2**20) -> tuple[torch.Tensor, dict]:
    """Gallery embeddings (A, N, D) at θ₀ + α·Δ for each α, and timing info.

    ``progress(i, total)`` is called after each α (it may raise to cancel). The shared trunk is
    kept in memory only while it fits ``trunk_budget_bytes`` (a real CLIP at 224 px would not)."""
    from .pipeline import edited_model

    t0 = time.perf_counter()
    enc = TrunkEncoder(bundle.model.visual, delta.keys(), budget_bytes=trunk_budget_bytes, batch_size=batch_size)
    first = enc.prepare(to_input(bundle, images[:batch_size]), total=len(images))
    shared = first.start > 0        # else keep nothing: encode from the uint8 images per α
    prepared = [first] + [enc.prepare(to_input(bundle, images[i:i + batch_size]), total=len(images))
                          for i in range(batch_size, len(images), batch_size)] if shared else []
    t_trunk = time.perf_counter() - t0
    out = []
    for i, a in enumerate(alphas):
        model = edited_model(bundle, delta, a)
        out.append(torch.cat([enc.encode(p, model.visual) for p in prepared]) if shared
                   else encode_images(bundle, images, model, batch_size))
        del model
        if progress is not None:
            progress(i + 1, len(alphas))
    info = {"alphas": list(alphas), "images": len(images), "seconds": time.perf_counter() - t0,
            "shared_trunk": shared, "trunk_seconds": t_trunk}
    log.info("α-grid: %d points x %d images in %.2fs (shared trunk: %s)", len(alphas), len(images),
             info["seconds"], info["shared_trunk"])
    return torch.stack(out), info
