"""Security and artifact hygiene: the app listens on 127.0.0.1 unless told otherwise (and warns
when told), serves only the gallery and the runs folder, caps uploads, no user-supplied id or
name becomes a path outside them, and every artifact clipforget writes is safetensors / JSON /
text / PNG, written through a temporary name and renamed. On the tiny world (tests/tinyworld.py)."""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from clipforget.jobs import JobError
from conftest import launch_on_free_port, load_app_module
from tinyworld import TINY_CONFIG, TINY_MODEL, TINY_SPLIT, file_hash, tree

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_SUFFIXES = {".safetensors", ".json", ".md", ".png", ".zip", ".csv"}
TEMP_NAME = re.compile(r"\..+\.tmp")            # atomic_file's temporary files


# ---- who writes what: an audit hook sees every file opened for writing ------------------------------

class WriteLog:
    """Paths opened for writing while ``active`` (a process-wide audit hook cannot be removed, so
    one is installed once and switched on and off)."""
    active = False
    paths: list[str] = []

    @classmethod
    def hook(cls, event, args):
        if not cls.active or event != "open":
            return
        path, mode, flags = args
        if isinstance(path, int):
            return
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
            bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if writing:
            cls.paths.append(os.path.abspath(os.fsdecode(path)))


sys.addaudithook(WriteLog.hook)


@pytest.fixture
def writes():
    WriteLog.paths, WriteLog.active = [], True
    yield WriteLog.paths
    WriteLog.active = False


def written_in_place(paths, root: Path) -> list[str]:
    """Files under ``root`` written directly instead of as a temporary file or inside a
    temporary folder that is renamed when complete."""
    bad = []
    for p in paths:
        try:
            parts = Path(p).relative_to(root).parts
        except ValueError:
            continue
        if TEMP_NAME.fullmatch(parts[-1]) or any(d.endswith(".partial") for d in parts[:-1]):
            continue
        bad.append(p)
    return bad


def artifact_problems(root: Path) -> list[str]:
    """Files that are not safetensors/JSON/text/PNG/zip, pickles in disguise, zips holding anything
    else, and safetensors files that do not parse."""
    from safetensors import safe_open
    problems = []
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file() or p.name == ".lock":
            continue
        head = p.read_bytes()[:2]
        if p.suffix not in ALLOWED_SUFFIXES or head == b"\x80\x02" or head[:1] == b"\x80":
            problems.append(str(p))
        elif p.suffix == ".zip":
            with zipfile.ZipFile(p) as z:
                problems += [f"{p}:{n}" for n in z.namelist() if Path(n).suffix not in ALLOWED_SUFFIXES
                             or ".." in Path(n).parts or n.startswith("/") or n.endswith(".pkl")]
        elif p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                f.keys()
    return problems


class Payload:  # makes a checkpoint that only full unpickling can read
    pass


# ---- the CLI: forget and merge --------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tiny_world, tiny_ckpt, tmp_path_factory):
    """`clipforget forget` and `clipforget merge` on the tiny model, with the write log on."""
    from clipforget.cli import main as cli_main
    out = tmp_path_factory.mktemp("cli")
    pickled = out / "pickled.pt"
    from safetensors.torch import load_file
    torch.save({"state_dict": load_file(str(tiny_ckpt)), "extra": Payload()}, pickled)
    hashes = {tiny_ckpt: file_hash(tiny_ckpt), pickled: file_hash(pickled)}
    WriteLog.paths, WriteLog.active = [], True
    try:
        code = cli_main(["forget", "--model", TINY_MODEL, "--pretrained", str(tiny_ckpt), "--gallery", str(tiny_world),
                         "--superclass", "dog", "--subgroup", "poodle", "--config", json.dumps(TINY_CONFIG),
                         "--split", json.dumps(TINY_SPLIT), "--alpha", "0.5", "--out", str(out / "poodle")])
        assert code == 0
        code = cli_main(["merge", "--model", TINY_MODEL, "--pretrained", str(pickled), "--allow-pickle",
                         str(out / "poodle"), str(out / "poodle"), "--out", str(out / "merged")])
        assert code == 0
    finally:
        WriteLog.active = False
    return out, list(WriteLog.paths), hashes


