"""``clipforget bench``: every method on one task, one paper-style table (Markdown, CSV, JSON, PNG).

    bundle, gallery = load_clip("embedded"), Gallery.embedded()
    run_bench("dog/poodle", ["ours", "ga", "ccup"], bundle, gallery, "bench/poodle")

A task is named by a spec:

- ``SUPER/SUB``          in-domain subgroup forgetting (``monkey/gorilla``: the paper's marmoset)
- ``SUPER@STYLE``        style forgetting (``car@line-art``: the paper's sketch cars); ``SUPER/SUB@STYLE`` too
- ``class:SUPER``        whole-class forgetting (CCUP's setting): every image of the superclass
- ``continual:A+B+...``  continual forgetting by merging single-request runs [paper A.2]
- ``ablation:SPEC``      the ablation table of ours on one request (each ingredient switched off)

or by a preset name of :data:`PRESETS` (``all`` runs every preset into its own sub-folder). A preset
holds several requests of one kind (five subgroups, five styles, ...): each gets its own table in a
sub-folder and the preset a summary over them (each method's mean Score ± sd, its minimum, how many
requests end with the held-out target at or below chance, and each column's mean), so no figure
hangs on one subgroup. Rows: one per method (or merge / ablation variant); columns: each report
column's after-accuracy and its ratio to before, and the Score.

When a learned method and its ``+soup`` variant run with the same config, the variant runs once
and the method's row is its delta at α = 1 (the variant makes exactly the method's delta first),
so the table shows what restore buys at the cost of one run.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from pathlib import Path
from typing import Iterable


from .data.gallery import Gallery
from .data.task import (ClassRequest, ForgetRequest, SplitConfig, Task, ViewCache, build_class_task, build_task,
                        request_files)
from .eval.report import column_title
from .eval.score import at_or_below_chance, score
from .io import save_figure, write_json, write_text
from .methods.base import get_method, list_methods
from .methods.catalog import SOUP_SUFFIX, soup_base
from .models import ClipBundle
from .pipeline import Evaluator, Run, Unlearned, check_recognised, evaluate, merge_runs
from .presets import deep_update
from .runfolder import save_run, scaled_delta
from .train.loop import Callback

log = logging.getLogger(__name__)

IN_DOMAIN = ("monkey/gorilla",       # the paper's marmoset (a primate subgroup)
             "reptile/turtle",       # the paper's box turtle
             "dog/poodle", "big cat/leopard", "insect/butterfly")
PRESETS: dict[str, tuple[str, ...]] = {
    "in-domain": IN_DOMAIN,
    # the paper's sketch cars, and four more superclasses each forgotten in one trained style
    "style": ("car@line-art", "fruit@openmoji", "airplane@noto", "flower@twemoji", "cat@emojione-mono"),
    "whole-class": ("class:dog", "class:monkey", "class:car", "class:flower", "class:train"),   # CCUP's setting
    "continual": ("continual:dog/poodle+monkey/gorilla+reptile/turtle",),
    "ablation": tuple(f"ablation:{s}" for s in IN_DOMAIN),
}

# Ours with one ingredient off, as OursConfig overrides (nested dicts).
ABLATIONS = {
    "ours (full)": {},
    "no stand-ins": {"stand_ins": {"enabled": False}},
    "no feature stand-ins": {"remind": {"feature_stand_ins": 0}},
    "no replay": {"remind": {"replay": False}},
    "plain Fisher (no retain ratio)": {"forget": {"layer_selection": "plain"}},
    "all layers": {"forget": {"layer_selection": "all"}},
    "no LoRA (full update)": {"forget": {"use_lora": False}},
    "no alignment": {"remind": {"align": {"enabled": False}}},
    "aligned copies only (paper)": {"remind": {"align": {"keep_originals": False, "max_images": None}}},
    "no distillation": {"remind": {"kd_weight": 0.0, "feature_kd_weight": 0.0}},
    "no edited teacher (γ = 0)": {"remind": {"teacher": {"edit": 0.0}}},
    "no EMA": {"remind": {"ema": False}},
    "no remind": {"remind": {"enabled": False}},
    "no restore (α = 1)": {"restore": {"enabled": False}},
}


# ---- task specs ------------------------------------------------------------------------------------

def parse_request(spec: str) -> ForgetRequest | ClassRequest:
    """'dog/poodle' | 'car@line-art' | 'dog/poodle@noto' | 'class:dog' -> a request."""
    if spec.startswith("class:"):
        return ClassRequest(spec.removeprefix("class:"))
    body, _, style = spec.partition("@")
    superclass, _, subgroup = body.partition("/")
    if not superclass or (not subgroup and not style):
        raise ValueError(f"task {spec!r}: expected SUPER/SUB, SUPER@STYLE, SUPER/SUB@STYLE or class:SUPER")
    return ForgetRequest(superclass, subgroup or None, style or None)


def make_task(spec: str, bundle: ClipBundle, gallery: Gallery, split: SplitConfig, cache: ViewCache,
              exclude: frozenset[str] = frozenset()) -> Task:
    request = parse_request(spec)
    if isinstance(request, ClassRequest):
        return build_class_task(gallery, request, bundle.image_size, split, cache, exclude=exclude)
    return build_task(gallery, request, bundle.image_size, split, cache, exclude=exclude)


# ---- rows and tables -------------------------------------------------------------------------------

def row_from_report(name: str, report: dict, **extra) -> dict:
    row = {"method": name, "score": report["score"], "alpha": report.get("alpha", 1.0)}
    for col, c in {**report["columns"], **report.get("trained_on", {})}.items():
        row[f"{col}_before"] = c["before"]
        row[f"{col}_after"] = c["after"]
        row[f"{col}_ratio"] = c["after"] / c["before"] if c["before"] else float("nan")
    row["seconds"] = report.get("seconds", {}).get("total", float("nan"))
    row.update(extra)
    return row


def columns_of(rows: list[dict]) -> list[str]:
    order = ["target", "retain", "other_styles", "other_superclasses", "other_concepts", "unseen_styles",
             "forget_examples"]
    seen = {k.removesuffix("_after") for r in rows for k in r if k.endswith("_after")}
    return [c for c in order if c in seen] + sorted(seen - set(order))


def table_markdown(title: str, rows: list[dict], note: str = "") -> str:
    cols = columns_of(rows)
    head = ["method"] + [column_title(c) for c in cols] + ["Score", "α", "seconds"]
    lines = [f"# {title}", ""]
    if rows and cols:
        lines.append("Before: " + ", ".join(f"{column_title(c)} {rows[0][f'{c}_before']:.3f}" for c in cols
                                            if f"{c}_before" in rows[0]))
        lines.append("Cells: accuracy after (after / before).")
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [f"{r[f'{c}_after']:.3f} ({r[f'{c}_ratio']:.2f})" if f"{c}_after" in r else "" for c in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) +
                     f" | **{r['score']:.1f}** | {r.get('alpha', 1.0):.2f} | {r.get('seconds', float('nan')):.0f} |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_table(out: Path, stem: str, title: str, rows: list[dict], meta: dict, note: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{stem}.md", table_markdown(title, rows, note))
    write_text(out / f"{stem}.csv", table_csv(rows))
    write_json(out / f"{stem}.json", {**meta, "title": title, "rows": rows})


# ---- plots -----------------------------------------------------------------------------------------

def plot_alpha_curve(curve: list[dict], chosen: float, path: Path, title: str) -> Path | None:
    if not curve:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    alphas = [r["alpha"] for r in curve]
    for col in [k for k in curve[0] if k != "alpha"]:
        ax.plot(alphas, [r[col] for r in curve], marker="o", ms=3, label=column_title(col),
                ls=":" if col == "forget_examples" else "-")
    ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen α = {chosen:.2f}")
    ax.set(xlabel="unlearning strength α (0: original, 1: fully unlearned)", ylabel="calibration accuracy",
           title=title, ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_relative_fisher(importance: dict[str, float], chosen: list[str], path: Path, title: str) -> Path | None:
    if not importance:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(importance)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(names)), 3.6))
    ax.bar(range(len(names)), [importance[n] for n in names],
           color=["tab:red" if n in chosen else "tab:blue" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=75, fontsize=6)
    ax.set(ylabel="relative Fisher F(D_f) / F(D_r)", title=title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def plots_for_ours(run: Run, out: Path, label: str) -> list[str]:
    paths = []
    res = run.result
    p = plot_alpha_curve(res.alpha_curve, res.alpha, out / "alpha_curve.png", f"ours: forget {label}")
    if p:
        paths.append(p.name)
    forget = res.info.get("forget", {})
    p = plot_relative_fisher(forget.get("relative_fisher", {}), forget.get("layers", []),
                             out / "relative_fisher.png", f"relative Fisher per layer ({label}); red: chosen")
    if p:
        paths.append(p.name)
    return paths


# ---- the benchmark ---------------------------------------------------------------------------------

def method_config(configs: dict, method: str):
    """``configs[method]``; a ``+soup`` variant without its own entry runs its method's (a tuned
    config of ``ga`` is ``ga+soup``'s too: the row then differs from ``ga``'s by restore alone).
    Keys starting with ``_`` (a tuned file's ``_protocol``) are notes, never a method."""
    if method in configs:
        return configs[method]
    return configs.get(soup_base(method)) if soup_base(method) else None


def run_method(bundle: ClipBundle, task: Task, method: str, config, evaluator: Evaluator,
               callbacks: Iterable[Callback] = ()) -> Run:
    t0 = time.perf_counter()
    unlearner = get_method(method)(config)
    result = unlearner.run(bundle, task, callbacks, evaluator.texts)
    return evaluate(Unlearned(result, task, getattr(unlearner.config, "seed", 0), time.perf_counter() - t0), evaluator)


def without_restore(run: Run, method: str, evaluator: Evaluator) -> Run:
    """The row of ``method`` from its ``+soup`` variant's run: the same delta at α = 1 (the variant
    makes the method's delta first, with the same config and seed), its restore stage left out of
    the seconds."""
    res = run.result
    seconds = {k: v for k, v in res.seconds.items() if k != "restore"}
    seconds["total"] = res.seconds.get("total", 0.0) - res.seconds.get("restore", 0.0)
    result = dataclasses.replace(
        res, method=method, alpha=1.0, alpha_curve=[], seconds=seconds,
        config={k: v for k, v in res.config.items() if k != "restore"},
        info={k: v for k, v in res.info.items() if k != "restore"},
        history={k: v for k, v in res.history.items() if k != "restore"})
    return evaluate(Unlearned(result, run.task, run.report.get("seed", 0), seconds["total"]), evaluator)


def run_methods(bundle: ClipBundle, task: Task, methods: list[str], configs: dict, evaluator: Evaluator,
                callbacks: Iterable[Callback] = ()) -> dict[str, Run]:
    """{method: Run} in the order of ``methods``; a method whose ``+soup`` variant is also asked for
    with the same config comes from the variant's run (:func:`without_restore`)."""
    runs: dict[str, Run] = {}
    for m in methods:
        if m in runs:
            continue
        base = soup_base(m) or m
        soup = base + SOUP_SUFFIX
        if base in methods and soup in methods and method_config(configs, soup) is method_config(configs, base):
            log.info("bench %s: %s (and %s from its delta at α = 1)", task.request.label, soup, base)
            runs[soup] = run_method(bundle, task, soup, method_config(configs, soup), evaluator, callbacks)
            runs[base] = without_restore(runs[soup], base, evaluator)
        else:
            log.info("bench %s: %s", task.request.label, m)
            runs[m] = run_method(bundle, task, m, method_config(configs, m), evaluator, callbacks)
    return {m: runs[m] for m in methods}


def run_bench(task_name: str, methods: list[str] | None, bundle: ClipBundle, gallery: Gallery,
              out_dir: str | Path, configs: dict[str, dict] | None = None, split: SplitConfig | None = None,
              callbacks: Iterable[Callback] = (), cache: ViewCache | None = None, resume: bool = False) -> dict:
    """Run ``methods`` (default: every registered one) on the task ``task_name`` (a spec or a preset
    of :data:`PRESETS`; ``all``: every preset) and write the table to ``out_dir``. ``configs``: per
    method config dicts. Returns {"title", "rows", ...} (for ``all``: {preset: that}; for a preset
    of several requests, the summary's rows and {"requests": {spec: that}}). ``resume``: a preset's
    request whose table is already in ``out_dir`` is read back instead of run again."""
    out = Path(out_dir)
    split = split or SplitConfig()
    cache = cache or ViewCache(gallery)
    configs = configs or {}
    if task_name == "all":
        return {name: run_bench(name, methods, bundle, gallery, out / name, configs, split, callbacks, cache, resume)
                for name in PRESETS}
    spec = PRESETS.get(task_name, task_name)
    if isinstance(spec, tuple) and len(spec) > 1:
        return _preset(task_name, spec, methods, bundle, gallery, out, configs, split, callbacks, cache, resume)
    spec = spec[0] if isinstance(spec, tuple) else spec
    evaluator = Evaluator(bundle)
    meta = {"task": spec, "model": bundle.arch, "gallery": gallery.name, "split": dataclasses.asdict(split)}
    if spec.startswith("continual:"):
        return _continual(spec, methods, bundle, gallery, out, configs, split, callbacks, cache, evaluator, meta)
    if spec.startswith("ablation:"):
        return _ablation(spec.removeprefix("ablation:"), bundle, gallery, out, configs, split, callbacks, cache,
                         evaluator, meta)
    methods = list(methods or list_methods())
    for m in methods:
        get_method(m)      # unknown names fail before any work, with a suggestion
    task = make_task(spec, bundle, gallery, split, cache)
    check_recognised(evaluator, task)        # before any method runs: a Score needs something to forget
    label = task.request.label
    chance = 1 / len(task.superclasses)
    rows, plots = [], []
    for m, run in run_methods(bundle, task, methods, configs, evaluator, callbacks).items():
        rows.append(row_from_report(m, run.report, chance=chance))
        if m == "ours":
            plots += plots_for_ours(run, _mkdir(out), label)
        elif soup_base(m) and run.result.alpha_curve:
            p = plot_alpha_curve(run.result.alpha_curve, run.result.alpha, _mkdir(out) / f"alpha_curve-{m}.png",
                                 f"{m}: forget {label}")
            plots += [p.name] if p else []
    title = f"forget {label} ({spec}) — {bundle.arch}"
    note = ("Score = 100/K·[(1 − min(1, a'_T/a_T)) + Σ_j min(1, a'_j/a_j)] over the K held-out columns (the "
            "paper's); the forget examples column is measured on the files the method trained on and is not in it. "
            f"Chance (1 / superclasses) = {chance:.3f}.")
    write_table(out, "table", title, rows, {**meta, "plots": plots}, note)
    return {"title": title, "rows": rows, "plots": plots}


def slug(spec: str) -> str:
    """A folder name for a request spec: 'big cat/leopard' -> 'big-cat_leopard'."""
    return spec.replace("/", "_").replace("@", "_").replace(":", "-").replace(" ", "-")


def _preset(name, specs, methods, bundle, gallery, out, configs, split, callbacks, cache, resume=False) -> dict:
    """Each request of the preset into its own sub-folder, then the summary over them (``resume``: a
    request whose table is there already is read back, so a stopped preset run finishes the rest)."""
    results = {}
    for s in specs:
        done = out / slug(s) / ("ablation.json" if s.startswith("ablation:") else "table.json")
        if resume and done.is_file():
            log.info("bench %s: %s read back from %s", name, s, done)
            results[s] = json.loads(done.read_text())
        else:
            results[s] = run_bench(s, methods, bundle, gallery, out / slug(s), configs, split, callbacks, cache)
    rows = summary_rows(results)
    title = f"{name}: {len(specs)} requests ({', '.join(specs)}) — {bundle.arch}"
    note = ("Each method's Score over the requests: mean ± sd (population), minimum; 'at chance': requests whose "
            "held-out target accuracy ends at or below chance (1 / superclasses). Column cells: the mean after "
            "accuracy over the requests (mean after / before). Each request's own table is in its sub-folder.")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "summary.md", summary_markdown(title, rows, note))
    write_text(out / "summary.csv", table_csv(rows))
    write_json(out / "summary.json", {"preset": name, "requests": list(specs), "model": bundle.arch,
                                      "gallery": gallery.name, "split": dataclasses.asdict(split),
                                      "title": title, "rows": rows})
    return {"title": title, "rows": rows, "requests": results}


