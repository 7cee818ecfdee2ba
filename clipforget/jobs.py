"""Background jobs: one worker thread runs unlearning jobs outside any web handler.

    registry = JobRegistry("runs/app", work={"forget": ForgetWork(resources), "certify": CertifyWork(resources)})
                                                   # the work kinds: clipforget.work
    job = registry.submit({"request": {...}, "method": "ours"}, label="poodle (dog)")   # kind "forget"
    registry.submit({"run_dir": ...}, label="certificate of poodle", kind="certify")
    registry.get(job.id).stage, .fraction          # observed by the UI, never driven by it
    registry.cancel(job.id)                        # raises Cancelled inside the job's next progress event

A job lives in ``runs_dir/<id>/``: ``job.json`` (status, stage, timings; rewritten atomically) and,
once its results exist, ``run/`` — a run folder (:mod:`clipforget.runfolder`) — whose results
appear whole or not at all. A work function may publish its results before it ends (it returns
:class:`Ready`): the job is then ``ready`` — results usable, the rest (a forget job's evaluation,
then its α-grid, each added to ``run/`` whole) still running — and ``done`` when the rest ends.
A job that failed or was cancelled before its results leaves only its ``job.json``; one cancelled
(or failed) after them keeps them and ends ``done``, its summary saying what is unfinished. After a restart, a job that was queued or
running when the process died is marked failed; one that was ``ready`` is done with what it had. One process at
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

from . import runfolder
from .io import OutputError, check_writable, write_json
from .memory import release_memory
from .train.events import Cancelled, StageClock, describe_seconds

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9a-f]{32}")
# "ready": the results are usable while the job's rest (a forget job's evaluation and α-grid) still
# runs; it is still active (one model, one worker: a second job waits for the rest or cancels it)
ACTIVE = ("queued", "running", "ready")
WORKING = ("queued", "running")               # no results yet
HAS_RESULTS = ("ready", "done")
FINISHED = ("done", "failed", "cancelled")
Progress = Callable[[dict], None]
Work = Callable[["Job", Progress, Path], "dict | Ready"]   # Ready: results before the end


class JobError(ValueError):
    """A bad or unknown job id."""


class RunsDirBusy(RuntimeError):
    """Another process owns the runs folder."""


@dataclass
class Ready:
    """What a work function returns to publish its results before it ends: the job becomes
    ``ready`` with ``summary``, then ``rest(ready)`` runs (:meth:`run_rest`) — reporting through the
    work function's own ``progress``, so a cancel stops it as it stops the rest of the job — and the
    dict it returns is added to the summary when the job is ``done``. ``rest`` may add to ``summary``
    and narrow ``what`` as it goes (``ready.update``): a cancel or failure then keeps what it added
    and names what it stopped."""
    summary: dict
    rest: Callable[["Ready"], dict]
    what: str = "the rest"           # for people: what is still running ("evaluation and α-grid", "α-grid")
    listener: Callable[[], None] | None = None    # set by the registry: publishes an update

    def update(self, summary: dict | None = None, what: str | None = None) -> None:
        """Called by ``rest`` as it goes: add to the summary (e.g. the Score once evaluated) and
        say what is still running; the registry records it in the job at once."""
        self.summary.update(summary or {})
        self.what = what or self.what
        if self.listener is not None:
            self.listener()

    def run_rest(self) -> dict:
        return self.rest(self)


class JobBusy(RuntimeError):
    """A job is already running; the message names it."""

    def __init__(self, running: "Job"):
        self.running = running
        state = "running (its results are ready)" if running.status == "ready" else running.status
        super().__init__(f"job {running.id} ({running.label}) is still {state} ({running.stage or 'starting'}); "
                         "wait for it to finish or cancel it first")


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
    status: str = "queued"             # queued | running | ready (results usable) | done | failed | cancelled
    stage: str = ""                    # the stage the last progress event named
    step: int = 0
    total: int = 0
    fraction: float = 0.0              # within the stage
    eta: float | None = None           # seconds left in the stage at its pace so far (None: unknown)
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
    def has_results(self) -> bool:
        """Its results are usable: ``ready`` (the rest still running) or ``done``."""
        return self.status in HAS_RESULTS

    @property
    def where(self) -> str:
        """``stage step/total · about N s left`` for people."""
        out = (self.stage or "starting") + (f" {self.step}/{self.total}" if self.total else "")
        return out + (f" · {describe_seconds(self.eta)} left" if self.eta is not None else "")

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
        """A job from its job.json; a TypeError for anything but a JSON object (a damaged record:
        the callers treat it as they treat one that does not parse)."""
        if not isinstance(d, dict):
            raise TypeError(f"a job record must be a JSON object, got {json.dumps(d, default=str)[:40]}")
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
        """The result of a job (a run folder; a forget job's evaluation and α-grid may still be
        coming: see :mod:`clipforget.runfolder`); raises if it has none yet."""
        job = self.get(job_id)
        path = self.job_dir(job_id) / "run"
        if not job.has_results or not runfolder.has_results(path):
            raise JobError(f"job {job_id} has no result (status {job.status})")
        return path

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.1, results: bool = False) -> Job:
        """Block until the job finishes — or, with ``results``, until its results are usable or
        it ended without (tests and scripts)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if not job.active or (results and job.has_results):
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
        clock = StageClock()

        def progress(event: dict) -> None:
            if cancel.is_set():
                raise Cancelled(f"job {job.id} cancelled")
            with self._lock:
                new_stage = clock.update(event)
                if new_stage:
                    job.stages.append(clock.stage)
                job.stage, job.step, job.total = clock.stage, clock.step, clock.total
                job.eta = clock.seconds_left()
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
        elif isinstance(summary, Ready):
            summary = self._rest(job, summary)
        with self._lock:
            job.status, job.error, job.summary, job.finished = status, error, summary or {}, time.time()
            job.message = {"done": "finished", "cancelled": "cancelled", "failed": "failed"}[status]
            if summary and summary.get("unfinished"):
                job.message = f"finished; {summary['unfinished']}"
            if status == "done":
                job.fraction, job.eta = 1.0, None
            self._save(job)
        release_memory()

    def _rest(self, job: Job, ready: Ready) -> dict:
        """Publish a job's results (status ``ready``), run the rest of its work, and return its
        final summary. A cancel or a failure now stops only the rest: the results stay."""
        def publish() -> None:
            with self._lock:
                job.status, job.summary, job.message = "ready", dict(ready.summary), f"results ready; {ready.what} running"
                self._save(job)
        ready.listener = publish
        publish()
        log.info("job %s: results ready; %s running", job.id, ready.what)
        release_memory()
        try:
            more = ready.run_rest()
        except Cancelled:
            log.info("job %s: %s cancelled; its results stay", job.id, ready.what)
            return {**ready.summary, "unfinished": f"{ready.what} cancelled"}
        except Exception as e:  # noqa: BLE001 - the results are saved; only the rest failed
            log.error("job %s: %s failed:\n%s", job.id, ready.what, traceback.format_exc())
            # what a dead process would leave in the run folder (this one's helpers clean up after
            # themselves; the job folder is left alone: a handler may be writing a download there)
            _remove_partials(self.job_dir(job.id), keep_run=True, job_folder=False)
            return {**ready.summary, "unfinished": f"{ready.what} failed: {describe_failure(e)}"}
        return {**ready.summary, **(more or {})}

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
                # the process died after the results were written (the evaluation, the α-grid, or
                # job.json unfinished)
                run = path.parent / "run"
                if runfolder.has_results(run):
                    job.status, job.message = "done", "recovered after a restart"
                    if not runfolder.is_evaluated(run):
                        runfolder.remove_report(run)          # an export or report.md cut short
                        job.summary = {**job.summary, "unfinished": "evaluation interrupted by a restart: "
                                       "no report or export (the grids are there; run the job again for them)"}
                    else:
                        if "score" not in job.summary:        # evaluated, not yet in job.json
                            with contextlib.suppress(OSError, ValueError):
                                job.summary = {**job.summary, "score": runfolder.read_report(run).get("score")}
                        if not runfolder.is_complete(run, alpha_grid=True):
                            job.summary = {**job.summary, "unfinished": "α-grid interrupted by a restart"}
                else:
                    job.status = "failed"
                    job.error = "interrupted: the app stopped while this job was running; no result was saved"
                    _remove_partials(path.parent, keep_run=False)
                job.finished = job.finished or time.time()
                self._save(job)
            self._jobs[job.id] = job


def _remove_partials(job_dir: Path, keep_run: bool, job_folder: bool = True) -> None:
    """Temporary folders (``atomic_dir``) and files (``atomic_file``) a dead process left behind,
    in the job folder (unless ``job_folder`` is False), in its run folder (the evaluation, added
    after the results) and in its α-grid (points added after the rest); without ``keep_run``, a
    run folder without its results."""
    folders = ([job_dir] if job_folder else []) + [job_dir / "run", job_dir / "run" / runfolder.ALPHA_GRID]
    for folder in folders:
        for p in folder.glob(".*"):
            if p.is_dir() and (p.name.endswith(".partial") or ".old." in p.name):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
    if not keep_run and (job_dir / "run").exists() and not runfolder.has_results(job_dir / "run"):
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
