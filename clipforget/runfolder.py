"""The run folder: the one module that knows what a run writes, under which names, and how to
read it back. Everything else (the pipeline, the CLI, certify, the benchmark, the app and its jobs)
calls these functions instead of naming files.

    save_run(run, bundle, "runs/poodle")     # report.json, report.md, delta.safetensors, run.json, export/
    read_run("runs/poodle")                  # RunRecord: delta, α, request, model, gallery (certify)
    scaled_delta("runs/poodle")              # α·Δ: what merging and the continual bench add up
    is_complete(job_dir / "run", alpha_grid=True)   # ... and every point of an app job's α-grid

    write_results(made, bundle, tmp)         # an app job: the results first (delta, run.json) ...
    add_report(run, bundle, run_dir)         # ... the evaluation when it is done (export/, reports)
    has_results(run_dir), is_evaluated(run_dir)

What a run folder holds (every file written atomically). ``save_run`` writes it in one folder swap:
it appears complete or not at all. An app job writes it in three steps, each whole or not at all:
the results (delta, run.json, the α-grid's plan and its calibrated point: one folder swap — the
grids show from then on), the evaluation (export/, report.md, report.json last), the other α
points one by one.

    report.json, report.md     the evaluation (method, request, Score, α, columns) and its table
    delta.safetensors          Δ = θ_u − θ₀ with the keys of model.state_dict(): ``visual.*`` for the
                               image tower, the others for the text tower (CLIP-LIP); the model at
                               strength α is θ₀ + α·Δ (its metadata ``towers`` names which)
    run.json                   config, seed, split, package versions, gallery hash, per-stage history
    export/                    the unlearned model at the reported α as an open_clip folder
    alpha_grid.json            (app jobs) the α-grid's plan: every α point the job encodes the
                               gallery at (for the slider), the gallery's hash, what encoding took
    alpha_grid/alpha-<α>.safetensors  one file per α point, added one at a time after the rest of the
                               folder (each written to a temporary name and renamed: a point is
                               there whole or not at all, so a cancelled or killed α-grid leaves
                               the points finished so far and a job resumes with the missing ones)
    certificate.json, .md      (after ``clipforget certify``) the forgetting certificate

No torch at import: the app's job registry reads run folders before the model stack loads.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .data.request import ForgetRequest
from .io import atomic_dir, check_apart, save_safetensors, write_json, write_text

if TYPE_CHECKING:
    from .models import ClipBundle
    from .pipeline import Run, Unlearned

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
DELTA = "delta.safetensors"
RUN_JSON = "run.json"
EXPORT = "export"
ALPHA_GRID = "alpha_grid"                   # the folder of α points
ALPHA_GRID_JSON = "alpha_grid.json"
LEGACY_ALPHA_GRID = "alpha_grid.safetensors"  # every point in one file (run folders before the folder)
_POINT = re.compile(r"alpha-([0-9]+\.[0-9]{6})\.safetensors")
CERTIFICATE_JSON = "certificate.json"
CERTIFICATE_MD = "certificate.md"


# ---- writing -------------------------------------------------------------------------------------

def save_run(run: "Run", bundle: "ClipBundle", out: str | Path, export: bool = True) -> Path:
    """Write report.json, report.md, delta.safetensors, run.json and (optionally) an open_clip
    export of the unlearned model at the chosen α — all or nothing (atomic folder swap). Refused
    before any work when ``out`` is, holds or lies inside one of the run's inputs (:func:`inputs`), or
    is an existing folder this project did not write (``io.project_folder``)."""
    out = Path(out)
    check_apart(out, inputs(bundle.arch, bundle.pretrained, run.task.gallery))   # never over its inputs
    with atomic_dir(out) as tmp:
        _write_results(run.result, bundle, run.task, run.report.get("seed"), tmp)
        _write_report(run, bundle, tmp, export)
    return out


def inputs(model: str | None = None, pretrained: str | None = None, gallery=None, runs=()) -> list[tuple[str, Path]]:
    """What an output folder must keep apart from (``io.check_apart``): the model's folder
    (``local-dir:``), its checkpoint file (the shipped one of an embedded model by default), the
    folders of the gallery's images and the runs read. Cheap: no model is loaded."""
    from .models import EMBEDDED_MODELS
    keep: list[tuple[str, Path]] = []
    if model and model.startswith("local-dir:"):
        keep.append(("model folder", Path(model.removeprefix("local-dir:"))))
    if not pretrained and model in EMBEDDED_MODELS:
        pretrained = str(EMBEDDED_MODELS[model][1])
    if pretrained and Path(pretrained).is_file():
        keep.append(("checkpoint", Path(pretrained)))
    if gallery is not None:
        keep += [("gallery's image folder", gallery.root / d)
                 for d in sorted({str(Path(it.path).parent) for it in gallery.items})]
    return keep + [("run", Path(r)) for r in runs]


