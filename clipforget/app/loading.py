"""The app's model, gallery pixels and original gallery embeddings, loaded once in a background
thread: the page is served first (it needs only the gallery's names), and the model stack (torch,
open_clip, faiss) is imported here when loading starts, never at import."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..data.gallery import Gallery
from ..io import save_safetensors
from ..work import Resources
from ..memory import release_memory

log = logging.getLogger(__name__)


def default_pick(gallery: Gallery) -> tuple[str, str | None]:
    """The (superclass, subgroup) the page offers first: dog / poodle when the gallery has them,
    else its first superclass and that one's first subgroup."""
    superclasses = gallery.superclasses()
    if not superclasses:
        raise ValueError(f"the gallery {gallery.name!r} has no superclass/subgroup images ({len(gallery)} images, "
                         "none in the hierarchy): the app forgets a subgroup of a superclass. Start it with a "
                         "folder root/superclass/subgroup/*.jpg, or a manifest whose rows name a superclass and a "
                         "subgroup (kind empty or 'hierarchy')")
    sc = "dog" if "dog" in superclasses else superclasses[0]
    subs = gallery.subgroups(sc)
    return sc, ("poodle" if "poodle" in subs else subs[0]) if subs else None


def drop_other_trunks(cache_dir: Path, keep: Path | None) -> list[Path]:
    """The cache's disk policy: one gallery trunk per runs folder — the loaded model's (``keep``).
    A trunk is hundreds of MB (448 MB on the embedded model and gallery); those of other models,
    weights or galleries are removed when an app starts (switching back re-encodes the gallery
    once, as a first start does). Returns what was removed."""
    gone = [p for p in Path(cache_dir).glob("trunk-*.safetensors") if keep is None or p.name != Path(keep).name]
    for p in gone:
        p.unlink(missing_ok=True)
        log.info("removed the gallery trunk of another model or gallery: %s", p.name)
    return gone


def remove_partials(cache_dir: Path) -> list[Path]:
    """Temporary files an app killed mid-write left in its cache (``atomic_file``'s
    ``.NAME.*.tmp``, e.g. a gallery trunk cut short by Ctrl-C during the first encode: up to
    448 MB), in it and its folders (cards, marked images). Called when an app starts, while it holds
    the runs folder (no other process writes there). Returns what was removed."""
    cache_dir = Path(cache_dir)
    gone = [p for p in cache_dir.rglob(".*.tmp") if p.is_file()] if cache_dir.is_dir() else []
    for p in gone:
        try:
            p.unlink(missing_ok=True)
            log.info("removed a temporary file an earlier app left in its cache: %s", p.relative_to(cache_dir))
        except OSError as e:        # a cache file the app cannot remove: it is only space
            log.warning("could not remove %s: %s", p, e)
    return gone


class NotReady(RuntimeError):
    """The model is still loading (or failed to load: the message says why)."""


