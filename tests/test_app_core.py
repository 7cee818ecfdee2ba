"""The app's logic without a browser: the FAISS index, the α-grid, the job runner (cancel, refusal
of a second job, restart recovery, no half-written artifact) and the handlers of AppCore."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforget import index as fx
from clipforget.jobs import Job, JobBusy, JobError, JobRegistry, check_id
from clipforget.io import atomic_dir, write_json

ROOT = Path(__file__).resolve().parents[1]


# ---- index ---------------------------------------------------------------------------------------

def _unit(n, d, seed=0):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


def test_index_search_is_exact_cosine_and_roundtrips(tmp_path):
    emb = _unit(200, 16)
    idx = fx.build(emb)
    q = _unit(3, 16, seed=1)
    scores, ids = fx.search(idx, q, k=5)
    ref = (q @ emb.T).topk(5)
    assert np.array_equal(ids, ref.indices.numpy())
    assert np.allclose(scores, ref.values.numpy(), atol=1e-5)
    path = fx.save(idx, tmp_path / "g.faiss")
    again = fx.search(fx.load(path), q, k=5)[1]
    assert np.array_equal(again, ids)
    assert fx.search(idx, q[0], k=10_000)[1].shape == (1, 200)       # k capped at the index size


def test_index_refuses_unnormalised_and_wrong_dimension():
    with pytest.raises(ValueError, match="normalised"):
        fx.build(torch.ones(4, 8))
    idx = fx.build(_unit(10, 8))
    with pytest.raises(ValueError, match="dimension"):
        fx.search(idx, _unit(1, 4), 3)


def test_alpha_points_and_nearest():
    pts = fx.alpha_points(11, (0.65,))
    assert pts[0] == 0.0 and pts[-1] == 1.0 and 0.65 in pts and len(pts) == 12
    assert fx.nearest(pts, 0.66) == 0.65
    assert fx.nearest(pts, 0.84) == 0.8
    with pytest.raises(ValueError):
        fx.alpha_points(1)


@pytest.mark.slow
@pytest.mark.parametrize("keys,shared", [(("visual.layer4.0.downsample.0.weight", "visual.attnpool.c_proj.weight"), True),
                                         (("visual.conv1.weight",), False)])
def test_alpha_grid_shared_trunk_equals_full_encode(bundle, gallery, keys, shared):
    """The trunk shortcut is exact: same embeddings as re-encoding with θ₀ + α·Δ. A delta on the
    stem leaves nothing to share (trunk.split_index returns None): the gallery is encoded in full."""
    from clipforget.embed import encode_images
    from clipforget.pipeline import edited_model
    images, _ = gallery.load(gallery.items[:40], bundle.image_size)
    sd = bundle.model.state_dict()
    g = torch.Generator().manual_seed(0)
    delta = {k: 0.05 * torch.randn(sd[k].shape, generator=g) for k in keys}
    kept = {k: sd[k].clone() for k in keys}
    grid, info = fx.encode_alpha_grid(bundle, images, delta, [0.5, 1.0], batch_size=16)
    assert info["shared_trunk"] is shared
    assert all(torch.equal(bundle.model.state_dict()[k], kept[k]) for k in keys)   # the original untouched
    for i, a in enumerate([0.5, 1.0]):
        ref = encode_images(bundle, images, edited_model(bundle, delta, a))
        assert torch.allclose(grid[i], ref, atol=1e-5), a
    assert not torch.allclose(grid[0], grid[1], atol=1e-3)         # the delta matters


# ---- job registry with stand-in work functions ----------------------------------------------------

def _slow_work(seconds=30.0):
    """Reports progress every 10 ms for up to ``seconds``; writes its result atomically at the end."""
    def work(job, progress, job_dir):
        t0 = time.monotonic()
        i = 0
        with atomic_dir(job_dir / "run") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)        # written before the end: must not survive
            while time.monotonic() - t0 < seconds:
                i += 1
                progress({"stage": "forget" if i < 20 else "remind", "step": i, "total": 0, "fraction": 0.5})
                time.sleep(0.01)
            (tmp / "report.json").write_text("{}")
            (tmp / "alpha_grid.safetensors").write_bytes(b"")
        return {"steps": i}
    return work


def test_job_ids_are_validated(tmp_path):
    reg = JobRegistry(tmp_path, _slow_work(0))
    for bad in ["../etc", "..", "a" * 31, "A" * 32, "0" * 31 + "/", "", None]:
        with pytest.raises(JobError):
            reg.get(bad)
    with pytest.raises(JobError, match="no job"):
        reg.get("0" * 32)
    assert check_id("ab" * 16) == "ab" * 16
    reg.close()


def test_cancel_mid_stage_leaves_no_artifact(tmp_path):
    reg = JobRegistry(tmp_path, _slow_work(30))
    job = reg.submit({"x": 1}, "slow")
    while reg.get(job.id).stage != "remind":
        time.sleep(0.02)
    t0 = time.monotonic()
    reg.cancel(job.id)
    done = reg.wait(job.id, timeout=10)
    assert done.status == "cancelled" and time.monotonic() - t0 < 5
    jd = reg.job_dir(job.id)
    assert sorted(p.name for p in jd.iterdir()) == ["job.json"]     # no run/, no *.partial
    assert json.loads((jd / "job.json").read_text())["status"] == "cancelled"
    with pytest.raises(JobError, match="no result"):
        reg.run_dir(job.id)
    reg.close()


def test_failed_job_leaves_no_artifact_and_says_why(tmp_path):
    def broken(job, progress, job_dir):
        with atomic_dir(job_dir / "run") as tmp:
            (tmp / "report.json").write_text("{}")
            raise RuntimeError("disk on fire")
    reg = JobRegistry(tmp_path, broken)
    job = reg.wait(reg.submit({}, "broken").id, timeout=10)
    assert job.status == "failed" and "disk on fire" in job.error
    assert [p.name for p in reg.job_dir(job.id).iterdir()] == ["job.json"]
    reg.close()


def test_second_job_is_refused_naming_the_running_one(tmp_path):
    reg = JobRegistry(tmp_path, _slow_work(30))
    first = reg.submit({}, "poodle (dog)")
    with pytest.raises(JobBusy) as e:
        reg.submit({}, "taxi (car)")
    assert first.id in str(e.value) and "poodle (dog)" in str(e.value)
    assert len(reg.jobs()) == 1
    reg.cancel(first.id)
    reg.wait(first.id, timeout=10)
    second = reg.submit({}, "taxi (car)")                   # free again once the first ended
    reg.cancel(second.id)
    assert reg.wait(second.id, timeout=10).status == "cancelled"
    reg.close()


def test_restart_marks_running_jobs_failed_and_reopens_finished_ones(tmp_path):
    reg = JobRegistry(tmp_path, _slow_work(0.05))
    done = reg.wait(reg.submit({"n": 1}, "finished").id, timeout=10)
    assert done.status == "done"
    reg.close()
    # a job that was running when the process died: job.json says running, a partial folder remains
    dead = Job("f" * 32, "killed", {}, status="running", stage="remind", started=time.time())
    write_json(tmp_path / dead.id / "job.json", dead.to_dict())
    (tmp_path / dead.id / ".run.abc.partial").mkdir()
    (tmp_path / dead.id / ".run.abc.partial" / "delta.safetensors").write_bytes(b"half")

    reg2 = JobRegistry(tmp_path, _slow_work(0.05))
    revived = reg2.get(dead.id)
    assert revived.status == "failed" and "interrupted" in revived.error
    assert [p.name for p in (tmp_path / dead.id).iterdir()] == ["job.json"]
    assert json.loads((tmp_path / dead.id / "job.json").read_text())["status"] == "failed"
    assert reg2.get(done.id).status == "done" and (reg2.run_dir(done.id) / "report.json").is_file()
    assert {j.id for j in reg2.jobs()} == {done.id, dead.id}
    assert reg2.running() is None                            # the dead job does not block new ones
    reg2.close()


# ---- AppCore on the embedded model (the shared ``core`` fixture of conftest.py) -----------------------

@pytest.fixture(scope="module")
def finished(app_core):
    app_core.resources(timeout=300)
    job = app_core.start_job("dog", "poodle")
    return app_core.jobs.wait(job.id, timeout=600)


@pytest.mark.slow
def test_pick_handlers(core):
    assert "dog" in core.superclasses() and "poodle" in core.subgroups("dog")
    cards = core.subgroup_cards("dog")
    assert [c[1] for c in cards] == [s.replace("-", " ") for s in core.subgroups("dog")]
    from PIL import Image
    assert Image.open(cards[0][0]).size[0] >= 96 * 3                # every style in one card
    info = core.describe_retain("dog", "poodle")
    assert len(info["forget"]) == len(core.gallery.select(subgroup="poodle", unseen_style=False))
    assert sorted(info["examples"] + info["held_out"]) == sorted(info["forget"]) and info["held_out"]
    assert "poodle" not in info["retain_subgroups"]
    assert info["retain_images"] == sum(info["retain_counts"].values()) > 0
    assert info["queries"] == ["a dog", "a poodle", "a poodle, a kind of dog"]
    md = core.retain_markdown(info)
    assert "Retain" in md and "dog face" in md and "held out" in md
    with pytest.raises(ValueError, match="did you mean 'poodle'"):
        core.describe_retain("dog", "poodel")
    with pytest.raises(ValueError, match="pick a subgroup"):
        core.request("dog", "", "")
    assert core.methods()[0] == "ours"


@pytest.mark.slow
def test_search_without_job_marks_nothing(core):
    res = core.search("a poodle", None, None, k=8)
    assert len(res["left"]) == 8 and "right" not in res and res["recall_left"] is None
    assert any(h["subgroup"] == "poodle" for h in res["left"])
    assert core.text_embedding("a poodle") is core.text_embedding("a poodle")   # cached per query
    with pytest.raises(ValueError, match="type a query"):
        core.search("   ")


@pytest.mark.slow
def test_finished_job_forgets_for_its_query_and_alpha_zero_is_original(core, finished):
    assert finished.status == "done", finished.error
    s = finished.summary
    assert s["alpha_grid_points"] >= 3 and s["alpha_grid_seconds"] > 0 and s["shared_trunk"]
    q = core.default_query("dog", "poodle")
    res = core.search(q, finished.id, None, k=12)                 # at the calibrated α
    assert res["alpha_shown"] == pytest.approx(s["alpha"])
    assert res["recall_left"] > 0 and res["recall_right"] < res["recall_left"]
    assert any(h["forgotten"] for h in res["left"]) and "FORGOTTEN" in next(
        h["caption"] for h in res["left"] if h["forgotten"])
    zero = core.search(q, finished.id, 0.0, k=12)
    assert [h["path"] for h in zero["right"]] == [h["path"] for h in zero["left"]]
    snapped = core.search(q, finished.id, 0.3, k=12)
    assert snapped["alpha_shown"] in snapped["alpha_points"] and "nearest computed point" in snapped["alpha_note"]
    with pytest.raises(ValueError, match="alpha"):
        core.search(q, finished.id, 1.5)


@pytest.mark.slow
def test_results_plot_table_export(core, finished):
    table = core.metrics_table(finished.id)
    assert table["headers"][0] == "column" and table["rows"][0][0].startswith("Target")
    assert 0 <= table["score"] <= 100
    png = core.alpha_plot(finished.id)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = core.export(finished.id)
    with zipfile.ZipFile(files["model_zip"]) as z:
        names = set(z.namelist())
    assert {"export/open_clip_config.json", "export/open_clip_model.safetensors"} <= names
    assert "Score" in open(files["report_md"]).read()


@pytest.mark.slow
def test_export_loads_in_plain_open_clip(core, finished, tmp_path, minilm_hub_cache):
    import open_clip
    with zipfile.ZipFile(core.export(finished.id)["model_zip"]) as z:
        z.extractall(tmp_path)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    from clipforget.pipeline import load_delta
    delta, _ = load_delta(core.jobs.run_dir(finished.id))
    k = next(iter(delta)).removeprefix("visual.")
    orig = core.resources().bundle.model.visual.state_dict()[k]
    assert not torch.equal(model.visual.state_dict()[k], orig)      # the export is the unlearned model


@pytest.mark.slow
def test_real_job_cancel_mid_stage_and_refusal(core, finished):
    job = core.start_job("car", "taxi")
    with pytest.raises(JobBusy, match=job.id):
        core.start_job("dog", "poodle")
    while core.job_status(job.id)["stage"] not in ("forget", "restore", "evaluate"):
        assert core.job_status(job.id)["status"] in ("queued", "running")
        time.sleep(0.05)
    core.cancel(job.id)
    st = core.jobs.wait(job.id, timeout=120)
    assert st.status == "cancelled"
    assert [p.name for p in core.jobs.job_dir(job.id).iterdir()] == ["job.json"]
    assert "cancelled" in core.job_status(job.id)["text"]


@pytest.mark.slow
def test_history_survives_a_restart(core, finished, tmp_path):
    import shutil
    from clipforget.app import AppCore
    # one app at a time owns a runs folder, and the shared ``core`` stays open for the other tests:
    # the restarted app opens a copy of its runs folder, as a new process would find it on disk
    runs = shutil.copytree(core.runs_dir, tmp_path / "runs", ignore=shutil.ignore_patterns(".lock"))
    again = AppCore(runs_dir=runs, device="cpu")
    try:
        ids = [i for _, i in again.history()]
        assert finished.id in ids
        again.resources(timeout=300)
        res = again.search("a dog", finished.id, None, k=12)        # reopened from disk, no re-run
        assert res["alpha_shown"] == pytest.approx(finished.summary["alpha"])
        assert again.metrics_table(finished.id)["score"] == pytest.approx(core.metrics_table(finished.id)["score"])
    finally:
        again.close()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_release_memory_gives_freed_heap_back_under_glibc():
    """What the app does after loading and each job stage: memory freed in the middle of the heap
    (an allocation above it still alive) goes back to the OS. In a child process: a clean heap."""
    code = """
