"""Background jobs: one worker thread runs unlearning jobs outside any web handler.

    registry = JobRegistry("runs/app", work={"forget": ForgetWork(resources), "certify": CertifyWork(resources)})
    job = registry.submit({"request": {...}, "method": "ours"}, label="poodle (dog)")   # kind "forget"
    registry.submit({"run_dir": ...}, label="certificate of poodle", kind="certify")
    registry.get(job.id).stage, .fraction          # observed by the UI, never driven by it
    registry.cancel(job.id)                        # raises Cancelled inside the job's next progress event

A job lives in ``runs_dir/<id>/``: ``job.json`` (status, stage, timings; rewritten atomically) and,
once it succeeds, ``run/`` — a run folder (:mod:`clipforget.runfolder`) with its α-grid — which
appears complete or not at all. A failed or cancelled job leaves only its ``job.json``. After a
restart, a job that was queued or running when the process died is marked failed. One process at
a time owns a runs folder (a lock file, released by the kernel even on SIGKILL): a second app on
the same folder is refused instead of failing the first one's running job.

No gradio and no torch at import here (the work functions import the model stack when a job
runs): the app, the tests and scripts use the same registry.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

try:
    import fcntl
except ImportError:       # Windows: no flock; one app per runs folder is then up to the user
    fcntl = None

from .alphas import DEFAULT_ALPHA_POINTS, alpha_points
from .data.request import ForgetRequest, SplitConfig
from . import runfolder
from .io import OutputError, atomic_dir, check_writable, write_json
from .memory import release_memory
from .train.events import Cancelled

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9a-f]{32}")
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")
Progress = Callable[[dict], None]
Work = Callable[["Job", Progress, Path], dict]


class JobError(ValueError):
    """A bad or unknown job id."""


class RunsDirBusy(RuntimeError):
    """Another process owns the runs folder."""


class JobBusy(RuntimeError):
    """A job is already running; the message names it."""

    def __init__(self, running: "Job"):
        self.running = running
        super().__init__(f"job {running.id} ({running.label}) is still {running.status} "
                         f"({running.stage or 'starting'}); wait for it to finish or cancel it first")


def check_id(job_id: str) -> str:
    """A job id is 32 lowercase hex characters (uuid4().hex): never a path."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise JobError(f"invalid job id {str(job_id)[:80]!r}: expected 32 hex characters")
    return job_id


@dataclass
class Job:
    id: str
    label: str                         # what is forgotten, for people
    spec: dict                         # what the work function needs (request, method, config)
    kind: str = "forget"               # which work function runs it (the registry's ``work`` keys)
    status: str = "queued"             # queued | running | done | failed | cancelled
    stage: str = ""                    # the stage the last progress event named
    step: int = 0
    total: int = 0
    fraction: float = 0.0              # within the stage
    stages: list = field(default_factory=list)   # stages seen so far, in order
    message: str = ""
    error: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    summary: dict = field(default_factory=dict)  # the work function's return value

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def seconds(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 2)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


