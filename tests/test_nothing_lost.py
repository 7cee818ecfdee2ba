"""Nothing lost: real forget jobs on the tiny world (tests/tinyworld.py) cancelled in every stage,
failed by NaN, out-of-memory and a full disk, killed with SIGKILL mid-stage in a separate process;
afterwards only ``job.json`` remains, the registry keeps working, the original weights are
untouched and the history survives a restart."""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from clipforget import runfolder
from clipforget.jobs import Job, JobError, JobRegistry, RunsDirBusy
from clipforget.io import write_json
from tinyworld import TINY_CONFIG, TINY_MODEL, TINY_SPLIT, file_hash, state_hash, tree

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the stages a job reports, in order (the remind stage aligns its images first, then fine-tunes; "encode"
# is the gallery at the calibrated α, "save" the results — the grids show from then on —, "evaluate" and
# "report" the held-out evaluation added to them, "alpha-grid" the other points)
STAGES = ["prepare", "data", "stand-ins", "forget", "remind", "align", "feature stand-ins", "restore", "encode", "save",
          "evaluate", "report", "alpha-grid"]
# a cancel takes effect at the job's next progress event: from "evaluate" on it keeps the results, from
# "report" on (its next event is the α-grid's first) the report too
RESULTS_FROM = STAGES.index("evaluate")
REPORT_FROM = STAGES.index("report")


@pytest.fixture(scope="module")
def core(tiny_world, tiny_ckpt, tmp_path_factory):
    from clipforget.app import AppCore
    # 3 α points (0, 0.5, 1): besides the calibrated α there is always one left for the α-grid stage
    c = AppCore(TINY_MODEL, str(tiny_ckpt), str(tiny_world), tmp_path_factory.mktemp("runs"), "cpu",
                alpha_points=3, job_config=TINY_CONFIG, job_split=TINY_SPLIT)
    c.resources(timeout=300)
    yield c
    c.close()


@pytest.fixture
def on_event(core):
    """Install ``fn(job, event)``, called after the registry has taken each progress event."""
    work = core.jobs.kinds["forget"]

    def install(fn):
        def observed(job, progress, job_dir):
            def hook(event):
                progress(event)           # raises Cancelled once the job is cancelled
                fn(job, event)
            return work(job, hook, job_dir)
        core.jobs.kinds["forget"] = observed
    yield install
    core.jobs.kinds["forget"] = work


def finish(core, job, timeout=300) -> Job:
    done = core.jobs.wait(job.id, timeout=timeout)
    on_disk = json.loads((core.jobs.job_dir(job.id) / "job.json").read_text())
    assert on_disk["status"] == done.status and on_disk["error"] == done.error
    return done


def no_leftovers(runs: Path):
    return [p for p in tree(runs) if p.endswith((".partial", ".tmp")) or ".old." in p]


# ---- a job that succeeds: weights untouched --------------------------------------------------------

@pytest.fixture(scope="module")
def done_job(core, tiny_ckpt):
    bundle = core.resources().bundle
    before = state_hash(bundle.model), file_hash(tiny_ckpt)
    job = finish(core, core.start_job("dog", "poodle"))
    assert job.status == "done", job.error
    return job, before, (state_hash(bundle.model), file_hash(tiny_ckpt))


def test_a_job_never_modifies_the_original_weights(done_job, core):
    job, before, after = done_job
    assert after == before           # state dict (weights + BatchNorm buffers) and checkpoint file
    assert list(dict.fromkeys(job.stages)) == STAGES
    run = core.jobs.run_dir(job.id)
    assert {"report.json", "delta.safetensors", "alpha_grid.json", "alpha_grid", "export"} <= {p.name for p in run.iterdir()}
    assert runfolder.is_complete(run, alpha_grid=True) and "unfinished" not in job.summary
    assert no_leftovers(core.runs_dir) == []


# ---- cancel, in every stage ------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_cancel_in_every_stage_leaves_only_job_json(core, on_event, stage, done_job):
    """Before the results: nothing is kept. In the evaluation (after the grids were shown): the
    results stay, without a report. In the α-grid: the run folder stays, with its report and the α
    points finished so far, each whole."""
    on_event(lambda job, e: core.jobs.cancel(job.id) if e["stage"] == stage else None)
    job = finish(core, core.start_job("dog", "poodle"))
    assert job.stage == stage and job.stages[-1] == stage, (job.status, job.stages)
    assert list(dict.fromkeys(job.stages)) == STAGES[:STAGES.index(stage) + 1]     # it went no further
    assert no_leftovers(core.runs_dir) == []
    if STAGES.index(stage) < RESULTS_FROM:
        assert job.status == "cancelled"
        assert tree(core.jobs.job_dir(job.id)) == ["job.json"]            # no run/, no partial folder
        assert "cancelled (nothing saved)" in core.job_status(job.id)["text"]
        return
    run = core.jobs.run_dir(job.id)
    assert runfolder.has_results(run) and runfolder.alpha_grid_points(run)           # the grids can show
    if STAGES.index(stage) < REPORT_FROM:
        assert job.status == "done" and job.summary["unfinished"] == "evaluation and α-grid cancelled"
        assert not runfolder.is_evaluated(run) and "score" not in job.summary
        assert "no Score (not evaluated)" in core.job_status(job.id)["text"]
        with pytest.raises(JobError, match="it has no report \\(evaluation and α-grid cancelled\\)"):
            core.metrics_table(job.id)
        return
    assert job.status == "done" and job.summary["unfinished"] == "α-grid cancelled"
    assert job.summary["score"] == core.metrics_table(job.id)["score"]               # the evaluation kept
    assert runfolder.is_complete(run) and runfolder.missing_alpha_points(run)        # resumable
    assert not runfolder.is_complete(run, alpha_grid=True)
    assert "α-grid incomplete (α-grid cancelled)" in core.job_status(job.id)["text"]


# ---- failures: the reason, no artifact, the registry goes on ---------------------------------------

def test_nan_loss_fails_the_job_with_the_reason(core, done_job):
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["forget"]["loop"] = {"steps": 2, "lr": 1e30}
    job = finish(core, core.start_job("dog", "poodle", config=cfg))
    assert job.status == "failed" and job.stage == "forget"
    assert job.error.startswith("NonFiniteLoss: stage 'forget': the ") and "NaN/inf" in job.error
    assert "lower the learning rate" in job.error and job.error in core.job_status(job.id)["text"]
    assert tree(core.jobs.job_dir(job.id)) == ["job.json"]


@pytest.mark.parametrize("exc, where", [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "GPU"),
                                        (MemoryError(), "CPU")])
