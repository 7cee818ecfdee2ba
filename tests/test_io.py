"""Artifacts are written atomically: complete or absent."""
import errno
import os

import pytest

from clipforget.io import OutputError, atomic_dir, atomic_file, write_json


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_old_until_new_is_complete(tmp_path):
    out = tmp_path / "run"
    with atomic_dir(out) as d:
        write_json(d / "report.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            write_json(d / "report.json", {"v": 2})
            raise RuntimeError("cancelled")
    assert (out / "report.json").read_text().strip().endswith("}")
    assert '"v": 1' in (out / "report.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_disk_full_is_explained(tmp_path, monkeypatch):
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="disk full"):
        write_json(tmp_path / "x.json", {"a": 1})
    monkeypatch.setattr(os, "fsync", real)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(OutputError, match="permission denied"):
        write_json(ro / "x.json", {})


def test_safetensors_written_in_place_and_a_failed_write_explained(tmp_path):
    """save_safetensors streams the tensors to disk (no serialised copy in memory); an OS error
    inside the writer (here: a file-size limit, standing in for a full disk) becomes a clear
    OutputError and leaves no file behind. In a child process: the limit is process-wide."""
    import subprocess
    import sys
    code = f"""
import resource, signal, torch
from safetensors.torch import load_file
from clipforget.io import OutputError, save_safetensors
ok = {str(tmp_path / "ok.safetensors")!r}
save_safetensors({{"w": torch.arange(6.0).view(2, 3)}}, ok, {{"note": 1}})
assert torch.equal(load_file(ok)["w"], torch.arange(6.0).view(2, 3))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    save_safetensors({{"w": torch.zeros(100_000)}}, {str(tmp_path / "big.safetensors")!r})
except OutputError as e:
    print("OutputError:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OutputError: cannot write" in out.stdout and "big.safetensors" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"]


def test_atomic_dir_replaces_only_an_empty_folder_or_one_this_project_wrote(tmp_path):
    """A folder the project did not write (a gallery, a checkpoint's folder, notes) is refused before
    the work starts, and stays as it was; an empty folder, a run folder and an export are replaced."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("a file")
    not_ours = tmp_path / "not-ours"                  # an open_clip folder of someone else
    not_ours.mkdir()
    write_json(not_ours / "open_clip_config.json", {"model_cfg": {}})
    for target, message in ((theirs, "exists and is not a clipforget run folder; choose another --out or remove it"),
                            (not_ours, "is not a clipforget run folder"),
                            (tmp_path / "notes.txt", "exists and is not a folder")):
        with pytest.raises(OutputError, match=message):
            with atomic_dir(target):
                raise AssertionError("the work started before the output folder was checked")
    assert (theirs / "keep.txt").read_text() == "mine" and (tmp_path / "notes.txt").read_text() == "a file"
    for name, marker in (("empty", None), ("run", "run.json"), ("evaluated", "report.json"),
                         ("export", "open_clip_config.json")):
        folder = tmp_path / name
        folder.mkdir()
        if marker:
            write_json(folder / marker, {"clipforget": {"arch": "x"}} if marker.startswith("open_clip") else {})
        with atomic_dir(folder) as d:
            write_json(d / "report.json", {"v": name})
        assert sorted(p.name for p in folder.iterdir()) == ["report.json"], name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no .partial, no .old


def test_the_current_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """``--out .`` once trained for an hour, then failed on "PosixPath('.') has an empty name"."""
    from clipforget.io import check_out_dir
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(OutputError, match="is the current folder or holds it; choose a new folder for --out"):
            check_out_dir(out)
        with pytest.raises(OutputError, match="current folder"):
            with atomic_dir(out):
                raise AssertionError("the work started")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert check_out_dir("runs/../new") == tmp_path / "new"           # made absolute, '..' resolved


def test_an_output_folder_apart_from_the_inputs(tmp_path):
    from clipforget.io import check_apart, check_out_dir
    model, ckpt = tmp_path / "models" / "export", tmp_path / "ckpts" / "w.safetensors"
    keep = [("model folder", model), ("checkpoint", ckpt)]
    for out, rel in ((model, "is the model folder"), (tmp_path / "models", "holds the model folder"),
                     (model / "sub", "lies inside the model folder"), (tmp_path / "ckpts", "holds the checkpoint"),
                     (tmp_path / "models" / "." / "export", "is the model folder")):
        with pytest.raises(OutputError, match=f"{rel} .*an input, which is never overwritten; choose another --out"):
            check_out_dir(out, keep)
    link = tmp_path / "link"                    # a symlink to an input is that input
    link.symlink_to(tmp_path / "models")
    with pytest.raises(OutputError, match="holds the model folder"):
        check_apart(link, keep)
    for fine in (tmp_path / "runs" / "a", tmp_path / "ckpts" / "run", tmp_path / "models" / "export2"):
        check_apart(fine, keep)


def test_the_umask_is_read_without_changing_it(tmp_path, monkeypatch):
    """Setting the umask to 0 for a moment, while other threads of the app create folders, made their
    folders world-writable: it is read, never set, and new files still follow it."""
    def no_set(mask):
        raise AssertionError(f"os.umask({mask:o}) called: every thread's new files would get that umask")
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_set)
        with atomic_dir(tmp_path / "run") as d:
            write_json(d / "a.json", {})
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o750
        assert (tmp_path / "run" / "a.json").stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_every_file_of_a_folder_is_synced_before_it_appears(tmp_path, monkeypatch):
    """Files a writer makes with plain open() (an export's config and tokenizer files) reach the disk
    before the swap that publishes the folder, and the swap itself is synced."""
    synced, real = [], os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", record)
    with atomic_dir(tmp_path / "export") as d:
        (d / "config.json").write_text("{}")
        (d / "sub").mkdir()
        (d / "sub" / "vocab.txt").write_text("a")
        tmp = d
    assert {str(tmp / "config.json"), str(tmp / "sub" / "vocab.txt"), str(tmp), str(tmp / "sub")} <= set(synced)
    assert synced[-1] == str(tmp_path)                 # the rename into the parent folder