class ModelLoader:
    """Loads once (:meth:`start`); :meth:`resources` blocks until loaded and raises
    :class:`NotReady` with the reason when loading failed."""

    def __init__(self, model: str, pretrained: str | None, device: str, gallery: Gallery, cache_dir: Path,
                 allow_pickle: bool = False, split: dict | None = None, warm: bool = True):
        self.model_name, self.pretrained, self.device = model, pretrained, device
        self.split, self.warm = split, warm    # the jobs' SplitConfig fields; warm the first pick's views
        self.allow_pickle = allow_pickle      # full unpickling of a .pt checkpoint: only for files you trust
        self.gallery, self.cache_dir = gallery, cache_dir
        self.timings: dict[str, float] = {}
        self.error: BaseException | None = None
        self.original_index = None            # FAISS index of the original gallery embeddings
        self._resources: Resources | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._load, name="clipforget-load", daemon=True)

    def start(self) -> None:
        if self._thread.ident is None:        # not started yet
            self._thread.start()

    @property
    def loaded(self) -> bool:
        """Loading ended (successfully or not)."""
        return self._ready.is_set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    def resources(self, timeout: float | None = None) -> Resources:
        """The loaded model and gallery; blocks up to ``timeout`` seconds (None: until loaded)."""
        if not self._ready.wait(timeout):
            raise NotReady(f"the model {self.model_name!r} is still loading; try again in a few seconds")
        if self.error is not None:
            raise NotReady(f"the app could not start: {self.error}")
        return self._resources

    def bundle(self):
        """The loaded model, or None before (or without) it."""
        return self._resources.bundle if self._resources is not None else None

    def _load(self) -> None:
        loading = f"the model {self.model_name!r}"        # what the error message blames
        try:
            # the model stack is imported here, in the background, not with this module: the page
            # comes up without waiting for torch (bench/bench_app.py measures both)
            from .. import index as faiss_index
            from ..data.task import ViewCache
            from ..models import load_clip
            t0 = time.perf_counter()
            bundle = load_clip(self.model_name, self.pretrained, device=self.device, allow_pickle=self.allow_pickle)
            self.timings["model_load"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            loading = f"the gallery {self.gallery.name!r}"
            images, _ = self.gallery.load(self.gallery.items, bundle.image_size)
            self.timings["gallery_load"] = time.perf_counter() - t1
            loading = f"the embeddings of the gallery {self.gallery.name!r}"
            original, trunk = self._original_embeddings(bundle, images)
            self.original_index = faiss_index.build(original)
            resources = Resources(bundle, self.gallery, ViewCache(self.gallery, keep_sources=False), images, original,
                                  trunk)
            if self.warm:
                loading = "the views of the first pick"
                self._warm_views(resources)
            self._resources = resources
            release_memory()          # the encode's transient batches stay in this thread's arena otherwise
            self.timings["ready"] = time.perf_counter() - t0
            log.info("app ready in %.1fs (%s)", self.timings["ready"], self.timings)
        except BaseException as e:  # noqa: BLE001 - reported to every caller of resources()
            self.error = RuntimeError(f"{loading} could not be loaded: {e}")
            log.error("%s", self.error)
        finally:
            self._ready.set()

    def _warm_views(self, res: Resources) -> None:
        """Make the views of the page's first pick (:func:`default_pick`) in the jobs' view cache
        before the model is ready: a first job on it finds its data made, and one on any subgroup
        finds the columns every request shares (the other concepts: two thirds of the data stage
        on the embedded gallery). Jobs cannot start meanwhile (they wait for the model), so the
        cache is never used by two threads at once."""
        from ..data.request import ForgetRequest, SplitConfig
        from ..data.task import build_task
        t0 = time.perf_counter()
        try:
            build_task(self.gallery, ForgetRequest(*default_pick(self.gallery)), res.bundle.image_size,
                       SplitConfig(**(self.split or {})), res.cache)
        except ValueError as e:          # e.g. a gallery too small to split: the job will say so
            log.info("no views made ahead: %s", e)
        self.timings["warm_views"] = time.perf_counter() - t0

    def _original_embeddings(self, bundle, images):
        """Gallery embeddings of the original model and the gallery's trunk
        (:class:`~clipforget.index.GalleryTrunk`; None for a tower that cannot be split), cached
        on disk per (model, weights, gallery)."""
        import torch
        from ..embed import encode_images
        from ..index import GalleryTrunk
        from ..stages.forget import candidate_layers
        from ..suggest import model_gallery_key
        from ..trunk import split_index
        key = model_gallery_key(bundle, self.gallery)
        path = self.cache_dir / f"original-{key}.safetensors"
        # the trunk file is float32: a half-precision model encodes its gallery as before
        fp32 = next(bundle.model.visual.parameters()).dtype == torch.float32
        start = split_index(bundle.model.visual, candidate_layers(bundle.model.visual)) if fp32 else None
        store = GalleryTrunk(self.cache_dir / f"trunk-{key}-{start}.safetensors") if start else None
        drop_other_trunks(self.cache_dir, store.path if store is not None else None)
        trunk = store.load(len(images)) if store is not None else None
        if path.is_file() and (trunk is not None or store is None):
            from safetensors.torch import load_file
            emb = load_file(str(path))["embeddings"]
            if emb.shape[0] == len(images):
                self.timings["original_embeddings_cached"] = 1.0
                return emb, trunk
        t0 = time.perf_counter()
        if store is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            emb, trunk = store.encode(bundle, images, start)
        else:
            emb = encode_images(bundle, images)
        self.timings["original_encode"] = time.perf_counter() - t0
        save_safetensors({"embeddings": emb}, path, {"arch": bundle.arch})
        return emb, trunk
