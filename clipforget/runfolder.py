"""The run folder: the one module that knows what a run writes, under which names, and how to
read it back. Everything else (the pipeline, the CLI, certify, the benchmark, the app and its jobs)
calls these functions instead of naming files.

    save_run(run, bundle, "runs/poodle")     # report.json, report.md, delta.safetensors, run.json, export/
    read_run("runs/poodle")                  # RunRecord: delta, α, request, model, gallery (certify)
    scaled_delta("runs/poodle")              # α·Δ: what merging and the continual bench add up
    is_complete(job_dir / "run", alpha_grid=True)   # an app job's result also holds its α-grid

What a run folder holds (all written atomically; the folder appears complete or not at all):

    report.json, report.md     the evaluation (method, request, Score, α, columns) and its table
    delta.safetensors          Δ = θ_u − θ₀ of the image tower; the model at strength α is θ₀ + α·Δ
    run.json                   config, seed, package versions, gallery hash, per-stage history
    export/                    the unlearned model at the reported α as an open_clip folder
    alpha_grid.safetensors     (app jobs) gallery embeddings at the slider's α points, and
    alpha_grid.json            what encoding them took
    certificate.json, .md      (after ``clipforget certify``) the forgetting certificate

No torch at import: the app's job registry reads run folders before the model stack loads.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .data.request import ForgetRequest
from .io import atomic_dir, save_safetensors, write_json, write_text

if TYPE_CHECKING:
    from .models import ClipBundle
    from .pipeline import Run

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
DELTA = "delta.safetensors"
RUN_JSON = "run.json"
EXPORT = "export"
ALPHA_GRID = "alpha_grid.safetensors"
ALPHA_GRID_JSON = "alpha_grid.json"
CERTIFICATE_JSON = "certificate.json"
CERTIFICATE_MD = "certificate.md"


# ---- writing -------------------------------------------------------------------------------------

def save_run(run: "Run", bundle: "ClipBundle", out: str | Path, export: bool = True) -> Path:
    """Write report.json, report.md, delta.safetensors, run.json and (optionally) an open_clip
    export of the unlearned model at the chosen α — all or nothing (atomic folder swap)."""
    from .eval.report import markdown
    from .models import export_open_clip
    from .pipeline import edited_model
    out = Path(out)
    result = run.result
    with atomic_dir(out) as tmp:
        write_json(tmp / REPORT_JSON, run.report)
        write_text(tmp / REPORT_MD, markdown(run.report))
        save_safetensors(result.delta, tmp / DELTA, {"method": result.method, "alpha": result.alpha,
                                                     "arch": bundle.arch})
        write_json(tmp / RUN_JSON, {
            "method": result.method, "request": result.request, "config": result.config,
            "alpha": result.alpha, "seed": run.report.get("seed"), "model": bundle.arch,
            "pretrained": bundle.pretrained, "gallery": run.task.gallery.name,
            "gallery_hash": run.task.gallery.content_hash, "versions": versions(),
            "history": result.history, "info": _jsonable(result.info)})
        if export:
            model = edited_model(bundle, result.delta, result.alpha)
            export_open_clip(bundle, {k: v for k, v in model.state_dict().items()}, tmp / EXPORT,
                             {"method": result.method, "alpha": result.alpha, "request": result.request})
    return out


def save_alpha_grid(run_dir: str | Path, grid, alphas: list[float], info: dict, gallery_hash: str) -> None:
    """An app job's α-grid: gallery embeddings (A, N, D) at ``alphas`` (all > 0; α = 0 is the
    original model) and what encoding them took."""
    import torch
    run_dir = Path(run_dir)
    save_safetensors({"embeddings": grid, "alphas": torch.tensor(alphas, dtype=torch.float64)},
                     run_dir / ALPHA_GRID, {"gallery_hash": gallery_hash, "note": "alpha=0 is the original model"})
    write_json(run_dir / ALPHA_GRID_JSON, {**info, "alphas": [0.0] + list(alphas), "points": len(alphas) + 1,
                                           "gallery_hash": gallery_hash})


def save_certificate(run_dir: str | Path, cert: dict, markdown: str) -> tuple[Path, Path]:
    """certificate.json and certificate.md next to the run, each written atomically."""
    run_dir = Path(run_dir)
    write_text(run_dir / CERTIFICATE_MD, markdown)
    write_json(run_dir / CERTIFICATE_JSON, cert)       # last: its presence marks a complete certificate
    return run_dir / CERTIFICATE_JSON, run_dir / CERTIFICATE_MD


def versions() -> dict:
    import open_clip
    import peft
    import torch

    from . import __version__
    return {"clipforget": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def _jsonable(obj):
    import torch
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


# ---- reading -------------------------------------------------------------------------------------

def is_complete(run_dir: str | Path, alpha_grid: bool = False) -> bool:
    """Whether ``run_dir`` holds a finished run (and, with ``alpha_grid``, an app job's α-grid)."""
    run_dir = Path(run_dir)
    return (run_dir / REPORT_JSON).is_file() and (not alpha_grid or has_alpha_grid(run_dir))


def has_alpha_grid(run_dir: str | Path) -> bool:
    """The α-grid is the last thing an app job writes into its run folder."""
    return (Path(run_dir) / ALPHA_GRID).is_file()


def has_delta(path: str | Path) -> bool:
    """A run folder with its delta, or a delta file itself."""
    path = Path(path)
    return (path / DELTA).is_file() or path.is_file()


def read_report(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / REPORT_JSON).read_text())


