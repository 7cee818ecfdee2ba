"""A finished job's results for the page: the metrics table, the α-curve plot, the downloads, the
certificate panel. Read from the job's run folder (:mod:`clipforget.runfolder`)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

from .. import runfolder
from ..eval.report import column_title, measured_on
from ..io import atomic_file
from .views import alpha_label


def metrics_table(report: dict) -> dict:
    """The report's columns (accuracy before / after) and the Score."""
    columns = {**report["columns"], **report.get("trained_on", {})}     # held out, then the trained-on examples
    rows = [[column_title(n), measured_on(c), round(c["before"], 3), round(c["after"], 3),
             round(c["after"] / c["before"], 2) if c["before"] else None] for n, c in columns.items()]
    return {"headers": ["column", "measured on", "before", "after", "ratio"], "rows": rows,
            "score": report["score"], "alpha": report["alpha"], "method": report["method"]}


def alpha_plot(report: dict, path: Path, calibrated: float | None = None) -> Path:
    """PNG of calibration accuracy per column vs α, the α used marked (made once); ``calibrated``:
    the calibrated α it was chosen from, marked too when known (the α used adds restore's margin)."""
    if path.is_file():
        return path
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.subplots()
    curve = report.get("alpha_curve") or []
    if curve:
        xs = [r["alpha"] for r in curve]
        for name in [k for k in curve[0] if k != "alpha"]:
            style = {"target": {"lw": 2.5, "color": "#dc2626"},
                     "forget_examples": {"lw": 1.6, "color": "#dc2626", "ls": ":"}}.get(name, {"lw": 1.6})
            ax.plot(xs, [r[name] for r in curve], label=column_title(name), **style)
    else:
        ax.text(0.5, 0.5, f"method {report['method']!r} has no α-curve (α = {report['alpha']:.2f})",
                ha="center", va="center", transform=ax.transAxes)
    ax.axvline(report["alpha"], color="k", ls="--", lw=1)
    right = report["alpha"] > 0.6          # the label on the side with room for it
    ax.annotate(alpha_label(report["alpha"], calibrated), (report["alpha"], 0.04), xytext=(-4 if right else 4, 0),
                textcoords="offset points", fontsize=8, ha="right" if right else "left")
    if calibrated is not None and abs(calibrated - report["alpha"]) > 1e-9:
        ax.axvline(calibrated, color="gray", ls=":", lw=1)
    if report.get("chance"):
        ax.axhline(report["chance"], color="gray", ls=":", lw=1, label="chance")
    ax.set(xlabel="unlearning strength α (0 = original, 1 = unlearned)", ylabel="zero-shot accuracy",
           ylim=(0, 1.02), xlim=(0, 1), title="calibration set: accuracy vs α")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with atomic_file(path) as f:
        f.write(buf.getvalue())
    return path


def downloads(run_dir: Path, zpath: Path) -> dict:
    """Paths of the downloadable artifacts: the open_clip export folder zipped, the reports."""
    files = runfolder.report_files(run_dir)
    if not zpath.is_file():
        zip_export(files["export"], zpath)
    return {"model_zip": str(zpath), "report_md": str(files["report_md"]), "report_json": str(files["report_json"])}


def zip_export(export_dir: str | Path, zpath: str | Path) -> Path:
    """An export folder as a zip whose files are ``export/<name>`` (written atomically). Unzipped
    anywhere, ``export/`` loads like the folder itself (:func:`clipforget.models.export_open_clip`)."""
    with atomic_file(zpath) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(Path(export_dir).iterdir()):
            z.write(p, f"export/{p.name}")
    return Path(zpath)
