"""Everything the web app does, without gradio: the app (``app.py``) only lays out widgets and
calls these methods; tests and scripts call them directly.

    core = AppCore(model="embedded", runs_dir="runs/app")   # page-ready at once; model loads behind
    core.describe_retain("dog", "poodle")                    # what will be forgotten / kept
    job = core.start_job("dog", "poodle")                    # background job (see jobs.py)
    core.search("a poodle, a kind of dog", job.id, alpha=0.7, k=12)   # both grids + recall@k

Retrieval: the original gallery embeddings are computed once per (model, gallery) and cached on
disk; every finished job carries its α-grid of gallery embeddings, so moving the slider is a
FAISS search, never a re-encode. The slider snaps to the nearest computed α and says so. Text
embeddings come from the original text tower (no method edits it) and are cached per query.
"""
from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import logging
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .alphas import DEFAULT_ALPHA_POINTS, nearest
from .data.gallery import Gallery, Item, display
from .data.prompts import article
from .data.request import ForgetRequest, resolve
from .eval.report import column_title
from .io import atomic_file, save_safetensors
from .jobs import CertifyWork, ForgetWork, Job, JobError, JobRegistry, Resources
from .memory import release_memory
from .methods.catalog import builtin_methods

log = logging.getLogger(__name__)

THUMB = 96                      # px of one style cell in a subgroup card
MAX_K = 100                     # images per search grid, at most
MAX_QUERY = 300                 # characters of a query, at most (text towers read ~77 tokens anyway)
MARK = (220, 38, 38)            # red frame around images of the forgotten subgroup


class NotReady(RuntimeError):
    """The model is still loading (or failed to load: the message says why)."""


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