def test_cli_artifacts_are_safetensors_only_and_written_atomically(cli_runs):
    out, paths, hashes = cli_runs
    assert {"report.json", "report.md", "run.json", "delta.safetensors", "export"} <= set(tree(out / "poodle"))
    assert tree(out / "merged") == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert artifact_problems(out / "poodle") == [] and artifact_problems(out / "merged") == []
    assert len(written_in_place(paths, Path("/"))) < len(paths)          # the log saw the writes
    assert written_in_place(paths, out) == []
    assert all(file_hash(p) == h for p, h in hashes.items())             # the checkpoints are untouched
    report = json.loads((out / "poodle" / "report.json").read_text())
    assert report["alpha"] == 0.5 and report["alpha_source"] == "--alpha"
    assert json.loads((out / "poodle" / "export" / "open_clip_config.json").read_text())["clipforget"]["alpha"] == 0.5


# ---- the app: launched on the default host ---------------------------------------------------------

@pytest.fixture(scope="module")
def app_module():
    return load_app_module()


@pytest.fixture(scope="module")
def served(app_module, tiny_world, tiny_ckpt, tmp_path_factory):
    """The app on the tiny world, launched without a host argument, with one finished job; the
    write log was on while the job ran."""
    from clipforget.app import AppCore
    runs = tmp_path_factory.mktemp("app") / "runs"
    core = AppCore(TINY_MODEL, str(tiny_ckpt), str(tiny_world), runs, "cpu", alpha_points=2,
                   job_config=TINY_CONFIG, job_split=TINY_SPLIT)
    WriteLog.paths, WriteLog.active = [], True
    try:
        core.resources(timeout=300)
        job = core.jobs.wait(core.start_job("dog", "poodle").id, timeout=300)
        assert job.status == "done", job.error
        core.export(job.id), core.alpha_plot(job.id), core.search("a dog", job.id, 1.0, k=4)
    finally:
        WriteLog.active = False
    paths = list(WriteLog.paths)
    demo, port = launch_on_free_port(lambda port: app_module.launch(core, port=port, prevent_thread_lock=True,
                                                                    quiet=True))
    yield {"core": core, "demo": demo, "port": port, "job": job, "writes": paths}
    demo.close()
    core.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    """A raw GET: the path goes on the wire as written (no client-side '..' clean-up)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))          # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_the_app_binds_loopback_unless_told(served, app_module):
    demo, port = served["demo"], served["port"]
    assert demo.server_name == "127.0.0.1" and demo.local_url.startswith(f"http://127.0.0.1:{port}")
    assert get(port, "/")[0] == 200
    ip = non_loopback_address()
    if ip is not None:       # reachable from this machine only
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=2).close()
    import inspect
    assert inspect.signature(app_module.launch).parameters["host"].default == "127.0.0.1"


def test_a_non_loopback_host_is_warned_about_and_pickle_needs_a_flag(app_module, monkeypatch, caplog, tmp_path):
    from clipforget.app import bind_warning
    assert bind_warning("127.0.0.1") is None and bind_warning("::1") is None and bind_warning("localhost") is None
    assert "reachable from other machines" in bind_warning("0.0.0.0")
    assert "host name 'example.org'" in bind_warning("example.org")
    launched, made, events = [], [], []

    class FakeCore:
        def __init__(self, *args, **kwargs):
            made.append(kwargs)

        def start_loading(self):
            events.append("load model")

        def close(self):
            pass

    class FakeDemo:
        def block_thread(self):
            events.append("serve")

    def fake_launch(core, host, port, prevent_thread_lock=False):
        launched.append(host)
        events.append("page up")
        assert prevent_thread_lock           # main goes on to start the model loading
        return FakeDemo()
    monkeypatch.setattr(app_module, "AppCore", FakeCore)
    monkeypatch.setattr(app_module, "launch", fake_launch)
    with caplog.at_level(logging.WARNING, logger="clipforget.app"):
        app_module.main([])
        assert caplog.records == [] and launched == ["127.0.0.1"]
        # the page is served before the model loads (python app.py's first page waits for nothing)
        assert events == ["page up", "load model", "serve"] and made[0]["load"] is False
        app_module.main(["--host", "0.0.0.0"])
    assert launched[-1] == "0.0.0.0"
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "binding to 0.0.0.0" in caplog.text
    app_module.main(["--allow-pickle"])
    assert [m["allow_pickle"] for m in made] == [False, False, True]       # full unpickling only when told
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match=re.escape(f"clipforget app: error: cannot write to {blocker}/runs: "
                                                   f"{blocker} is a file, not a folder")):
        app_module.main(["--runs-dir", str(blocker / "runs")])


def test_only_the_gallery_and_runs_folders_are_served(served, tmp_path_factory):
    core, port, job = served["core"], served["port"], served["job"]
    gallery, runs = core.gallery.root.resolve(), core.runs_dir
    secret_text = b"the secret of test_security"
    outside = tmp_path_factory.mktemp("outside")
    secret = outside / "secret.txt"
    secret.write_bytes(secret_text)
    (outside / "leak.png").write_bytes((gallery / "dog" / "poodle" / "noto" / "0.png").read_bytes())
    for parent in (gallery.parent, runs.parent):
        (parent / "secret.txt").write_bytes(secret_text)
    (runs / "link.txt").symlink_to(secret)                                 # a symlink inside runs/
    (gallery / "linked").symlink_to(outside, target_is_directory=True)     # a symlinked folder in the gallery
    try:
        image = gallery / "dog" / "poodle" / "noto" / "0.png"
        report = core.jobs.run_dir(job.id) / "report.md"
        assert get(port, f"/gradio_api/file={image}")[0] == 200            # what must be served is
        status, body = get(port, f"/gradio_api/file={report}")
        assert status == 200 and b"Score" in body
        refused_paths_are_refused(port, gallery, runs, secret, job.id, secret_text)
    finally:                                    # the tiny world is shared by other tests
        (runs / "link.txt").unlink()
        (gallery / "linked").unlink()


def refused_paths_are_refused(port, gallery, runs, secret, job_id, secret_text):
    refused = [f"{secret}", "/etc/passwd", f"{ROOT / 'pyproject.toml'}", "pyproject.toml",
               "../../../../../../etc/passwd",
               f"{gallery}/../secret.txt", f"{gallery}/%2e%2e/secret.txt", f"{gallery}/dog/../../secret.txt",
               f"{runs}/../secret.txt", f"{runs}/%2E%2E/secret.txt", f"{runs}//..//secret.txt",
               f"{runs}/link.txt", f"{gallery}/linked/secret.txt", f"{gallery}/linked/leak.png",
               f"{runs}/{job_id}/../../secret.txt", "~/.bashrc", f"{gallery}%00/../secret.txt"]
    for path in refused:
        status, body = get(port, f"/gradio_api/file={path}")
        assert status in (400, 403, 404), (path, status)
        assert secret_text not in body and b"root:" not in body, path


def test_job_ids_and_export_names_cannot_leave_the_runs_folder(served):
    core, job = served["core"], served["job"]
    bad_ids = ["../../etc", "..", "/etc/passwd", job.id + "/../x", job.id[:-1] + "/", "%2e%2e" * 5 + "aa",
               job.id.upper(), job.id + "\x00", " " + job.id[1:]]
    for bad in bad_ids:
        for call in (core.jobs.get, core.jobs.job_dir, core.jobs.run_dir, core.jobs.cancel, core.export,
                     core.alpha_plot, core.report, core.job_status, lambda i: core.search("a dog", i, 1.0)):
            with pytest.raises(JobError, match="invalid job id"):
                call(bad)
    files = core.export(job.id)
    home = core.jobs.job_dir(job.id).resolve()
    for path in files.values():
        assert Path(path).resolve().is_relative_to(home)
    with zipfile.ZipFile(files["model_zip"]) as z:
        names = z.namelist()
    assert names and all(n.startswith("export/") and ".." not in Path(n).parts for n in names)


def test_uploads_are_capped_and_cannot_name_a_path(served):
    """Gradio's upload route (the app's example-image box uses it) refuses a file over the
    per-file limit, whatever its type; a file under it lands inside gradio's own upload folder
    whatever name it claims, and nothing reaches the runs folder or the gallery by this route
    (type and pixel checks happen when the app stores example images: tests/test_uploads.py)."""
    import httpx
    from app import MAX_UPLOAD_BYTES
    from clipforget.uploads import UploadConfig
    assert MAX_UPLOAD_BYTES == UploadConfig().max_bytes
    demo, port, core = served["demo"], served["port"], served["core"]
    url = f"http://127.0.0.1:{port}/gradio_api/upload"
    upload_dir = Path(demo.server_app.uploaded_file_dir).resolve()
    image = (core.gallery.root / "dog" / "poodle" / "noto" / "0.png").read_bytes()
    before = tree(core.runs_dir), tree(core.gallery.root)
    for name in ("big.bin", "big.png"):
        r = httpx.post(url, files={"files": (name, b"\0" * (MAX_UPLOAD_BYTES + 1))}, timeout=60)
        assert r.status_code == 413 and "maximum allowed size" in r.text, (name, r.status_code, r.text)
    for name, data in [("../../../escape.png", image), ("../../escape.txt", b""),
                       (f"{core.runs_dir}/{served['job'].id}/report.json", b"{}"), ("..\\..\\win.txt", b"x"),
                       ("run.sh", b"#!/bin/sh\nrm -rf ~\n")]:
        r = httpx.post(url, files={"files": (name, data)}, timeout=30)
        assert r.status_code in (200, 400), (name, r.status_code)
        for p in r.json() if r.status_code == 200 else []:
            assert Path(p).resolve().parent.parent == upload_dir, p
    assert (tree(core.runs_dir), tree(core.gallery.root)) == before
    assert not (upload_dir.parent / "escape.txt").exists() and not (upload_dir.parent.parent / "escape.txt").exists()
    assert not (upload_dir.parent / "escape.png").exists()


def test_app_api_refuses_bad_values(served):
    from gradio_client import Client
    client = Client(f"http://127.0.0.1:{served['port']}/", analytics_enabled=False, verbose=False,
                    download_files=False)
    job = served["job"].id
    cases = [(("a dog", job, 1.5, 4), r"alpha must be in \[0, 1\], got 1.5"),
             (("a dog", job, -0.5, 4), r"alpha must be in \[0, 1\], got -0.5"),
             (("a dog", "", -1.0, 0), "k .* must be between 1 and 100"),
             (("a dog", "", -1.0, 10**6), "k .* must be between 1 and 100"),
             (("dog " * 200, "", -1.0, 4), "keep it under 300"),
             (("a dog", "../../etc/passwd", -1.0, 4), "invalid job id")]
    for args, message in cases:
        with pytest.raises(Exception, match=message):
            client.predict(*args, api_name="/search")
    ok = client.predict("a dog", job, -1.0, 4, api_name="/search")
    assert ok["alpha_shown"] == pytest.approx(served["job"].summary["alpha"])


def test_app_artifacts_are_safetensors_only_and_written_atomically(served):
    core = served["core"]
    run = core.jobs.run_dir(served["job"].id)
    assert {"alpha_grid", "alpha_grid.json", "delta.safetensors", "report.json"} <= {p.name for p in run.iterdir()}
    assert artifact_problems(core.runs_dir) == []
    paths = [p for p in served["writes"] if Path(p).name != ".lock"]    # the runs-folder lock is not an artifact
    assert any(TEMP_NAME.fullmatch(Path(p).name) for p in paths) and any(".partial/" in p for p in paths)
    assert written_in_place(paths, core.runs_dir) == []