def write_results(unlearned: "Unlearned", bundle: "ClipBundle", folder: str | Path) -> None:
    """The first half of a run folder, before its evaluation: delta.safetensors and run.json (what
    the app's grids and certify need), written into ``folder`` — the temporary folder of the
    caller's ``atomic_dir``, which adds the α-grid's plan and first point before the swap that
    makes them appear together. :func:`add_report` completes it."""
    _write_results(unlearned.result, bundle, unlearned.task, unlearned.seed, Path(folder))


def add_report(run: "Run", bundle: "ClipBundle", run_dir: str | Path, export: bool = True) -> Path:
    """Complete a folder of :func:`write_results` with the evaluation: the export folder, report.md,
    and report.json last — its presence marks the run evaluated. All or nothing: a failure (or a
    cancel) on the way removes what it wrote."""
    run_dir = Path(run_dir)
    try:
        _write_report(run, bundle, run_dir, export)
    except BaseException:
        remove_report(run_dir)
        raise
    return run_dir


def remove_report(run_dir: str | Path) -> None:
    """Remove a run's evaluation (export/, report.md, report.json), leaving its results: what a
    failed :func:`add_report` wrote, or a dead process left."""
    import shutil
    run_dir = Path(run_dir)
    (run_dir / REPORT_JSON).unlink(missing_ok=True)
    (run_dir / REPORT_MD).unlink(missing_ok=True)
    shutil.rmtree(run_dir / EXPORT, ignore_errors=True)


def _write_results(result, bundle: "ClipBundle", task, seed, folder: Path) -> None:
    from .merge import towers
    save_safetensors(result.delta, folder / DELTA, {"method": result.method, "alpha": result.alpha,
                                                    "arch": bundle.arch, "towers": ",".join(towers(result.delta))})
    write_json(folder / RUN_JSON, {
        "method": result.method, "request": result.request, "config": result.config,
        "alpha": result.alpha, "seed": seed, "model": bundle.arch,
        "pretrained": bundle.pretrained, "gallery": task.gallery.name,
        "gallery_hash": task.gallery.content_hash, "versions": versions(),
        "history": result.history, "info": _jsonable(result.info),
        # the split rebuilds the test columns' images with the request and the gallery
        # (data/task.py: deterministic, seeded): bench/external_eval.py evaluates them apart
        "split": dataclasses.asdict(task.split) if task.split is not None else None})


def _write_report(run: "Run", bundle: "ClipBundle", folder: Path, export: bool) -> None:
    from .eval.report import markdown
    from .models import export_open_clip
    from .pipeline import edited_model
    result = run.result
    if export:
        model = edited_model(bundle, result.delta, result.alpha)     # the export is written whole or not at all
        export_open_clip(bundle, {k: v for k, v in model.state_dict().items()}, folder / EXPORT,
                         {"method": result.method, "alpha": result.alpha, "request": result.request})
    write_text(folder / REPORT_MD, markdown(run.report))
    write_json(folder / REPORT_JSON, run.report)        # last: its presence marks the run evaluated


def plan_alpha_grid(run_dir: str | Path, alphas: list[float], gallery_hash: str, images: int) -> None:
    """Record the α points an app job will encode the gallery at (all > 0; α = 0 is the original
    model): what :func:`missing_alpha_points` and :func:`alpha_grid_complete` measure against."""
    write_json(Path(run_dir) / ALPHA_GRID_JSON, {"alphas": [0.0] + [_key(a) for a in alphas],
                                                 "points": len(alphas) + 1, "images": images,
                                                 "gallery_hash": gallery_hash})


def save_alpha_point(run_dir: str | Path, alpha: float, embeddings, gallery_hash: str) -> Path:
    """One α point's gallery embeddings (N, D), written to a temporary name and renamed."""
    path = Path(run_dir) / ALPHA_GRID / f"alpha-{_key(alpha):.6f}.safetensors"
    save_safetensors({"embeddings": embeddings}, path, {"alpha": _key(alpha), "gallery_hash": gallery_hash})
    return path


def finish_alpha_grid(run_dir: str | Path, info: dict) -> None:
    """Add what encoding the α-grid took to its plan (the timings the app and the bench show)."""
    path = Path(run_dir) / ALPHA_GRID_JSON
    plan = json.loads(path.read_text())
    write_json(path, {**plan, **{k: v for k, v in info.items() if k not in plan}})


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

