"""Shared fixtures. Tests run on the CPU, offline; tiny open_clip configs are registered here."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

# two threads (CI's cores), or OMP_NUM_THREADS when set: one per process when two share 2 cores
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

TINY_RN = {  # a BatchNorm ResNet CLIP small enough to build in milliseconds
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}

# timm towers (open_clip's TimmModel) built from timm's own tiny test networks, offline
TINY_TIMM_RESNET = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "test_resnet", "timm_model_pretrained": False, "image_size": 32},
    "text_cfg": TINY_RN["text_cfg"],
}
TINY_TIMM_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                   "image_size": 32},
    "text_cfg": TINY_RN["text_cfg"],
}


@pytest.fixture(scope="session", autouse=True)
def tiny_configs():
    from clipforget.models import register_model_config
    register_model_config("test-tiny-rn", TINY_RN)
    register_model_config("test-tiny-vit", TINY_VIT)
    register_model_config("test-tiny-timm-resnet", TINY_TIMM_RESNET)
    register_model_config("test-tiny-timm-vit", TINY_TIMM_VIT)


@pytest.fixture(scope="session")
def gallery():
    from clipforget.data.gallery import Gallery
    return Gallery.embedded()


@pytest.fixture(scope="session")
def bundle():
    from clipforget.models import load_clip
    return load_clip("embedded", device="cpu")


@pytest.fixture(scope="session")
def view_cache(gallery):
    from clipforget.data.task import ViewCache
    return ViewCache(gallery)


@pytest.fixture(scope="session")
def poodle_task(bundle, gallery, view_cache):
    from clipforget.data.task import ForgetRequest, build_task
    return build_task(gallery, ForgetRequest("dog", "poodle"), bundle.image_size, cache=view_cache)


def fill_hub_cache(root: Path, repo: str, files: list[Path]) -> Path:
    """A Hugging Face hub cache at ``root`` holding ``files`` for ``repo``, as on a machine that has
    downloaded them once (the tests run offline)."""
    rev = "0" * 40
    folder = Path(root) / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    (folder / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / "snapshots" / rev / Path(f).name)
    return Path(root)


@pytest.fixture
def minilm_hub_cache(tmp_path, monkeypatch):
    """Plain open_clip builds an export's MiniLM text tower from the config.json of its hub name (the
    weights are in the export): this makes that config available offline, in this process."""
    import huggingface_hub.constants
    from clipforget.models import MINILM_HUB_ID, minilm_dir
    root = fill_hub_cache(tmp_path / "hf-hub-cache", MINILM_HUB_ID, [minilm_dir() / "config.json"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


# ---- the method end to end: default-config runs of ours ------------------------------------------
SECOND_EDIT = {"stand_ins": {"images": 16, "steps": 10},
               "remind": {"align": {"steps": 3, "max_images": 32}, "loop": {"steps": 10}}}


@pytest.fixture(scope="session")
def runs(bundle, gallery, view_cache, tmp_path_factory):
    """Default-config runs of ours, saved like the CLI does: the quality, export and merging tests
    of test_method.py and the certificate's real run read them."""
    from clipforget.data.task import ForgetRequest, SplitConfig
    from clipforget.pipeline import Evaluator, forget, save_run
    from tinyworld import state_hash
    out = {}
    ev = Evaluator(bundle)
    # poodle at the defaults (the quality test); taxi, the second edit of the merging test, shorter.
    # The default split but 300 test images of the other columns (all of them: ~5,000 views to encode
    # before and after; the method's data, calibration included, is the default)
    split = SplitConfig(max_other_images=300)
    for sc, sg, cfg in (("dog", "poodle", None), ("car", "taxi", SECOND_EDIT)):
        before = state_hash(bundle.model)
        run = forget(bundle, ForgetRequest(sc, sg), config=cfg, gallery=gallery, split=split, cache=view_cache,
                     evaluator=ev)
        assert state_hash(bundle.model) == before, "forget() mutated the model it was given"
        d = tmp_path_factory.mktemp(sg)
        save_run(run, bundle, d)
        out[sg] = (run, d)
    return out


# ---- the web app: one AppCore and one launched server shared by the app tests -------------------

# A small but real job: the method's stages all run, on fewer views and stand-ins, so a job takes seconds.
QUICK_CONFIG = {"stand_ins": {"images": 16, "steps": 10}, "remind": {"enabled": False}, "restore": {"grid_points": 5}}
QUICK_SPLIT = {"train_views": 2, "forget_views": 2, "calib_views": 1, "test_views": 1, "calib_other_images": 40,
               "calib_concept_images": 40, "max_other_images": 80}
# a certificate small enough for seconds, big enough to separate a real run from a sham
CERTIFY_SMALL = {"relearn": {"steps": 4, "eval_every": 2, "batch_size": 8, "train_views": 2, "eval_views": 2,
                             "anchor_images": 16},
                 # fewer views or negatives and the coarse probe misses most poodles even in the original model
                 "probe": {"train_views": 2, "eval_views": 4, "max_negatives": 200},
                 "retrieval": {"pool": 100}}
ROOT = Path(__file__).resolve().parents[1]