def test_out_of_memory_fails_the_job_with_advice(core, monkeypatch, exc, where, done_job):
    def oom(*args, **kwargs):
        raise exc
    monkeypatch.setattr("clipforget.train.loop.make_optimizer", oom)     # inside the first loop: stand-ins'
    job = finish(core, core.start_job("dog", "poodle"))
    assert job.status == "failed" and job.stage == "stand-ins"
    assert job.error.startswith(f"out of {where} memory") and "lower the batch size" in job.error
    assert tree(core.jobs.job_dir(job.id)) == ["job.json"]
    assert core.jobs.running() is None


def test_disk_full_while_saving_a_job(core, monkeypatch, done_job):
    real = os.fsync

    def fsync(fd):      # the disk is full for the result, not for job.json
        if ".partial" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    job = finish(core, core.start_job("dog", "poodle"))
    assert job.status == "failed" and job.stage == "save"
    assert "disk full while writing" in job.error and "free some space" in job.error
    assert tree(core.jobs.job_dir(job.id)) == ["job.json"] and no_leftovers(core.runs_dir) == []


def test_the_registry_survives_when_job_json_cannot_be_written(tmp_path, monkeypatch, caplog):
    gate = threading.Event()

    def work(job, progress, job_dir):
        gate.wait(10)
        return {"ok": 1}
    reg = JobRegistry(tmp_path, work)
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    job = reg.submit({}, "no space for records")
    gate.set()
    assert reg.wait(job.id, timeout=10).status == "done"       # the job table in memory is right
    assert "could not record job" in caplog.text and "disk full" in caplog.text
    monkeypatch.setattr(os, "fsync", real)                      # space freed: the worker is still there
    second = reg.submit({}, "after")
    assert reg.wait(second.id, timeout=10).status == "done"
    assert json.loads((reg.job_dir(second.id) / "job.json").read_text())["status"] == "done"
    assert no_leftovers(tmp_path) == []
    reg.close()


