"""``clipforget sweep``: one forget run per subgroup of the hierarchy, summarised.

The quality bar of the method is a sweep, not a single lucky request: held-out target accuracy
after <= chance for every subgroup, median Score and minimum Score over all of them. With ``folds``
> 1 each request runs once per fold (another set of held-out files each time) and a subgroup's
figure is the mean over its folds, so it does not hang on one image.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data.gallery import Gallery
from .data.task import ForgetRequest, NoSuchFold, SplitConfig, ViewCache
from .eval.score import at_or_below_chance
from .io import write_json, write_text
from .models import ClipBundle
from .pipeline import Evaluator, NothingToForget, forget

log = logging.getLogger(__name__)


def sweep_requests(gallery: Gallery, superclass: str | None = None, every: int = 1,
                   style: str | None = None, offset: int = 0,
                   subgroups: list[str] | None = None) -> list[ForgetRequest]:
    """The hierarchy's subgroups in order, every ``every``-th from the ``offset``-th (``every=2``
    with offsets 0 and 1: two disjoint halves); ``subgroups``: only these (by name, in the
    hierarchy's order), e.g. to run a few of a sweep's subgroups again."""
    if every < 1 or not 0 <= offset < every:
        raise ValueError(f"need every >= 1 and 0 <= offset < every, got every={every}, offset={offset}")
    scs = [superclass] if superclass else gallery.superclasses()
    reqs = [ForgetRequest(sc, sg, style) for sc in scs for sg in gallery.subgroups(sc)]
    if subgroups is not None:
        wanted = set(subgroups)
        unknown = sorted(wanted - {r.subgroup for r in reqs})
        if unknown:
            raise ValueError(f"no subgroup {', '.join(map(repr, unknown))} in the gallery"
                             + (f"'s superclass {superclass!r}" if superclass else "")
                             + "; the names are the gallery's subgroup folders (e.g. "
                             + ", ".join(r.subgroup for r in reqs[:3]) + ")")
        reqs = [r for r in reqs if r.subgroup in wanted]
    return reqs[offset::every]


@dataclass(frozen=True)
class ModelSpec:
    """How to load the model again in a worker process (load_clip's arguments)."""
    name: str = "embedded"
    pretrained: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    allow_pickle: bool = False

    def load(self) -> ClipBundle:
        from .models import load_clip
        return load_clip(self.name, self.pretrained, self.device, self.precision, allow_pickle=self.allow_pickle)


def sweep_row(run, fold: int = 0) -> dict:
    r, req = run.report, run.task.request
    row = {"superclass": req.superclass, "subgroup": req.subgroup, "style": req.style, "fold": fold,
           "score": r["score"], "alpha": r["alpha"], "chance": r["chance"],
           "target_after": r["columns"]["target"]["after"], "columns": r["columns"],
           "trained_on": r.get("trained_on", {}),
           "seconds": r["seconds"]["total"], "stage_seconds": r["seconds"]}
    if run.result.info.get("escalate"):        # ours with escalate on: what D_m chose
        row["escalate"] = run.result.info["escalate"]
    return row


def row_line(r: dict) -> str:
    """A row as the sweep prints it while it runs."""
    where = f"  {r['superclass']}/{r['subgroup']} fold {r['fold']}: "
    if "skipped" in r:
        return where + f"skipped ({r['skipped']})"
    return (where + f"Score {r['score']:.1f}, held-out target {r['columns']['target']['before']:.2f} -> "
            f"{r['target_after']:.2f}, alpha {r['alpha']:.2f}, {r['seconds']:.1f}s")


# why a run has no figures (a skipped row's "skip_reason"; rows written before it are "nothing_to_forget")
SKIP_REASONS = {NothingToForget: "nothing_to_forget", NoSuchFold: "no_such_fold"}
SKIP_TEXT = {"nothing_to_forget": "the model does not recognise before unlearning (nothing to forget)",
             "no_such_fold": "at a fold past the subgroup's last (too few files for that many folds)"}


class _Runner:
    """Runs requests one after another on one loaded model (shared caches)."""

    def __init__(self, bundle: ClipBundle, gallery: Gallery, method: str, config, split: SplitConfig | None = None):
        self.bundle, self.gallery, self.method, self.config = bundle, gallery, method, config
        self.split = split or SplitConfig()
        self.cache, self.evaluator = ViewCache(gallery), Evaluator(bundle)

    def __call__(self, request: ForgetRequest, fold: int = 0) -> dict:
        """The request's row at ``fold`` (:attr:`SplitConfig.fold`: which files are held out); a
        request the model does not recognise before unlearning is a row with ``skipped`` (the
        reason) instead of figures, and the sweep goes on."""
        t0 = time.perf_counter()
        try:
            run = forget(self.bundle, request, self.method, self.config, self.gallery,
                         dataclasses.replace(self.split, fold=fold), cache=self.cache, evaluator=self.evaluator)
        except (NothingToForget, NoSuchFold) as e:     # any other error stops the sweep
            log.warning("skipped %s fold %d: %s", request.label, fold, e)
            return {"superclass": request.superclass, "subgroup": request.subgroup, "style": request.style,
                    "fold": fold, "skipped": str(e), "skip_reason": SKIP_REASONS[type(e)],
                    "wall": time.perf_counter() - t0}
        return {**sweep_row(run, fold), "wall": time.perf_counter() - t0}


_WORKER: _Runner | None = None     # one per worker process (ProcessPoolExecutor initializer)


def _init_worker(spec: ModelSpec, gallery: str | None, method: str, config, threads: int,
                 split: SplitConfig | None) -> None:
    global _WORKER
    import torch
    torch.set_num_threads(threads)
    _WORKER = _Runner(spec.load(), Gallery.open(gallery), method, config, split)


def _work(request: ForgetRequest, fold: int) -> dict:
    return _WORKER(request, fold)


def request_key(row_or_request, fold: int | None = None) -> tuple:
    """(superclass, subgroup, style, fold) of a row, or of a request with ``fold``."""
    r = row_or_request
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    return get("superclass"), get("subgroup"), get("style"), get("fold") if fold is None else fold


def spread_order(n: int, stride: int = 4) -> list[int]:
    """0, 4, 8, ..., 1, 5, ...: the runs done first spread over the whole hierarchy, so a sweep
    stopped early is a fair sample of it."""
    return [i for k in range(stride) for i in range(k, n, stride)]


def previous_rows(out: str | Path, method: str, split: SplitConfig | None = None) -> dict[tuple, dict]:
    """Rows of an earlier (possibly partial) sweep of ``method`` in ``out``, by request; with
    ``split``, only if it ran with the same split (:func:`check_split`)."""
    path = Path(out) / "sweep.json"
    if not path.exists():
        return {}
    import json
    try:
        old = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it to start over, or choose another --out") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} is not a sweep summary; delete it to start over, or choose another --out")
    if old.get("method") != method:
        raise ValueError(f"{path} holds a sweep of {old.get('method')!r}, not {method!r}: "
                         "choose another --out, or drop --resume")
    rows = old.get("rows", [])
    if split is not None:
        check_split(path, old.get("split"), split, bool(rows))
    return {request_key(r): r for r in rows}


def check_split(path: Path, recorded: dict | None, split: SplitConfig, has_rows: bool = True) -> None:
    """Refuse to resume rows that ran with another split (seed, test_images, views…): their files
    are not the ones the new rows hold out. ``fold`` is not compared (rows are keyed by their own
    fold). A summary written before the split was recorded is accepted, with a log line; so are
    fields added to :class:`SplitConfig` since it was written."""
    if recorded is None:
        if has_rows:
            log.info("resume: %s records no split (written before sweeps recorded it); its rows are kept as "
                     "they are", path)
        return
    wanted = dataclasses.asdict(split)
    differ = {k: (recorded[k], wanted[k]) for k in wanted if k != "fold" and k in recorded and recorded[k] != wanted[k]}
    if differ:
        raise ValueError(f"{path} holds a sweep run with another split: "
                         + ", ".join(f"{k} {a!r} there, {b!r} asked for" for k, (a, b) in differ.items())
                         + "; resume with the same --split, or choose another --out")
    missing = sorted(k for k in wanted if k not in recorded and k != "fold")
    if missing:
        log.info("resume: %s records no %s (added to the split since); its rows are kept", path, ", ".join(missing))


def run_sweep(bundle: ClipBundle | None, gallery: Gallery, requests: list[ForgetRequest], method: str = "ours",
              config=None, out: str | Path | None = None,
              on_row: Callable[[dict], None] | None = None, workers: int = 1,
              model_spec: ModelSpec | None = None, gallery_spec: str | None = None,
              resume: bool = False, folds: int = 1, split: SplitConfig | None = None) -> dict:
    """One forget run per request. ``workers`` > 1 runs them in that many processes (each loads
    the model from ``model_spec`` and the gallery from ``gallery_spec`` and uses one CPU thread:
    on a small model, two one-thread processes finish more jobs than one two-thread process).
    Runs go in :func:`spread_order`; rows come back in request order; partial results are written
    to ``out`` as they arrive, and ``resume`` keeps the rows of an earlier sweep there (same
    method and split, else an error; the config is the caller's to keep the same) and runs only the
    missing requests. A run at a fold past its subgroup's last is a skipped row (:class:`NoSuchFold`),
    as is one the model does not recognise before unlearning (:class:`NothingToForget`).
    ``folds``: each request once per fold, ``split.fold`` .. ``split.fold + folds − 1``
    (:attr:`SplitConfig.fold`); a row records the fold it ran at."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    split = split or SplitConfig()
    jobs = [(r, split.fold + f) for r in requests for f in range(folds)]
    rows: list[dict | None] = [None] * len(jobs)
    if resume and out:
        old = previous_rows(out, method, split)
        rows = [old.get(request_key(r, f)) for r, f in jobs]
        log.info("resume: %d of %d runs already done", sum(r is not None for r in rows), len(rows))
    todo = [i for i in spread_order(len(jobs), 4 * folds) if rows[i] is None]

    def done(i: int, row: dict) -> None:
        rows[i] = row
        if on_row:
            on_row(row)
        if out:   # keep partial results of a long sweep
            write_json(Path(out) / "sweep.json", summarise([r for r in rows if r is not None], method, split))

    if workers <= 1:
        runner = _Runner(bundle if bundle is not None else (model_spec or ModelSpec()).load(), gallery, method, config,
                         split)
        for i in todo:
            done(i, runner(*jobs[i]))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(workers, mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(model_spec or ModelSpec(), gallery_spec, method, config, 1, split)) as pool:
            futures = {pool.submit(_work, *jobs[i]): i for i in todo}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    summary = summarise(rows, method, split)
    if out:
        write_json(Path(out) / "sweep.json", summary)
        write_text(Path(out) / "sweep.md", markdown(summary))
    return summary


def per_request(rows: list[dict]) -> list[dict]:
    """One figure per request: the mean Score and held-out target accuracy over its folds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(request_key(r)[:3], []).append(r)
    return [{"superclass": k[0], "subgroup": k[1], "style": k[2], "folds": len(g),
             "score": statistics.fmean(r["score"] for r in g),
             "target_after": statistics.fmean(r["target_after"] for r in g), "chance": g[0]["chance"]}
            for k, g in groups.items()]


def summarise(rows: list[dict], method: str, split: SplitConfig | None = None) -> dict:
    """Median / minimum Score and the rest over the scored rows; ``skipped`` lists the requests
    the model did not recognise before unlearning (nothing to forget: no figure). ``split``: the
    split the rows ran with (recorded as it is, its ``fold`` the first fold)."""
    every_row, skipped = rows, [r for r in rows if "skipped" in r]
    rows = [r for r in rows if "skipped" not in r]
    requests = per_request(rows)
    scores = [r["score"] for r in requests]
    at_chance = [at_or_below_chance(r) for r in requests]
    secs = [r["seconds"] for r in rows]
    stages = sorted({k for r in rows for k in r.get("stage_seconds", {})})
    return {"method": method, "runs": len(rows), "requests": len(requests),
            "folds": max((r["folds"] for r in requests), default=0),
            "median_score": statistics.median(scores) if scores else None,
            "min_score": min(scores) if scores else None,
            "target_at_or_below_chance": sum(at_chance),
            "median_seconds": statistics.median(secs) if secs else None,
            "max_seconds": max(secs) if secs else None,
            "median_stage_seconds": {k: statistics.median(r["stage_seconds"][k] for r in rows
                                                          if k in r.get("stage_seconds", {})) for k in stages},
            **({"split": dataclasses.asdict(split)} if split is not None else {}),
            "per_request": requests, "rows": every_row,
            "skipped": [{**{k: r[k] for k in ("superclass", "subgroup", "style", "fold", "skipped")},
                         "skip_reason": r.get("skip_reason", "nothing_to_forget")} for r in skipped]}


def skipped_lines(skipped: list[dict]) -> list[str]:
    """One line per reason a run was skipped, naming the runs (fold too when a reason is the fold)."""
    lines = []
    for reason, text in SKIP_TEXT.items():
        runs = [r for r in skipped if r.get("skip_reason", "nothing_to_forget") == reason]
        if runs:
            fold = reason == "no_such_fold"
            lines.append(f"- skipped {len(runs)} run(s) {text}: " + ", ".join(
                f"{r['superclass']}/{r['subgroup'] or r['style']}" + (f" fold {r['fold']}" if fold else "") for r in runs))
    return lines


def markdown(summary: dict) -> str:
    n, folds = summary.get("requests", summary["runs"]), summary.get("folds", 1)
    lines = [f"# Sweep: {summary['method']} over {n} requests" + (f", {folds} folds each" if folds > 1 else ""), "",
             "Held-out protocol: every column is measured on image files the method never trained on; the "
             "forget examples column is the trained-on files, outside the Score."
             + (" A request's figures below are the mean over its folds; the table lists each run." if folds > 1 else ""),
             "",
             *([f"- split: fold {summary['split']['fold']}"
                + (f" to {summary['split']['fold'] + folds - 1}" if folds > 1 else "")
                + ", " + ", ".join(f"{k} {v}" for k, v in summary["split"].items() if k != "fold")]
               if "split" in summary else []),
             (f"- median Score {summary['median_score']:.1f}, minimum {summary['min_score']:.1f}"
              if summary["median_score"] is not None else "- no run was scored"),
             f"- held-out target accuracy after <= chance in {summary['target_at_or_below_chance']} of {n}",
             *skipped_lines(summary.get("skipped", [])),
             *([f"- seconds per job: median {summary['median_seconds']:.1f}, max {summary['max_seconds']:.1f}; "
                "median per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.get("median_stage_seconds", {}).items())]
               if summary["median_seconds"] is not None else []),
             "",
             "| superclass | subgroup | style | fold | α | target (held out) before → after | forget examples (trained on) | "
             "retain | other superclasses | other concepts | unseen styles | Score |",
             "|---|---|---|---:|---:|---|---|---|---|---|---|---:|"]
    for r in (r for r in summary["rows"] if "skipped" not in r):
        c = {**r["columns"], **r.get("trained_on", {})}

        def fmt(name):
            return f"{c[name]['before']:.2f} → {c[name]['after']:.2f}" if name in c else "–"
        lines.append(f"| {r['superclass']} | {r['subgroup'] or '–'} | {r['style'] or '–'} | {r.get('fold', 0)} | "
                     f"{r['alpha']:.2f} | "
                     f"{fmt('target')} | {fmt('forget_examples')} | {fmt('retain')} | {fmt('other_superclasses')} | "
                     f"{fmt('other_concepts')} | {fmt('unseen_styles')} | "
                     f"{r['score']:.1f} |")
    return "\n".join(lines) + "\n"
