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