def has_results(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run's results — its delta and run.json: an app job's grids and
    certify need no more. Its evaluation may still be running (:func:`is_evaluated`)."""
    run_dir = Path(run_dir)
    return (run_dir / DELTA).is_file() and (run_dir / RUN_JSON).is_file()


def is_evaluated(run_dir: str | Path) -> bool:
    """Whether the run's report is there (and with it report.md and the export, written before it)."""
    return (Path(run_dir) / REPORT_JSON).is_file()


def is_complete(run_dir: str | Path, alpha_grid: bool = False) -> bool:
    """Whether ``run_dir`` holds a finished run: results and report. With ``alpha_grid``: and
    every α point an app job planned."""
    return (has_results(run_dir) and is_evaluated(run_dir)
            and (not alpha_grid or alpha_grid_complete(run_dir)))


def _key(alpha: float) -> float:
    return round(float(alpha), 6)


def alpha_grid_plan(run_dir: str | Path) -> dict | None:
    """The α-grid's plan (``alphas`` includes 0, the original model), or None without one."""
    path = Path(run_dir) / ALPHA_GRID_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def alpha_grid_points(run_dir: str | Path) -> list[float]:
    """The α points (> 0) whose embeddings are in the run folder, sorted; a file name is only
    ever a whole point (temporary files have other names)."""
    run_dir = Path(run_dir)
    if (run_dir / LEGACY_ALPHA_GRID).is_file():
        from safetensors import safe_open
        with safe_open(str(run_dir / LEGACY_ALPHA_GRID), "pt") as f:
            return sorted(_key(a) for a in f.get_tensor("alphas").tolist())
    folder = run_dir / ALPHA_GRID
    if not folder.is_dir():
        return []
    return sorted(float(m[1]) for p in folder.iterdir() if (m := _POINT.fullmatch(p.name)))


def missing_alpha_points(run_dir: str | Path) -> list[float]:
    """The planned α points (> 0) not encoded yet: what a resumed α-grid computes."""
    plan = alpha_grid_plan(run_dir)
    if plan is None:
        return []
    have = set(alpha_grid_points(run_dir))
    return [a for a in plan["alphas"] if a > 0 and _key(a) not in have]


def alpha_grid_complete(run_dir: str | Path) -> bool:
    """Every planned point is there (an old single-file α-grid is complete by construction)."""
    run_dir = Path(run_dir)
    if (run_dir / LEGACY_ALPHA_GRID).is_file():
        return True
    return alpha_grid_plan(run_dir) is not None and not missing_alpha_points(run_dir)


def has_alpha_grid(run_dir: str | Path) -> bool:
    """At least one α point (> 0) is there."""
    return bool(alpha_grid_points(run_dir))


def has_delta(path: str | Path) -> bool:
    """A run folder with its delta, or a delta file itself (a .safetensors file)."""
    path = Path(path)
    return (path / DELTA).is_file() or (path.is_file() and path.suffix == ".safetensors")


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
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path} is not a readable delta ({e}): it is damaged or no delta; pass a run "
                         "folder written by `clipforget forget`, or its delta.safetensors") from None


def load_text_delta(path: str | Path) -> dict:
    """The text-side entries of a saved delta (keys outside ``visual.``), reading only those: {}
    for a delta of the image tower alone (the common case costs a look at the file's header)."""
    from safetensors import safe_open

    from .merge import is_text_key
    path = Path(path)
    if path.is_dir():
        path = path / DELTA
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if is_text_key(k)}


def scaled_delta(path: str | Path) -> dict:
    """α·Δ of a run at its reported α: the model θ₀ + α·Δ as one delta to add."""
    delta, meta = load_delta(path)
    a = float(meta.get("alpha", 1.0))
    return {k: a * v for k, v in delta.items()}


def load_alpha_grid(run_dir: str | Path, skip=()) -> tuple[dict[float, object], str | None]:
    """({α: gallery embeddings (N, D)} of the points there, except those in ``skip`` — the ones a
    caller already has —, the hash of the gallery they were encoded on)."""
    from safetensors.torch import load_file
    run_dir = Path(run_dir)
    plan = alpha_grid_plan(run_dir) or {}
    made_on = plan.get("gallery_hash")
    skip = {_key(a) for a in skip}
    if (run_dir / LEGACY_ALPHA_GRID).is_file():
        data = load_file(str(run_dir / LEGACY_ALPHA_GRID))
        return ({_key(a): e for a, e in zip(data["alphas"].tolist(), data["embeddings"]) if _key(a) not in skip},
                made_on)
    return ({a: load_file(str(run_dir / ALPHA_GRID / f"alpha-{a:.6f}.safetensors"))["embeddings"]
             for a in alpha_grid_points(run_dir) if a not in skip}, made_on)


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
    """The original model a run was made from (the shipped weights of an embedded model — a file of
    their name — are found in this installation when the recorded path, another installation's, no
    longer exists; other weights that are gone are an error: θ₀ would be another model)."""
    from .models import EMBEDDED_ARCHS, EMBEDDED_MODELS, load_clip
    if record.model in EMBEDDED_MODELS or record.model in EMBEDDED_ARCHS:
        name = EMBEDDED_ARCHS.get(record.model, record.model)
        weights = record.pretrained if record.pretrained and Path(record.pretrained).is_file() else None
        shipped = EMBEDDED_MODELS[name][1]
        if record.pretrained and weights is None and Path(record.pretrained).name != shipped.name:
            raise FileNotFoundError(f"run {record.path} was made from the {name} weights {record.pretrained}, "
                                    f"which no longer exist; pass them with --model {name} --pretrained PATH")
        return load_clip(name, weights, device)
    return load_clip(record.model, record.pretrained, device)