class AppCore:
    """One per app process: the gallery, the model (loaded in the background), the job registry
    and the caches the handlers share. No module-level state: the app creates it in ``main``."""

    def __init__(self, model: str = "embedded", pretrained: str | None = None, gallery: str | None = None,
                 runs_dir: str | Path = "runs/app", device: str = "cpu", alpha_points: int = DEFAULT_ALPHA_POINTS,
                 job_config: dict | None = None, job_split: dict | None = None, max_text_cache: int = 512,
                 certify_config: dict | None = None, allow_pickle: bool = False, load: bool = True):
        self.model_name, self.pretrained, self.device = model, pretrained, device
        self.allow_pickle = allow_pickle      # full unpickling of a .pt checkpoint: only for files you trust
        self.gallery = Gallery.open(gallery)
        self.runs_dir = Path(runs_dir).resolve()
        self.cache_dir = self.runs_dir / ".cache"
        self.job_config = job_config          # default method config of jobs (None: the method's defaults)
        self.job_split = job_split            # SplitConfig fields of jobs (None: defaults); tests shrink it
        self.timings: dict[str, float] = {}
        self._index_of = {it.path: i for i, it in enumerate(self.gallery.items)}
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._resources: Resources | None = None
        self._original_index = None
        self._lock = threading.Lock()           # tokenizer + text tower: one caller at a time
        self._cache_lock = threading.RLock()    # the text and α-grid caches, shared by handler threads
        self._texts: OrderedDict[str, np.ndarray] = OrderedDict()
        self._max_texts = max_text_cache
        self._grids: OrderedDict[str, tuple[list[float], dict]] = OrderedDict()
        self._forget_paths: dict[str, set[str]] = {}
        self._suggest_emb = None                # original gallery embeddings for retain suggestions
        self.jobs = JobRegistry(self.runs_dir, {"forget": ForgetWork(self.resources, alpha_points),
                                                "certify": CertifyWork(self.resources, certify_config)})
        self._loader = threading.Thread(target=self._load, name="clipforget-load", daemon=True)
        if load:
            self.start_loading()

    def start_loading(self) -> None:
        """Load the model and gallery in the background (once). ``AppCore(load=False)`` leaves this
        to the caller: the app first serves its page, whose widgets need only the gallery."""
        if self._loader.ident is None:        # not started yet
            self._loader.start()

    # ---- loading -----------------------------------------------------------------------------
    def _load(self) -> None:
        loading = f"the model {self.model_name!r}"        # what the error message blames
        try:
            # the model stack is imported here, in the background, not with this module: the page
            # comes up without waiting for torch (bench/bench_app.py measures both)
            from . import index as faiss_index
            from .data.task import ViewCache
            from .models import load_clip
            t0 = time.perf_counter()
            bundle = load_clip(self.model_name, self.pretrained, device=self.device, allow_pickle=self.allow_pickle)
            self.timings["model_load"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            loading = f"the gallery {self.gallery.name!r}"
            images, _ = self.gallery.load(self.gallery.items, bundle.image_size)
            self.timings["gallery_load"] = time.perf_counter() - t1
            loading = f"the embeddings of the gallery {self.gallery.name!r}"
            original = self._original_embeddings(bundle, images)
            self._original_index = faiss_index.build(original)
            self._resources = Resources(bundle, self.gallery, ViewCache(self.gallery, keep_sources=False), images,
                                        original)
            release_memory()          # the encode's transient batches stay in this thread's arena otherwise
            self.timings["ready"] = time.perf_counter() - t0
            log.info("app ready in %.1fs (%s)", self.timings["ready"], self.timings)
        except BaseException as e:  # noqa: BLE001 - reported to every caller of resources()
            self._load_error = RuntimeError(f"{loading} could not be loaded: {e}")
            log.error("%s", self._load_error)
        finally:
            self._ready.set()

    def _original_embeddings(self, bundle, images) -> torch.Tensor:
        """Gallery embeddings of the original model, cached per (model, weights, gallery)."""
        from .embed import encode_images
        src = Path(bundle.pretrained) if bundle.pretrained and Path(str(bundle.pretrained)).is_file() else None
        stamp = f"{src.stat().st_size}-{src.stat().st_mtime_ns}" if src else ""
        key = hashlib.sha256(f"{bundle.arch}|{bundle.pretrained}|{stamp}|{bundle.image_size}|"
                             f"{self.gallery.content_hash}|{self.gallery.root}".encode()).hexdigest()[:16]
        path = self.cache_dir / f"original-{key}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file
            emb = load_file(str(path))["embeddings"]
            if emb.shape[0] == len(images):
                self.timings["original_embeddings_cached"] = 1.0
                return emb
        t0 = time.perf_counter()
        emb = encode_images(bundle, images)
        self.timings["original_encode"] = time.perf_counter() - t0
        save_safetensors({"embeddings": emb}, path, {"arch": bundle.arch})
        return emb

    def resources(self, timeout: float | None = None) -> Resources:
        """The loaded model and gallery; blocks up to ``timeout`` seconds (None: until loaded)."""
        if not self._ready.wait(timeout):
            raise NotReady(f"the model {self.model_name!r} is still loading; try again in a few seconds")
        if self._load_error is not None:
            raise NotReady(f"the app could not start: {self._load_error}")
        return self._resources

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None

    def model_status(self) -> str:
        if not self._ready.is_set():
            return f"Loading model `{self.model_name}` and encoding the gallery…"
        if self._load_error is not None:
            return f"The app could not start: {self._load_error}"
        b = self._resources.bundle
        return (f"Model `{self.model_name}` ({b.arch}, {b.image_size} px) · gallery `{self.gallery.name}`: "
                f"{len(self.gallery)} images, {len(self.gallery.superclasses())} superclasses\n\n"
                + device_line(b.device, b.precision))

    def close(self) -> None:
        self.jobs.close()

    # ---- pick --------------------------------------------------------------------------------
    def superclasses(self) -> list[str]:
        return self.gallery.superclasses()

    def subgroups(self, superclass: str) -> list[str]:
        return self.gallery.subgroups(superclass)

    def styles(self) -> list[str]:
        return self.gallery.styles()

    def methods(self) -> list[str]:
        """Every registered method, ``ours`` first (the dropdown's choices). Before the registry is
        imported (it brings torch) the built-in ones, read from their source; once it is, the
        registry, with any method a script registered before starting the app."""
        if "clipforget.methods.base" in sys.modules:
            from .methods import list_methods
            return list_methods()
        return list(builtin_methods())

    def method_summary(self, name: str) -> str:
        if name in builtin_methods() and "clipforget.methods.base" not in sys.modules:
            return builtin_methods()[name]
        from .methods import get_method
        return get_method(name).summary

    def subgroup_cards(self, superclass: str) -> list[tuple[str, str]]:
        """One thumbnail per subgroup showing it in every style, with its name as caption."""
        out = []
        for sg in self.subgroups(superclass):
            items = self.gallery.select(superclass=superclass, subgroup=sg)
            out.append((str(self._card(superclass, sg, items)), display(sg)))
        return out

    def _card(self, superclass: str, subgroup: str, items: list[Item]) -> Path:
        from PIL import Image
        key = hashlib.sha256(f"{self.gallery.root}|{superclass}|{subgroup}|{[i.path for i in items]}".encode())
        path = self.cache_dir / "cards" / f"{key.hexdigest()[:16]}.png"
        if path.is_file():
            return path
        items = sorted(items, key=lambda it: it.style)[:9]
        cols = min(3, len(items))
        rows = -(-len(items) // cols)
        card = Image.new("RGB", (cols * THUMB, rows * THUMB), (255, 255, 255))
        for i, it in enumerate(items):
            img = self.gallery.open_image(it)
            img.thumbnail((THUMB - 6, THUMB - 6))
            x, y = (i % cols) * THUMB, (i // cols) * THUMB
            card.paste(img, (x + (THUMB - img.width) // 2, y + (THUMB - img.height) // 2))
        buf = io.BytesIO()
        card.save(buf, "PNG")
        with atomic_file(path) as f:
            f.write(buf.getvalue())
        return path

    def request(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> ForgetRequest:
        """A validated request; empty strings mean 'not chosen'. Raises ValueError with advice."""
        subgroup, style = subgroup or None, style or None
        if not superclass:
            raise ValueError("pick a superclass first")
        if subgroup is None and style is None:
            raise ValueError(f"pick a subgroup of {superclass!r} (or a style) to forget; forgetting the "
                             "whole superclass is not a subgroup request")
        req = ForgetRequest(superclass, subgroup, style)
        resolve(self.gallery, req)     # raises with close-match suggestions
        return req

    def suggested_queries(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> list[str]:
        """The coarse label first ('a dog': the association the method removes for the forgotten
        subgroup), then the subgroup name ('a poodle') and both ('a poodle, a kind of dog')."""
        sc = display(superclass)
        coarse = f"{article(sc)} {sc}"
        out = [coarse]
        if subgroup:
            sg = display(subgroup)
            out += [f"{article(sg)} {sg}", f"{article(sg)} {sg}, a kind of {sc}"]
        if style:
            phrase = self.gallery.style_phrase(style)
            out = [f"{article(phrase)} {phrase} of {q}" for q in out] + out[:1]
        return list(dict.fromkeys(out))

    def default_query(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> str:
        return self.suggested_queries(superclass, subgroup, style)[0]

    def describe_retain(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> dict:
        """What a job would forget and keep, before it runs."""
        req = self.request(superclass, subgroup, style)
        forget, retain, names, warnings = resolve(self.gallery, req)
        counts = {n: sum(1 for it in retain if it.subgroup == n) for n in names}
        other = sum(1 for it in self.gallery.items if it.kind == "hierarchy" and it.superclass != superclass)
        return {"label": req.label, "request": req.to_dict(),
                "forget": [it.path for it in forget], "forget_styles": sorted({it.style for it in forget}),
                "retain_subgroups": names, "retain_counts": counts, "retain_images": len(retain),
                "other_superclass_images": other, "warnings": warnings,
                "query": self.default_query(superclass, subgroup, style),
                "queries": self.suggested_queries(superclass, subgroup, style)}

    def retain_markdown(self, info: dict) -> str:
        sty = ", ".join(info["forget_styles"]) or "—"
        kept = ", ".join(f"{display(n)} ({c})" for n, c in info["retain_counts"].items()) or "none"
        lines = [f"**Forget** {info['label']} ({info['request']['superclass']}): {len(info['forget'])} images "
                 f"in styles {sty}.",
                 f"**Retain** {info['retain_images']} images of {len(info['retain_subgroups'])} subgroups: {kept}.",
                 f"Also checked, not trained on: {info['other_superclass_images']} images of other superclasses "
                 "and the other-concepts pool."]
        lines += [f"⚠️ {w}" for w in info["warnings"]]
        return "\n\n".join(lines)

    # ---- jobs --------------------------------------------------------------------------------
    def start_job(self, superclass: str, subgroup: str | None = None, style: str | None = None,
                  method: str = "ours", config: dict | None = None, retain: list[str] | None = None) -> Job:
        """``retain``: the edited retain subgroups (None, or the siblings themselves: the default
        request with ``retain=None``, exactly what the CLI and the sweep run)."""
        req = self.with_retain(self.request(superclass, subgroup, style), retain)
        from .methods import get_method
        get_method(method)       # raises for unknown names
        spec = {"request": req.to_dict(), "method": method, "config": config or self.job_config,
                "split": self.job_split,
                "model": self.model_name, "pretrained": self.pretrained, "gallery": self.gallery.name,
                "query": self.default_query(superclass, subgroup, style),
                "queries": self.suggested_queries(superclass, subgroup, style)}
        return self.jobs.submit(spec, f"{req.label} ({req.superclass}) · {method}")

    def job_status(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        d = job.to_dict()
        d["text"] = status_text(job)
        return d

    def cancel(self, job_id: str) -> dict:
        self.jobs.cancel(job_id)
        return self.job_status(job_id)

    def history(self) -> list[tuple[str, str]]:
        """(label, id) of every forget job, newest first, for the reopen dropdown."""
        return [(f"{time.strftime('%m-%d %H:%M', time.localtime(j.created))} · {j.label} · {j.status}", j.id)
                for j in self.jobs.jobs() if j.kind == "forget"]

    # ---- retain set: suggestion and editing -------------------------------------------------------
    def _gallery_embeddings(self):
        res = self.resources(timeout=0.01)          # raises NotReady while loading
        from .suggest import GalleryEmbeddings
        if self._suggest_emb is None:
            self._suggest_emb = GalleryEmbeddings(list(self.gallery.items), res.original)
        return res.bundle, self._suggest_emb

    def suggestion(self, superclass: str, subgroup: str | None = None, style: str | None = None):
        """The retain suggestion for a request (siblings + at-risk neighbours); NotReady while the
        model loads."""
        req = self.request(superclass, subgroup, style)
        bundle, emb = self._gallery_embeddings()        # NotReady before the suggestion module loads torch
        from .suggest import suggest_for_request
        return suggest_for_request(bundle, self.gallery, req, embeddings=emb)

    def retain_editor(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> dict:
        """What the editable retain widget shows: every subgroup of the gallery as a choice (the
        siblings first, then the at-risk and nearest ones), the siblings selected, and the
        suggestion's markdown (or why there is none yet)."""
        req = self.request(superclass, subgroup, style)
        siblings = resolve(self.gallery, req)[2]
        try:
            s = self.suggestion(superclass, subgroup, style)
        except NotReady as e:
            return {"choices": self._retain_choices(siblings, []), "value": siblings,
                    "markdown": f"Retain suggestion: {e}", "at_risk": []}
        near = [n.name for n in s.neighbours if n.superclass]
        return {"choices": self._retain_choices(siblings, near), "value": s.retain, "markdown": s.markdown(),
                "at_risk": [n.name for n in s.at_risk if n.superclass]}

    def _retain_choices(self, first: list[str], then: list[str]) -> list[str]:
        rest = sorted(self.gallery.subgroups())
        return list(dict.fromkeys(first + then + rest))

    def with_retain(self, req: ForgetRequest, retain: list[str] | None) -> ForgetRequest:
        """The request with an edited retain set; the siblings themselves stay ``retain=None``."""
        if retain is None:
            return req
        retain = [r for r in dict.fromkeys(retain) if r]
        if set(retain) == set(resolve(self.gallery, req)[2]):
            return req
        edited = replace(req, retain=tuple(retain))
        resolve(self.gallery, edited)          # unknown names / the forget subgroup itself raise here
        return edited

    def suggest_uploads(self, files: list, coarse_label: str) -> dict:
        """Example images uploaded by the user (checked and stored by ``uploads.store_uploads``)
        + their coarse label -> the retain suggestion for them."""
        from .suggest import suggest_for_examples
        from .uploads import store_uploads
        batch = store_uploads(files or [], self.runs_dir)
        bundle, emb = self._gallery_embeddings()
        s = suggest_for_examples(bundle, self.gallery, batch.paths, coarse_label, embeddings=emb)
        note = ""
        if s.match:
            note = (f"\n\nTo forget them, pick **{display(s.match['subgroup'])}** in "
                    f"**{s.match['superclass']}** above.")
        return {"batch": batch.id, "retain": s.retain, "match": s.match, "markdown": s.markdown() + note,
                "suggestion": s.to_dict()}

    # ---- certificate ----------------------------------------------------------------------------
    def start_certificate(self, job_id: str, config: dict | None = None) -> Job:
        """Certify a finished forget job in the background (a "certify" job)."""
        forget_job = self.jobs.get(job_id)
        if forget_job.kind != "forget":
            raise JobError(f"job {job_id} is a {forget_job.kind} job; certify a forget job")
        run = self.jobs.run_dir(job_id)
        spec = {"run_dir": str(run), "of_job": job_id, "config": config, "request": forget_job.spec.get("request")}
        return self.jobs.submit(spec, f"certificate of {forget_job.label}", kind="certify")

    def certificate(self, job_id: str) -> dict | None:
        """The saved certificate of a finished forget job, or None."""
        from .certify import load_certificate
        return load_certificate(self.jobs.run_dir(job_id))

    def certificate_view(self, job_id: str) -> dict:
        """Markdown for the certificate panel: the certificate, a running certify job's progress,
        or an invitation; plus the path of certificate.md when there is one."""
        from .certify import load_certificate
        from .certify import markdown as certificate_markdown
        run = self.jobs.run_dir(job_id)
        cert = load_certificate(run)
        if cert is not None:
            return {"markdown": certificate_markdown(cert), "file": str(run / "certificate.md"),
                    "certified": cert["certified"]}
        running = self.jobs.running()
        if running is not None and running.kind == "certify" and running.spec.get("of_job") == job_id:
            return {"markdown": status_text(running), "file": None, "certified": None, "job": running.id}
        return {"markdown": "Not certified yet: **Certify** runs a relearning attack, linear probes and "
                            "retrieval checks in the background.", "file": None, "certified": None}

    # ---- compare -----------------------------------------------------------------------------
    def text_embedding(self, query: str) -> np.ndarray:
        """One embedding per query serves every α: no method edits the text tower."""
        query = query.strip()
        if not query:
            raise ValueError("type a query, e.g. 'a dog' or 'a poodle'")
        if len(query) > MAX_QUERY:
            raise ValueError(f"the query has {len(query)} characters; keep it under {MAX_QUERY} "
                             "(a short description such as 'a poodle' works best)")
        with self._cache_lock:
            if query in self._texts:
                self._texts.move_to_end(query)
                return self._texts[query]
        bundle = self.resources(timeout=120).bundle
        from .embed import encode_texts
        with self._lock:
            emb = encode_texts(bundle, [query])[0].numpy()
        with self._cache_lock:
            self._texts[query] = emb
            while len(self._texts) > self._max_texts:
                self._texts.popitem(last=False)
        return emb

    def _grid(self, job_id: str) -> tuple[list[float], dict]:
        """(α points, {α: faiss index}) of a finished job; α = 0 is the original index."""
        with self._cache_lock:
            if job_id in self._grids:
                self._grids.move_to_end(job_id)
                return self._grids[job_id]
            from safetensors.torch import load_file

            from . import index as faiss_index
            run = self.jobs.run_dir(job_id)
            data = load_file(str(run / "alpha_grid.safetensors"))
            emb, alphas = data["embeddings"], [round(float(a), 6) for a in data["alphas"]]
            made_on = json.loads((run / "alpha_grid.json").read_text()).get("gallery_hash")
            if emb.shape[1] != len(self.gallery) or made_on not in (None, self.gallery.content_hash):
                raise ValueError(f"job {job_id} was run on another gallery ({emb.shape[1]} images, hash {made_on}; "
                                 f"this app has {len(self.gallery)}, hash {self.gallery.content_hash}); start the "
                                 "app with that gallery to reopen it")
            self.resources(timeout=120)
            indexes = {0.0: self._original_index}
            indexes.update({a: faiss_index.build(e) for a, e in zip(alphas, emb)})
            entry = ([0.0] + alphas, indexes)
            self._grids[job_id] = entry
            while len(self._grids) > 3:
                self._grids.popitem(last=False)
            return entry

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
        self.resources(timeout=120)
        forgotten = self.forgotten_paths(job_id) if job_id else set()
        out = {"query": query.strip(), "k": int(k), "job_id": job_id or None, "forget_count": len(forgotten)}
        out["left"] = self._hits(self._original_index, q, k, forgotten)
        out["recall_left"] = _recall(out["left"], forgotten)
        if job_id:
            points, indexes = self._grid(job_id)
            calibrated = float(self.jobs.get(job_id).summary.get("alpha", 1.0))
            wanted = calibrated if alpha is None else float(alpha)
            if not 0.0 <= wanted <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {wanted}")
            shown = nearest(points, wanted)
            out.update(alpha_requested=wanted, alpha_shown=shown, alpha_points=points, alpha_calibrated=calibrated,
                       right=self._hits(indexes[shown], q, k, forgotten))
            out["recall_right"] = _recall(out["right"], forgotten)
            out["alpha_note"] = (f"showing α = {shown:.2f}" + ("" if abs(shown - wanted) < 1e-9 else
                                 f" (nearest computed point to {wanted:.2f})") +
                                 f"; calibrated α = {calibrated:.2f}; {len(points)} precomputed points")
        out["seconds"] = time.perf_counter() - t0
        return out

    def _hits(self, idx, q, k, forgotten) -> list[dict]:
        from . import index as faiss_index
        scores, ids = faiss_index.search(idx, q, k)
        hits = []
        for s, i in zip(scores[0], ids[0]):
            it = self.gallery.items[int(i)]
            bad = it.path in forgotten
            # forgotten images: a red frame and a short caption (the style shows in the image)
            name = f"FORGOTTEN {display(it.concept)}" if bad else \
                display(it.concept) + (f" · {it.style}" if it.style else "")
            hits.append(Hit(str(self._marked(it) if bad else self.gallery.root / it.path), name, it.concept, it.superclass, it.subgroup,
                            it.style, float(s), bad).to_dict())
        return hits

    def _marked(self, item: Item) -> Path:
        """The image with a red frame: the forgotten subgroup, visible at a glance."""
        from PIL import Image, ImageOps
        path = self.cache_dir / "marked" / (hashlib.sha256(str(self.gallery.root / item.path).encode())
                                            .hexdigest()[:16] + ".png")
        if not path.is_file():
            img = self.gallery.open_image(item).resize((88, 88), Image.BICUBIC)
            img = ImageOps.expand(img, border=4, fill=MARK)
            buf = io.BytesIO()
            img.save(buf, "PNG")
            with atomic_file(path) as f:
                f.write(buf.getvalue())
        return path

    # ---- results -----------------------------------------------------------------------------
    def report(self, job_id: str) -> dict:
        return json.loads((self.jobs.run_dir(job_id) / "report.json").read_text())

    def metrics_table(self, job_id: str) -> dict:
        """The report's columns (accuracy before / after) and the Score."""
        rep = self.report(job_id)
        columns = {**rep["columns"], **rep.get("trained_on", {})}     # held out, then the trained-on examples
        rows = [[column_title(n), c.get("images", ""), round(c["before"], 3), round(c["after"], 3),
                 round(c["after"] / c["before"], 2) if c["before"] else None] for n, c in columns.items()]
        return {"headers": ["column", "images", "before", "after", "ratio"], "rows": rows,
                "score": rep["score"], "alpha": rep["alpha"], "method": rep["method"]}

    def alpha_plot(self, job_id: str) -> Path:
        """PNG of calibration accuracy per column vs α, the calibrated α marked."""
        path = self.jobs.job_dir(job_id) / "alpha_curve.png"
        if path.is_file():
            return path
        rep = self.report(job_id)
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
        fig = Figure(figsize=(6.4, 3.6), dpi=100)
        ax = fig.subplots()
        curve = rep.get("alpha_curve") or []
        if curve:
            xs = [r["alpha"] for r in curve]
            for name in [k for k in curve[0] if k != "alpha"]:
                style = {"target": {"lw": 2.5, "color": "#dc2626"},
                         "forget_examples": {"lw": 1.6, "color": "#dc2626", "ls": ":"}}.get(name, {"lw": 1.6})
                ax.plot(xs, [r[name] for r in curve], label=column_title(name), **style)
        else:
            ax.text(0.5, 0.5, f"method {rep['method']!r} has no α-curve (α = {rep['alpha']:.2f})",
                    ha="center", va="center", transform=ax.transAxes)
        ax.axvline(rep["alpha"], color="k", ls="--", lw=1)
        ax.annotate(f"calibrated α = {rep['alpha']:.2f}", (rep["alpha"], 0.04), xytext=(4, 0),
                    textcoords="offset points", fontsize=8)
        if rep.get("chance"):
            ax.axhline(rep["chance"], color="gray", ls=":", lw=1, label="chance")
        ax.set(xlabel="unlearning strength α (0 = original, 1 = unlearned)", ylabel="zero-shot accuracy",
               ylim=(0, 1.02), xlim=(0, 1), title="calibration set: accuracy vs α")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        with atomic_file(path) as f:
            f.write(buf.getvalue())
        return path

    def export(self, job_id: str) -> dict:
        """Paths of the downloadable artifacts: the open_clip export folder zipped, the reports."""
        run = self.jobs.run_dir(job_id)
        zpath = self.jobs.job_dir(job_id) / "unlearned-model.zip"
        if not zpath.is_file():
            zip_export(run / "export", zpath)
        return {"model_zip": str(zpath), "report_md": str(run / "report.md"), "report_json": str(run / "report.json")}


def device_line(device, precision: str) -> str:
    """Where the app's model runs, for the page: ``Runs on `cuda:0` (NVIDIA H200) · fp32``."""
    name = ""
    if getattr(device, "type", str(device)) == "cuda":
        import torch
        name = f" ({torch.cuda.get_device_name(device)})"
    return f"Runs on `{device}`{name} · {precision}"


def zip_export(export_dir: str | Path, zpath: str | Path) -> Path:
    """An export folder as a zip whose files are ``export/<name>`` (written atomically). Unzipped
    anywhere, ``export/`` loads like the folder itself (:func:`clipforget.models.export_open_clip`)."""
    with atomic_file(zpath) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(Path(export_dir).iterdir()):
            z.write(p, f"export/{p.name}")
    return Path(zpath)


def bind_warning(host: str) -> str | None:
    """What to tell the operator when the app will listen beyond this machine (None: loopback)."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
        return (f"binding to {host}: the app (and starting jobs) is reachable from other machines and has "
                "no authentication; use --host 127.0.0.1 unless you trust everyone on that network")
    except ValueError:
        return (f"binding to host name {host!r}: the app has no authentication; make sure that name is not "
                "reachable by people you do not trust (--host 127.0.0.1 keeps it on this machine)")


def _recall(hits: list[dict], forgotten: set[str]) -> float | None:
    """recall@k of the forgotten subgroup: its images in the top k / all its images."""
    if not forgotten:
        return None
    return sum(h["forgotten"] for h in hits) / len(forgotten)


def _done_forget(job: Job) -> str:
    s = job.summary
    return (f"Job `{job.id[:8]}` {job.label}: done in {job.seconds:.0f}s · Score {s.get('score', float('nan')):.1f}"
            f" · α = {s.get('alpha', 1.0):.2f} · α-grid {s.get('alpha_grid_points', '?')} points in "
            f"{s.get('alpha_grid_seconds', float('nan')):.1f}s")


def _done_certify(job: Job) -> str:
    return f"Job `{job.id[:8]}` {job.label}: done in {job.seconds:.0f}s · {job.summary.get('verdict', '')}"


DONE_TEXT = {"forget": _done_forget, "certify": _done_certify}     # per job kind


def status_text(job: Job) -> str:
    if job.status == "queued":
        return f"Job `{job.id[:8]}` {job.label}: queued"
    if job.status == "running":
        where = f"{job.stage}" + (f" {job.step}/{job.total}" if job.total else "")
        return f"Job `{job.id[:8]}` {job.label}: running · {where} · {job.seconds:.0f}s"
    if job.status == "done":
        return DONE_TEXT.get(job.kind, _done_forget)(job)
    if job.status == "cancelled":
        return f"Job `{job.id[:8]}` {job.label}: cancelled (nothing saved)"
    return f"Job `{job.id[:8]}` {job.label}: failed · {job.error}"
