"""A request's torch work leaves no OpenMP team behind in the thread that served it, so the jobs
thread's team is the only one and its workers may spin between parallel regions
(clipforget/threads.py says why that matters: with a second team alive the default job ran 4 s
slower)."""
import os
import threading

import pytest
import torch

from clipforget.threads import single_threaded

pytestmark = pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"),
                                reason="needs two torch threads and Linux's /proc")


def _tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _threads_started_by(fn) -> set[int]:
    """The threads that ``fn``, run in a fresh thread, started and left running (counted while
    that thread is still alive: an OpenMP team lives as long as the thread that made it)."""
    out: dict = {}
    done, release = threading.Event(), threading.Event()

    def body():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e
        out["after"] = _tids()
        done.set()
        release.wait(60)

    before = _tids()
    th = threading.Thread(target=body)
    th.start()
    assert done.wait(300), "the request did not finish"
    release.set()
    th.join()
    if "error" in out:
        raise out["error"]
    return out["after"] - before - {th.native_id}


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


def test_app_requests_leave_no_team(core, finished_job):
    """What the page asks while a job may run: a search (a query never encoded before, the job's
    α-grid indexes loaded) and the retain suggestion."""
    fresh = f"a drawing of a dog number {threading.get_ident()}"
    started = _threads_started_by(lambda: (core.search(fresh, finished_job.id, None, k=8),
                                           core.retain_editor("dog", "poodle")))
    assert started == set()
