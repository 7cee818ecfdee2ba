"""The kinds of work a job runs (:class:`~clipforget.jobs.JobRegistry`'s ``work``): a forget job
(unlearn, save the results — the grids show —, then evaluate, then the α-grid point by point) and
a certify job.

No torch at import here either: each work function imports the model stack when a job runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Callable

from . import runfolder
from .alphas import DEFAULT_ALPHA_POINTS, alpha_points
from .data.request import ForgetRequest, SplitConfig
from .io import atomic_dir
from .jobs import Job, Progress, Ready


# ---- which model a job was made with --------------------------------------------------------------

def model_id(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """The app's ``--model``/``--pretrained`` as a job records them: a ``local-dir:`` folder and a
    weights file by their absolute path (the same weights however the app was started), a tag as is."""
    if model.startswith("local-dir:"):
        model = "local-dir:" + str(Path(model.removeprefix("local-dir:")).expanduser().resolve())
    if pretrained and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser().resolve())
    return model, pretrained or None


def check_same_model(spec: dict, model: str, pretrained: str | None, job_id: str, what: str = "reopen it") -> None:
    """Refuse a job made with another model than this app's (``spec``: the job's, which records
    ``model`` and ``pretrained``; a spec without them predates the record and is taken as it is):
    its delta and gallery embeddings belong to that model's weights, not to these."""
    if not spec.get("model"):
        return
    made, here = model_id(spec["model"], spec.get("pretrained")), model_id(model, pretrained)
    if made != here:
        def say(m):
            return f"--model {m[0]}" + (f" --pretrained {m[1]}" if m[1] else "")
        raise ValueError(f"job {job_id} was made with the model {say(made)}; this app runs {say(here)}: "
                         f"start the app with {say(made)} to {what}")


# ---- the forget job ------------------------------------------------------------------------------

# autograd graph a job's stage may hold at once: the app keeps to its memory target (the remind
# stage's alignment then runs in micro-batches: ~0.4 GiB less at the peak, a few seconds slower)
JOB_ACTIVATION_BUDGET = 128 << 20

@dataclass
class Resources:
    """What a forget job needs, loaded once by the app: the model, the gallery, its pixel cache,
    the gallery images at the model's input size and their original embeddings."""
    bundle: object
    gallery: object
    cache: object
    images: object        # uint8 (N, 3, S, S), gallery order
    original: object      # (N, D) float32 embeddings with the original model
    trunk: object = None  # the gallery through the original's first stages, on disk (index.GalleryTrunk)