def summary_rows(results: dict[str, dict]) -> list[dict]:
    """One row per method (in first-seen order) aggregating its rows over the requests' tables."""
    by_method: dict[str, list[dict]] = {}
    for res in results.values():
        for r in res["rows"]:
            by_method.setdefault(r["method"], []).append(r)
    out = []
    for m, rs in by_method.items():
        scores = [r["score"] for r in rs]
        mean = sum(scores) / len(scores)
        row = {"method": m, "requests": len(rs), "score": mean,
               "score_sd": (sum((x - mean) ** 2 for x in scores) / len(scores)) ** 0.5,
               "score_min": min(scores), "score_max": max(scores)}
        if all("target_after" in r and "chance" in r for r in rs):
            row["target_at_chance"] = sum(map(at_or_below_chance, rs))
        for key in sorted({k for r in rs for k in r if k.endswith(("_after", "_ratio"))}):
            vals = [r[key] for r in rs if key in r and r[key] == r[key]]
            if vals:
                row[key] = sum(vals) / len(vals)
        for key in ("alpha", "seconds"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key] = sum(vals) / len(vals)
        out.append(row)
    return out


def summary_markdown(title: str, rows: list[dict], note: str = "") -> str:
    cols = columns_of(rows)
    head = (["method", "Score mean ± sd", "min"] + (["at chance"] if any("target_at_chance" in r for r in rows) else [])
            + [column_title(c) for c in cols] + ["α", "seconds"])
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [f"**{r['score']:.1f}** ± {r['score_sd']:.1f}", f"{r['score_min']:.1f}"]
        if "at chance" in head:
            cells.append(f"{r['target_at_chance']}/{r['requests']}" if "target_at_chance" in r else "")
        cells += [f"{r[f'{c}_after']:.3f} ({r[f'{c}_ratio']:.2f})" if f"{c}_ratio" in r
                  else (f"{r[f'{c}_after']:.3f}" if f"{c}_after" in r else "") for c in cols]
        cells += [f"{r.get('alpha', 1.0):.2f}", f"{r.get('seconds', float('nan')):.0f}"]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _ablation(spec, bundle, gallery, out, configs, split, callbacks, cache, evaluator, meta) -> dict:
    task = make_task(spec, bundle, gallery, split, cache)
    base = configs.get("ours") or {}
    rows = []
    for name, over in ABLATIONS.items():
        log.info("ablation %s: %s", spec, name)
        run = run_method(bundle, task, "ours", deep_update(base, over), evaluator, callbacks)
        rows.append(row_from_report(name, run.report, chance=1 / len(task.superclasses), overrides=json.dumps(over)))
    title = f"ablation of ours: forget {task.request.label} ({spec}) — {bundle.arch}"
    write_table(out, "ablation", title, rows, meta, "Each row switches one ingredient of ours off (OursConfig overrides).")
    return {"title": title, "rows": rows}


