"""A request's torch work leaves no OpenMP team behind in the thread that served it, so the jobs
thread's team is the only one and its workers may spin between parallel regions
(clipforget/threads.py says why that matters: with a second team alive the default job ran 4 s
slower)."""
import contextlib
import ctypes
import itertools
import os
import threading

import pytest
import torch

from clipforget.threads import single_threaded

pytestmark = pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"),
                                reason="needs two torch threads and Linux's /proc")


_PROBES = itertools.count()


def _named(prefix: str) -> set[int]:
    """The process's threads whose name starts with ``prefix``."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            if open(f"/proc/self/task/{tid}/comm").read().startswith(prefix):
                out.add(int(tid))
    return out


def _threads_started_by(fn) -> set[int]:
    """The threads that ``fn``, run in a fresh thread, started and left running (counted while
    that thread is still alive: an OpenMP team lives as long as the thread that made it). The
    fresh thread gets a name of its own, which the threads it starts inherit: threads that others
    start meanwhile (a web server's workers) are not counted."""
    name = f"cf-probe-{next(_PROBES)}"
    out: dict = {}
    done, release = threading.Event(), threading.Event()

    def body():
        ctypes.CDLL(None).prctl(15, name.encode())      # PR_SET_NAME: this thread's name
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e
        out["started"] = _named(name) - {threading.get_native_id()}
        done.set()
        release.wait(60)

    th = threading.Thread(target=body)
    th.start()
    assert done.wait(300), "the request did not finish"
    release.set()
    th.join()
    if "error" in out:
        raise out["error"]
    return out["started"]


def _matmul():
    a = torch.randn(1024, 1024)
    return (a @ a).sum()


def test_single_threaded_limits_the_calling_thread_only():
    seen = {}

    def body():
        before = torch.get_num_threads()
        with single_threaded():
            seen["inside"] = torch.get_num_threads()
            seen["other thread"] = _in_other_thread(torch.get_num_threads)
        seen["after"] = torch.get_num_threads() == before

    th = threading.Thread(target=body)
    th.start()
    th.join()
    assert seen == {"inside": 1, "other thread": torch.get_num_threads(), "after": True}


def _in_other_thread(fn):
    box = []
    th = threading.Thread(target=lambda: box.append(fn()))
    th.start()
    th.join()
    return box[0]


def test_a_parallel_op_keeps_a_team_unless_single_threaded():
    assert _threads_started_by(_matmul), "the control: a 2-thread matmul starts an OpenMP worker"
    assert _threads_started_by(single_threaded()(_matmul)) == set()


def test_app_requests_leave_no_team(core, finished_job, monkeypatch):
    """What the page asks while a job may run: a search (a query never encoded before, the job's
    α-grid indexes loaded afresh) and the retain suggestion. The control: the same requests with
    single_threaded unable to reach the runtime leave a team."""
    import clipforget.threads

    def requests(n):
        core.retrieval._grids.clear()
        return core.search(f"a drawing of a dog, probe {n}", finished_job.id, None, k=8), \
            core.retain_editor("dog", "poodle")

    assert _threads_started_by(lambda: requests(1)) == set()
    monkeypatch.setattr(clipforget.threads, "_setters", lambda: (None, None))
    assert _threads_started_by(lambda: requests(2)), "the control: these requests run parallel torch ops"
