"""The bench suite: every bench in one command, one table at the end.

    python bench/run_all.py                 # core, app (browser, a full job), load test, GPU section
    python bench/run_all.py --quick         # the tests' short job and a smaller load (a smoke run)

Sections: ``bench_core`` (encode, index, search), ``bench_app`` (start, click to grids and to the
Score with the job's seconds per stage and its α-grid, slider round trip, peak RSS), ``bench_load`` (concurrent
searches while a job runs), ``bench_gpu`` (RN50 at 224 px on ~1,300 forget images and the encode
overhead against plain open_clip; skipped, saying why, without a CUDA GPU). Timings depend on what
else the machine runs: the table starts with its load average. Figures also go to
``bench/out/bench.json``.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import bench_app
import bench_core
import bench_gpu
import bench_load
from common import ROOT, machine_load

# (section, key, label, target)
ROWS = [
    ("core", "model_load_s", "model load (s)", ""),
    ("core", "gallery_encode_images_per_s", "gallery encode (images/s)", ""),
    ("core", "index_build_s", "FAISS index build (s)", ""),
    ("core", "text_embed_ms_p50", "text embedding (ms, p50)", ""),
    ("core", "faiss_search_ms_p50", "FAISS search (ms, p50)", ""),
    ("core", "search_ms_p50", "search = text + FAISS (ms, p50)", ""),
    ("app", "start_to_first_page_s", "app start to first page (s)", "≤ 8"),
    ("app", "start_to_model_ready_s", "app start to model ready (s)", ""),
    ("app", "job_click_to_grids_s", "job: click to grids (s)", "≤ 30"),
    ("app", "job_click_to_score_s", "job: click to Score (s)", ""),
    ("app", "alpha_grid_after_grids_s", "job: the rest after the grids: evaluation, α-grid (s)", "≤ 20"),
    ("app", "job_stage_seconds", "job seconds per stage", ""),
    ("app", "alpha_grid_points", "α-grid points", ""),
    ("app", "alpha_grid_seconds", "α-grid precompute (s)", ""),
    ("app", "slider_round_trip_ms_p50", "slider round trip (ms, p50)", "≤ 50"),
    ("app", "slider_round_trip_ms_p90", "slider round trip (ms, p90)", ""),
    ("app", "app_peak_rss_mb", "app peak RSS (MiB)", "≤ 1536"),
    ("load", "requests", "load: searches sent", ""),
    ("load", "errors", "load: errors", "0"),
    ("load", "p50_ms", "load: search latency p50 (ms)", ""),
    ("load", "p99_ms", "load: search latency p99 (ms)", ""),
    ("load", "job_running_throughout", "load: a job ran throughout", "True"),
    ("load", "app_peak_rss_mb", "load: app peak RSS (MiB)", ""),
    ("gpu", "gpu", "GPU", ""),
    ("gpu", "job_stage_seconds", "RN50 job seconds per stage", ""),
    ("gpu", "alpha_grid_s", "RN50 α-grid precompute (s)", ""),
    ("gpu", "encode_images_per_s", "RN50 encode_images (images/s)", ""),
    ("gpu", "plain_open_clip_images_per_s", "RN50 plain open_clip (images/s)", ""),
    ("gpu", "encode_overhead_pct", "encode overhead vs open_clip (%)", "≤ 10"),
]


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return str(v)


def table(results: dict) -> str:
    lines = ["| figure | value | target |", "|---|---|---|"]
    for section, key, label, target in ROWS:
        fig = results.get(section, {})
        if "skipped" in fig or "error" in fig:
            continue
        lines.append(f"| {label} | {fmt(fig.get(key, '—'))} | {target} |")
    for section, fig in results.items():
        if "skipped" in fig:
            lines.append(f"| {section} | skipped: {fig['skipped']} | |")
        elif "error" in fig:
            lines.append(f"| {section} | FAILED: {fig['error']} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tests' short job and 4 clients x 5 searches")
    ap.add_argument("--only", default="core,app,load,gpu", help="comma-separated sections to run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "bench.json"))
    args = ap.parse_args(argv)
    sections = {
        "core": lambda: bench_core.main([]),
        "app": lambda: bench_app.main(["--quick"] if args.quick else []),
        "load": lambda: bench_load.main(["--quick", "--clients", "4", "--searches", "5"] if args.quick else []),
        "gpu": lambda: bench_gpu.main([]),
    }
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(wanted) - set(sections)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {sorted(sections)}")
    results: dict = {}
    started = machine_load()
    t0 = time.monotonic()
    for name in wanted:
        print(f"\n=== {name} ===", flush=True)
        try:
            results[name] = sections[name]()
        except Exception as e:  # noqa: BLE001 - one failed section must not hide the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine_start": started, "machine_end": machine_load(),
                               "seconds": time.monotonic() - t0, "quick": args.quick, **results}, indent=1))
    print(f"\nclipforget bench ({'quick' if args.quick else 'full'}) · start: {started} · end: {machine_load()} · "
          f"{time.monotonic() - t0:.0f}s\n")
    print(table(results))
    print(f"\nfigures: {out}")
    return results


if __name__ == "__main__":
    main()