class JobRegistry:
    """Owns the job table, the runs folder and one worker thread. A second job while one is queued
    or running is refused with :class:`JobBusy` (one model, one CPU/GPU: never two jobs at once).

    ``work`` is one work function (every job is a "forget" job) or a registry of work kinds,
    ``{kind: work function}``; a job names its kind when submitted."""

    def __init__(self, runs_dir: str | Path, work: Work | Mapping[str, Work], save_every: float = 1.0):
        self.runs_dir = Path(runs_dir)
        check_writable(self.runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_runs_dir(self.runs_dir)
        self.kinds: dict[str, Work] = dict(work) if isinstance(work, Mapping) else {"forget": work}
        self.save_every = save_every
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._last_save: dict[str, float] = {}
        self._queue: queue.Queue = queue.Queue()
        try:
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._worker = threading.Thread(target=self._loop, name="clipforget-jobs", daemon=True)
        self._worker.start()

    # ---- public API --------------------------------------------------------------------------
    def submit(self, spec: dict, label: str, kind: str = "forget") -> Job:
        if kind not in self.kinds:
            raise JobError(f"unknown job kind {kind!r}; this registry runs {', '.join(sorted(self.kinds))}")
        with self._lock:
            running = self.running()
            if running is not None:
                raise JobBusy(running)
            job = Job(uuid.uuid4().hex, label, spec, kind=kind)
            self._jobs[job.id] = job
            self._cancel[job.id] = threading.Event()
            self._save(job)
        self._queue.put(job.id)
        log.info("job %s submitted: %s", job.id, label)
        return job

    def get(self, job_id: str) -> Job:
        check_id(job_id)
        with self._lock:
            if job_id in self._jobs:
                return self._jobs[job_id]
        path = self.job_dir(job_id) / "job.json"
        if not path.is_file():
            raise JobError(f"no job {job_id} in {self.runs_dir}")
        try:
            job = Job.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise JobError(f"job {job_id}: {path} is unreadable ({e}); delete that folder") from e
        with self._lock:
            return self._jobs.setdefault(job_id, job)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.active:
                self._cancel[job.id].set()
                job.message = "cancelling…"
                self._save(job)
        return job

    def running(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.active), None)

    def jobs(self) -> list[Job]:
        """Every job in the runs folder, newest first."""
        for path in self.runs_dir.glob("*/job.json"):
            if JOB_ID.fullmatch(path.parent.name):
                with contextlib.suppress(JobError, ValueError, TypeError):
                    self.get(path.parent.name)
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def job_dir(self, job_id: str) -> Path:
        return self.runs_dir / check_id(job_id)

    def run_dir(self, job_id: str) -> Path:
        """The finished result of a job (``save_run`` folder + α-grid); raises if it has none."""
        job = self.get(job_id)
        path = self.job_dir(job_id) / "run"
        if job.status != "done" or not runfolder.is_complete(path):
            raise JobError(f"job {job_id} has no result (status {job.status})")
        return path

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.1) -> Job:
        """Block until the job finishes (tests and scripts)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if not job.active:
                return job
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s")
            time.sleep(poll)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what runs and stop the worker thread."""
        running = self.running()
        if running is not None:
            self.cancel(running.id)
        self._queue.put(None)
        self._worker.join(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)       # releases the runs-folder lock
            self._lock_fd = None

    # ---- the worker --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            self._execute(self._jobs[job_id])

    def _execute(self, job: Job) -> None:
        cancel = self._cancel[job.id]
        job_dir = self.job_dir(job.id)

        def progress(event: dict) -> None:
            if cancel.is_set():
                raise Cancelled(f"job {job.id} cancelled")
            with self._lock:
                stage = event.get("stage", job.stage)
                new_stage = stage != job.stage
                if new_stage:
                    job.stages.append(stage)
                job.stage = stage
                job.step, job.total = int(event.get("step", 0)), int(event.get("total", 0))
                job.fraction = float(event.get("fraction", 0.0))
                if new_stage or time.monotonic() - self._last_save.get(job.id, 0.0) >= self.save_every:
                    self._save(job)
            if new_stage:
                release_memory()      # the last stage's transients: the next stage's peak starts low

        with self._lock:
            if cancel.is_set():
                job.status, job.finished, job.message = "cancelled", time.time(), "cancelled before it started"
                self._save(job)
                return
            job.status, job.started = "running", time.time()
            self._save(job)
        try:
            work = self.kinds.get(job.kind)
            if work is None:
                raise JobError(f"job kind {job.kind!r} has no work function in this registry")
            summary = work(job, progress, job_dir)
        except Cancelled:
            status, error, summary = "cancelled", "", {}
            log.info("job %s cancelled", job.id)
        except Exception as e:  # noqa: BLE001 - a job failure is reported, never raised into the thread
            status, error, summary = "failed", describe_failure(e), {}
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        else:
            status, error = "done", ""
        if status != "done":
            _remove_partials(job_dir, keep_run=False)
        with self._lock:
            job.status, job.error, job.summary, job.finished = status, error, summary or {}, time.time()
            job.message = {"done": "finished", "cancelled": "cancelled", "failed": "failed"}[status]
            if status == "done":
                job.fraction = 1.0
            self._save(job)
        release_memory()

    # ---- persistence -------------------------------------------------------------------------
    def _save(self, job: Job) -> None:
        try:
            write_json(self.job_dir(job.id) / "job.json", job.to_dict())
        except OutputError as e:   # e.g. a full disk: the job table in memory stays right; keep working
            log.error("could not record job %s (%s): %s", job.id, job.status, e)
        self._last_save[job.id] = time.monotonic()

    def _recover(self) -> None:
        """Jobs that were queued or running when the last process died did not finish."""
        for path in sorted(self.runs_dir.glob("*/job.json")):
            if not JOB_ID.fullmatch(path.parent.name):
                continue
            try:
                job = Job.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError) as e:
                log.warning("ignoring unreadable %s: %s", path, e)
                continue
            _remove_partials(path.parent, keep_run=True)      # e.g. an export zip cut short
            if job.active:
                # the process died between writing the result and job.json
                if runfolder.is_complete(path.parent / "run", alpha_grid=True):
                    job.status, job.message = "done", "recovered after a restart"
                else:
                    job.status = "failed"
                    job.error = "interrupted: the app stopped while this job was running; no result was saved"
                    _remove_partials(path.parent, keep_run=False)
                job.finished = job.finished or time.time()
                self._save(job)
            self._jobs[job.id] = job


