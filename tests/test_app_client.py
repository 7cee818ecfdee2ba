"""The launched app through gradio_client: the gr.api endpoints (search, start_job, job_status,
cancel), what the server serves, and searches from concurrent clients while a job runs — on
127.0.0.1 (the ``server`` fixture of conftest.py)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def client(server):
    from gradio_client import Client
    c = Client(server.url, analytics_enabled=False, verbose=False, download_files=False)
    yield c
    c.close()


def test_endpoints_are_published(client):
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/search", "/start_job", "/job_status", "/cancel"} <= set(named)
    assert not any(n.startswith("/on_") for n in named)        # UI handlers stay private


def test_bad_job_ids_are_refused(client):
    for bad in ["../../etc/passwd", "x" * 32]:
        with pytest.raises(Exception, match="invalid job id"):
            client.predict(bad, api_name="/job_status")
    with pytest.raises(Exception, match="no job"):
        client.predict("0" * 32, api_name="/cancel")


def test_only_gallery_and_runs_are_served(server, client):
    import httpx
    url, core = server.url, server.core
    res = client.predict("a dog", "", -1.0, 4, api_name="/search")
    assert len(res["left"]) == 4 and res.get("right") is None
    img = res["left"][0]["path"]
    assert httpx.get(f"{url}gradio_api/file={img}").status_code == 200
    secret = core.runs_dir.parent / "secret.txt"
    secret.write_text("not for the web")
    for path in [secret, Path("/etc/passwd"), ROOT / "pyproject.toml"]:
        assert httpx.get(f"{url}gradio_api/file={path}").status_code in (403, 404), path


def test_job_lifecycle_over_the_api(client):
    job = client.predict("dog", "poodle", "", "ours", api_name="/start_job")
    assert job["status"] in ("queued", "running") and len(job["id"]) == 32
    with pytest.raises(Exception, match=job["id"]):
        client.predict("car", "taxi", "", "ours", api_name="/start_job")
    seen = set()
    t0 = time.monotonic()
    while True:
        st = client.predict(job["id"], api_name="/job_status")
        seen.add(st["stage"])
        if st["status"] not in ("queued", "running", "ready"):      # ready: results shown, α-grid computing
            break
        assert time.monotonic() - t0 < 600
        time.sleep(0.5)
    assert st["status"] == "done", st["error"]
    assert {"forget", "alpha-grid"} <= seen | set(st["stages"])
    assert st["stages"].index("save") < st["stages"].index("alpha-grid")     # the results before the α-grid
    res = client.predict("a dog", job["id"], -1.0, 12, api_name="/search")
    assert res["alpha_shown"] == pytest.approx(st["summary"]["alpha"])
    assert res["recall_right"] < res["recall_left"]
    zero = client.predict("a dog", job["id"], 0.0, 12, api_name="/search")
    assert [h["path"] for h in zero["right"]] == [h["path"] for h in zero["left"]]


def test_cancel_over_the_api(client):
    job = client.predict("car", "taxi", "", "ours", api_name="/start_job")
    time.sleep(1.0)
    client.predict(job["id"], api_name="/cancel")
    t0 = time.monotonic()
    while (st := client.predict(job["id"], api_name="/job_status"))["status"] in ("queued", "running", "ready"):
        assert time.monotonic() - t0 < 120
        time.sleep(0.3)
    assert st["status"] == "cancelled"


def test_concurrent_searches_while_a_job_runs(server):
    """A small version of bench/bench_load.py: 4 clients x 5 searches during a job, 0 errors."""
    from conftest import load_bench_module
    run_load = load_bench_module("loadtest").run_load
    job = server.core.start_job("car", "taxi")
    while server.core.job_status(job.id)["status"] == "queued":
        time.sleep(0.05)
    res = run_load(server.url, clients=4, searches=5, timeout=300)
    during = server.core.job_status(job.id)["status"]
    server.core.cancel(job.id)
    assert res.errors == [] and res.requests == 20 and len(res.latencies_ms) == 20
    assert res.p50_ms > 0 and res.p99_ms >= res.p50_ms
    assert during == "running", "the job ended before the load did: the test did not load a busy app"