def load_app_module():
    """``app.py`` as a module (it is a script at the repository root, not part of the package)."""
    spec = importlib.util.spec_from_file_location("clipforget_app", ROOT / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_bench_module(name: str):
    """``bench/<name>.py`` as a module (the bench scripts are not part of the package; they import
    their ``common`` helper from their own folder)."""
    bench = str(ROOT / "bench")
    sys.path.insert(0, bench)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod          # its dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(bench)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the app tests' world: seven superclasses (the subgroups the app tests name among them) and one
# drawing of each other concept
APP_SUPERCLASSES = ("dog", "cat", "big cat", "car", "truck", "bird", "fish")


def app_gallery(superclasses=APP_SUPERCLASSES, per_concept: int = 1):
    """The embedded gallery cut to ``superclasses`` (every drawing of their subgroups; None: all
    superclasses) and ``per_concept`` drawings of each other concept: ~920 of its ~6,800 images, so the app tests'
    model load, jobs and α-grid encode a seventh of it. The app's logic is the same on any gallery;
    the method's quality is tested on the whole one."""
    from clipforget.data.gallery import Gallery
    g, seen, items = Gallery.embedded(), {}, []
    for it in g.items:
        if it.kind == "other":
            seen[it.concept] = seen.get(it.concept, 0) + 1
            if seen[it.concept] > per_concept:
                continue
        elif superclasses is not None and it.superclass not in superclasses:
            continue
        items.append(it)
    return Gallery(g.root, items, "embedded-app-tests")


@pytest.fixture(scope="session")
def app_core(tmp_path_factory):
    """One AppCore on the embedded model with short jobs (QUICK_*): the model loads and the
    gallery is encoded once for every app test. Use ``core`` in tests: it leaves no job running."""
    from clipforget.app import AppCore
    core = AppCore(runs_dir=tmp_path_factory.mktemp("app-runs"), gallery=app_gallery(), device="cpu", alpha_points=3,
                   job_config=QUICK_CONFIG, job_split=QUICK_SPLIT, certify_config=CERTIFY_SMALL)
    yield core
    core.close()


@pytest.fixture(scope="session")
def finished_job(app_core):
    """A poodle job of the shared AppCore, done (its results and α-grid on disk); test_app_core.py
    reads it, test_certify.py certifies it (its run folder gains a certificate)."""
    app_core.resources(timeout=300)
    _stop_jobs(app_core)
    return app_core.jobs.wait(app_core.start_job("dog", "poodle").id, timeout=600)


def _stop_jobs(core) -> None:
    running = core.jobs.running()
    if running is not None:      # a failed test must not leave a job that refuses the next test's
        core.jobs.cancel(running.id)
        core.jobs.wait(running.id, timeout=600)


@pytest.fixture
def core(app_core):
    """The shared AppCore, loaded, with no job running before or after the test."""
    app_core.resources(timeout=300)
    _stop_jobs(app_core)
    yield app_core
    _stop_jobs(app_core)


@dataclass
class AppServer:
    url: str          # http://127.0.0.1:PORT/
    core: object      # the AppCore behind it
    demo: object      # the launched gr.Blocks


def launch_on_free_port(launch):
    """``launch(port)`` on a free port of 127.0.0.1 -> (demo, port). Gradio gives its own first page
    request 3 s; on a machine busy with other work that can time out although the server is up:
    that server is closed (only it: other tests' apps keep running) and the launch tried again."""
    from gradio.blocks import Blocks
    for attempt in range(3):
        port = free_port()
        running = {id(b) for b in Blocks.get_instances() if b.is_running}
        try:
            return launch(port), port
        except ValueError as e:
            if "localhost is not accessible" not in str(e) or attempt == 2:
                raise
            for b in Blocks.get_instances():
                if b.is_running and id(b) not in running:
                    b.close()


@pytest.fixture(scope="session")
def app_server(app_core):
    """``app.py``'s app launched around ``app_core`` on 127.0.0.1 and a free port."""
    app = load_app_module()
    demo, port = launch_on_free_port(
        lambda port: app.launch(app_core, "127.0.0.1", port, prevent_thread_lock=True, quiet=True))
    yield AppServer(f"http://127.0.0.1:{port}/", app_core, demo)
    demo.close()


@pytest.fixture
def server(app_server, core):
    """The launched app, with no job running before or after the test."""
    return app_server


# ---- the tiny world (tests/tinyworld.py): real jobs in seconds ------------------------------------

@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_configs):
    """A folder gallery of 15 icons in 4 superclasses (fish/shark alone: nothing to retain)."""
    from clipforget.data.gallery import default_gallery_dir
    from tinyworld import make_tiny_gallery
    return make_tiny_gallery(default_gallery_dir(), tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_world, tmp_path_factory):
    """A tiny-model checkpoint file that recognises dog/poodle."""
    from tinyworld import recognising_checkpoint
    return recognising_checkpoint(tiny_world, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors",
                                  "dog", "poodle")


def _gated(core, stage: str):
    """Holds a forget job at its first progress event of ``stage`` until the test sets the event."""
    gate = threading.Event()
    work = core.jobs.kinds["forget"]

    def gated(job, progress, job_dir):
        def hook(event):
            progress(event)
            if event.get("stage") == stage:
                gate.wait(600)
        return work(job, hook, job_dir)
    core.jobs.kinds["forget"] = gated
    yield gate
    gate.set()
    core.jobs.kinds["forget"] = work


@pytest.fixture
def gated_alpha_grid(core):
    """Holds a forget job at the start of its α-grid (after its results and report) until the test
    sets the returned event."""
    yield from _gated(core, "alpha-grid")


@pytest.fixture
def gated_evaluation(core):
    """Holds a forget job at the start of its evaluation (after its results: the grids can show)
    until the test sets the returned event."""
    yield from _gated(core, "evaluate")
