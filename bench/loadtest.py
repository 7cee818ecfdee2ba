"""A bounded load test of a running app: concurrent clients searching through its ``/search`` API.

    from loadtest import run_load
    res = run_load("http://127.0.0.1:7860/", clients=20, searches=50)
    res.errors, res.p50_ms, res.p99_ms

Each client is its own ``gradio_client.Client`` (its own connection and queue session) in its own
thread and sends its searches one after another, so at most ``clients`` requests are in flight.
Latency is measured per request on the client (queueing in the server included). Used by
``bench/bench_load.py`` and, at a small scale, by the tests. No gradio server code here.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

DEFAULT_QUERIES = ("a dog", "a poodle", "a cat", "a car", "a taxi", "a red apple", "a line drawing of a bird",
                   "a flower", "a train", "a tiger", "an owl", "a banana", "a soccer ball", "a rose")


@dataclass
class LoadResult:
    clients: int
    searches: int                      # per client
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0               # wall time of the whole load

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + len(self.errors)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latency (ms); NaN if none."""
        xs = sorted(self.latencies_ms)
        if not xs:
            return float("nan")
        return xs[min(len(xs), max(1, math.ceil(q / 100 * len(xs)))) - 1]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)

    def summary(self) -> dict:
        return {"clients": self.clients, "searches_per_client": self.searches, "requests": self.requests,
                "errors": len(self.errors), "p50_ms": round(self.p50_ms, 1), "p99_ms": round(self.p99_ms, 1),
                "max_ms": round(max(self.latencies_ms), 1) if self.latencies_ms else float("nan"),
                "seconds": round(self.seconds, 2),
                "requests_per_s": round(self.requests / self.seconds, 1) if self.seconds else float("nan"),
                "first_errors": self.errors[:3]}


def run_load(url: str, clients: int = 20, searches: int = 50, queries: tuple[str, ...] = DEFAULT_QUERIES,
             job_id: str = "", k: int = 12, timeout: float = 600.0) -> LoadResult:
    """``clients`` concurrent clients each run ``searches`` searches (queries in rotation, each
    client starting at a different one) against ``url``'s ``/search`` API. With ``job_id`` (a
    finished job) the right grid is searched too. Errors are collected, never raised."""
    if clients < 1 or searches < 1:
        raise ValueError(f"clients and searches must be >= 1, got {clients} and {searches}")
    if not queries:
        raise ValueError("give at least one query")
    from gradio_client import Client

    result = LoadResult(clients, searches)
    lock = threading.Lock()
    start = threading.Barrier(clients)
    deadline = time.monotonic() + timeout

    def client(i: int) -> None:
        try:
            c = Client(url, analytics_enabled=False, verbose=False, download_files=False)
        except Exception as e:  # noqa: BLE001 - a client that cannot connect is an error of the run
            with lock:
                result.errors.extend([f"client {i}: connect: {type(e).__name__}: {e}"] * searches)
            start.abort()
            return
        try:
            start.wait(timeout=60)       # every client connected: the load starts together
        except threading.BrokenBarrierError:
            pass
        for j in range(searches):
            if time.monotonic() > deadline:
                with lock:
                    result.errors.append(f"client {i}: search {j}: not sent, the {timeout:.0f}s budget ran out")
                continue
            q = queries[(i + j) % len(queries)]
            t0 = time.perf_counter()
            try:
                res = c.predict(q, job_id, -1.0, k, api_name="/search")
                if not isinstance(res, dict) or not res.get("left"):
                    raise RuntimeError(f"unexpected answer {str(res)[:120]!r}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    result.errors.append(f"client {i}: search {j} ({q!r}): {type(e).__name__}: {e}"[:300])
                continue
            with lock:
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
        c.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients, thread_name_prefix="load") as pool:
        list(pool.map(client, range(clients)))
    result.seconds = time.perf_counter() - t0
    return result
