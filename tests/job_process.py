"""A separate process that runs a forget job on the tiny world, for the SIGKILL test
(test_nothing_lost.py): the job stops at a given (stage, step), writes its id to a marker file and
waits there to be killed.

    python tests/job_process.py RUNS GALLERY CHECKPOINT STAGE STEP MARKER
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import TINY_RN  # noqa: E402
from tinyworld import TINY_CONFIG, TINY_MODEL, TINY_SPLIT  # noqa: E402

from clipforget.app import AppCore  # noqa: E402
from clipforget.models import register_model_config  # noqa: E402


def main(runs: str, gallery: str, ckpt: str, stage: str, step: str, marker: str) -> None:
    torch.set_num_threads(1)        # a tiny model: one thread is quickest on a busy machine
    register_model_config(TINY_MODEL, TINY_RN)
    core = AppCore(TINY_MODEL, ckpt, gallery, runs, "cpu", alpha_points=2, job_config=TINY_CONFIG,
                   job_split=TINY_SPLIT)
    core.resources(timeout=600)
    work = core.jobs.kinds["forget"]

    def stopping_work(job, progress, job_dir):
        def hook(event):
            progress(event)
            if event.get("stage") == stage and int(event.get("step", 0)) == int(step):
                Path(marker).write_text(job.id)
                time.sleep(600)          # mid-stage, until the test kills this process
        return work(job, hook, job_dir)

    core.jobs.kinds["forget"] = stopping_work
    core.jobs.wait(core.start_job("dog", "poodle").id, timeout=600)
    raise SystemExit(f"the job never reached {stage} step {step}")


if __name__ == "__main__":
    main(*sys.argv[1:])