def test_a_second_job_is_refused_naming_the_running_one(core, on_event, done_job):
    from clipforget.jobs import JobBusy
    gate, inside = threading.Event(), threading.Event()

    def hold(job, e):
        if e["stage"] == "forget":
            inside.set()
            gate.wait(30)
    on_event(hold)
    first = core.start_job("dog", "poodle")
    assert inside.wait(120)
    with pytest.raises(JobBusy, match=f"job {first.id} \\(poodle \\(dog\\) · ours\\) is still running \\(forget\\); "
                                      "wait for it to finish or cancel it first"):
        core.start_job("dog", "dog-face")
    core.cancel(first.id)
    gate.set()
    assert finish(core, first).status == "cancelled"


# ---- SIGKILL mid-stage, restart ---------------------------------------------------------------------

def killed_at(core, done_job, tiny_world, tiny_ckpt, tmp_path, stage, step, check=lambda job_dir: None):
    """Run a job in its own process until (stage, step), call ``check`` on its folder there, kill
    it with SIGKILL. The runs folder also holds a finished job from an earlier session. Returns
    (runs folder, the killed job's id, the earlier job's id)."""
    runs, marker = tmp_path / "runs", tmp_path / "paused"
    earlier = done_job[0].id
    shutil.copytree(core.jobs.job_dir(earlier), runs / earlier)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(HERE / "job_process.py"), str(runs), str(tiny_world), str(tiny_ckpt), stage,
            str(step), str(marker)]
    log = open(tmp_path / "process.log", "wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "process.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 600
            time.sleep(0.05)
        job_id = marker.read_text()
        record = json.loads((runs / job_id / "job.json").read_text())
        assert record["status"] in ("running", "ready") and record["stage"] == stage
        check(runs / job_id)
        with pytest.raises(RunsDirBusy, match=f"in use by another clipforget app \\(pid {proc.pid}\\)"):
            JobRegistry(runs, lambda *a: {})                   # a second app on the same folder
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        log.close()
    return runs, job_id, earlier


def the_earlier_job_is_intact(reg, core, done_job, earlier):
    done = reg.get(earlier)           # the earlier job is still done, with its result
    assert done.status == "done" and done.summary == done_job[0].summary
    assert tree(reg.run_dir(earlier)) == tree(core.jobs.run_dir(earlier))


@pytest.mark.parametrize("stage, step", [("forget", 1), ("save", 1)])
def test_sigkill_mid_stage_leaves_no_partial_artifact_and_shows_failed(core, done_job, tiny_world, tiny_ckpt,
                                                                       tmp_path, stage, step):
    """Killed before the results (in "save", with half of them written): the restart shows the job
    failed and nothing of it but job.json."""
    def half_written(job_dir):
        partial = [p for p in job_dir.iterdir() if p.name.endswith(".partial")]
        if stage == "save":     # the result is half written: the delta and run.json, not the α-grid's first point
            assert len(partial) == 1 and (partial[0] / "run.json").is_file()
            assert not (partial[0] / "alpha_grid").exists()
    runs, job_id, earlier = killed_at(core, done_job, tiny_world, tiny_ckpt, tmp_path, stage, step, half_written)
    reg = JobRegistry(runs, lambda *a: {})                      # the restart: the lock died with the process
    try:
        job = reg.get(job_id)
        assert job.status == "failed" and job.stage == stage and "interrupted" in job.error
        assert tree(runs / job_id) == ["job.json"]
        assert json.loads((runs / job_id / "job.json").read_text())["status"] == "failed"
        assert reg.running() is None
        assert [j.id for j in reg.jobs()] == [job_id, earlier]          # the history, newest first
        the_earlier_job_is_intact(reg, core, done_job, earlier)
        assert no_leftovers(runs) == []
    finally:
        reg.close()


def test_sigkill_in_the_evaluation_keeps_the_results_without_a_report(core, done_job, tiny_world, tiny_ckpt,
                                                                     tmp_path):
    """Killed after the results were shown, before the report: the restart shows the job done with
    its grids' results and says the evaluation was interrupted; no half-written export is left."""
    def shown(job_dir):
        assert runfolder.has_results(job_dir / "run") and not runfolder.is_evaluated(job_dir / "run")
    runs, job_id, earlier = killed_at(core, done_job, tiny_world, tiny_ckpt, tmp_path, "report", 0, shown)
    (runs / job_id / "run" / ".export.x3.partial").mkdir()          # as if killed while exporting ...
    (runs / job_id / "run" / "export").mkdir()                       # ... or after the export, before the report
    (runs / job_id / "run" / "report.md").write_text("half")
    reg = JobRegistry(runs, lambda *a: {})
    try:
        job = reg.get(job_id)
        assert job.status == "done" and job.summary["unfinished"].startswith("evaluation interrupted by a restart")
        run = reg.run_dir(job_id)
        assert runfolder.has_results(run) and runfolder.alpha_grid_points(run) and not runfolder.is_evaluated(run)
        assert not (run / "export").exists() and not (run / "report.md").exists()
        assert runfolder.read_run(run).alpha == job.summary["alpha"]        # certify can read it
        the_earlier_job_is_intact(reg, core, done_job, earlier)
        assert no_leftovers(runs) == []
    finally:
        reg.close()


def test_restart_sweeps_temporary_files_and_unreadable_records(tmp_path):
    done = Job("d" * 32, "done before", {}, status="done", started=1.0, finished=2.0)
    write_json(tmp_path / done.id / "job.json", done.to_dict())
    (tmp_path / done.id / "run").mkdir()
    (tmp_path / done.id / "run" / "report.json").write_text("{}")
    (tmp_path / done.id / ".unlearned-model.zip.x1.tmp").write_bytes(b"PK half")   # killed while zipping
    dead = Job("e" * 32, "killed", {}, status="running", stage="save", started=1.0)
    write_json(tmp_path / dead.id / "job.json", dead.to_dict())
    (tmp_path / dead.id / ".job.json.x2.tmp").write_text('{"status": "runn')     # killed while recording
    (tmp_path / ("f" * 32)).mkdir()
    (tmp_path / ("f" * 32) / "job.json").write_text('{"status": ')               # damaged by hand
    reg = JobRegistry(tmp_path, lambda *a: {})
    try:
        assert tree(tmp_path / done.id) == ["job.json", "run", "run/report.json"]
        assert tree(tmp_path / dead.id) == ["job.json"] and reg.get(dead.id).status == "failed"
        assert {j.id for j in reg.jobs()} == {done.id, dead.id}
        with pytest.raises(JobError, match="is unreadable"):
            reg.get("f" * 32)
    finally:
        reg.close()


@pytest.mark.parametrize("text", ["null", "[]", '"done"', "3"])
def test_a_job_record_that_is_not_an_object_is_unreadable_not_fatal(tmp_path, text):
    """A job.json that parses but holds no object is damaged like one that does not parse: the
    registry starts, lists the other jobs and names the record's folder for that id."""
    done = Job("d" * 32, "done before", {}, status="done", started=1.0, finished=2.0)
    write_json(tmp_path / done.id / "job.json", done.to_dict())
    (tmp_path / ("a" * 32)).mkdir()
    (tmp_path / ("a" * 32) / "job.json").write_text(text)
    reg = JobRegistry(tmp_path, lambda *a: {})
    try:
        assert [j.id for j in reg.jobs()] == [done.id]
        with pytest.raises(JobError, match=r"is unreadable \(a job record must be a JSON object.*delete that folder"):
            reg.get("a" * 32)
    finally:
        reg.close()


def test_one_app_per_runs_folder(tmp_path):
    reg = JobRegistry(tmp_path, lambda *a: {})
    with pytest.raises(RunsDirBusy, match=f"in use by another clipforget app \\(pid {os.getpid()}\\); stop it, "
                                          "or give this one its own --runs-dir"):
        JobRegistry(tmp_path, lambda *a: {})
    reg.close()
    JobRegistry(tmp_path, lambda *a: {}).close()       # free once the first is closed


def test_the_data_stage_counts_every_view_set_it_builds(tiny_world):
    """The "data" stage's step count is exact: its last step is its total (the app's time left
    in a stage comes from these counts)."""
    from clipforget.data.gallery import Gallery
    from clipforget.data.task import ForgetRequest, SplitConfig, build_task
    events = []
    build_task(Gallery.open(str(tiny_world)), ForgetRequest("dog", "poodle"), 32, SplitConfig(**TINY_SPLIT),
               progress=events.append)
    steps = [(e["step"], e["total"]) for e in events]
    assert [s for s, _ in steps] == list(range(1, len(steps) + 1))
    assert {t for _, t in steps} == {len(steps)} and len(steps) >= 5
