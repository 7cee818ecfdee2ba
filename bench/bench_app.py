"""Measure the web app as a person meets it, in headless Chromium:

- app start to first page (process start -> the page's widgets in the browser),
- a full job from the click on "Forget it" to both grids filled (the method's default config),
- the α-slider browser round trip (key press -> the right grid and α note updated), p50 / p90,
- the app process's peak RSS (VmHWM), and the job's α-grid precompute time.

    python bench/bench_app.py                     # default config, 11 α points
    python bench/bench_app.py --quick             # the tests' short job
Prints one line per figure and a JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for(cond, timeout, what, poll=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tests' short job instead of the default config")
    ap.add_argument("--slides", type=int, default=30, help="slider moves to time")
    ap.add_argument("--alpha-points", type=int, default=11)
    ap.add_argument("--screenshots", default=str(ROOT / "bench" / "out" / "screenshots"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    runs = Path(tempfile.mkdtemp(prefix="clipforget-bench-"))
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    code = ("import sys, app; from clipforget.appcore import AppCore; "
            f"core = AppCore(runs_dir={str(runs)!r}, alpha_points={args.alpha_points}"
            + (", job_config={'remind': {'enabled': False}, 'restore': {'grid_points': 5}}, job_split="
               "{'train_views': 2, 'calib_views': 1, 'test_views': 1, 'calib_other_images': 40, "
               "'calib_concept_images': 40, 'max_other_images': 80}" if args.quick else "")
            + f"); app.launch(core, '127.0.0.1', {port}, quiet=True)")
    cmd = [sys.executable, "-c", code] if args.quick else \
        [sys.executable, "app.py", "--runs-dir", str(runs), "--port", str(port), "--alpha-points", str(args.alpha_points)]
    figures: dict = {"quick": args.quick}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            url = f"http://127.0.0.1:{port}/"
            while True:
                try:
                    page.goto(url, timeout=2000)
                    break
                except Exception:  # noqa: BLE001 - server not up yet
                    if time.monotonic() - t0 > 60:
                        raise
                    time.sleep(0.1)
            page.wait_for_selector("#cards img", timeout=60_000)
            figures["start_to_first_page_s"] = time.monotonic() - t0
            wait_for(lambda: page.locator("#left-grid .caption-label").count() == 12, 300, "model ready")
            figures["start_to_model_ready_s"] = time.monotonic() - t0

            t1 = time.monotonic()
            page.locator("#run").click()
            wait_for(lambda: "Score" in page.locator("#score").inner_text()
                     and page.locator("#right-grid .caption-label").count() == 12, 900, "job results", poll=0.2)
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
        finally:
            proc.terminate()
            proc.wait(10)
            browser.close()
    for k, v in figures.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
