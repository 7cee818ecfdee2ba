"""``clipforget sweep``: one forget run per subgroup of the hierarchy, summarised.

The quality bar of the method is a sweep, not a single lucky request: target accuracy after <=
chance for every subgroup, median Score and minimum Score over all of them.
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Callable

from .data.gallery import Gallery
from .data.task import ForgetRequest, ViewCache
from .io import write_json, write_text
from .models import ClipBundle
from .pipeline import Evaluator, forget

log = logging.getLogger(__name__)


def sweep_requests(gallery: Gallery, superclass: str | None = None, every: int = 1,
                   style: str | None = None) -> list[ForgetRequest]:
    scs = [superclass] if superclass else gallery.superclasses()
    reqs = [ForgetRequest(sc, sg, style) for sc in scs for sg in gallery.subgroups(sc)]
    return reqs[::every]


def run_sweep(bundle: ClipBundle, gallery: Gallery, requests: list[ForgetRequest], method: str = "ours",
              config=None, out: str | Path | None = None,
              on_row: Callable[[dict], None] | None = None) -> dict:
    cache, evaluator = ViewCache(gallery), Evaluator(bundle)
    rows = []
    for req in requests:
        t0 = time.perf_counter()
        run = forget(bundle, req, method, config, gallery, cache=cache, evaluator=evaluator)
        r = run.report
        row = {"superclass": req.superclass, "subgroup": req.subgroup, "style": req.style,
               "score": r["score"], "alpha": r["alpha"], "chance": r["chance"],
               "target_after": r["columns"]["target"]["after"],
               "columns": r["columns"], "seconds": r["seconds"]["total"], "wall": time.perf_counter() - t0}
        rows.append(row)
        if on_row:
            on_row(row)
        if out:   # keep partial results of a long sweep
            write_json(Path(out) / "sweep.json", summarise(rows, method))
    summary = summarise(rows, method)
    if out:
        write_json(Path(out) / "sweep.json", summary)
        write_text(Path(out) / "sweep.md", markdown(summary))
    return summary


def summarise(rows: list[dict], method: str) -> dict:
    scores = [r["score"] for r in rows]
    at_chance = [r["target_after"] <= r["chance"] + 1e-9 for r in rows]
    return {"method": method, "runs": len(rows),
            "median_score": statistics.median(scores) if scores else None,
            "min_score": min(scores) if scores else None,
            "target_at_or_below_chance": sum(at_chance), "median_seconds":
                statistics.median(r["seconds"] for r in rows) if rows else None, "rows": rows}


def markdown(summary: dict) -> str:
    lines = [f"# Sweep: {summary['method']} over {summary['runs']} requests", "",
             f"- median Score {summary['median_score']:.1f}, minimum {summary['min_score']:.1f}",
             f"- target accuracy after <= chance in {summary['target_at_or_below_chance']} of {summary['runs']}",
             f"- median seconds per job {summary['median_seconds']:.1f}", "",
             "| superclass | subgroup | style | α | target before → after | retain | other superclasses | other concepts | Score |",
             "|---|---|---|---:|---|---|---|---|---:|"]
    for r in summary["rows"]:
        c = r["columns"]

        def fmt(name):
            return f"{c[name]['before']:.2f} → {c[name]['after']:.2f}" if name in c else "–"
        lines.append(f"| {r['superclass']} | {r['subgroup'] or '–'} | {r['style'] or '–'} | {r['alpha']:.2f} | "
                     f"{fmt('target')} | {fmt('retain')} | {fmt('other_superclasses')} | {fmt('other_concepts')} | "
                     f"{r['score']:.1f} |")
    return "\n".join(lines) + "\n"