def continual_tasks(specs: list[str], bundle: ClipBundle, gallery: Gallery, split: SplitConfig,
                    cache: ViewCache) -> list[Task]:
    """One task per request whose shared columns and replay files leave out every file the other
    requests ask to forget (a merged model forgets them: they are no "other superclass" to keep)."""
    wanted = [request_files(gallery, parse_request(s)) for s in specs]
    return [make_task(s, bundle, gallery, split, cache, frozenset().union(*(w for j, w in enumerate(wanted) if j != i)))
            for i, s in enumerate(specs)]


def read_by(task: Task) -> set[str]:
    """The files a run on ``task`` reads or is asked to forget: D_f, D_r, the replay files, every
    D_m column (its α is chosen on them) and the target's held-out test files."""
    views = [task.forget, task.retain, *(c.views for c in task.calib.values()), task.test["target"].views,
             *(c.views for c in task.trained.values())]
    return {it.path for v in views for it in v.items} | {it.path for it in task.replay_items}


def without_files(task: Task, paths: set[str]) -> Task:
    """``task`` with ``paths`` dropped from its test columns (a column left empty is dropped too, with a
    warning): a merged model is scored on each request's columns without the files another merged run
    trained on, calibrated on or was asked to forget, so every column stays held out for every edit."""
    test = {}
    for name, col in task.test.items():
        keep = [i for i, it in enumerate(col.views.items) if it.path not in paths]
        if not keep:
            log.warning("continual: %s's column %s is left empty by the other requests' files; dropped",
                        task.request.label, name)
            continue
        test[name] = col if len(keep) == len(col.views) else dataclasses.replace(
            col, views=col.views.subset(keep), labels=col.labels[keep])
    if "target" not in test:
        raise ValueError(f"continual: every held-out target file of {task.request.label} is another request's "
                         "file; merge requests of different subgroups")
    return dataclasses.replace(task, test=test)


