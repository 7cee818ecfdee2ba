"""Helpers shared by the bench scripts: free ports, the app as a subprocess, peak memory."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:      # bench/ runs as scripts: import this checkout's clipforget
    sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the tests' short job (conftest.QUICK_*): every stage runs, on fewer views
QUICK_JOB = ("job_config={'remind': {'enabled': False}, 'restore': {'grid_points': 5}}, job_split="
             "{'train_views': 2, 'forget_views': 2, 'calib_views': 1, 'test_views': 1, 'calib_other_images': 40, "
             "'calib_concept_images': 40, 'max_other_images': 80}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _procs(comm: str):
    """(pid, user + system CPU ticks) of the live processes whose name contains ``comm``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:          # the process ended meanwhile
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if comm in name:
            yield int(stat.parent.name), int(rest[11]) + int(rest[12])     # utime, stime (fields 14, 15)


def pids(comm: str) -> set[int]:
    """The live processes whose name contains ``comm``."""
    return {pid for pid, _ in _procs(comm)}


def cpu_seconds(comm: str, exclude: set[int] = frozenset()) -> float:
    """User + system CPU seconds used so far by the live processes whose name contains ``comm``
    (e.g. "chrom": the headless browser's processes), except those in ``exclude`` (e.g. another
    run's browser, there before this one started). A process that ended is not counted."""
    return sum(ticks for pid, ticks in _procs(comm) if pid not in exclude) / os.sysconf("SC_CLK_TCK")


def wait_for(cond, timeout: float, what: str, poll: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout}s")


def wait_in_page(page, condition: str, timeout: float, what: str, poll_ms: int = 100) -> None:
    """Wait until the JavaScript expression ``condition`` holds in ``page``, checked inside the page
    every ``poll_ms``: asking from here through Playwright costs the page, its driver and this
    process a round trip each time, on the cores the app's job is timed on."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        page.wait_for_function(f"() => {condition}", polling=poll_ms, timeout=timeout * 1000)
    except PlaywrightTimeout:
        raise TimeoutError(f"{what}: not within {timeout}s") from None


def start_app(runs: Path, port: int, alpha_points: int | None = None, quick: bool = False,
              root: Path = ROOT) -> subprocess.Popen:
    """``python app.py`` (or, with ``quick``, the same app with the tests' short job) on 127.0.0.1,
    from the checkout at ``root`` (its own clipforget package: first on PYTHONPATH)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    if quick:
        code = ("import app; from clipforget.app import AppCore; "
                f"core = AppCore(runs_dir={str(runs)!r}, {QUICK_JOB}"
                + (f", alpha_points={alpha_points}" if alpha_points else "") + "); "
                f"app.launch(core, '127.0.0.1', {port}, quiet=True)")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "app.py", "--runs-dir", str(runs), "--port", str(port)]
        if alpha_points:
            cmd += ["--alpha-points", str(alpha_points)]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def checkout(ref: str, dest: Path) -> Path:
    """The tree of commit ``ref`` of this repository, unpacked into ``dest`` (``git archive``: no
    worktree or branch is created)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "archive", sha], cwd=ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return dest


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def machine_load() -> str:
    """The 1/5/15-minute load averages and the CPU count: other work skews every timing."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def print_figures(figures: dict, digits: int = 2) -> dict:
    """One line per figure (floats to ``digits`` places), then all of them as one JSON line."""
    for k, v in figures.items():
        print(f"{k}: {v:.{digits}f}" if isinstance(v, float) else f"{k}: {v}")
    print(json.dumps(figures))
    return figures
