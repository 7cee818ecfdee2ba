"""Retrieval over gallery embeddings: a FAISS inner-product index on L2-normalised vectors
(inner product = cosine similarity), plus the α-grid of gallery embeddings the app's slider reads.

    emb = encode_images(bundle, images)                 # (N, D), normalised
    index = build(emb)
    scores, ids = search(index, encode_texts(bundle, ["a poodle"]), k=12)

The α-grid: for an unlearning delta Δ, the gallery is encoded once per α on a grid with the model
θ₀ + α·Δ (:func:`encode_alpha_grid`). Methods edit a few late layers of the image tower, so the
trunk before the first edited stage is computed once and shared by every α (:mod:`.trunk`; exact,
checked against a full re-encode in the tests). A delta without image-tower entries (CLIP-LIP edits
the text tower) leaves the gallery's embeddings as they are at every α: they are encoded once (or
taken as given); what changes with α is the text side, :class:`TextAlpha` (query embeddings at α).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch

from .alphas import DEFAULT_ALPHA_POINTS, alpha_points, nearest  # noqa: F401 - also this module's API
from .embed import ENCODE_BATCH, to_input
from .merge import write_delta
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

# the whole gallery's trunk output kept while an α-grid is encoded point by point, at most (the
# embedded model's 6,837 images need 224 MiB); above it each point runs the trunk again
TRUNK_BUDGET = 256 << 20
# ... when it is kept in a temporary file instead (``spill``): out of the process's memory
SPILL_BUDGET = 4 << 30


class TrunkFile:
    """A finished file of trunk output — ``n`` rows of shape ``tail``, ``offset`` bytes in (a
    safetensors header: :class:`GalleryTrunk`) — read back a batch at a time with plain reads: exact
    float32, one batch in the process's memory instead of the whole gallery's (the kernel's page
    cache keeps the file; it is not the app's RSS). A file of any other size is refused."""

    def __init__(self, path: Path, start: int, n: int, tail: tuple, dtype: torch.dtype = torch.float32,
                 offset: int = 0):
        self.path, self.start, self.n, self.tail = Path(path), start, n, tuple(tail)
        self.dtype, self.offset = dtype, offset
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self._per_row = int(np.prod(self.tail))
        self.row_bytes = self._per_row * self._np_dtype.itemsize
        expected = offset + n * self.row_bytes
        if self.path.stat().st_size != expected:
            raise ValueError(f"{path} holds {self.path.stat().st_size} bytes, not the {expected} of its header")

    def __getitem__(self, idx: slice):
        from .trunk import Prepared
        lo, hi = idx.start or 0, min(idx.stop, self.n)
        arr = np.fromfile(self.path, dtype=self._np_dtype, count=(hi - lo) * self._per_row,
                          offset=self.offset + lo * self.row_bytes)
        return Prepared(torch.from_numpy(arr).reshape((hi - lo,) + self.tail), self.start)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class SpilledTrunk:
    """The gallery's trunk output written to a temporary file a batch at a time while an α-grid's
    first point is encoded; :meth:`finish` closes it and hands back its :class:`TrunkFile`."""

    def __init__(self, path: Path, start: int, n: int):
        self.path, self.start, self.n = Path(path), start, n
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")
        self._tail: tuple | None = None
        self._dtype = None

    def write(self, data: torch.Tensor) -> None:
        self._tail, self._dtype = tuple(data.shape[1:]), data.dtype
        self._file.write(data.contiguous().numpy().tobytes())

    def finish(self) -> TrunkFile:
        self._file.close()
        return TrunkFile(self.path, self.start, self.n, self._tail, self._dtype)

    def remove(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class GalleryTrunk:
    """The whole gallery through the ORIGINAL image tower's stages ``[0, start)``, on disk next to
    its original embeddings: ``start`` is the first stage any layer the forget stage may edit lives
    in (:func:`clipforget.stages.forget.candidate_layers`), so every job's α-grid can start from it
    and run only the stages after — the gallery's stem and first blocks, most of an encode, run once
    per app and gallery instead of once per job. A safetensors file (one float32 tensor ``trunk``,
    ``start`` in its metadata) written a batch at a time and read back a batch at a time with plain
    reads (the page cache keeps it, not the app's memory). 448 MB for the embedded model and gallery."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self, n: int) -> TrunkFile | None:
        """The finished file for ``n`` images, or None when there is none (or it is not whole)."""
        from .io import read_safetensors_header
        if not self.path.is_file():
            return None
        try:
            header, offset = read_safetensors_header(self.path)
            t = header["trunk"]
            if t["dtype"] != "F32" or t["shape"][0] != n:
                return None
            return TrunkFile(self.path, int(header["__metadata__"]["start"]), n, tuple(t["shape"][1:]),
                             offset=offset)
        except (ValueError, KeyError, OSError) as e:
            log.warning("gallery trunk %s unusable (%s); encoding it again", self.path, e)
            return None

    @torch.no_grad()
    def encode(self, bundle: ClipBundle, images: torch.Tensor, start: int,
               batch_size: int = ENCODE_BATCH) -> tuple[torch.Tensor, TrunkFile]:
        """The original gallery embeddings (N, D), normalised — the same values as
        :func:`clipforget.embed.encode_images` — with stages ``[0, start)``'s output written to the
        file on the way."""
        import torch.nn.functional as F
        from .io import atomic_file, safetensors_header
        from .trunk import run_stages
        visual = bundle.model.visual
        was = visual.training
        visual.eval()
        out = []
        try:
            with atomic_file(self.path) as f:     # a temporary file, renamed once whole
                for i in range(0, len(images), batch_size):
                    t = run_stages(visual, to_input(bundle, images[i:i + batch_size], bundle.model), 0, start).float()
                    if i == 0:                    # the header, once the shape is known
                        tail = tuple(t.shape[1:])
                        head = safetensors_header("trunk", (len(images), *tail), {"start": start})
                        f.write(head)
                    f.write(t.cpu().contiguous().numpy().tobytes())
                    out.append(F.normalize(run_stages(visual, t, start).float(), dim=-1).cpu())
        finally:
            visual.train(was)
        return torch.cat(out), TrunkFile(self.path, start, len(images), tail, offset=len(head))


class AlphaGrid:
    """Gallery embeddings at θ₀ + α·Δ, one α point at a time, so that each point can be shown as
    soon as it exists.

    One copy of the image tower, whose edited weights are set to θ₀ + α·Δ in turn. The trunk
    before the first edited stage (:mod:`.trunk`) is the same at every α: it is computed once for
    the whole gallery when that fits ``trunk_budget`` bytes (default :data:`TRUNK_BUDGET`, or
    :data:`SPILL_BUDGET` with ``spill``: a temporary file to keep it in instead of memory), else
    once per batch and point."""

    def __init__(self, bundle: ClipBundle, images: torch.Tensor, delta: dict, batch_size: int = ENCODE_BATCH,
                 trunk_budget: int | None = None, spill: Path | None = None, original: torch.Tensor | None = None,
                 gallery_trunk: TrunkFile | None = None):
        from .merge import image_part
        from .pipeline import edited_model
        if not len(images):
            raise ValueError("an α-grid needs images")
        self.bundle, self.images, self.batch_size = bundle, images, batch_size
        self.model = edited_model(bundle, {}, 0.0)          # a private copy of the image tower, θ₀
        self.visual = self.model.visual
        self.vdelta = {k.removeprefix("visual."): v for k, v in image_part(delta).items()}
        # without an image-tower delta every α point is θ₀'s gallery: ``original`` when given, else
        # encoded once by the first point
        self._same = original if not self.vdelta else None
        self._weights = self.visual.state_dict()            # shares storage with the copy's parameters
        self._base = {k: bundle.model.visual.state_dict()[k] for k in self.vdelta}
        self.spill = Path(spill) if spill is not None else None
        if trunk_budget is None:
            trunk_budget = SPILL_BUDGET if spill is not None else TRUNK_BUDGET
        self.enc = TrunkEncoder(self.visual, self.vdelta.keys(), batch_size=batch_size, budget_bytes=trunk_budget)
        self._trunk = None          # the whole gallery's trunk output (a Prepared), when it fits
        self._pending = None        # ... while the first point fills it
        self._fits: bool | None = None
        self.trunk_seconds = 0.0
        self.n_batches = -(-len(images) // batch_size)
        # the app's gallery trunk (:class:`GalleryTrunk`): the first point starts from it when the
        # delta's first edited stage is at or after its end
        self.base = gallery_trunk if (gallery_trunk is not None and self.enc.split
                                      and gallery_trunk.start <= self.enc.start
                                      and gallery_trunk.n == len(images)) else None

    @property
    def shared_trunk(self) -> bool:
        return self.enc.split

    def _set(self, alpha: float) -> None:
        write_delta(self._weights, self._base, self.vdelta, alpha)

    def _prepare(self, i: int):
        """A batch's trunk output. Asked whether the whole gallery's would fit (``total``) until
        that is known; once it is known not to, the batch's own (every point runs the trunk)."""
        t0 = time.perf_counter()
        if self.base is not None:
            from .trunk import Prepared
            b = self.base[i:i + self.batch_size]
            p = self.enc.advance(Prepared(b.data.to(self.bundle.device), b.start))
            if self._fits is None and not self.enc.fits(p.data, len(self.images)):
                self._fits = False
            self.trunk_seconds += time.perf_counter() - t0
            return p
        x = to_input(self.bundle, self.images[i:i + self.batch_size], self.model)
        p = self.enc.prepare(x, total=None if self._fits is False else len(self.images))
        if p.start == 0 and self.enc.split and self._fits is None:
            self._fits = False
            p = self.enc.prepare(x)
        self.trunk_seconds += time.perf_counter() - t0
        return p

    def steps(self, points: int) -> int:
        """Progress steps (batches) for ``points`` α points (the first one also fills the trunk)."""
        return points * self.n_batches

    @torch.no_grad()
    def encode(self, alpha: float, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(N, D) normalised gallery embeddings at θ₀ + α·Δ; ``progress(batches_done)`` after each batch."""
        if self._same is not None:          # no image-tower delta: the same embeddings at every α
            if progress is not None:
                progress(self.n_batches)
            return self._same.clone()
        self._set(alpha)
        out = None
        keep = self._fits is not False and self.enc.split
        for b, i in enumerate(range(0, len(self.images), self.batch_size)):
            if self._trunk is not None:
                prepared = self._trunk[i:i + self.batch_size]
            else:
                prepared = self._prepare(i)
                if keep:
                    keep = self._keep(prepared, i)
            emb = self.enc.encode(prepared, self.visual)
            if out is None:
                out = torch.empty(len(self.images), emb.shape[-1])
            out[i:i + self.batch_size] = emb
            if progress is not None:
                progress(b + 1)
        if keep and self._trunk is None and self._pending is not None:
            done = self._pending
            self._trunk, self._pending = done.finish() if isinstance(done, SpilledTrunk) else done, None
        if not self.vdelta:
            self._same = out.clone()
        return out

    def _keep(self, prepared, i: int) -> bool:
        """Store a batch's trunk output for the next points; False once it does not fit."""
        from .trunk import Prepared
        if self._fits is False:                    # the whole gallery's trunk is over the budget
            self._pending = None
            return False
        if i == 0:
            self._fits = True
            self._drop()                           # a first point cancelled earlier left a partial one
            if self.spill is not None:
                self._pending = SpilledTrunk(self.spill, prepared.start, len(self.images))
            else:
                data = torch.empty((len(self.images),) + tuple(prepared.data.shape[1:]), dtype=prepared.data.dtype)
                self._pending = Prepared(data, prepared.start)
        if isinstance(self._pending, SpilledTrunk):
            self._pending.write(prepared.data)
        else:
            self._pending.data[i:i + len(prepared)] = prepared.data
        return True

    def _drop(self) -> None:
        for t in (self._trunk, self._pending):
            if isinstance(t, (SpilledTrunk, TrunkFile)):
                t.remove()
        self._trunk = self._pending = None

    def release(self) -> None:
        """Drop the kept trunk (its memory, or its file, goes once the grid is done)."""
        self._drop()


class TextAlpha:
    """Text embeddings at θ₀ + α·Δ_text for a delta that edits the text tower: one private copy of
    the text side (the image tower stays shared), set to each α in turn, and the embeddings cached
    per (α, text), so a query is encoded once per α point it is searched at. Works for any text
    tower through ``model.encode_text`` (open_clip's own transformer or a Hugging Face tower).
    Not thread-safe: callers hold a lock around :meth:`encode`."""

    def __init__(self, bundle: ClipBundle, delta: dict, max_texts: int = 512):
        from .merge import text_part
        from .methods.base import editable_copy, text_state
        self.bundle = bundle
        self.tdelta = text_part(delta)
        if not self.tdelta:
            raise ValueError("TextAlpha needs a delta with text-side entries (keys outside visual.)")
        self.model = editable_copy(bundle.model, text=True, visual=False).eval()
        self._weights = text_state(self.model)             # shares storage with the copy's parameters
        missing = [k for k in self.tdelta if k not in self._weights]
        if missing:
            raise KeyError(f"delta entry {missing[0]!r} is not a weight of this model's text tower")
        self._base = {k: text_state(bundle.model)[k] for k in self.tdelta}
        self._alpha: float | None = None
        self._cache: "OrderedDict[tuple[float, str], torch.Tensor]" = OrderedDict()
        self.max_texts = max_texts

    def _set(self, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (unlearning strength) must be in [0, 1], got {alpha}")
        if self._alpha != alpha:
            write_delta(self._weights, self._base, self.tdelta, alpha)
            self._alpha = alpha

    @torch.no_grad()
    def encode(self, texts: list[str], alpha: float) -> torch.Tensor:
        """(len(texts), D) normalised embeddings with the text tower at θ₀ + α·Δ_text."""
        from .embed import encode_texts
        alpha = round(float(alpha), 6)
        todo = [t for t in dict.fromkeys(texts) if (alpha, t) not in self._cache]
        if todo:
            self._set(alpha)
            for t, e in zip(todo, encode_texts(self.bundle, todo, self.model)):
                self._cache[(alpha, t)] = e
        out = []
        for t in texts:
            self._cache.move_to_end((alpha, t))
            out.append(self._cache[(alpha, t)])
        while len(self._cache) > self.max_texts:
            self._cache.popitem(last=False)
        return torch.stack(out)


@torch.no_grad()
def encode_alpha_grid(bundle: ClipBundle, images: torch.Tensor, delta: dict, alphas: list[float],
                      progress: Callable[[int, int], None] | None = None, batch_size: int = ENCODE_BATCH,
                      trunk_budget: int | None = None, spill: Path | None = None) -> tuple[torch.Tensor, dict]:
    """Gallery embeddings (A, N, D) at θ₀ + α·Δ for each α, and timing info (all points at once:
    :class:`AlphaGrid` gives them one by one). ``progress(i, total)`` after each batch."""
    t0 = time.perf_counter()
    if not len(images) or not alphas:
        raise ValueError("an α-grid needs images and at least one α")
    grid = AlphaGrid(bundle, images, delta, batch_size, trunk_budget, spill)
    total = grid.steps(len(alphas))
    out = None
    for j, a in enumerate(alphas):
        done = j * grid.n_batches
        emb = grid.encode(a, None if progress is None else (lambda b, done=done: progress(done + b, total)))
        if out is None:
            out = torch.empty(len(alphas), *emb.shape)
        out[j] = emb
    grid.release()
    info = {"alphas": list(alphas), "images": len(images), "seconds": time.perf_counter() - t0,
            "shared_trunk": grid.shared_trunk, "trunk_seconds": grid.trunk_seconds}
    log.info("α-grid: %d points x %d images in %.2fs (shared trunk: %s)", len(alphas), len(images),
             info["seconds"], info["shared_trunk"])
    return out, info
