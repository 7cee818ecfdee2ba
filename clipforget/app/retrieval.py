"""Text-to-image search in two FAISS indexes: the original encoder, and a job's encoder at the
computed α nearest the slider. A job's run folder holds its α-grid of gallery embeddings
(:mod:`clipforget.runfolder`) — from the job's α when its results appear, the other points as
they are encoded — so moving the slider is a search, never a re-encode. Query embeddings come from
the original text tower, cached per query; for a job whose delta edits the text tower (CLIP-LIP)
the right grid's query is embedded by that text tower at the shown α (:class:`~clipforget.index.TextAlpha`,
cached per α and query). A job with an image-tower delta only never loads more than its delta's
header for this."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import runfolder
from ..alphas import nearest
from ..data.gallery import display
from ..data.request import ForgetRequest, resolve
from ..jobs import JobRegistry
from ..threads import single_threaded
from ..work import check_same_model
from .cards import marked
from .loading import ModelLoader
from .views import alpha_label

MAX_K = 100                     # images per search grid, at most
MAX_QUERY = 300                 # characters of a query, at most (text towers read ~77 tokens anyway)
MAX_GRIDS = 3                   # jobs whose α-grid indexes stay in memory


@dataclass
class Hit:
    path: str          # absolute image path (served by the app)
    caption: str
    concept: str
    superclass: str
    subgroup: str
    style: str
    score: float
    forgotten: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Retrieval:
    """Search and the caches it needs, shared by the app's handler threads."""

    def __init__(self, loader: ModelLoader, jobs: JobRegistry, cache_dir: Path, max_texts: int = 512):
        self.loader, self.jobs, self.cache_dir = loader, jobs, cache_dir
        self.gallery = loader.gallery
        self._lock = threading.Lock()           # tokenizer + text tower: one caller at a time
        self._cache_lock = threading.RLock()    # the text and α-grid caches, shared by handler threads
        self._texts: OrderedDict[str, np.ndarray] = OrderedDict()
        self._max_texts = max_texts
        self._grids: OrderedDict[str, AlphaIndexes] = OrderedDict()
        self._forget_paths: dict[str, set[str]] = {}

    def text_embedding(self, query: str) -> np.ndarray:
        """The original text tower's embedding of a query (the left grid's; the right grid's too
        unless the job's delta edits the text tower: :meth:`edited_text_embedding`)."""
        query = check_query(query)
        with self._cache_lock:
            if query in self._texts:
                self._texts.move_to_end(query)
                return self._texts[query]
        bundle = self.loader.resources(timeout=120).bundle      # loaded: torch is imported (single_threaded)
        from ..embed import encode_texts
        with self._lock, single_threaded():
            emb = encode_texts(bundle, [query])[0].numpy()
        with self._cache_lock:
            self._texts[query] = emb
            while len(self._texts) > self._max_texts:
                self._texts.popitem(last=False)
        return emb

    def edited_text_embedding(self, query: str, entry: "AlphaIndexes", alpha: float) -> np.ndarray:
        """A query's embedding by a job's edited text tower at ``alpha`` (cached per α and query)."""
        query = check_query(query)
        with self._lock, single_threaded():
            return entry.text.encode([query], alpha)[0].numpy()

    def grid(self, job_id: str) -> "AlphaIndexes":
        """The α points of a job with results and their FAISS indexes (α = 0: the original index).
        While its α-grid grows, each call adds the points written since the last one (a listing of
        the run folder's α-grid; only new points are read)."""
        with self._cache_lock:
            entry = self._grids.get(job_id)
            if entry is not None:
                self._grids.move_to_end(job_id)
                if entry.complete:
                    return entry
            else:       # its embeddings are those of the model it was made with: refuse another's
                check_same_model(self.jobs.get(job_id).spec, self.loader.model_name, self.loader.pretrained, job_id)
            run = self.jobs.run_dir(job_id)
            res = self.loader.resources(timeout=120)     # loaded: torch is imported (single_threaded)
            with single_threaded():
                return self._add_points(job_id, run, res, entry)

    def _add_points(self, job_id: str, run: Path, res, entry: "AlphaIndexes | None") -> "AlphaIndexes":
        """:meth:`grid`'s work, under its lock: a new entry, then the points written since."""
        if entry is None:
            entry = AlphaIndexes({0.0: self.loader.original_index})
            text_delta = runfolder.load_text_delta(run) if runfolder.has_delta(run) else {}
            if text_delta:        # the job edits the text tower: queries are embedded at α
                from ..index import TextAlpha
                entry.text = TextAlpha(res.bundle, text_delta)
        from .. import index as faiss_index
        new, made_on = runfolder.load_alpha_grid(run, skip=entry.indexes)
        for a, emb in sorted(new.items()):
            if emb.shape[0] != len(self.gallery) or made_on not in (None, self.gallery.content_hash):
                raise ValueError(f"job {job_id} was run on another gallery ({emb.shape[0]} images, hash "
                                 f"{made_on}; this app has {len(self.gallery)}, hash {self.gallery.content_hash});"
                                 " start the app with that gallery to reopen it")
            entry.indexes[a] = faiss_index.build(emb)
        plan = runfolder.alpha_grid_plan(run)
        entry.planned = sorted(set(plan["alphas"]) | set(entry.indexes)) if plan else entry.points
        # complete when this entry holds every planned point — never from a second look at the
        # folder: a point saved since the listing above would make it complete without that point
        entry.complete = (run / runfolder.LEGACY_ALPHA_GRID).is_file() or (
            plan is not None and {round(float(a), 6) for a in plan["alphas"]} <= {round(a, 6) for a in entry.indexes})
        self._grids[job_id] = entry
        while len(self._grids) > MAX_GRIDS:
            self._grids.popitem(last=False)
        return entry

    def alpha_points(self, job_id: str) -> dict:
        """Which α points of a job can be shown and how many are still being computed."""
        g = self.grid(job_id)
        return {"ready": g.points, "planned": g.planned, "computing": len(g.planned) - len(g.points),
                "complete": g.complete}

    def forgotten_paths(self, job_id: str) -> set[str]:
        """Paths of the gallery images the job's request forgets (marked in both grids)."""
        if job_id not in self._forget_paths:
            req = ForgetRequest.from_dict(self.jobs.get(job_id).spec["request"])
            self._forget_paths[job_id] = {it.path for it in resolve(self.gallery, req)[0]}
        return self._forget_paths[job_id]

    def search(self, query: str, job_id: str | None = None, alpha: float | None = None, k: int = 12) -> dict:
        """Top-``k`` gallery images for ``query`` with the original encoder (left) and, for a
        finished job, the unlearned encoder at the computed α nearest to ``alpha`` (right)."""
        t0 = time.perf_counter()
        if not 1 <= int(k) <= MAX_K:
            raise ValueError(f"k (images per grid) must be between 1 and {MAX_K}, got {k}")
        q = self.text_embedding(query)
        self.loader.resources(timeout=120)
        forgotten = self.forgotten_paths(job_id) if job_id else set()
        out = {"query": query.strip(), "k": int(k), "job_id": job_id or None, "forget_count": len(forgotten)}
        out["left"] = self._hits(self.loader.original_index, q, k, forgotten)
        out["recall_left"] = recall(out["left"], forgotten)
        if job_id:
            g = self.grid(job_id)
            points, indexes = g.points, g.indexes
            summary = self.jobs.get(job_id).summary
            used = float(summary.get("alpha", 1.0))           # the job's α: calibrated + restore's margin
            calibrated = summary.get("calibrated_alpha")
            wanted = used if alpha is None else float(alpha)
            if not 0.0 <= wanted <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {wanted}")
            shown = nearest(points, wanted)
            q_right = q if g.text is None or shown == 0.0 else self.edited_text_embedding(query, g, shown)
            out.update(alpha_requested=wanted, alpha_shown=shown, alpha_points=points, alpha_used=used,
                       alpha_calibrated=calibrated,
                       right=self._hits(indexes[shown], q_right, k, forgotten), text_edited=g.text is not None)
            out["recall_right"] = recall(out["right"], forgotten)
            out["alpha_planned"], out["alpha_complete"] = g.planned, g.complete
            out["alpha_note"] = (f"showing α = {shown:.2f}" + ("" if abs(shown - wanted) < 1e-9 else
                                 f" (nearest computed point to {wanted:.2f})") +
                                 f"; {alpha_label(used, calibrated)}; {len(points)} precomputed points"
                                 + ("" if g.complete else f" so far, {len(g.planned) - len(points)} computing"))
        out["seconds"] = time.perf_counter() - t0
        return out

    def _hits(self, idx, q, k, forgotten) -> list[dict]:
        from .. import index as faiss_index
        scores, ids = faiss_index.search(idx, q, k)
        hits = []
        for s, i in zip(scores[0], ids[0]):
            it = self.gallery.items[int(i)]
            bad = it.path in forgotten
            # forgotten images: a red frame and a short caption (the style shows in the image)
            name = f"FORGOTTEN {display(it.concept)}" if bad else \
                display(it.concept) + (f" · {it.style}" if it.style else "")
            path = marked(self.gallery, self.cache_dir, it) if bad else self.gallery.root / it.path
            hits.append(Hit(str(path), name, it.concept, it.superclass, it.subgroup, it.style, float(s), bad).to_dict())
        return hits


@dataclass
class AlphaIndexes:
    """A job's α points loaded so far: {α: FAISS index}, the planned points, whether all are in."""
    indexes: dict
    planned: list = None
    complete: bool = False
    text: object = None         # a TextAlpha when the job's delta edits the text tower, else None

    @property
    def points(self) -> list[float]:
        return sorted(self.indexes)


def check_query(query: str) -> str:
    query = query.strip()
    if not query:
        raise ValueError("type a query, e.g. 'a dog' or 'a poodle'")
    if len(query) > MAX_QUERY:
        raise ValueError(f"the query has {len(query)} characters; keep it under {MAX_QUERY} "
                         "(a short description such as 'a poodle' works best)")
    return query


def recall(hits: list[dict], forgotten: set[str]) -> float | None:
    """recall@k of the forgotten subgroup: its images in the top k / all its images."""
    if not forgotten:
        return None
    return sum(h["forgotten"] for h in hits) / len(forgotten)
