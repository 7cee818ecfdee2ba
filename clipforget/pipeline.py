"""One call from a loaded model and a request to an evaluated, saved unlearning run.

    bundle = load_clip("embedded")
    run = forget(bundle, ForgetRequest("dog", "poodle"), method="ours")
    save_run(run, bundle, "runs/poodle")       # the run folder (clipforget/runfolder.py owns its files)

    made = unlearn(bundle, ForgetRequest("dog", "poodle"), evaluator=ev)   # the same in two halves: the
    run = evaluate(made, ev)                   # method's result, then its report (the app shows grids between)

``forget`` never mutates ``bundle.model``: methods edit a private copy of the image tower (and of
the text tower, for a method that edits it).
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from torch import nn

from .data.gallery import Gallery
from .data.task import ForgetRequest, SplitConfig, Task, ViewCache, build_task
from .eval.score import score
from .eval.zeroshot import TextCache, column_accuracy, evaluate_columns
from .merge import StateDict, apply_delta, image_part, sum_deltas, text_part
from .methods.base import UnlearnResult, editable_copy, get_method, load_text_state, text_state
from .models import ClipBundle
from .runfolder import load_delta, save_run, scaled_delta  # noqa: F401 - save_run, load_delta: the library's API
from .train.loop import Callback
from .trunk import encode_pair

log = logging.getLogger(__name__)


@dataclass
class Run:
    result: UnlearnResult
    report: dict
    task: Task = field(repr=False)


def edited_model(bundle: ClipBundle, delta: StateDict, alpha: float = 1.0) -> nn.Module:
    """A model equal to ``bundle.model`` with θ₀ + α·Δ (the original untouched): the image tower's
    entries (``visual.*``) in a private copy of the image tower, and — only when the delta has
    any — the text-side entries in a private copy of the text tower."""
    text_delta = text_part(delta)
    model = editable_copy(bundle.model, text=bool(text_delta))
    visual_delta = {k.removeprefix("visual."): v for k, v in image_part(delta).items()}
    model.visual.load_state_dict(apply_delta(bundle.model.visual.state_dict(), visual_delta, alpha))
    if text_delta:
        load_text_state(model, apply_delta(text_state(bundle.model), text_delta, alpha))
    return model.eval()


def texts_for(bundle: ClipBundle, delta: StateDict, model: nn.Module, texts: TextCache) -> TextCache:
    """The class embeddings to evaluate ``model`` = θ₀ + α·Δ with: ``texts`` (the original text
    tower's) when Δ leaves the text tower alone, else a cache of ``model``'s own text tower."""
    return TextCache(bundle, model) if text_part(delta) else texts


def column_size(col) -> dict[str, int]:
    """What a report column was measured on: ``files`` (held-out image files) and ``views_per_file``
    (augmented views of each); ``images`` stays the number of views, files × views, as the app
    and bench/ read it (despite its name it never counted files)."""
    files = len({it.path for it in col.views.items})
    return {"images": len(col.views), "files": files, "views_per_file": len(col.views) // files if files else 0}


def _columns(task: Task, split: str) -> dict:
    """The columns of ``split``: "test", "trained", "calib", or parts joined by "+" ("test+trained")."""
    return {n: c for part in split.split("+") for n, c in getattr(task, part).items()}


class Evaluator:
    """Before/after accuracy of a task's columns; caches text embeddings and the 'before' row."""

    def __init__(self, bundle: ClipBundle):
        self.bundle = bundle
        self.texts = TextCache(bundle)
        self._before: dict[int, tuple[weakref.ref, float]] = {}   # id(views) -> (ref to views, accuracy)

    def before(self, task: Task, split: str = "test", names: Iterable[str] | None = None) -> dict[str, float]:
        """Accuracy of the original model per column (``names``: only those); memoised per ViewSet (a
        ViewCache returns the same object for the same images, so columns shared by tasks are encoded
        once). Weak: the memo never keeps a ViewSet alive after its cache and tasks dropped it."""
        out = {}
        columns = getattr(task, split)
        for name, col in (columns.items() if names is None else ((n, columns[n]) for n in names)):
            out[name] = self._memo(col)
            if out[name] is None:
                out[name] = self._remember(col, column_accuracy(self.bundle, col, self.texts))
        return out

    def _memo(self, col) -> float | None:
        hit = self._before.get(id(col.views))
        return hit[1] if hit is not None and hit[0]() is col.views else None

    def _remember(self, col, accuracy: float) -> float:
        self._before = {k: v for k, v in self._before.items() if v[0]() is not None}
        self._before[id(col.views)] = (weakref.ref(col.views), accuracy)
        return accuracy

    def before_after(self, task: Task, delta: StateDict, alpha: float, split: str = "test"
                     ) -> tuple[dict[str, float], dict[str, float]]:
        """Accuracy of θ₀ and of θ₀ + α·Δ per column of ``split`` (as in :meth:`after`): a column
        whose "before" is not memoised runs the trunk before the first stage Δ edits once for both
        models (:func:`clipforget.trunk.encode_pair`; the same values as two passes)."""
        columns = _columns(task, split)
        model = edited_model(self.bundle, delta, alpha)
        texts = texts_for(self.bundle, delta, model, self.texts)
        edited = list(image_part(delta))
        before, after = {}, {}
        for i, (name, col) in enumerate(columns.items()):
            self.on_column(i, len(columns))
            before[name] = self._memo(col)
            if before[name] is None:
                emb0, emb1 = encode_pair(self.bundle, col.views.images, model, edited)
                before[name] = self._remember(col, column_accuracy(self.bundle, col, self.texts, image_emb=emb0))
                after[name] = column_accuracy(self.bundle, col, texts, image_emb=emb1)
            else:
                after[name] = column_accuracy(self.bundle, col, texts, model)
        return before, after

    def on_column(self, i: int, n: int) -> None:
        """Called before column ``i`` of ``n`` in :meth:`before_after` (a job reports progress here)."""

    def after(self, task: Task, delta: StateDict, alpha: float, split: str = "test") -> dict[str, float]:
        """Accuracy of θ₀ + α·Δ per column of ``split`` ("test", "trained", or "test+trained": one
        edited model for both)."""
        columns = _columns(task, split)
        model = edited_model(self.bundle, delta, alpha)
        return evaluate_columns(self.bundle, columns, texts_for(self.bundle, delta, model, self.texts), model)

    def report(self, task: Task, result: UnlearnResult, alpha: float | None = None) -> dict:
        """The run's report: held-out ``columns`` (the Score's) and ``trained_on`` (the files the
        method trained on — ``forget_examples`` — reported apart and kept out of the Score)."""
        alpha = result.alpha if alpha is None else alpha
        t0 = time.perf_counter()
        before, after = self.before_after(task, result.delta, alpha, "test+trained")
        cols, trained = ({n: {"before": before[n], "after": after[n], **column_size(c)}
                          for n, c in getattr(task, split).items()} for split in ("test", "trained"))
        seconds = dict(result.seconds)
        seconds["evaluate"] = time.perf_counter() - t0
        return {"method": result.method, "request": result.request, "model": self.bundle.arch,
                # a model that does not recognise the target has no Score: only forget(check=False) gets here
                "score": score(cols) if cols["target"]["before"] > 0 else None, "alpha": alpha, "chance": 1 / len(task.superclasses),
                "columns": cols, "trained_on": trained, "seconds": seconds,
                "retain_subgroups": task.retain_subgroups,
                "warnings": [*task.warnings, *filter(None, [result.info.get("restore", {}).get("warning")])],
                "alpha_curve": result.alpha_curve}


class ProgressEvaluator(Evaluator):
    """The evaluator of a background job: it reports (and so can be cancelled) before each column."""

    def __init__(self, bundle, progress: Callback):
        super().__init__(bundle)
        self.progress = progress

    def on_column(self, i, n):
        self.progress({"stage": "evaluate", "step": i, "total": n, "fraction": i / n})


@dataclass
class Unlearned:
    """What :func:`unlearn` made, not evaluated yet: the method's result on its task. The app
    shows its grids from this and evaluates afterwards (:func:`evaluate`)."""
    result: UnlearnResult
    task: Task = field(repr=False)
    seed: int = 0
    seconds: float = 0.0          # data and the method, wall clock (the report's total adds evaluate)


def unlearn(bundle: ClipBundle, request: ForgetRequest, method: str = "ours", config=None,
            gallery: Gallery | None = None, split: SplitConfig | None = None,
            callbacks: Iterable[Callback] = (), cache: ViewCache | None = None,
            evaluator: Evaluator | None = None, check: bool = True,
            activation_budget: int | None = None) -> Unlearned:
    """Build the task and run the method (the first half of :func:`forget`; arguments as there).
    ``evaluator`` only answers the cheap "does the model recognise the target" check here — pass
    the same one to :func:`evaluate` and the report reuses its memo."""
    gallery = gallery or (cache.gallery if cache else Gallery.embedded())
    t0 = time.perf_counter()
    callbacks = list(callbacks)

    def data_progress(event: dict) -> None:
        for cb in callbacks:
            cb(event)
    data_progress({"stage": "data", "step": 0, "total": 0, "fraction": 0.0})
    task = build_task(gallery, request, bundle.image_size, split or SplitConfig(), cache, data_progress)
    t_data = time.perf_counter() - t0
    evaluator = evaluator or Evaluator(bundle)
    unlearner = get_method(method)(config)
    # the cheap check first: the target column alone (memoised: the report reuses it), before training
    # and before the other columns are encoded
    if check:
        check_recognised(evaluator, task)
    result = unlearner.run(bundle, task, callbacks, evaluator.texts, activation_budget)
    result.seconds["data"] = t_data
    return Unlearned(result, task, getattr(unlearner.config, "seed", 0), time.perf_counter() - t0)


def evaluate(unlearned: Unlearned, evaluator: Evaluator) -> Run:
    """The report of an :func:`unlearn` result on its held-out test columns (the second half of
    :func:`forget`)."""
    report = evaluator.report(unlearned.task, unlearned.result)
    report["seconds"]["total"] = unlearned.seconds + report["seconds"]["evaluate"]
    report["seed"] = unlearned.seed
    return Run(unlearned.result, report, unlearned.task)


def forget(bundle: ClipBundle, request: ForgetRequest, method: str = "ours", config=None,
           gallery: Gallery | None = None, split: SplitConfig | None = None,
           callbacks: Iterable[Callback] = (), cache: ViewCache | None = None,
           evaluator: Evaluator | None = None, check: bool = True, activation_budget: int | None = None) -> Run:
    """Build the task, run the method, evaluate before/after on the test columns. ``check=False``
    runs even when the model does not recognise the held-out target (the report's Score is then None:
    for measuring what the stages cost on untrained weights, bench/bench_towers.py).
    ``activation_budget``: bytes of autograd graph a stage may hold at once (None: each stage's
    default; it changes speed and memory, not results)."""
    evaluator = evaluator or Evaluator(bundle)
    return evaluate(unlearn(bundle, request, method, config, gallery, split, callbacks, cache, evaluator, check,
                            activation_budget), evaluator)


class NothingToForget(ValueError):
    """The model does not recognise the request's held-out target images before unlearning."""


def check_recognised(evaluator: Evaluator, task: Task) -> None:
    """Raise :class:`NothingToForget` when the original model recognises none of the task's held-out
    target images (the target column alone is encoded, and memoised for the report)."""
    if evaluator.before(task, names=["target"])["target"] <= 0:
        r = task.request
        raise NothingToForget(f"the model does not recognise {r.label} as {r.superclass!r} (zero-shot "
                              "accuracy 0 on its test images before unlearning), so there is nothing to forget; "
                              "check the model and its weights, or pick another subgroup")


def merge_runs(run_dirs: list[str | Path], mode: str = "sum") -> StateDict:
    """Continual forgetting [paper A.2]: one delta that forgets every run's target.
    ``sum``: Σ_i α_i Δ_i (task arithmetic); ``average``: mean_i α_i Δ_i (a plain average of θ_i)."""
    deltas = [scaled_delta(d) for d in run_dirs]
    if mode not in ("sum", "average"):
        raise ValueError(f"merge mode must be 'sum' or 'average', got {mode!r}")
    return sum_deltas(deltas, None if mode == "sum" else [1 / len(deltas)] * len(deltas))
