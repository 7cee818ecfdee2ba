"""Measure the web app as a person meets it, in headless Chromium:

- app start to first page (process start -> the page's widgets in the browser; the server is
  polled over HTTP first, then the page opened once),
- a full job from the click on "Forget it" to both grids filled (the method's default config),
  with the job's seconds per stage and its α-grid precompute,
- the α-slider browser round trip (key press -> the right grid and α note updated), p50 / p90,
- the app process's peak RSS (VmHWM) over all of it.

    python bench/bench_app.py                     # the app as `python app.py` starts it
    python bench/bench_app.py --quick             # the tests' short job
Prints one line per figure and a JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from common import (CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, machine_load, peak_rss_mb, print_figures, start_app,
                    stop, wait_for)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tests' short job instead of the default config")
    ap.add_argument("--slides", type=int, default=30, help="slider moves to time")
    ap.add_argument("--alpha-points", type=int, default=None, help="α-grid points per job (default: the app's)")
    ap.add_argument("--screenshots", default=str(ROOT / "bench" / "out" / "screenshots"))
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        figures = {"skipped": f"{CHROMIUM} missing (apt-get install -y chromium)"}
        print(json.dumps(figures))
        return figures
    from playwright.sync_api import sync_playwright

    runs = Path(tempfile.mkdtemp(prefix="clipforget-bench-"))
    port = free_port()
    figures: dict = {"quick": args.quick, "machine_before": machine_load()}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        t0 = time.monotonic()
        proc = start_app(runs, port, args.alpha_points, args.quick)
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

            t1 = time.monotonic()
            page.locator("#run").click()
            wait_for(lambda: "Score" in page.locator("#score").inner_text()
                     and page.locator("#right-grid .caption-label").count() == 12, 1800, "job results", poll=0.2)
            figures["job_click_to_grids_s"] = time.monotonic() - t1
            shots = Path(args.screenshots)
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "bench-done.png"), full_page=True)

            slider = page.locator("#alpha input[type=range]")
            note = page.locator("#alpha-note")
            slider.focus()
            page.keyboard.press("End")
            wait_for(lambda: "α = 1.00" in note.inner_text(), 10, "α = 1")
            times = []
            for i in range(args.slides):
                before = note.inner_text()
                key = "ArrowLeft" if (i // 10) % 2 == 0 else "ArrowRight"
                t2 = time.perf_counter()
                page.keyboard.press(key)
                wait_for(lambda: note.inner_text() != before, 10, "slider round trip", poll=0.002)
                times.append((time.perf_counter() - t2) * 1000)
            figures["slider_round_trip_ms_p50"] = statistics.median(times)
            figures["slider_round_trip_ms_p90"] = sorted(times)[int(0.9 * (len(times) - 1))]
            figures["app_peak_rss_mb"] = peak_rss_mb(proc.pid)
            job = next(json.loads(j.read_text()) for j in runs.glob("*/job.json"))
            figures["alpha_grid_points"] = job["summary"].get("alpha_grid_points")
            figures["alpha_grid_seconds"] = job["summary"].get("alpha_grid_seconds")
            figures["job_seconds_server"] = job["seconds"]
            figures["job_stage_seconds"] = job["summary"].get("stage_seconds")
            figures["screenshot"] = str(shots / "bench-done.png")
        finally:
            stop(proc)
            browser.close()
    figures["machine_after"] = machine_load()
    return print_figures(figures)


if __name__ == "__main__":
    main()
