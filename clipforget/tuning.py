"""One tuning protocol for every method, ours included (``python bench/tune.py``).

- **Search space**: each method's Config declares ``search_space``, a small dict of dotted config
  keys -> candidate values (``{"loop.lr": (1e-5, 1e-4), "sigma": (0.1, 1.0)}``), next to the knobs.
  A ``+soup`` variant's is its method's (it is not tuned apart: see :func:`tunable_methods`).
- **Budget**: the same number of trials for every method (:data:`DEFAULT_TRIALS`): trial 0 is the
  method's defaults, the others a random sample without replacement of the space's grid, drawn with
  a fixed seed (:func:`sample_trials`).
- **Tasks**: :data:`TUNING_TASKS`, requests of superclasses no benchmark preset touches (a test checks).
- **Rule** (:func:`choose`): per trial, the *calibration* Score (the Score's formula over the
  calibration columns D_m, at the α the method reports) averaged over the tuning tasks; among the
  trials whose calibration target accuracy is at or below chance on every task, the best; where
  none is, the one with the lowest mean calibration target (then the best Score). The test columns
  are never evaluated (:func:`calibration_row` reads ``task.calib`` only).

The chosen overrides are written as ``{method: overrides, "_protocol": {...}, "_trials": [...]}``,
a file ``clipforget bench --config`` reads as it is (keys starting with ``_`` are notes).
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Iterable

from .benchmark import PRESETS, deep_update
from .data.task import Task
from .eval.score import at_or_below_chance, score
from .methods.base import config_from_dict, get_method, list_methods
from .methods.catalog import soup_base
from .models import ClipBundle
from .pipeline import Evaluator

log = logging.getLogger(__name__)

TUNING_TASKS = ("bird/owl", "fish/shark")   # bird and fish: superclasses no preset of the benchmark uses
DEFAULT_TRIALS = 8
DEFAULT_SEED = 0


# ---- spaces and trials -----------------------------------------------------------------------------

def search_space(method: str) -> dict[str, tuple]:
    """The method's declared space (``Config.search_space``); {} when it declares none."""
    return dict(getattr(get_method(method).Config, "search_space", None) or {})


def nested(flat: dict) -> dict:
    """{"loop.lr": 1e-4, "sigma": 1} -> {"loop": {"lr": 1e-4}, "sigma": 1}."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def check_space(method: str, space: dict | None = None) -> None:
    """Every key is a (nested) field of the method's Config and every value builds a valid config:
    raises ValueError/TypeError naming the key otherwise."""
    config_cls = get_method(method).Config
    space = search_space(method) if space is None else space
    for key, values in space.items():
        if not values:
            raise ValueError(f"{method}: search_space[{key!r}] has no candidate values")
        for v in values:
            try:
                config_from_dict(config_cls, nested({key: v}))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{method}: search_space[{key!r}] = {v!r} is not a valid config value ({e})") from None


def grid(space: dict) -> list[dict]:
    """Every point of the space (flat dicts), in a fixed order."""
    return [dict(zip(space, values)) for values in itertools.product(*space.values())]


def defaults_of(method: str, keys: Iterable[str]) -> dict:
    """The method's default value of each dotted key (``loop.lr`` -> ``Config().loop.lr``)."""
    config = get_method(method).Config()
    out = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = node
    return out


def sample_trials(space: dict, trials: int, seed: int = DEFAULT_SEED, defaults: dict | None = None) -> list[dict]:
    """``trials`` flat override dicts: {} (the defaults) first, then a seeded random sample without
    replacement of the grid's other points (``defaults``: the point equal to the defaults, left out
    so that no trial repeats another). A space smaller than the budget gives all of its points (fewer
    trials: a test requires every declared space to fill the default budget)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    points = [p for p in grid(space) if p != defaults] if space else []
    rng = random.Random(seed)
    return [{}] + rng.sample(points, min(trials - 1, len(points)))


def method_trials(method: str, trials: int = DEFAULT_TRIALS, seed: int = DEFAULT_SEED) -> list[dict]:
    """The protocol's trials of one method (:func:`sample_trials` of its declared space)."""
    space = search_space(method)
    return sample_trials(space, trials, seed, defaults_of(method, space))


def tunable_methods() -> list[str]:
    """Every registered method but the ``+soup`` variants: a variant runs its method's tuned config
    and ours' restore defaults, so its row differs from its method's by restore alone."""
    return [m for m in list_methods() if not soup_base(m)]


# ---- one trial -------------------------------------------------------------------------------------

def calibration_row(bundle: ClipBundle, task: Task, method: str, config: dict, evaluator: Evaluator) -> dict:
    """Run ``method`` with ``config`` on ``task``; its calibration Score and columns at its α.
    Only ``task.calib`` is evaluated: the test columns are never read."""
    result = get_method(method)(config).run(bundle, task, texts=evaluator.texts)
    before = evaluator.before(task, "calib")
    if before["target"] <= 0:
        raise ValueError(f"tuning task {task.request.label}: the model does not recognise its calibration "
                         "target images before unlearning; pick another tuning task")
    after = evaluator.after(task, result.delta, result.alpha, "calib")
    cols = {c: {"before": before[c], "after": after[c]} for c in before}
    row = {"task": task.request.label, "score": score(cols), "alpha": result.alpha,
           "chance": 1 / len(task.superclasses), "seconds": result.seconds.get("total", float("nan"))}
    row.update({f"{c}_before": before[c] for c in before})
    row.update({f"{c}_after": after[c] for c in after})
    return row


