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


def _umask_now() -> int | None:
    """The process umask read from /proc (Linux), without setting it; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


# elsewhere the umask can only be read by setting it; done once, at import, not while the app's
# threads create folders (a moment of umask 0 makes their folders world-writable)
_UMASK_AT_IMPORT = _umask_now()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = os.umask(0o022)
    os.umask(_UMASK_AT_IMPORT)


def _umask() -> int:
    """The umask to give new files and folders the modes the user expects (mkstemp / mkdtemp make
    them 0600 / 0700); read without changing the process umask, which other threads rely on."""
    mask = _umask_now()
    return _UMASK_AT_IMPORT if mask is None else mask


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
        _fsync_dir(path.parent)          # the rename itself is durable: report.json marks a run done
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


def _absolute(path: str | Path) -> Path:
    """``path`` made absolute and normalised ('.', '..' resolved), symlinks kept: '.' gets a name."""
    return Path(os.path.abspath(path))


def project_folder(path: str | Path) -> bool:
    """Whether the existing folder ``path`` may be replaced by :func:`atomic_dir`: an empty folder,
    or one this project wrote — a run folder (its run.json or report.json: clipforget/runfolder.py)
    or an open_clip export (its open_clip_config.json has a "clipforget" entry: models.py)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if not any(path.iterdir()) or (path / "run.json").is_file() or (path / "report.json").is_file():
        return True
    try:
        return "clipforget" in json.loads((path / "open_clip_config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _check_target(path: Path) -> None:
    """Raise :class:`OutputError` unless the folder ``path`` (absolute) may be written by a swap."""
    cwd = Path(os.getcwd())
    real = Path(os.path.realpath(path))
    if real == cwd or real in cwd.parents:
        raise OutputError(errno.EINVAL, f"the output folder {path} is the current folder or holds it; "
                          "choose a new folder for --out (e.g. runs/NAME)")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(errno.EEXIST, f"{path} exists and is not a folder; choose another --out or remove it")
    if path.exists() and not project_folder(path):
        raise OutputError(errno.EEXIST, f"{path} exists and is not a clipforget run folder; choose another "
                          "--out or remove it")


def check_apart(path: str | Path, keep=()) -> None:
    """Raise :class:`OutputError` when the output folder ``path`` is, holds or lies inside one of
    the inputs in ``keep`` — (what, path) pairs: a model folder, a checkpoint, a gallery's image
    folders, a run —, which writing it would replace or mix into (inputs are never overwritten)."""
    out = Path(os.path.realpath(path))
    for what, p in keep:
        q = Path(os.path.realpath(p))
        rel = "is" if out == q else "holds" if out in q.parents else "lies inside" if q in out.parents else None
        if rel:
            raise OutputError(errno.EINVAL, f"the output folder {path} {rel} the {what} {p}, an input, which is "
                              "never overwritten; choose another --out outside the inputs")


def check_out_dir(path: str | Path, keep=()) -> Path:
    """What writing the folder ``path`` with :func:`atomic_dir` checks, made before any work: it is
    writable, apart from the inputs in ``keep`` (:func:`check_apart`), not the current folder, and
    new, empty or a folder this project wrote. Returns it absolute."""
    check_writable(path)
    path = _absolute(path)
    check_apart(path, keep)
    _check_target(path)
    return path


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``: what a folder swap publishes is on disk first."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling folder; on success it replaces ``path`` (an existing ``path`` is
    only removed once the new one is complete, and only when it is empty or a folder this project
    wrote: :func:`project_folder`; anything else is refused before the work starts). Every file is
    synced to disk before the swap. On failure nothing is left behind."""
    path = _absolute(path)
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise _explain(path, e) from e
    try:
        yield tmp
        _sync_tree(tmp)
        if path.exists() or path.is_symlink():
            _check_target(path)          # it may have appeared while the work ran
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
        _fsync_dir(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError):
            raise
        raise _explain(path, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
