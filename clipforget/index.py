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

from .alphas import DEFAULT_ALPHA_POINTS, alpha_points, nearest  # noqa: F401 - also this module's API
from .embed import ENCODE_BATCH, to_input
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


# ---- the α-grid (its points: clipforget.alphas) ---------------------------------------------------

@torch.no_grad()
def encode_alpha_grid(bundle: ClipBundle, images: torch.Tensor, delta: dict, alphas: list[float],
                      progress: Callable[[int, int], None] | None = None,
                      batch_size: int = ENCODE_BATCH) -> tuple[torch.Tensor, dict]:
    """Gallery embeddings (A, N, D) at θ₀ + α·Δ for each α, and timing info.

    Batch by batch: a batch's trunk is computed once and runs through the later stages at every
    α, with one copy of the image tower whose edited weights are set to θ₀ + α·Δ in turn — so
    neither the whole gallery's trunk nor one tower per α is ever held. ``progress(i, total)``
    is called after each batch (it may raise to cancel)."""
    from .pipeline import edited_model

    t0 = time.perf_counter()
    if not len(images) or not alphas:
        raise ValueError("an α-grid needs images and at least one α")
    model = edited_model(bundle, {}, 0.0)           # a private copy of the image tower, θ₀
    visual = model.visual
    vdelta = {k.removeprefix("visual."): v for k, v in delta.items()}
    weights = visual.state_dict()                   # shares storage with the copy's parameters
    base = {k: bundle.model.visual.state_dict()[k] for k in vdelta}
    enc = TrunkEncoder(visual, vdelta.keys(), batch_size=batch_size)
    out: torch.Tensor | None = None
    t_trunk, n_batches = 0.0, -(-len(images) // batch_size)
    for b, i in enumerate(range(0, len(images), batch_size)):
        t1 = time.perf_counter()
        prepared = enc.prepare(to_input(bundle, images[i:i + batch_size], model))
        t_trunk += time.perf_counter() - t1
        for j, a in enumerate(alphas):
            for k, d in vdelta.items():            # as apply_delta: in float, then the weight's dtype
                weights[k].copy_((base[k].float() + a * d.to(base[k].device)).to(base[k].dtype))
            emb = enc.encode(prepared, visual)
            if out is None:
                out = torch.empty(len(alphas), len(images), emb.shape[-1])
            out[j, i:i + batch_size] = emb
        if progress is not None:
            progress(b + 1, n_batches)
    info = {"alphas": list(alphas), "images": len(images), "seconds": time.perf_counter() - t0,
            "shared_trunk": enc.split, "trunk_seconds": t_trunk}
    log.info("α-grid: %d points x %d images in %.2fs (shared trunk: %s)", len(alphas), len(images),
             info["seconds"], info["shared_trunk"])
    return out, info