# ---- the rule --------------------------------------------------------------------------------------

def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (method, trial): mean calibration Score and target over the tuning tasks, and
    whether the target is at or below chance on every task."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["method"], r["trial"])
        e = out.setdefault(key, {"method": r["method"], "trial": r["trial"], "overrides": r["overrides"], "rows": []})
        e["rows"].append(r)
    for e in out.values():
        rs = e.pop("rows")
        e["score"] = sum(r["score"] for r in rs) / len(rs)
        e["target_after"] = sum(r["target_after"] for r in rs) / len(rs)
        e["forgets"] = all(map(at_or_below_chance, rs))
        e["tasks"] = len(rs)
    return list(out.values())


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per method, the chosen trial's summary (:func:`summarise`): the best mean calibration Score
    among trials that forget on every tuning task; if none does, the lowest mean calibration target,
    then the best Score. Ties: the earlier trial (the defaults are trial 0)."""
    chosen: dict[str, dict] = {}
    summary = summarise(rows)
    for method in dict.fromkeys(e["method"] for e in summary):
        own = sorted((e for e in summary if e["method"] == method), key=lambda e: e["trial"])
        forgetting = [e for e in own if e["forgets"]]
        chosen[method] = (max(forgetting, key=lambda e: e["score"]) if forgetting
                          else min(own, key=lambda e: (e["target_after"], -e["score"])))
    return chosen


# ---- the protocol ----------------------------------------------------------------------------------

def tune(bundle: ClipBundle, tasks: dict[str, Task], methods: Iterable[str] | None = None,
         trials: int = DEFAULT_TRIALS, seed: int = DEFAULT_SEED, base: dict[str, dict] | None = None,
         evaluator: Evaluator | None = None, on_row=None) -> dict:
    """Run the protocol: every method (default :func:`tunable_methods`) gets ``trials`` trials of its
    space on every task of ``tasks`` ({spec: Task}). ``base``: per-method overrides under every trial
    (the tests' short loops). Returns the tuned file's content (see the module docstring).
    ``on_row(row)`` sees each trial's row as it comes."""
    methods = list(methods or tunable_methods())
    base = base or {}
    evaluator = evaluator or Evaluator(bundle)
    untuned = [m for m in methods if not search_space(m)]
    for m in methods:
        check_space(m)
    if untuned:
        log.warning("no search_space declared by %s: not tuned (it runs its defaults)", ", ".join(untuned))
    rows = []
    for m in (m for m in methods if m not in untuned):
        for i, flat in enumerate(method_trials(m, trials, seed)):
            config = deep_update(base.get(m, {}), nested(flat))
            for spec, task in tasks.items():
                row = {"method": m, "trial": i, "overrides": flat, "spec": spec,
                       **calibration_row(bundle, task, m, config, evaluator)}
                rows.append(row)
                if on_row:
                    on_row(row)
    chosen = choose(rows)
    return {"_protocol": {"tasks": list(tasks), "trials": trials, "seed": seed, "untuned": untuned,
                          "rule": "best mean calibration Score among trials with calibration target <= chance "
                                  "on every tuning task; else the lowest mean calibration target",
                          "chosen": {m: {k: e[k] for k in ("trial", "score", "target_after", "forgets")}
                                     for m, e in chosen.items()}},
            "_trials": rows,
            **{m: nested(e["overrides"]) for m, e in chosen.items()}}


def table(tuned: dict) -> str:
    """The trials as a Markdown table, the chosen ones marked."""
    chosen = tuned["_protocol"]["chosen"]
    lines = ["| method | trial | overrides | calib Score (mean) | calib target (mean) | forgets | chosen |",
             "|---|---:|---|---:|---:|---|---|"]
    for e in summarise(tuned["_trials"]):
        mark = "**yes**" if chosen.get(e["method"], {}).get("trial") == e["trial"] else ""
        over = ", ".join(f"{k}={v}" for k, v in e["overrides"].items()) or "(defaults)"
        lines.append(f"| {e['method']} | {e['trial']} | {over} | {e['score']:.1f} | {e['target_after']:.3f} | "
                     f"{'yes' if e['forgets'] else 'no'} | {mark} |")
    return "\n".join(lines) + "\n"


def bench_specs() -> set[str]:
    """Every request spec the benchmark's presets evaluate (continual and ablation parts included)."""
    out = set()
    for spec in (s for specs in PRESETS.values() for s in specs):
        body = spec.split(":", 1)[1] if spec.startswith(("continual:", "ablation:")) else spec
        out.update(body.split("+"))
    return out


def superclass_of(spec: str) -> str:
    return spec.removeprefix("class:").split("/")[0].split("@")[0]


__all__ = ["TUNING_TASKS", "DEFAULT_TRIALS", "search_space", "check_space", "sample_trials", "method_trials", "tune", "choose",
           "calibration_row", "table", "bench_specs"]
