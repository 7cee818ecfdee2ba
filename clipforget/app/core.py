"""``AppCore``: everything the web app does, without gradio, behind one small facade. ``app.py``
lays out widgets and calls these methods; tests and scripts call them directly.

    core = AppCore(model="embedded", runs_dir="runs/app")   # page-ready at once; model loads behind
    core.describe_retain("dog", "poodle")                    # what will be forgotten / kept
    job = core.start_job("dog", "poodle")                    # background job (see clipforget/jobs.py)
    core.search("a poodle, a kind of dog", job.id, alpha=0.7, k=12)   # both grids + recall@k

The work lives in the package's modules: ``loading`` (the model, in the background), ``retain``
(requests, queries, retain sets), ``cards`` (subgroup cards, red frames), ``retrieval`` (search,
the text and α-grid caches), ``results`` (metrics, plot, downloads) and ``views`` (the text shown).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import runfolder
from ..alphas import DEFAULT_ALPHA_POINTS
from ..data.gallery import Gallery
from ..data.request import ForgetRequest, SplitConfig
from ..jobs import Job, JobError, JobRegistry
from ..work import CertifyWork, ForgetWork, Resources, check_same_model, model_id
from ..methods.catalog import builtin_methods
from . import cards, results, views
from . import retain as retain_sets
from .loading import ModelLoader, default_pick, remove_partials
from .retrieval import Retrieval


class AppCore:
    """One per app process: the gallery, the model (loaded in the background), the job registry
    and the caches the handlers share. No module-level state: the app creates it in ``main``."""

    def __init__(self, model: str = "embedded", pretrained: str | None = None, gallery: str | None = None,
                 runs_dir: str | Path = "runs/app", device: str = "cpu", alpha_points: int = DEFAULT_ALPHA_POINTS,
                 job_config: dict | None = None, job_split: dict | None = None, max_text_cache: int = 512,
                 certify_config: dict | None = None, allow_pickle: bool = False, load: bool = True):
        self.model_name, self.pretrained, self.device = model, pretrained, device
        self.gallery = Gallery.open(gallery)
        default_pick(self.gallery)            # the page's first pick: a gallery without one says so here
        self.runs_dir = Path(runs_dir).resolve()
        self.cache_dir = self.runs_dir / ".cache"
        self.job_config = job_config          # default method config of jobs (None: the method's defaults)
        self.job_split = job_split            # SplitConfig fields of jobs (None: defaults); tests shrink it
        self.loader = ModelLoader(model, pretrained, device, self.gallery, self.cache_dir, allow_pickle, job_split)
        self.jobs = JobRegistry(self.runs_dir, {"forget": ForgetWork(self.resources, alpha_points),
                                                "certify": CertifyWork(self.resources, certify_config,
                                                                       (model, pretrained))})
        remove_partials(self.cache_dir)       # the runs folder is this app's now (the registry's lock)
        self.retrieval = Retrieval(self.loader, self.jobs, self.cache_dir, max_text_cache)
        self.suggester = retain_sets.RetainSuggester(self.gallery, self.resources, self.runs_dir)
        if load:
            self.start_loading()

    # ---- loading -----------------------------------------------------------------------------
    def start_loading(self) -> None:
        """Load the model and gallery in the background (once). ``AppCore(load=False)`` leaves this
        to the caller: the app first serves its page, whose widgets need only the gallery."""
        self.loader.start()

    def resources(self, timeout: float | None = None) -> Resources:
        """The loaded model and gallery; blocks up to ``timeout`` seconds (None: until loaded)."""
        return self.loader.resources(timeout)

    @property
    def ready(self) -> bool:
        return self.loader.ready

    @property
    def timings(self) -> dict[str, float]:
        return self.loader.timings

    def model_status(self) -> str:
        return views.model_status(self.model_name, self.gallery, self.loader.loaded, self.loader.error,
                                  self.loader.bundle())

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
        imported (it brings torch) the package's methods read from their source; once it is, the
        registry, with any method a script registered before starting the app."""
        if "clipforget.methods.base" in sys.modules:
            from ..methods import list_methods
            return list_methods()
        return list(builtin_methods())

    def method_summary(self, name: str) -> str:
        if name in builtin_methods() and "clipforget.methods.base" not in sys.modules:
            return builtin_methods()[name]
        from ..methods import get_method
        return get_method(name).summary

    def subgroup_cards(self, superclass: str) -> list[tuple[str, str]]:
        return cards.subgroup_cards(self.gallery, self.cache_dir, superclass)

    def request(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> ForgetRequest:
        return retain_sets.make_request(self.gallery, superclass, subgroup, style)

    def suggested_queries(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> list[str]:
        return retain_sets.suggested_queries(self.gallery, superclass, subgroup, style)

    def default_query(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> str:
        return self.suggested_queries(superclass, subgroup, style)[0]

    # ---- retain set ----------------------------------------------------------------------------
    def describe_retain(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> dict:
        split = SplitConfig(**self.job_split) if self.job_split else None
        return retain_sets.describe_retain(self.gallery, superclass, subgroup, style, split)

    def retain_markdown(self, info: dict) -> str:
        return views.retain_markdown(info)

    def suggestion(self, superclass: str, subgroup: str | None = None, style: str | None = None):
        return self.suggester.suggestion(self.request(superclass, subgroup, style))

    def retain_editor(self, superclass: str, subgroup: str | None = None, style: str | None = None) -> dict:
        return self.suggester.editor(self.request(superclass, subgroup, style))

    def with_retain(self, req: ForgetRequest, retain: list[str] | None) -> ForgetRequest:
        """The request with an edited retain set; the siblings themselves stay ``retain=None``."""
        return retain_sets.with_retain(self.gallery, req, retain)

    def suggest_uploads(self, files: list, coarse_label: str) -> dict:
        return self.suggester.for_uploads(files, coarse_label)

    # ---- jobs --------------------------------------------------------------------------------
    def start_job(self, superclass: str, subgroup: str | None = None, style: str | None = None,
                  method: str = "ours", config: dict | None = None, retain: list[str] | None = None) -> Job:
        """``retain``: the edited retain subgroups (None, or the siblings themselves: the default
        request with ``retain=None``, exactly what the CLI and the sweep run)."""
        req = self.with_retain(self.request(superclass, subgroup, style), retain)
        from ..methods import get_method
        get_method(method)       # raises for unknown names
        queries = self.suggested_queries(superclass, subgroup, style)
        spec = {"request": req.to_dict(), "method": method, "config": config or self.job_config,
                "split": self.job_split,
                **dict(zip(("model", "pretrained"), model_id(self.model_name, self.pretrained))),
                "gallery": self.gallery.name,
                "query": queries[0], "queries": queries}
        return self.jobs.submit(spec, f"{req.label} ({req.superclass}) · {method}")

    def job_status(self, job_id: str) -> dict:
        """The job as a dict, with ``text`` (its status for people), ``progress_text`` (the same
        with a bar of the stage's fraction) and ``results`` (its results are usable: ``ready`` — a
        forget job's evaluation and α-grid still computing — or ``done``)."""
        job = self.jobs.get(job_id)
        d = job.to_dict()
        d["text"] = views.status_text(job)
        d["progress_text"] = views.progress_text(job)
        d["results"] = job.has_results
        return d

    def alpha_points(self, job_id: str) -> dict:
        """The α points of a job's α-grid that the slider can show now (``ready``, α = 0 included),
        all it plans, how many are ``computing``, and ``text`` for people."""
        state = self.retrieval.alpha_points(job_id)
        return {**state, "text": views.alpha_points_text(state, self.jobs.get(job_id))}

    def cancel(self, job_id: str) -> dict:
        self.jobs.cancel(job_id)
        return self.job_status(job_id)

    def history(self) -> list[tuple[str, str]]:
        """(label, id) of every forget job, newest first, for the reopen dropdown."""
        return [(f"{time.strftime('%m-%d %H:%M', time.localtime(j.created))} · {j.label} · {j.status}", j.id)
                for j in self.jobs.jobs() if j.kind == "forget"]

    # ---- certificate ----------------------------------------------------------------------------
    def start_certificate(self, job_id: str, config: dict | None = None) -> Job:
        """Certify a finished forget job in the background (a "certify" job)."""
        forget_job = self.jobs.get(job_id)
        if forget_job.kind != "forget":
            raise JobError(f"job {job_id} is a {forget_job.kind} job; certify a forget job")
        check_same_model(forget_job.spec, self.model_name, self.pretrained, job_id, "certify it")
        run = self.jobs.run_dir(job_id)
        spec = {"run_dir": str(run), "of_job": job_id, "config": config, "request": forget_job.spec.get("request"),
                **{k: forget_job.spec[k] for k in ("model", "pretrained") if k in forget_job.spec}}
        return self.jobs.submit(spec, f"certificate of {forget_job.label}", kind="certify")

    def certificate(self, job_id: str) -> dict | None:
        """The saved certificate of a finished forget job, or None."""
        return runfolder.load_certificate(self.jobs.run_dir(job_id))

    def certificate_view(self, job_id: str) -> dict:
        """Markdown for the certificate panel: the certificate, a running certify job's progress,
        or an invitation; plus the path of certificate.md when there is one."""
        run = self.jobs.run_dir(job_id)
        cert = runfolder.load_certificate(run)
        if cert is not None:
            from ..certify import markdown as certificate_markdown
            return {"markdown": certificate_markdown(cert), "file": str(runfolder.certificate_md(run)),
                    "certified": cert["certified"]}
        running = self.jobs.running()
        if running is not None and running.kind == "certify" and running.spec.get("of_job") == job_id:
            return {"markdown": views.status_text(running), "file": None, "certified": None, "job": running.id}
        return {"markdown": views.CERTIFY_INVITATION, "file": None, "certified": None}

    # ---- compare -----------------------------------------------------------------------------
    def text_embedding(self, query: str):
        return self.retrieval.text_embedding(query)

    def forgotten_paths(self, job_id: str) -> set[str]:
        return self.retrieval.forgotten_paths(job_id)

    def search(self, query: str, job_id: str | None = None, alpha: float | None = None, k: int = 12) -> dict:
        """Top-``k`` gallery images for ``query`` with the original encoder (left) and, for a job
        with results, the unlearned encoder at the computed α nearest to ``alpha`` (right)."""
        return self.retrieval.search(query, job_id, alpha, k)

    # ---- results -----------------------------------------------------------------------------
    def evaluated(self, job_id: str) -> bool:
        """The job's report is there: metrics, plot and downloads can show (its grids show before,
        from the moment its results are ready)."""
        return runfolder.is_evaluated(self.jobs.run_dir(job_id))

    def report(self, job_id: str) -> dict:
        return runfolder.read_report(self._evaluated_run(job_id))

    def _evaluated_run(self, job_id: str) -> Path:
        """The job's run folder once its report (and export) is there; raises before, saying why."""
        run = self.jobs.run_dir(job_id)
        if not runfolder.is_evaluated(run):
            job = self.jobs.get(job_id)
            why = ("its evaluation is still running: the report comes in seconds" if job.active else
                   f"it has no report ({job.summary.get('unfinished', 'its evaluation did not finish')})")
            raise JobError(f"job {job_id}: {why}")
        return run

    def metrics_table(self, job_id: str) -> dict:
        return results.metrics_table(self.report(job_id))

    def alpha_plot(self, job_id: str, report: dict | None = None) -> Path:
        """The α-curve's PNG, drawn once from the report (``report``: already read, not read again)."""
        path = self.jobs.job_dir(job_id) / "alpha_curve.png"
        return path if path.is_file() else results.alpha_plot(report or self.report(job_id), path,
                                                              self.jobs.get(job_id).summary.get("calibrated_alpha"))

    def evaluation(self, job_id: str) -> dict:
        """What the page shows of an evaluated job — metrics table, α-curve and downloads — from one
        read of its report."""
        report = self.report(job_id)
        return {"table": results.metrics_table(report), "plot": self.alpha_plot(job_id, report),
                "downloads": self.export(job_id)}

    def export(self, job_id: str) -> dict:
        return results.downloads(self._evaluated_run(job_id), self.jobs.job_dir(job_id) / "unlearned-model.zip")