def report_files(run_dir: str | Path) -> dict[str, Path]:
    """The run's downloadable files: the reports and the export folder."""
    run_dir = Path(run_dir)
    return {"report_md": run_dir / REPORT_MD, "report_json": run_dir / REPORT_JSON, "export": run_dir / EXPORT}


def load_delta(path: str | Path) -> tuple[dict, dict]:
    """A delta saved by :func:`save_run` (a run folder or the file) and its metadata (method,
    alpha, arch)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_dir():
        path = path / DELTA
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def scaled_delta(path: str | Path) -> dict:
    """α·Δ of a run at its reported α: the model θ₀ + α·Δ as one delta to add."""
    delta, meta = load_delta(path)
    a = float(meta.get("alpha", 1.0))
    return {k: a * v for k, v in delta.items()}


def load_alpha_grid(run_dir: str | Path) -> tuple[object, list[float], str | None]:
    """(embeddings (A, N, D), their α values, the hash of the gallery they were encoded on)."""
    from safetensors.torch import load_file
    run_dir = Path(run_dir)
    data = load_file(str(run_dir / ALPHA_GRID))
    made_on = json.loads((run_dir / ALPHA_GRID_JSON).read_text()).get("gallery_hash")
    return data["embeddings"], [round(float(a), 6) for a in data["alphas"]], made_on


def load_certificate(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / CERTIFICATE_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def certificate_md(run_dir: str | Path) -> Path:
    return Path(run_dir) / CERTIFICATE_MD


@dataclass
class RunRecord:
    """What the certificate needs from a run folder: the delta, α, the request, where it ran."""
    path: Path
    delta: dict
    alpha: float
    request: ForgetRequest
    method: str
    model: str
    pretrained: str | None
    gallery: str
    gallery_hash: str | None


def read_run(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    rec_path = run_dir / RUN_JSON
    if not rec_path.is_file() or not (run_dir / DELTA).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it needs {RUN_JSON} and {DELTA} "
                                "(written by `clipforget forget --out DIR`)")
    rec = json.loads(rec_path.read_text())
    delta, meta = load_delta(run_dir)
    alpha = float(rec.get("alpha", meta.get("alpha", 1.0)))
    return RunRecord(run_dir, delta, alpha, ForgetRequest.from_dict(rec["request"]), rec.get("method", "?"),
                     rec.get("model", "embedded"), rec.get("pretrained"), rec.get("gallery", "embedded"),
                     rec.get("gallery_hash"))


def load_run_model(record: RunRecord, device: str = "auto") -> "ClipBundle":
    """The original model a run was made from (the embedded model's weights are found in this
    installation when the recorded path no longer exists)."""
    from .models import EMBEDDED, EMBEDDED_ARCH, load_clip
    if record.model in (EMBEDDED, EMBEDDED_ARCH):
        weights = record.pretrained if record.pretrained and Path(record.pretrained).is_file() else None
        return load_clip(EMBEDDED, weights, device)
    return load_clip(record.model, record.pretrained, device)