def _remove_partials(job_dir: Path, keep_run: bool) -> None:
    """Temporary folders (``atomic_dir``) and files (``atomic_file``) a dead process left behind."""
    for p in job_dir.glob(".*"):
        if p.is_dir() and (p.name.endswith(".partial") or ".old." in p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
    if not keep_run and (job_dir / "run").exists() and not runfolder.has_alpha_grid(job_dir / "run"):
        shutil.rmtree(job_dir / "run", ignore_errors=True)


def _lock_runs_dir(runs_dir: Path) -> int:
    """Hold an exclusive lock on ``runs_dir/.lock`` for the registry's life (the kernel drops it
    when the process ends, however it ends)."""
    fd = os.open(runs_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunsDirBusy(f"{runs_dir} is in use by another clipforget app ({owner}); stop it, or "
                          "give this one its own --runs-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    return fd


def describe_failure(e: BaseException) -> str:
    """The reason a job failed, as shown to the user, with advice where there is one."""
    torch = sys.modules.get("torch")          # a job that ran has imported it; this module does not
    gpu = torch is not None and isinstance(e, torch.OutOfMemoryError)
    if gpu or isinstance(e, MemoryError):
        where = "GPU" if gpu else "CPU"
        return (f"out of {where} memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}). Close other "
                "programs or jobs using it, use a smaller model or image size, lower the batch size "
                "(config forget.batch_size / remind.batch_size), or run on a machine with more memory")
    return f"{type(e).__name__}: {e}"


# ---- the forget job ------------------------------------------------------------------------------

@dataclass
class Resources:
    """What a forget job needs, loaded once by the app: the model, the gallery, its pixel cache,
    the gallery images at the model's input size and their original embeddings."""
    bundle: object
    gallery: object
    cache: object
    images: object        # uint8 (N, 3, S, S), gallery order
    original: object      # (N, D) float32 embeddings with the original model


class ForgetWork:
    """The work function of a forget job: unlearn, evaluate, precompute the α-grid, save.

    ``resources()`` blocks until the model and gallery are loaded (the app loads them in the
    background so its page is up in seconds)."""

    def __init__(self, resources: Callable[[], Resources], alpha_points: int = DEFAULT_ALPHA_POINTS):
        self.resources = resources
        self.alpha_points = alpha_points
        self._evaluator = None          # a ProgressEvaluator shared by jobs: caches "before" and texts

    def __call__(self, job: Job, progress: Progress, job_dir: Path) -> dict:
        from .index import encode_alpha_grid
        from .pipeline import ProgressEvaluator, forget

        progress({"stage": "prepare", "step": 0, "total": 0, "fraction": 0.0})
        res = self.resources()
        if self._evaluator is None or self._evaluator.bundle is not res.bundle:
            self._evaluator = ProgressEvaluator(res.bundle, progress)
        self._evaluator.progress = progress          # one worker thread: one job at a time
        spec = job.spec
        request = ForgetRequest.from_dict(spec["request"])
        t0 = time.perf_counter()
        run = forget(res.bundle, request, method=spec.get("method", "ours"), config=spec.get("config"),
                     gallery=res.gallery, split=SplitConfig(**spec["split"]) if spec.get("split") else None,
                     callbacks=[progress], cache=res.cache,
                     evaluator=self._evaluator)
        t_forget = time.perf_counter() - t0
        # α = 0 is θ₀ exactly: its embeddings are the original ones, so the grid starts above 0
        alphas = [a for a in alpha_points(self.alpha_points, (run.result.alpha,)) if a > 0]
        grid, info = encode_alpha_grid(
            res.bundle, res.images, run.result.delta, alphas,
            progress=lambda i, n: progress({"stage": "alpha-grid", "step": i, "total": n, "fraction": i / n}))
        progress({"stage": "save", "step": 0, "total": 2, "fraction": 0.0})
        with atomic_dir(job_dir / "run") as tmp:
            runfolder.save_run(run, res.bundle, tmp)
            progress({"stage": "save", "step": 1, "total": 2, "fraction": 0.5})   # a cancel point
            runfolder.save_alpha_grid(tmp, grid, alphas, info, res.gallery.content_hash)
        return {"alpha": run.result.alpha, "score": run.report["score"], "forget_seconds": t_forget,
                "alpha_grid_seconds": info["seconds"], "alpha_grid_points": len(alphas) + 1,
                "shared_trunk": info["shared_trunk"], "stage_seconds": run.report["seconds"]}


# ---- the certify job -----------------------------------------------------------------------------

class CertifyWork:
    """The work function of a "certify" job: certify the run folder named in the job's spec
    (:func:`clipforget.certify.certify`) and save the certificate next to it.

    ``resources()`` returns the loaded model, gallery and pixel cache (:class:`Resources`)."""

    def __init__(self, resources: Callable[[], Resources], config: dict | None = None):
        self.resources = resources
        self.config = config            # CertifyConfig fields for every job (None: the defaults)

    def __call__(self, job: Job, progress: Progress, job_dir: Path) -> dict:
        from .certify import CertifyConfig, certify, save_certificate

        progress({"stage": "certify: prepare", "step": 0, "total": 0, "fraction": 0.0})
        res = self.resources()
        run_dir = Path(job.spec["run_dir"])
        cfg = CertifyConfig.from_dict(job.spec.get("config") or self.config)
        cert = certify(res.bundle, run_dir, res.gallery, cfg, callbacks=[progress], cache=res.cache)
        progress({"stage": "certify: save", "step": 0, "total": 1, "fraction": 0.0})
        save_certificate(cert, run_dir)
        return {"certified": cert["certified"], "verdict": cert["verdict"], "run_dir": str(run_dir),
                "of_job": job.spec.get("of_job"), "seconds": cert["seconds"]}
