"""Measure the web app as a person meets it, in headless Chromium:

- app start to first page (process start -> the page's widgets in the browser; the server is
  polled over HTTP first, then the page opened once),
- a full job from the click on "Forget it" to both grids filled (the method's default config),
  then to its Score (the held-out evaluation runs after the grids), with the job's seconds per
  stage, then the rest of its evaluation and α-grid after the grids (the job done),
- the α-slider browser round trip (key press -> the α note updated, and the right grid when the
  move reaches another computed point), p50 / p90, and p50 of the moves that change the point,
- the app process's peak RSS (VmHWM) over all of it, and the CPU seconds the browser itself used
  while the job ran (it shares the app's cores on this bench).

    python bench/bench_app.py                     # the app as `python app.py` starts it
    python bench/bench_app.py --quick             # the tests' short job
    python bench/bench_app.py --baseline HEAD~1   # that commit first, then this checkout: side by side
Prints one line per figure and a JSON line at the end (with --baseline: a table of both, then the
JSON of both).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from common import (CHROMIUM, CHROMIUM_ARGS, ROOT, checkout, cpu_seconds, free_port, machine_load, peak_rss_mb, pids,
                    print_figures, start_app, stop, wait_for, wait_in_page)

# the figures a comparison shows, in order, with their targets on 2 CPU cores (issue 20)
COMPARED = [("start_to_first_page_s", "first page (s)", "≤ 8"),
            ("job_click_to_grids_s", "click → both grids (s)", "≤ 30"),
            ("job_click_to_score_s", "click → Score and metrics (s)", ""),
            ("alpha_grid_after_grids_s", "the rest after the grids: evaluation + α-grid (s)", "≤ 20"),
            ("alpha_grid_rest_seconds", "  of which the α-grid's other points (s)", ""),
            ("slider_round_trip_ms_p50", "slider round trip p50 (ms)", "≤ 50"),
            ("slider_grid_change_ms_p50", "  moves to another point, p50 (ms)", ""),
            ("app_peak_rss_mb", "peak RSS (MiB)", "≤ 1536"),
            ("browser_cpu_during_job_s", "browser CPU during the job (s)", ""),
            ("job_seconds_server", "job, server side (s)", ""),
            ("alpha_grid_seconds", "α-grid encode (s)", "")]


def _shown_alpha(note: str) -> str | None:
    """The computed α point the α note says the right grid shows."""
    m = re.search(r"showing α = ([0-9.]+)", note)
    return m.group(1) if m else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tests' short job instead of the default config")
    ap.add_argument("--slides", type=int, default=30, help="slider moves to time")
    ap.add_argument("--alpha-points", type=int, default=None, help="α-grid points per job (default: the app's)")
    ap.add_argument("--baseline", default=None, help="a commit to bench first, in the same session (e.g. HEAD~1)")
    ap.add_argument("--screenshots", default=str(ROOT / "bench" / "out" / "screenshots"))
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        figures = {"skipped": f"{CHROMIUM} missing (apt-get install -y chromium)"}
        print(json.dumps(figures))
        return figures
    if args.baseline is None:
        return print_figures(bench(args, ROOT))
    base_root = checkout(args.baseline, Path(tempfile.mkdtemp(prefix="clipforget-baseline-")))
    base = bench(args, base_root, "baseline-")
    ours = bench(args, ROOT)
    print(f"{'figure':36s} {'this checkout':>14s} {args.baseline:>14s} {'target':>8s}")
    for key, label, target in COMPARED:
        print(f"{label:36s} {_fmt(ours.get(key)):>14s} {_fmt(base.get(key)):>14s} {target:>8s}")
    print(f"machine: {ours['machine_before']} -> {ours['machine_after']} (baseline: {base['machine_before']})")
    both = {"this": ours, "baseline": {"ref": args.baseline, **base}}
    print(json.dumps(both))
    return both


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def bench(args, root: Path, prefix: str = "") -> dict:
    """The figures of the app in the checkout at ``root``."""
    from playwright.sync_api import sync_playwright

    runs = Path(tempfile.mkdtemp(prefix="clipforget-bench-"))
    port = free_port()
    figures: dict = {"quick": args.quick, "machine_before": machine_load()}
    others = pids("chrom")              # browsers this bench did not start: not counted
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        t0 = time.monotonic()
        proc = start_app(runs, port, args.alpha_points, args.quick, root)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            url = f"http://127.0.0.1:{port}/"
            # poll over HTTP, then open the page once: a browser retrying a refused navigation adds
            # seconds of its own (error pages, back-off) that a person opening the printed URL never sees
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2).read()
                    break
                except OSError:  # server not up yet
                    if time.monotonic() - t0 > 120 or proc.poll() is not None:
                        raise
                    time.sleep(0.05)
            figures["start_to_http_s"] = time.monotonic() - t0
            page.goto(url)
            page.wait_for_selector("#cards img", timeout=60_000)
            figures["start_to_first_page_s"] = time.monotonic() - t0
            wait_for(lambda: page.locator("#left-grid .caption-label").count() == 12, 300, "model ready")
            figures["start_to_model_ready_s"] = time.monotonic() - t0
            figures["app_rss_ready_mb"] = peak_rss_mb(proc.pid)

            t1, browser_cpu = time.monotonic(), cpu_seconds("chrom", others)
            page.locator("#run").click()
            wait_for(lambda: any(runs.glob("*/job.json")), 60, "a job started by the click", poll=0.1)
            wait_in_page(page, "document.querySelectorAll('#right-grid .caption-label').length === 12", 1800,
                         "both grids")
            t_grids = time.monotonic()
            figures["job_click_to_grids_s"] = t_grids - t1
            # the Score (a commit that evaluates before the grids: the same moment)
            wait_in_page(page, "(document.querySelector('#score')?.innerText || '').includes('Score')", 1800,
                         "the Score")
            figures["job_click_to_score_s"] = time.monotonic() - t1
            shots = Path(args.screenshots)
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / f"{prefix}bench-grids.png"), full_page=True)
            # the rest after the grids (the evaluation, then the α-grid's other points): the job is done
            wait_for(lambda: _job(runs)["status"] not in ("queued", "running", "ready"), 1800, "job done", poll=0.2)
            figures["alpha_grid_after_grids_s"] = time.monotonic() - t_grids
            # the browser shares the app's cores here: what it used while the job ran
            figures["browser_cpu_during_job_s"] = cpu_seconds("chrom", others) - browser_cpu
            page.screenshot(path=str(shots / f"{prefix}bench-done.png"), full_page=True)

            slider = page.locator("#alpha input[type=range]")
            note = page.locator("#alpha-note")
            slider.focus()
            page.keyboard.press("End")
            wait_for(lambda: "α = 1.00" in note.inner_text(), 10, "α = 1")
            times, grid_times = [], []      # every move; the moves that change the computed point shown
            for i in range(args.slides):
                before = note.inner_text()
                key = "ArrowLeft" if (i // 10) % 2 == 0 else "ArrowRight"
                t3 = time.perf_counter()
                page.keyboard.press(key)
                wait_for(lambda: note.inner_text() != before, 10, "slider round trip", poll=0.002)
                times.append((time.perf_counter() - t3) * 1000)
                if _shown_alpha(note.inner_text()) != _shown_alpha(before):
                    grid_times.append(times[-1])
            figures["slider_round_trip_ms_p50"] = statistics.median(times)
            figures["slider_round_trip_ms_p90"] = sorted(times)[int(0.9 * (len(times) - 1))]
            figures["slider_grid_change_ms_p50"] = statistics.median(grid_times) if grid_times else None
            figures["slider_grid_changes"] = len(grid_times)
            figures["app_peak_rss_mb"] = peak_rss_mb(proc.pid)
            job = _job(runs)
            figures["alpha_grid_points"] = job["summary"].get("alpha_grid_points")
            figures["alpha_grid_seconds"] = job["summary"].get("alpha_grid_seconds")
            figures["alpha_grid_rest_seconds"] = job["summary"].get("alpha_grid_rest_seconds")
            figures["job_seconds_server"] = job["seconds"]
            figures["job_stage_seconds"] = job["summary"].get("stage_seconds")
            figures["screenshot"] = str(shots / f"{prefix}bench-done.png")
        finally:
            stop(proc)
            browser.close()
    figures["machine_after"] = machine_load()
    return figures


def _job(runs: Path) -> dict:
    return next(json.loads(j.read_text()) for j in runs.glob("*/job.json"))


if __name__ == "__main__":
    main()