class ForgetWork:
    """The work function of a forget job: unlearn, encode the gallery at the job's α and save
    the results (delta, run.json, that α point) — shown at once: the job is ``ready`` — then the
    rest: evaluate and add the report and export to the run folder (the metrics show), then the
    α-grid's other points, one at a time, each added to the run folder as it is done.

    ``resources()`` blocks until the model and gallery are loaded (the app loads them in the
    background so its page is up in seconds)."""

    def __init__(self, resources: Callable[[], Resources], alpha_points: int = DEFAULT_ALPHA_POINTS,
                 activation_budget: int | None = JOB_ACTIVATION_BUDGET):
        if isinstance(alpha_points, bool) or not isinstance(alpha_points, Integral) or alpha_points < 2:
            raise ValueError(f"alpha points (α values precomputed per job) must be a whole number >= 2 "
                             f"(α = 0 and 1 at least), got {alpha_points!r}")
        self.resources = resources
        self.alpha_points = alpha_points
        self.activation_budget = activation_budget
        self._evaluator = None          # a ProgressEvaluator shared by jobs: caches "before" and texts

    def __call__(self, job: Job, progress: Progress, job_dir: Path) -> Ready:
        from .index import AlphaGrid
        from .pipeline import ProgressEvaluator, unlearn

        progress({"stage": "prepare", "step": 0, "total": 0, "fraction": 0.0})
        res = self.resources()
        if self._evaluator is None or self._evaluator.bundle is not res.bundle:
            self._evaluator = ProgressEvaluator(res.bundle, progress)
        self._evaluator.progress = progress          # one worker thread: one job at a time
        spec = job.spec
        request = ForgetRequest.from_dict(spec["request"])
        t0 = time.perf_counter()
        made = unlearn(res.bundle, request, method=spec.get("method", "ours"), config=spec.get("config"),
                       gallery=res.gallery, split=SplitConfig(**spec["split"]) if spec.get("split") else None,
                       callbacks=[progress], cache=res.cache,
                       evaluator=self._evaluator, activation_budget=self.activation_budget)
        t_forget = time.perf_counter() - t0
        # α = 0 is θ₀ exactly: its embeddings are the original ones, so the grid starts above 0
        used = round(float(made.result.alpha), 6)         # the α the results are at (restore's, with its margin)
        alphas = [a for a in alpha_points(self.alpha_points, (used,)) if a > 0]
        first = [a for a in alphas if a == used]                 # the right grid at that α
        t1 = time.perf_counter()
        # the gallery's trunk is kept between points in a temporary file, not in the app's memory
        # (a delta without image-tower entries — a text-tower method — reuses the original embeddings)
        grid = AlphaGrid(res.bundle, res.images, made.result.delta, spill=job_dir / ".alpha-grid-trunk.tmp",
                         original=res.original, gallery_trunk=res.trunk)
        try:
            points = {}
            for a in first:
                points[a] = grid.encode(a, lambda b: progress({"stage": "encode", "step": b, "total": grid.n_batches,
                                                              "fraction": b / grid.n_batches}))
            t_first = time.perf_counter() - t1
            progress({"stage": "save", "step": 0, "total": 2, "fraction": 0.0})
            with atomic_dir(job_dir / "run") as tmp:
                runfolder.write_results(made, res.bundle, tmp)
                progress({"stage": "save", "step": 1, "total": 2, "fraction": 0.5})   # a cancel point
                runfolder.plan_alpha_grid(tmp, alphas, res.gallery.content_hash, len(res.images))
                for a, emb in points.items():
                    runfolder.save_alpha_point(tmp, a, emb, res.gallery.content_hash)
        except BaseException:
            grid.release()
            raise
        # "alpha" is the α used: restore's calibrated α plus its margin (stages/restore.py)
        restore = made.result.info.get("restore") or {}
        summary = {"alpha": made.result.alpha, **({"calibrated_alpha": restore["calibrated_alpha"]}
                                                  if "calibrated_alpha" in restore else {}),
                   "forget_seconds": t_forget, "alpha_grid_planned": len(alphas) + 1,
                   "calibrated_point_seconds": t_first, "shared_trunk": grid.shared_trunk,
                   "stage_seconds": dict(made.result.seconds)}
        del points
        pending = [made]                 # the rest evaluates it, then lets it go before the α-grid
        del made

        def rest(ready: Ready) -> dict:
            try:
                evaluated = self.evaluate(pending.pop(), res.bundle, job_dir / "run", progress)
            except BaseException:
                grid.release()
                raise
            ready.update(evaluated, what="α-grid")    # the Score in job.json; a cancel now stops the α-grid only
            return self.alpha_grid(grid, job_dir / "run", progress, t_first, res.gallery.content_hash)
        return Ready(summary, rest, what="evaluation and α-grid")

    def evaluate(self, made, bundle, run_dir: Path, progress: Progress) -> dict:
        """The report on the held-out test columns, added to the run folder with the export."""
        from .pipeline import evaluate
        run = evaluate(made, self._evaluator)
        progress({"stage": "report", "step": 0, "total": 1, "fraction": 0.0})
        runfolder.add_report(run, bundle, run_dir)
        return {"score": run.report["score"], "stage_seconds": run.report["seconds"]}

    @staticmethod
    def alpha_grid(grid, run_dir: Path, progress: Progress, first_seconds: float, gallery_hash: str) -> dict:
        """The α-grid's other points, each added to the run folder as soon as it is encoded (a
        cancel keeps the points finished so far)."""
        t0 = time.perf_counter()
        try:
            missing = runfolder.missing_alpha_points(run_dir)
            total = grid.steps(len(missing))
            progress({"stage": "alpha-grid", "step": 0, "total": total, "fraction": 0.0})   # a cancel point
            for j, a in enumerate(missing):
                done = j * grid.n_batches
                emb = grid.encode(a, lambda b: progress({"stage": "alpha-grid", "step": done + b, "total": total,
                                                        "fraction": (done + b) / total}))
                runfolder.save_alpha_point(run_dir, a, emb, gallery_hash)
        finally:
            grid.release()
        rest = time.perf_counter() - t0
        info = {"seconds": first_seconds + rest, "rest_seconds": rest,
                "shared_trunk": grid.shared_trunk, "trunk_seconds": grid.trunk_seconds}
        runfolder.finish_alpha_grid(run_dir, info)
        return {"alpha_grid_seconds": info["seconds"], "alpha_grid_rest_seconds": rest,
                "alpha_grid_points": len(runfolder.alpha_grid_points(run_dir)) + 1}


# ---- the certify job -----------------------------------------------------------------------------

class CertifyWork:
    """The work function of a "certify" job: certify the run folder named in the job's spec
    (:func:`clipforget.certify.certify`) and save the certificate next to it.

    ``resources()`` returns the loaded model, gallery and pixel cache (:class:`Resources`)."""

    def __init__(self, resources: Callable[[], Resources], config: dict | None = None,
                 model: tuple[str, str | None] | None = None):
        self.resources = resources
        self.config = config            # CertifyConfig fields for every job (None: the defaults)
        self.model = model              # (model, pretrained) of the app: θ₀ of every certificate

    def __call__(self, job: Job, progress: Progress, job_dir: Path) -> dict:
        from .certify import CertifyConfig, certify, save_certificate

        if self.model is not None:      # the run's delta is applied to this θ₀: it must be the run's
            check_same_model(job.spec, *self.model, job.spec.get("of_job") or job.id, "certify it")
        progress({"stage": "certify: prepare", "step": 0, "total": 0, "fraction": 0.0})
        res = self.resources()
        run_dir = Path(job.spec["run_dir"])
        cfg = CertifyConfig.from_dict(job.spec.get("config") or self.config)
        cert = certify(res.bundle, run_dir, res.gallery, cfg, callbacks=[progress], cache=res.cache)
        progress({"stage": "certify: save", "step": 0, "total": 1, "fraction": 0.0})
        save_certificate(cert, run_dir)
        return {"certified": cert["certified"], "verdict": cert["verdict"], "run_dir": str(run_dir),
                "of_job": job.spec.get("of_job"), "seconds": cert["seconds"]}