from clipforget.memory import release_memory
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
blocks = [b"\\1" * 100_000 for _ in range(3000)]     # ~300 MB in heap-sized pieces
keep = b"\\2" * 100_000                            # above them: the heap's top stays in use
del blocks
before = rss()
print(release_memory(), before - rss())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    done, freed_mb = out.stdout.split()
    assert done == "True" and int(freed_mb) > 200, out.stdout + out.stderr[-2000:]


def test_the_page_is_built_without_torch(tmp_path):
    """The app serves its page before the model stack loads: importing the app and building the
    page import no torch (the core's loader thread imports it afterwards)."""
    code = ("import sys, app; from clipforget.app import AppCore; "
            f"core = AppCore(runs_dir={str(tmp_path)!r}, load=False); app.build_app(core); "
            "print(sorted(m for m in ('torch', 'open_clip', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_method_catalog_matches_the_registry():
    """The page's method menu (read from the method modules' source) is the registry's."""
    from clipforget.methods import get_method, list_methods
    from clipforget.methods.catalog import builtin_methods
    catalog = builtin_methods()
    assert list(catalog) == list_methods()
    assert catalog == {name: get_method(name).summary for name in list_methods()}
    assert all(catalog.values())


def test_failure_messages_name_the_memory_that_ran_out():
    from clipforget.jobs import describe_failure
    assert describe_failure(torch.OutOfMemoryError("CUDA out of memory")).startswith("out of GPU memory")
    assert describe_failure(MemoryError()).startswith("out of CPU memory (MemoryError)")
    assert describe_failure(ValueError("bad")) == "ValueError: bad"
