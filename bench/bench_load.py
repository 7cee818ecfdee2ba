"""Load test on loopback: concurrent clients searching through the app's ``/search`` API while a
forget job runs in the same app. Prints errors and latency p50 / p99 (0 errors is the bar).

    python bench/bench_load.py                          # 20 clients x 50 searches, default job
    python bench/bench_load.py --clients 4 --searches 5 --quick
Prints one line per figure and a JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import free_port, machine_load, peak_rss_mb, start_app, stop, wait_for


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--searches", type=int, default=50, help="searches per client")
    ap.add_argument("--quick", action="store_true", help="the tests' short job instead of the default config")
    args = ap.parse_args(argv)
    from gradio_client import Client

    from loadtest import run_load

    runs = Path(tempfile.mkdtemp(prefix="clipforget-load-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    figures: dict = {"machine_before": machine_load()}
    proc = start_app(runs, port, quick=args.quick)
    try:
        def up() -> bool:
            try:
                Client(url, analytics_enabled=False, verbose=False).close()
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                return proc.poll() is not None
        wait_for(up, 180, "app listening", poll=0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}")
        api = Client(url, analytics_enabled=False, verbose=False)
        def searchable() -> bool:           # the model loads in the background after the page is up
            try:
                return bool(api.predict("a dog", "", -1.0, 12, api_name="/search")["left"])
            except Exception:  # noqa: BLE001 - "still loading": try again
                return False
        wait_for(searchable, 600, "model loaded", poll=1.0)
        job = api.predict("dog", "poodle", "", "ours", api_name="/start_job")
        wait_for(lambda: api.predict(job["id"], api_name="/job_status")["status"] == "running", 60, "job running")
        stage_before = api.predict(job["id"], api_name="/job_status")["stage"]
        res = run_load(url, args.clients, args.searches)
        after = api.predict(job["id"], api_name="/job_status")
        figures.update(res.summary())
        figures["job_running_throughout"] = after["status"] == "running"
        figures["job_stages_during_load"] = f"{stage_before} -> {after['stage']}"
        figures["app_peak_rss_mb"] = peak_rss_mb(proc.pid)
        api.predict(job["id"], api_name="/cancel")
        t0 = time.monotonic()
        while api.predict(job["id"], api_name="/job_status")["status"] in ("queued", "running"):
            if time.monotonic() - t0 > 120:
                break
            time.sleep(0.5)
        api.close()
    finally:
        stop(proc)
    figures["machine_after"] = machine_load()
    for k, v in figures.items():
        print(f"{k}: {v}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
