"""The app's logic without a browser: the FAISS index, the α-grid, the job runner (cancel, refusal
of a second job, restart recovery, no half-written artifact) and the handlers of AppCore."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
import zipfile
from types import SimpleNamespace
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
@pytest.mark.parametrize("keys,shared,budget", [
    (("visual.layer4.0.downsample.0.weight", "visual.attnpool.c_proj.weight"), True, fx.TRUNK_BUDGET),
    (("visual.layer4.0.downsample.0.weight", "visual.attnpool.c_proj.weight"), True, 0),
    (("visual.layer4.0.downsample.0.weight", "visual.attnpool.c_proj.weight"), True, "spill"),
    (("visual.conv1.weight",), False, fx.TRUNK_BUDGET)])
def test_alpha_grid_shared_trunk_equals_full_encode(bundle, gallery, keys, shared, budget, tmp_path):
    """The trunk shortcut is exact: same embeddings as re-encoding with θ₀ + α·Δ, whether the
    whole gallery's trunk is kept between points or (over the budget) run again per batch. A delta
    on the stem leaves nothing to share (trunk.split_index returns None): the gallery is encoded in full."""
    from clipforget.embed import encode_images
    from clipforget.pipeline import edited_model
    images, _ = gallery.load(gallery.items[:40], bundle.image_size)
    sd = bundle.model.state_dict()
    g = torch.Generator().manual_seed(0)
    delta = {k: 0.05 * torch.randn(sd[k].shape, generator=g) for k in keys}
    kept = {k: sd[k].clone() for k in keys}
    spill = tmp_path / ".trunk.tmp" if budget == "spill" else None
    budget = None if budget == "spill" else budget
    one = fx.AlphaGrid(bundle, images, delta, batch_size=16, trunk_budget=budget, spill=spill)
    first = one.encode(0.5)
    assert (one._trunk is not None) == (shared and budget != 0)      # kept for the next points when it fits
    assert torch.equal(one.encode(0.5), first)                        # from the kept trunk: the same
    if spill is not None:                                             # in a file, out of memory
        per_image = one._trunk[0:1].data.numel() * 4                 # float32
        assert isinstance(one._trunk, fx.TrunkFile) and spill.stat().st_size == len(images) * per_image
    one.release()
    assert spill is None or not spill.exists()
    grid, info = fx.encode_alpha_grid(bundle, images, delta, [0.5, 1.0], batch_size=16, trunk_budget=budget,
                                      spill=spill)
    assert info["shared_trunk"] is shared
    assert all(torch.equal(bundle.model.state_dict()[k], kept[k]) for k in keys)   # the original untouched
    for i, a in enumerate([0.5, 1.0]):
        ref = encode_images(bundle, images, edited_model(bundle, delta, a))
        assert torch.allclose(grid[i], ref, atol=1e-5), a
    assert not torch.allclose(grid[0], grid[1], atol=1e-3)         # the delta matters


def test_one_gallery_trunk_per_runs_folder(tmp_path):
    """The cache keeps the loaded model's trunk only; the original embeddings (small) all stay."""
    from clipforget.app.loading import drop_other_trunks
    names = ["trunk-aaaa-2.safetensors", "trunk-bbbb-2.safetensors", "trunk-aaaa-3.safetensors",
             "original-aaaa.safetensors", "original-bbbb.safetensors", "text-1.safetensors"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    gone = drop_other_trunks(tmp_path, tmp_path / "trunk-aaaa-2.safetensors")
    assert sorted(p.name for p in gone) == ["trunk-aaaa-3.safetensors", "trunk-bbbb-2.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {p.name for p in gone})
    drop_other_trunks(tmp_path, None)                 # a model without a trunk: none is kept
    assert not list(tmp_path.glob("trunk-*"))


def _manifest(folder: Path, rows: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.csv").write_text("path,superclass,subgroup,kind\n" + rows)
    return folder / "manifest.csv"


def test_partial_cache_files_of_a_killed_app_are_removed_when_it_starts(tmp_path):
    """Ctrl-C during the first gallery encode leaves the trunk's temporary file (up to 448 MB) in
    the runs folder's cache, as a kill mid-write leaves a card's: the next app removes them, and
    only them."""
    from clipforget.app import AppCore
    cache = tmp_path / "runs" / ".cache"
    partial = [".trunk-0123-2.safetensors.k2j4.tmp", ".original-0123.safetensors.x9.tmp", "cards/.ab.png.q1.tmp",
               "marked/.cd.png.z7.tmp"]
    kept = ["trunk-0123-2.safetensors", "original-0123.safetensors", "cards/ab.png", "marked/cd.png"]
    for name in partial + kept:
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(b"x")
    core = AppCore(gallery=str(_manifest(tmp_path / "g", "a.png,dog,poodle,\n")), runs_dir=tmp_path / "runs",
                   load=False)
    try:
        assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) == sorted(kept)
    finally:
        core.close()


def test_a_gallery_without_superclasses_is_a_clear_error_at_start_up(tmp_path):
    """A manifest of concepts only has no first pick for the page: the app says so before it
    builds the page (before: IndexError while building it, outside main's error handling)."""
    from clipforget.app import AppCore
    from clipforget.app.loading import default_pick
    from clipforget.data.gallery import Gallery
    manifest = _manifest(tmp_path / "g", "a.png,,,concept\n")
    message = ("the gallery 'g' has no superclass/subgroup images (1 images, none in the hierarchy): the app forgets "
               "a subgroup of a superclass. Start it with a folder root/superclass/subgroup/*.jpg, or a manifest")
    with pytest.raises(ValueError, match=re.escape(message)):
        default_pick(Gallery.open(str(manifest)))
    with pytest.raises(ValueError, match=re.escape(message)):
        AppCore(gallery=str(manifest), runs_dir=tmp_path / "runs", load=False)
    assert not (tmp_path / "runs").exists()                 # refused before the runs folder is made
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--gallery", str(manifest), "--runs-dir",
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 1 and f"clipforget app: error: {message}" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_app_cache_holds_one_trunk(core):
    trunks = list(core.cache_dir.glob("trunk-*.safetensors"))
    assert len(trunks) == 1 and trunks[0] == core.resources().trunk.path


@pytest.mark.slow
def test_gallery_trunk_is_exact_and_reused(bundle, gallery, tmp_path):
    """The app's gallery trunk (stages before the first candidate layer, on disk): the original
    embeddings it is written beside equal encode_images'; a job's α point that starts from it equals
    one that runs the whole trunk; a delta on an earlier stage does not use it; a truncated file is
    not read."""
    from clipforget.embed import encode_images
    from clipforget.stages.forget import candidate_layers
    from clipforget.trunk import split_index
    images, _ = gallery.load(gallery.items[:40], bundle.image_size)
    start = split_index(bundle.model.visual, candidate_layers(bundle.model.visual))
    assert start and start > 1
    store = fx.GalleryTrunk(tmp_path / "trunk.safetensors")
    assert store.load(len(images)) is None
    emb, trunk = store.encode(bundle, images, start, batch_size=16)
    assert torch.allclose(emb, encode_images(bundle, images), atol=1e-6)
    again = store.load(len(images))
    assert again is not None and again.start == start and torch.equal(again[0:40].data, trunk[0:40].data)
    assert store.load(len(images) + 1) is None                        # another gallery size: not this file
    from safetensors import safe_open                                  # a plain safetensors file
    with safe_open(str(store.path), "pt") as f:
        assert f.metadata()["start"] == str(start) and torch.equal(f.get_tensor("trunk")[:40], trunk[0:40].data)
    sd = bundle.model.state_dict()
    g = torch.Generator().manual_seed(0)
    late = {k: 0.05 * torch.randn(sd[k].shape, generator=g)
            for k in ("visual.layer4.0.downsample.0.weight", "visual.attnpool.c_proj.weight")}
    plain = fx.AlphaGrid(bundle, images, late, batch_size=16)
    given = fx.AlphaGrid(bundle, images, late, batch_size=16, gallery_trunk=trunk)
    assert given.base is not None and plain.base is None
    assert torch.allclose(given.encode(0.5), plain.encode(0.5), atol=1e-6)
    assert torch.allclose(given.encode(1.0), plain.encode(1.0), atol=1e-6)   # the kept trunk, next point
    early = {"visual.conv1.weight": 0.05 * torch.randn(sd["visual.conv1.weight"].shape, generator=g)}
    assert fx.AlphaGrid(bundle, images, early, batch_size=16, gallery_trunk=trunk).base is None
    with open(store.path, "r+b") as f:                                 # a cut file is encoded again
        f.truncate(100)
    assert store.load(len(images)) is None


# ---- job registry with stand-in work functions ----------------------------------------------------

def _fake_run(folder: Path) -> None:
    """The files that make a run folder's results and its report (empty: the registry only looks)."""
    for name in ("run.json", "report.json"):
        (folder / name).write_text("{}")
    (folder / "delta.safetensors").write_bytes(b"")


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
            _fake_run(tmp)
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
            _fake_run(tmp)
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


# ---- the run folder's α-grid, point by point ----------------------------------------------------

def test_alpha_grid_points_are_added_atomically_and_resumable(tmp_path, monkeypatch):
    from clipforget import runfolder
    run = tmp_path / "run"
    run.mkdir()
    _fake_run(run)
    assert runfolder.is_complete(run) and not runfolder.is_complete(run, alpha_grid=True)   # no plan yet
    runfolder.plan_alpha_grid(run, [0.2, 0.6, 1.0], "hash", images=5)
    assert runfolder.missing_alpha_points(run) == [0.2, 0.6, 1.0] and not runfolder.alpha_grid_complete(run)
    emb = {a: _unit(5, 4, seed=int(a * 10)) for a in (0.2, 0.6, 1.0)}
    runfolder.save_alpha_point(run, 0.6, emb[0.6], "hash")
    assert runfolder.alpha_grid_points(run) == [0.6] and runfolder.missing_alpha_points(run) == [0.2, 1.0]
    assert runfolder.is_complete(run) and not runfolder.is_complete(run, alpha_grid=True)

    # a point whose write fails (here: the disk fills mid-file) leaves no file: not even a partial one
    import safetensors.torch
    real = safetensors.torch.save_file

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a point")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError):
        runfolder.save_alpha_point(run, 0.2, emb[0.2], "hash")
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert sorted(p.name for p in (run / runfolder.ALPHA_GRID).iterdir()) == ["alpha-0.600000.safetensors"]
    # a temporary file a killed process left is never taken for a point
    (run / runfolder.ALPHA_GRID / ".alpha-0.200000.safetensors.x1.tmp").write_bytes(b"half")
    assert runfolder.alpha_grid_points(run) == [0.6]

    # resuming computes only the missing points; then the grid is complete and loads whole
    for a in runfolder.missing_alpha_points(run):
        runfolder.save_alpha_point(run, a, emb[a], "hash")
    assert runfolder.alpha_grid_complete(run) and runfolder.is_complete(run, alpha_grid=True)
    loaded, made_on = runfolder.load_alpha_grid(run)
    assert made_on == "hash" and sorted(loaded) == [0.2, 0.6, 1.0]
    assert all(torch.equal(loaded[a], emb[a]) for a in loaded)
    assert sorted(runfolder.load_alpha_grid(run, skip=[0.0, 0.2, 0.6])[0]) == [1.0]     # only the new ones


def test_a_run_folder_of_the_single_file_grid_still_loads(tmp_path):
    from clipforget import runfolder
    from clipforget.io import save_safetensors
    run = tmp_path / "old"
    (run).mkdir()
    _fake_run(run)
    grid = torch.stack([_unit(5, 4, seed=1), _unit(5, 4, seed=2)])
    save_safetensors({"embeddings": grid, "alphas": torch.tensor([0.5, 1.0], dtype=torch.float64)},
                     run / runfolder.LEGACY_ALPHA_GRID)
    write_json(run / runfolder.ALPHA_GRID_JSON, {"alphas": [0.0, 0.5, 1.0], "gallery_hash": "h"})
    assert runfolder.alpha_grid_points(run) == [0.5, 1.0] and runfolder.is_complete(run, alpha_grid=True)
    loaded, made_on = runfolder.load_alpha_grid(run)
    assert made_on == "h" and torch.equal(loaded[1.0], grid[1])


def _retrieval(run: Path, spec: dict | None = None, model=("embedded", None), summary: dict | None = None):
    """The app's Retrieval over one job's run folder, with stand-ins for the loader and registry
    (a 5-image gallery of hash "h"; no model: the job's delta has no text tower)."""
    from clipforget.app.retrieval import Retrieval
    gallery = type("Gallery", (), {"content_hash": "h", "__len__": lambda self: 5})()
    loader = SimpleNamespace(gallery=gallery, original_index=fx.build(_unit(5, 4, seed=9)), model_name=model[0],
                             pretrained=model[1], resources=lambda timeout=None: SimpleNamespace(bundle=None))
    job = SimpleNamespace(spec=spec if spec is not None else {"model": "embedded", "pretrained": None},
                          summary=summary or {})
    jobs = SimpleNamespace(run_dir=lambda job_id: run, get=lambda job_id: job)
    return Retrieval(loader, jobs, run.parent / "cache")


def _grid_run(tmp_path, alphas=(0.5, 1.0), saved=(0.5,)) -> Path:
    from clipforget import runfolder
    from clipforget.io import save_safetensors
    run = tmp_path / "run"
    run.mkdir()
    save_safetensors({"visual.x": torch.zeros(1)}, run / runfolder.DELTA)
    write_json(run / runfolder.RUN_JSON, {})
    runfolder.plan_alpha_grid(run, list(alphas), "h", 5)
    for a in saved:
        runfolder.save_alpha_point(run, a, _unit(5, 4, seed=int(a * 10)), "h")
    return run


def test_a_point_saved_while_the_grid_loads_is_picked_up_next_time(tmp_path, monkeypatch):
    """The grid's last point is saved by the job while a handler loads the others: the cache entry
    is not complete without it, so the next call loads it (before: marked complete from the folder,
    the point was never loaded and the slider snapped to a neighbour)."""
    from clipforget import runfolder
    run = _grid_run(tmp_path)
    r = _retrieval(run)
    build = fx.build

    def build_then_the_last_point_lands(emb):
        out = build(emb)
        if 1.0 not in runfolder.alpha_grid_points(run):
            runfolder.save_alpha_point(run, 1.0, _unit(5, 4, seed=10), "h")
        return out
    monkeypatch.setattr(fx, "build", build_then_the_last_point_lands)
    first = r.grid("a" * 32)
    monkeypatch.setattr(fx, "build", build)
    assert runfolder.alpha_grid_complete(run) and first.points == [0.0, 0.5] and not first.complete
    state = r.alpha_points("a" * 32)
    assert state["ready"] == [0.0, 0.5, 1.0] and state["complete"] and state["computing"] == 0


def test_a_job_of_another_model_is_refused_with_what_to_start(tmp_path):
    """Its α-grid holds one model's image embeddings: searching them with another model's text
    embeddings would be nonsense. The page says which model to start the app with."""
    from clipforget.work import check_same_model
    run = _grid_run(tmp_path, saved=(0.5, 1.0))
    r = _retrieval(run, spec={"model": "embedded", "pretrained": None}, model=("embedded-vit", None))
    with pytest.raises(ValueError, match="made with the model --model embedded; this app runs --model embedded-vit: "
                                         "start the app with --model embedded to reopen it"):
        r.grid("a" * 32)
    assert _retrieval(run, spec={}, model=("embedded-vit", None)).grid("a" * 32).complete     # not recorded: as is
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"x")
    # the same weights file named relative or absolute is the same model; another file is not
    check_same_model({"model": "RN50", "pretrained": str(ckpt)}, "RN50", os.path.relpath(ckpt), "a" * 32)
    with pytest.raises(ValueError, match=f"start the app with --model RN50 --pretrained {ckpt} to reopen it"):
        check_same_model({"model": "RN50", "pretrained": str(ckpt)}, "RN50", "openai", "a" * 32)


def test_certify_refuses_a_run_of_another_model(tmp_path):
    """The certificate applies the run's delta to the app's model as θ₀: refused, before anything
    loads, when that is not the model the run was made with."""
    from clipforget.work import CertifyWork

    def no_model():
        raise AssertionError("the model was asked for before the check")
    work = CertifyWork(no_model, model=("embedded-vit", None))
    job = Job("c" * 32, "certificate", {"run_dir": str(tmp_path), "of_job": "a" * 32, "model": "embedded",
                                        "pretrained": None}, kind="certify")
    with pytest.raises(ValueError, match=f"job {'a' * 32} was made with the model --model embedded; .*"
                                         "start the app with --model embedded to certify it"):
        work(job, lambda event: None, tmp_path)


def test_the_alpha_shown_is_named_as_used_not_as_calibrated(tmp_path):
    """A job's α is restore's calibrated α plus its margin: the page names both for what they are."""
    from clipforget.app.page.handlers import _score
    from clipforget.app.views import alpha_label
    assert alpha_label(0.7, 0.6) == "α used = 0.70 (calibrated α 0.60 + restore's margin)"
    assert alpha_label(0.6, 0.6) == "α used = calibrated α = 0.60" and alpha_label(0.7) == "α used = 0.70"
    line = _score({"score": 80.0, "method": "ours", "alpha": 0.7},
                  {"status": "done", "summary": {"alpha": 0.7, "calibrated_alpha": 0.6, "alpha_grid_points": 3}})
    assert "α used = 0.70 (calibrated α 0.60 + restore's margin)" in line and "calibrated α = 0.70" not in line
    run = _grid_run(tmp_path, alphas=(0.7, 1.0), saved=(0.7, 1.0))
    r = _retrieval(run, summary={"alpha": 0.7, "calibrated_alpha": 0.6})
    r.text_embedding = lambda query: _unit(1, 4, seed=3)[0].numpy()
    r.forgotten_paths = lambda job_id: set()
    r._hits = lambda idx, q, k, forgotten: []
    res = r.search("a dog", "a" * 32, None, k=3)
    assert res["alpha_shown"] == 0.7 and res["alpha_used"] == 0.7 and res["alpha_calibrated"] == 0.6
    assert "; α used = 0.70 (calibrated α 0.60 + restore's margin);" in res["alpha_note"]


# ---- a job whose results come before its end (Ready) ----------------------------------------------

def _results_then_rest(points=4, seconds_per_point=0.3, fail_at=None):
    """Publishes its run folder (report + plan + first point), then adds the other points one by one."""
    from clipforget import runfolder
    from clipforget.jobs import Ready

    def work(job, progress, job_dir):
        progress({"stage": "forget", "step": 1, "total": 1})
        alphas = [round((i + 1) / points, 6) for i in range(points)]
        with atomic_dir(job_dir / "run") as tmp:
            _fake_run(tmp)
            runfolder.plan_alpha_grid(tmp, alphas, "h", 3)
            runfolder.save_alpha_point(tmp, alphas[-1], _unit(3, 4), "h")

        def rest(ready):
            missing = runfolder.missing_alpha_points(job_dir / "run")
            for i, a in enumerate(missing):
                t0 = time.monotonic()
                while time.monotonic() - t0 < seconds_per_point:
                    progress({"stage": "alpha-grid", "step": i, "total": len(missing)})
                    time.sleep(0.01)
                if fail_at == i:
                    raise OSError(28, "No space left on device")
                runfolder.save_alpha_point(job_dir / "run", a, _unit(3, 4), "h")
            return {"alpha_grid_points": points + 1}
        return Ready({"score": 1.0}, rest, what="α-grid")
    return work


def test_results_are_ready_before_the_job_is_done_and_a_second_job_waits(tmp_path):
    from clipforget import runfolder
    reg = JobRegistry(tmp_path, _results_then_rest(points=4, seconds_per_point=0.4))
    job = reg.submit({}, "poodle (dog)")
    ready = reg.wait(job.id, timeout=20, results=True)
    assert ready.status == "ready" and ready.has_results and ready.active and ready.summary == {"score": 1.0}
    run = reg.run_dir(job.id)                                   # usable now
    assert runfolder.is_complete(run) and not runfolder.is_complete(run, alpha_grid=True)
    with pytest.raises(JobBusy, match="results are ready"):    # one model, one worker: the α-grid first
        reg.submit({}, "taxi (car)")
    on_disk = json.loads((reg.job_dir(job.id) / "job.json").read_text())
    assert on_disk["status"] == "ready"
    done = reg.wait(job.id, timeout=20)
    assert done.status == "done" and done.summary == {"score": 1.0, "alpha_grid_points": 5}
    assert runfolder.is_complete(run, alpha_grid=True) and runfolder.alpha_grid_points(run) == [0.25, 0.5, 0.75, 1.0]
    reg.close()


def test_cancel_during_the_rest_keeps_the_results_and_whole_points(tmp_path):
    from clipforget import runfolder
    reg = JobRegistry(tmp_path, _results_then_rest(points=5, seconds_per_point=0.3))
    job = reg.submit({}, "poodle (dog)")
    reg.wait(job.id, timeout=20, results=True)
    run = reg.run_dir(job.id)
    while len(runfolder.alpha_grid_points(run)) < 2:
        time.sleep(0.02)
    reg.cancel(job.id)
    done = reg.wait(job.id, timeout=10)
    assert done.status == "done" and done.summary["unfinished"] == "α-grid cancelled"
    have = runfolder.alpha_grid_points(run)
    assert 2 <= len(have) < 5 and runfolder.missing_alpha_points(run)          # resumable: what is missing
    assert all(p.name.startswith("alpha-") for p in (run / runfolder.ALPHA_GRID).iterdir())   # no temp file
    assert reg.run_dir(job.id) == run and "α-grid incomplete (α-grid cancelled)" in _status_text(done)
    from clipforget.app.views import alpha_points_text
    state = {"ready": [0.0] + have, "planned": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "complete": False}
    state["computing"] = len(state["planned"]) - len(state["ready"])
    assert alpha_points_text(state, done).endswith(f"({state['computing']} not computed: α-grid cancelled)")
    assert "computing" in alpha_points_text(state, Job("a" * 32, "x", {}, status="ready"))
    reg.submit({}, "taxi (car)")                     # free again
    reg.close()


def test_a_failed_rest_keeps_the_results_and_says_why(tmp_path):
    from clipforget import runfolder
    reg = JobRegistry(tmp_path, _results_then_rest(points=3, seconds_per_point=0.05, fail_at=1))
    done = reg.wait(reg.submit({}, "poodle (dog)").id, timeout=20)
    assert done.status == "done" and "α-grid failed: OSError" in done.summary["unfinished"]
    assert runfolder.alpha_grid_points(reg.run_dir(done.id)) == [0.333333, 1.0]
    reg.close()


def test_restart_during_the_rest_keeps_the_results(tmp_path):
    from clipforget import runfolder
    job_dir = tmp_path / ("e" * 32)
    run = job_dir / "run"
    run.mkdir(parents=True)
    _fake_run(run)
    runfolder.plan_alpha_grid(run, [0.5, 1.0], "h", 3)
    runfolder.save_alpha_point(run, 1.0, _unit(3, 4), "h")
    (run / runfolder.ALPHA_GRID / ".alpha-0.500000.safetensors.abc.tmp").write_bytes(b"half")   # killed mid-write
    write_json(job_dir / "job.json", Job("e" * 32, "killed in the α-grid", {}, status="ready", stage="alpha-grid",
                                         started=time.time(), summary={"score": 1.0}).to_dict())
    reg = JobRegistry(tmp_path, _slow_work(0))
    job = reg.get("e" * 32)
    assert job.status == "done" and job.summary["unfinished"] == "α-grid interrupted by a restart"
    assert job.summary["score"] == 1.0 and reg.run_dir(job.id) == run and reg.running() is None
    assert [p.name for p in (run / runfolder.ALPHA_GRID).iterdir()] == ["alpha-1.000000.safetensors"]
    assert runfolder.missing_alpha_points(run) == [0.5]
    reg.close()


def test_restart_after_the_evaluation_takes_the_score_from_the_report(tmp_path):
    """Killed in the α-grid before job.json recorded the Score: the restart reads it from the report."""
    from clipforget import runfolder
    job_dir = tmp_path / ("c" * 32)
    run = job_dir / "run"
    run.mkdir(parents=True)
    _fake_run(run)
    (run / "report.json").write_text('{"score": 91.5}')
    runfolder.plan_alpha_grid(run, [0.5, 1.0], "h", 3)
    runfolder.save_alpha_point(run, 1.0, _unit(3, 4), "h")
    write_json(job_dir / "job.json", Job("c" * 32, "killed", {}, status="ready", stage="alpha-grid",
                                         started=time.time(), summary={"alpha": 1.0}).to_dict())
    reg = JobRegistry(tmp_path, _slow_work(0))
    job = reg.get("c" * 32)
    assert job.status == "done" and job.summary == {"alpha": 1.0, "score": 91.5,
                                                    "unfinished": "α-grid interrupted by a restart"}
    reg.close()


def test_a_failed_evaluation_leaves_the_results_and_nothing_of_the_report(tmp_path, monkeypatch):
    from clipforget import io, runfolder
    run = tmp_path / "run"
    run.mkdir()
    _fake_run(run)
    (run / "report.json").unlink()
    real = io.write_json

    def full_disk(path, obj):
        if Path(path).name == "report.json":
            raise OSError(28, "No space left on device")
        real(path, obj)
    def write_report(run, bundle, folder, export):       # the real order: export/, report.md, report.json
        (folder / runfolder.EXPORT).mkdir()
        runfolder.write_text(folder / runfolder.REPORT_MD, "x")
        runfolder.write_json(folder / runfolder.REPORT_JSON, {})
    monkeypatch.setattr(runfolder, "write_json", full_disk)
    monkeypatch.setattr(runfolder, "_write_report", write_report)
    with pytest.raises(OSError, match="No space"):
        runfolder.add_report(None, None, run)
    assert sorted(p.name for p in run.iterdir()) == ["delta.safetensors", "run.json"]
    assert runfolder.has_results(run) and not runfolder.is_evaluated(run)


def test_stage_clock_estimates_time_left_from_the_pace_so_far():
    from clipforget.train.events import StageClock
    now = [0.0]
    clock = StageClock(lambda: now[0])
    assert clock.update({"stage": "forget", "step": 0, "total": 40})
    now[0] = 5.0                                                    # start-up, not a step
    clock.update({"stage": "forget", "step": 1, "total": 40})
    assert clock.seconds_left() is None and clock.text() == "forget 1/40"
    now[0] = 7.0
    assert not clock.update({"stage": "forget", "step": 5, "total": 40})
    assert clock.seconds_left() == pytest.approx(0.5 * 35) and clock.text() == "forget 5/40 · about 18 s left"
    assert clock.update({"stage": "remind", "step": 0, "total": 0}) and clock.seconds_left() is None
    assert clock.text() == "remind"


def _status_text(job):
    from clipforget.app.views import status_text
    return status_text(job)


def test_progress_text_is_a_bar_the_stage_its_steps_and_the_time_left():
    from clipforget.app.views import progress_text
    job = Job("a" * 32, "poodle (dog) · ours", {}, status="running", stage="remind", step=15, total=60,
              fraction=0.25, eta=12.0, stages=["prepare", "data", "stand-ins", "forget", "remind"], started=time.time())
    text = progress_text(job, width=8)
    assert text.startswith("`██······`  25 % · Job `aaaaaaaa` poodle (dog) · ours: running · remind 15/60 · ")
    assert "12 s left" in text and text.endswith("· stage 5")
    assert progress_text(Job("b" * 32, "x", {}, status="queued"), width=4).startswith("`····`   0 % · ")


# ---- AppCore on the embedded model (the shared ``core`` fixture of conftest.py) -----------------------

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
def test_first_picks_views_are_made_before_the_model_is_ready(core):
    """The loader makes the page's first pick's views in the jobs' cache: its task needs no new one."""
    from clipforget.app.loading import default_pick
    from clipforget.data.request import ForgetRequest, SplitConfig
    from clipforget.data.task import build_task
    res = core.resources()
    assert default_pick(core.gallery) == ("dog", "poodle") and core.loader.timings["warm_views"] > 0
    held = res.cache.view_bytes
    assert held > 0
    build_task(core.gallery, ForgetRequest("dog", "poodle"), res.bundle.image_size,
               SplitConfig(**(core.job_split or {})), res.cache)
    assert res.cache.view_bytes == held                      # every view set was there already


@pytest.mark.slow
def test_search_without_job_marks_nothing(core):
    res = core.search("a poodle", None, None, k=8)
    assert len(res["left"]) == 8 and "right" not in res and res["recall_left"] is None
    assert any(h["subgroup"] == "poodle" for h in res["left"])
    assert core.text_embedding("a poodle") is core.text_embedding("a poodle")   # cached per query
    with pytest.raises(ValueError, match="type a query"):
        core.search("   ")


@pytest.mark.slow
def test_finished_job_forgets_for_its_query_and_alpha_zero_is_original(core, finished_job):
    assert finished_job.status == "done", finished_job.error
    s = finished_job.summary
    assert s["alpha_grid_points"] >= 3 and s["alpha_grid_seconds"] > 0 and s["shared_trunk"]
    q = core.default_query("dog", "poodle")
    res = core.search(q, finished_job.id, None, k=12)                 # at the job's α
    assert res["alpha_shown"] == pytest.approx(s["alpha"])
    # the job's α is restore's calibrated α plus its margin (α itself where no α was feasible)
    assert s["alpha"] in (s["calibrated_alpha"], min(1.0, round(s["calibrated_alpha"] + 0.1, 6)))
    assert res["alpha_calibrated"] == s["calibrated_alpha"] and "α used = " in res["alpha_note"]
    assert core.jobs.get(finished_job.id).spec["model"] == "embedded"
    assert res["recall_left"] > 0 and res["recall_right"] < res["recall_left"]
    assert any(h["forgotten"] for h in res["left"]) and "FORGOTTEN" in next(
        h["caption"] for h in res["left"] if h["forgotten"])
    zero = core.search(q, finished_job.id, 0.0, k=12)
    assert [h["path"] for h in zero["right"]] == [h["path"] for h in zero["left"]]
    snapped = core.search(q, finished_job.id, 0.3, k=12)
    assert snapped["alpha_shown"] in snapped["alpha_points"] and "nearest computed point" in snapped["alpha_note"]
    with pytest.raises(ValueError, match="alpha"):
        core.search(q, finished_job.id, 1.5)


@pytest.mark.slow
def test_slider_sends_the_right_grid_only_when_its_point_changes(core, finished_job):
    """A slider move nearest to the point the right grid already shows updates the α note alone;
    one to another computed point sends that point's grid (and remembers it)."""
    from types import SimpleNamespace

    from clipforget.app.page.handlers import Handlers
    p = SimpleNamespace(right="right", right_md="right_md", alpha_md="alpha_md", shown_right="shown_right",
                        left="left", left_md="left_md", shown_query="shown_query")
    h = Handlers(core, p)
    q = core.default_query("dog", "poodle")
    points = core.search(q, finished_job.id, 1.0)["alpha_points"]
    first = h.search(q, finished_job.id, 1.0)
    assert first["shown_right"] == [finished_job.id, q, 1.0] and len(first["right"]) == 12
    near = max(a for a in points if a < 1.0)
    same = h.slide(q, q, finished_job.id, 1.0 - 0.25 * (1.0 - near), first["shown_right"])   # still nearest to 1
    assert set(same) == {"alpha_md"} and "nearest computed point" in same["alpha_md"]
    moved = h.slide(q, q, finished_job.id, near, first["shown_right"])
    assert moved["shown_right"] == [finished_job.id, q, near] and len(moved["right"]) == 12
    assert f"showing α = {near:.2f};" in moved["alpha_md"]
    back = h.slide(q, q, finished_job.id, 0.0, moved["shown_right"])                   # α = 0: the original
    assert [c for c in back["right"]] == first["left"]


def test_the_result_handlers_show_the_library_s_message(tmp_path):
    """Gradio 6 shows any exception but gr.Error as a bare "Error": the handlers that fill a job's
    results — the grid watcher a generator, which stays one — turn the library's errors into
    gr.Error with their message (once: an inner handler's gr.Error passes unchanged)."""
    import inspect

    import gradio as gr

    from clipforget.app.page.handlers import Handlers
    why = "job x was run on another gallery; start the app with that gallery to reopen it"

    def refuse(*args, **kwargs):
        raise ValueError(why)
    st = {"status": "done", "results": True, "text": "", "summary": {"alpha": 1.0}}
    core = SimpleNamespace(job_status=lambda job_id: st, alpha_points=refuse, search=refuse, history=lambda: [],
                           evaluated=lambda job_id: False)
    page = SimpleNamespace(**{n: n for n in ("history", "status_md", "plot", "score_md", "table", "points_md",
                                            "alpha", "dl_model", "dl_md", "dl_json", "progress_md", "left",
                                            "left_md", "right", "right_md", "alpha_md", "shown_query",
                                            "shown_right")})
    h = Handlers(core, page)
    assert inspect.isgeneratorfunction(h.watch_grid) and inspect.isgeneratorfunction(h.watcher(page.progress_md))
    for call in (lambda: h.show("a" * 32, "a dog"), lambda: h.slide("a dog", "a dog", "a" * 32, 0.5, None),
                 lambda: list(h.watch_grid("a" * 32))):
        with pytest.raises(gr.Error) as e:
            call()
        assert e.value.message == why
    st["status"] = "ready"                   # the watcher's loop, while the job still runs
    with pytest.raises(gr.Error) as e:
        list(h.watch_grid("a" * 32))
    assert e.value.message == why


def _wait_for_stage(core, job, stage: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while core.job_status(job.id)["stage"] != stage:
        st = core.jobs.get(job.id)
        assert st.active and time.monotonic() < end, f"job {st.status} at {st.stage} ({st.error}), not {stage}"
        time.sleep(0.05)


@pytest.mark.slow
def test_grids_show_before_the_alpha_grid_is_complete(core, gated_alpha_grid):
    job = core.start_job("dog", "poodle")
    ready = core.jobs.wait(job.id, timeout=600, results=True)
    assert ready.status == "ready", ready.error
    calibrated = round(ready.summary["alpha"], 6)
    _wait_for_stage(core, job, "alpha-grid")                           # held there by the gate
    st = core.job_status(job.id)
    assert st["results"] and "results ready, still running · alpha-grid 0/" in st["text"]
    pts = core.alpha_points(job.id)
    assert pts["ready"] == sorted({0.0, calibrated}) and not pts["complete"] and pts["computing"] >= 1
    assert pts["text"] == f"α points ready: {', '.join(f'{a:g}' for a in pts['ready'])} (computing {pts['computing']} more)"
    res = core.search("a dog", job.id, None, k=12)                # the grids, at the calibrated α
    assert res["alpha_shown"] == calibrated and res["recall_right"] < res["recall_left"]
    missing = next(a for a in pts["planned"] if a not in pts["ready"])
    assert core.search("a dog", job.id, missing, k=12)["alpha_shown"] != missing     # not there yet
    table = core.metrics_table(job.id)                              # the report came before the α-grid
    assert core.job_status(job.id)["summary"]["score"] == table["score"]      # and its Score is in job.json
    on_disk = json.loads((core.jobs.job_dir(job.id) / "job.json").read_text())
    assert on_disk["summary"]["score"] == table["score"] and on_disk["message"] == "results ready; α-grid running"
    with pytest.raises(JobBusy, match="its results are ready"):
        core.start_job("car", "taxi")
    gated_alpha_grid.set()
    done = core.jobs.wait(job.id, timeout=600)
    assert done.status == "done" and done.summary["alpha_grid_points"] == len(pts["planned"])
    assert table["score"] == done.summary["score"]
    assert core.alpha_points(job.id)["complete"] and "(all " in core.alpha_points(job.id)["text"]
    assert core.search("a dog", job.id, missing, k=12)["alpha_shown"] == missing          # arrived


@pytest.mark.slow
def test_grids_show_before_the_evaluation(core, gated_evaluation):
    """The grids come from the results alone: the job is ``ready`` and both grids show at the
    calibrated α while its held-out evaluation is held; the metrics, plot and downloads say they
    are coming, then fill from the report."""
    from clipforget.app.page.handlers import Handlers
    job = core.start_job("dog", "poodle")
    ready = core.jobs.wait(job.id, timeout=600, results=True)
    assert ready.status == "ready", ready.error
    _wait_for_stage(core, job, "evaluate")                             # held there by the gate
    assert "score" not in core.job_status(job.id)["summary"] and not core.evaluated(job.id)
    res = core.search("a dog", job.id, None, k=12)
    assert res["alpha_shown"] == round(ready.summary["alpha"], 6) and len(res["right"]) == 12
    with pytest.raises(JobError, match="its evaluation is still running"):
        core.metrics_table(job.id)
    with pytest.raises(JobError, match="its evaluation is still running"):
        core.export(job.id)
    page = SimpleNamespace(**{n: n for n in ("plot", "score_md", "table", "dl_model", "dl_md", "dl_json")})
    pending = Handlers(core, page).report(job.id, core.job_status(job.id))
    assert pending["table"] is None and pending["dl_model"] is None and "Evaluating on the held-out" in pending["score_md"]
    gated_evaluation.set()
    done = core.jobs.wait(job.id, timeout=600)
    assert done.status == "done" and core.evaluated(job.id)
    filled = Handlers(core, page).report(job.id, core.job_status(job.id))
    assert filled["score_md"].startswith(f"**Score {done.summary['score']:.1f}**") and filled["table"]["data"]
    assert Path(filled["dl_model"]).is_file()


@pytest.mark.slow
def test_results_plot_table_export(core, finished_job):
    table = core.metrics_table(finished_job.id)
    assert table["headers"][:2] == ["column", "measured on"] and table["rows"][0][0].startswith("Target")
    assert re.fullmatch(r"\d+ files? × \d+ views?", table["rows"][0][1])     # files, not augmented views alone
    assert 0 <= table["score"] <= 100
    png = core.alpha_plot(finished_job.id)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = core.export(finished_job.id)
    with zipfile.ZipFile(files["model_zip"]) as z:
        names = set(z.namelist())
    assert {"export/open_clip_config.json", "export/open_clip_model.safetensors"} <= names
    assert "Score" in open(files["report_md"]).read()


@pytest.mark.slow
def test_the_page_reads_the_report_once_per_fill(core, finished_job, monkeypatch):
    from clipforget import runfolder
    reads = []
    read = runfolder.read_report
    monkeypatch.setattr(runfolder, "read_report", lambda run: reads.append(run) or read(run))
    (core.jobs.job_dir(finished_job.id) / "alpha_curve.png").unlink(missing_ok=True)    # drawn again here
    shown = core.evaluation(finished_job.id)
    assert len(reads) == 1
    assert shown["table"] == core.metrics_table(finished_job.id) and shown["plot"].read_bytes()[:4] == b"\x89PNG"
    assert shown["downloads"]["model_zip"] == core.export(finished_job.id)["model_zip"]


@pytest.mark.slow
def test_export_loads_in_plain_open_clip(core, finished_job, tmp_path, minilm_hub_cache):
    import open_clip
    with zipfile.ZipFile(core.export(finished_job.id)["model_zip"]) as z:
        z.extractall(tmp_path)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    from clipforget.pipeline import load_delta
    delta, _ = load_delta(core.jobs.run_dir(finished_job.id))
    k = next(iter(delta)).removeprefix("visual.")
    orig = core.resources().bundle.model.visual.state_dict()[k]
    assert not torch.equal(model.visual.state_dict()[k], orig)      # the export is the unlearned model


@pytest.mark.slow
def test_real_job_cancel_mid_stage_and_refusal(core, finished_job):
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
def test_history_survives_a_restart(core, finished_job, tmp_path):
    import shutil
    from clipforget.app import AppCore
    # one app at a time owns a runs folder, and the shared ``core`` stays open for the other tests:
    # the restarted app opens a copy of its runs folder, as a new process would find it on disk
    runs = shutil.copytree(core.runs_dir, tmp_path / "runs", ignore=shutil.ignore_patterns(".lock"))
    again = AppCore(runs_dir=runs, gallery=core.gallery, device="cpu")      # the same gallery as before the restart
    try:
        ids = [i for _, i in again.history()]
        assert finished_job.id in ids
        again.resources(timeout=300)
        res = again.search("a dog", finished_job.id, None, k=12)        # reopened from disk, no re-run
        assert res["alpha_shown"] == pytest.approx(finished_job.summary["alpha"])
        assert again.metrics_table(finished_job.id)["score"] == pytest.approx(core.metrics_table(finished_job.id)["score"])
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