def _continual(spec, methods, bundle, gallery, out, configs, split, callbacks, cache, evaluator, meta) -> dict:
    """Each request alone, then their deltas merged (sum: task arithmetic; average: mean of θ_i),
    every model evaluated on every request's test columns less the other requests' files
    (:func:`without_files`); a row's Score is the mean over requests."""
    specs = spec.removeprefix("continual:").split("+")
    if len(specs) < 2:
        raise ValueError(f"continual task {spec!r}: name at least two requests joined by '+'")
    tasks = continual_tasks(specs, bundle, gallery, split, cache)
    # the merged models are scored on each request's test columns without the other requests' files
    scored = [without_files(task, set().union(*(read_by(o) for o in tasks if o is not task))) for task in tasks]
    rows = []
    for m in list(methods or ["ours"]):
        run_dirs = []
        for s, task in zip(specs, tasks):
            run = run_method(bundle, task, m, method_config(configs, m), evaluator, callbacks)
            d = out / "runs" / m / slug(s)
            save_run(run, bundle, d, export=False)
            run_dirs.append(d)
        candidates = {f"{m}: {s} alone": scaled_delta(d) for s, d in zip(specs, run_dirs)}
        candidates[f"{m}: merged (sum)"] = merge_runs(run_dirs, "sum")
        candidates[f"{m}: merged (average)"] = merge_runs(run_dirs, "average")
        for name, delta in candidates.items():
            row = {"method": name}
            scores = []
            for s, task in zip(specs, scored):
                before = evaluator.before(task)
                after = evaluator.after(task, delta, 1.0)
                cols = {c: {"before": before[c], "after": after[c]} for c in before}
                sc = score(cols)
                scores.append(sc)
                row[f"{s} target_after"] = after["target"]
                row[f"{s} target_ratio"] = after["target"] / before["target"] if before["target"] else float("nan")
                row[f"{s} score"] = sc
            row["score"] = sum(scores) / len(scores)
            rows.append(row)
    title = f"continual forgetting by merging: {' + '.join(specs)} — {bundle.arch}"
    md = [f"# {title}", "", "Cells: target accuracy after (after / before) and the Score of each request's "
          "columns (without the files another request trains on, calibrates on or forgets); last column: the "
          "mean Score.", "",
          "| model | " + " | ".join(f"{s}: target | {s}: Score" for s in specs) + " | mean Score |",
          "|---|" + "---:|---:|" * len(specs) + "---:|"]
    for r in rows:
        cells = [f"{r[f'{s} target_after']:.3f} ({r[f'{s} target_ratio']:.2f}) | {r[f'{s} score']:.1f}" for s in specs]
        md.append(f"| {r['method']} | " + " | ".join(cells) + f" | **{r['score']:.1f}** |")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "continual.md", "\n".join(md) + "\n")
    write_text(out / "continual.csv", table_csv(rows))
    write_json(out / "continual.json", {**meta, "title": title, "rows": rows})
    return {"title": title, "rows": rows}
