"""The app's default job without a browser: the embedded model and gallery, dog / poodle, the
app's own job (``AppCore``: its config, split and activation budget), timed from the submit to the
results (the grids can show), to the report (the Score) and to the end of the α-grid, with the
seconds of each stage and the process's peak RSS.

    python bench/bench_job.py                          # this checkout, 2 runs in one process
    python bench/bench_job.py --baseline HEAD~1        # that commit and this checkout, alternating

With ``--baseline`` each run is a fresh process (the first job of an app, as a visitor's first
click), the two commits alternating ``--reps`` times; the table shows the median of each figure.
The browser is left out on purpose: bench/bench_app.py measures the page, with the headless
browser sharing the app's cores; this measures the job alone, run to run on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, checkout, machine_load, peak_rss_mb, print_figures

FIGURES = [("submit_to_results_s", "submit → results (grids) (s)"), ("submit_to_report_s", "submit → report (Score) (s)"),
           ("submit_to_done_s", "submit → α-grid done (s)"), ("peak_rss_mb", "peak RSS (MiB)")]


def one_job(runs: Path) -> dict:
    """One job in this process (its first), on this checkout's clipforget."""
    import clipforget
    from clipforget.app import AppCore
    from clipforget.app.loading import default_pick
    core = AppCore(runs_dir=runs)
    try:
        t0 = time.perf_counter()
        core.resources(timeout=600)
        figures = {"code": clipforget.__file__, "load_s": time.perf_counter() - t0,
                   "rss_loaded_mb": peak_rss_mb(os.getpid())}
        job = core.start_job(*default_pick(core.gallery))
        t1 = time.perf_counter()
        ready = core.jobs.wait(job.id, timeout=1200, results=True)
        figures["submit_to_results_s"] = time.perf_counter() - t1
        if ready.status not in ("ready", "done"):
            raise RuntimeError(f"the job ended {ready.status}: {ready.error}")
        while not core.evaluated(job.id) and core.jobs.get(job.id).active:
            time.sleep(0.05)
        figures["submit_to_report_s"] = time.perf_counter() - t1
        done = core.jobs.wait(job.id, timeout=1200)
        figures["submit_to_done_s"] = time.perf_counter() - t1
        figures["peak_rss_mb"] = peak_rss_mb(os.getpid())
        figures["score"] = done.summary.get("score")
        figures["stage_seconds"] = {k: round(v, 2) for k, v in done.summary.get("stage_seconds", {}).items()}
        return figures
    finally:
        core.close()


def in_process(root: Path) -> dict:
    """One job in a fresh process from the checkout at ``root``; its figures."""
    runs = Path(tempfile.mkdtemp(prefix="clipforget-job-"))
    # importing bench_job imports common, which puts this checkout first on sys.path: ``root`` is put
    # first after that import, so the job imports the clipforget of ``root``
    code = (f"import sys, json, pathlib; sys.path.insert(0, {str(ROOT / 'bench')!r}); import bench_job; "
            f"sys.path.insert(0, {str(root)!r}); "
            f"print('FIGURES', json.dumps(bench_job.one_job(pathlib.Path({str(runs)!r}))))")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(root))
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)        # its cache holds the gallery's trunk (hundreds of MB)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("FIGURES ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"the job at {root} failed:\n{out.stderr[-3000:]}")
    figures = json.loads(line.removeprefix("FIGURES "))
    if not Path(figures["code"]).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"the job meant for {root} ran the clipforget of {figures['code']}")
    return figures


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=None, help="a commit to alternate with this checkout (e.g. HEAD~1)")
    ap.add_argument("--reps", type=int, default=2, help="runs of each")
    args = ap.parse_args(argv)
    if args.baseline is None:
        runs = [in_process(ROOT) for _ in range(args.reps)]
        return print_figures({"machine": machine_load(), "runs": runs,
                              **{k: statistics.median(r[k] for r in runs) for k, _ in FIGURES}})
    base_root = checkout(args.baseline, Path(tempfile.mkdtemp(prefix="clipforget-baseline-")))
    ours, base = [], []
    for _ in range(args.reps):
        base.append(in_process(base_root))
        ours.append(in_process(ROOT))
    print(f"{'figure (median of ' + str(args.reps) + ')':36s} {'this checkout':>14s} {args.baseline:>14s}")
    for key, label in FIGURES:
        print(f"{label:36s} {statistics.median(r[key] for r in ours):14.2f} {statistics.median(r[key] for r in base):14.2f}")
    stages = sorted({k for r in ours + base for k in r["stage_seconds"]})
    for k in stages:
        a = [r["stage_seconds"].get(k) for r in ours if k in r["stage_seconds"]]
        b = [r["stage_seconds"].get(k) for r in base if k in r["stage_seconds"]]
        print(f"{'  stage ' + k + ' (s)':36s} {_median(a):>14s} {_median(b):>14s}")
    print(f"machine: {machine_load()}")
    both = {"this": ours, "baseline": {"ref": args.baseline, "runs": base}}
    print(json.dumps(both))
    return both


def _median(values: list) -> str:
    return f"{statistics.median(values):.2f}" if values else "–"


if __name__ == "__main__":
    main()
