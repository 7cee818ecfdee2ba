"""Atomic artifact writing: a file or folder appears complete or not at all."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path


class OutputError(OSError):
    """An artifact could not be written; the message says where and what to do."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _explain(path: Path, e: OSError) -> OutputError:
    if isinstance(e, OutputError):
        return e
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(errno.ENOSPC, f"disk full while writing {path}; free some space or write "
                           "elsewhere (--out / --runs-dir). Nothing was left half-written.")
    if e.errno in (errno.EACCES, errno.EPERM):
        return OutputError(e.errno, f"cannot write to {path}: permission denied; choose a writable "
                           "folder (--out / --runs-dir)")
    if e.errno == errno.EROFS:
        return OutputError(e.errno, f"cannot write to {path}: the file system is read-only; choose a "
                           "writable folder (--out / --runs-dir)")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return OutputError(e.errno, f"cannot write to {path}: a part of that path is a file, not a folder; "
                           "choose another output folder (--out / --runs-dir)")
    return OutputError(e.errno, f"cannot write {path}: {e.strerror or e}")


def check_writable(path: str | Path) -> Path:
    """Fail in a second, not after an hour of training: raise :class:`OutputError` unless a file can
    be created where ``path`` (a file or folder, existing or not) will be written. Probes by
    creating and removing a temporary file in the nearest existing folder, so it is right for
    root, read-only mounts and full disks too (``os.access`` is not)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == path:
            probe = path.parent          # an existing file that will be replaced
        else:
            raise OutputError(errno.ENOTDIR, f"cannot write to {path}: {probe} is a file, not a folder; "
                              "choose another output folder (--out / --runs-dir)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".clipforget-probe.", suffix=".tmp", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise _explain(path, e) from e
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield the path of an empty temporary file next to ``path`` for a writer that takes a file
    name; once the block ends, the file is synced to disk and renamed to ``path``. On failure
    nothing is left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _explain(path, e) from e
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OutputError):
            raise
        raise _explain(path, e) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb"):
    """Yield a file object for a temporary file next to ``path``; rename on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:    # atomic_path explains an OSError
        yield f


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def save_figure(fig, path: str | Path, **kwargs) -> None:
    """A matplotlib figure as an atomic file (the format follows the suffix)."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    write_bytes(path, buf.getvalue())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):          # tensors, numpy arrays and scalars (no torch import here)
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Written straight from the tensors' memory (no serialised copy of the whole file in RAM)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={k: str(v) for k, v in (metadata or {}).items()})
        except Exception as e:      # safetensors' own error type; it names the OS error it hit
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise _explain(Path(path), OSError(int(code[1]), os.strerror(int(code[1])))) from e


def safetensors_header(name: str, shape: tuple[int, ...], metadata: dict | None = None) -> bytes:
    """The head of a safetensors file holding one float32 tensor ``name`` of ``shape`` (the 8-byte
    length and the JSON header, padded to 8 bytes): write it, then stream the tensor's bytes after
    it, for a tensor too large to hold in memory at once."""
    nbytes = 4 * math.prod(shape)
    header = json.dumps({"__metadata__": {k: str(v) for k, v in (metadata or {}).items()},
                         name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the byte offset its data starts at (only the header is
    read: the data can then be read a slice at a time with plain reads)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling folder; on success it replaces ``path`` (an existing ``path`` is
    only removed once the new one is complete). On failure nothing is left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise _explain(path, e) from e
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            path.rename(old)
            try:
                tmp.rename(path)
            except OSError:
                old.rename(path)         # the previous result stays where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError):
            raise
        raise _explain(path, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
