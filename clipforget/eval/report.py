"""The paper-style report of one run: columns before/after, Score, α, seconds — JSON and Markdown."""
from __future__ import annotations

from ..data.gallery import display

COLUMN_TITLES = {
    "target": "Target (forget)",
    "retain": "Retain (siblings)",
    "other_styles": "Same subgroup, other styles",
    "other_superclasses": "Other superclasses",
    "other_concepts": "Other concepts",
    "unseen_styles": "Unseen styles (never trained on)",
    "forget_examples": "Forget examples (trained on; not in Score)",
    "target_within_margin": "Target within restore's logit margin (not in Score)",
}


def column_title(name: str) -> str:
    return COLUMN_TITLES.get(name, display(name))


def measured_on(column: dict) -> str:
    """"3 files × 4 views" for a report column; a report written before ``files`` was recorded says
    only how many views its ``images`` counted."""
    if "files" in column:
        files, views = column["files"], column.get("views_per_file")
        return f"{files} file{'s' * (files != 1)}" + (f" × {views} view{'s' * (views != 1)}" if views else "")
    return f"{column['images']} views" if "images" in column else ""


def markdown(report: dict) -> str:
    req = report["request"]
    what = req.get("subgroup") or req["superclass"]
    lines = [f"# clipforget report: forget {what}"
             + (f" in style {req['style']}" if req.get("style") else "") + f" ({req['superclass']})", "",
             f"- method: `{report['method']}`",
             f"- model: `{report.get('model', '?')}`",
             f"- unlearning strength α: {report['alpha']:.2f}",
             f"- Score: **{report['score']:.1f}** (0–100; 100 = target gone, everything else kept)",
             f"- chance level (1 / superclasses): {report.get('chance', float('nan')):.3f}", "",
             "| column | measured on | before | after | after / before |", "|---|---:|---:|---:|---:|"]
    for name, c in {**report["columns"], **report.get("trained_on", {})}.items():
        ratio = c["after"] / c["before"] if c["before"] else float("nan")
        lines.append(f"| {column_title(name)} | {measured_on(c)} | {c['before']:.3f} | {c['after']:.3f} | {ratio:.2f} |")
    lines += ["", "Every column but the forget examples is measured on held-out images: files the method never "
              "trained on (the target's are other drawings of the forgotten subgroup)."]
    secs = report.get("seconds", {})
    if secs:
        lines += ["", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in secs.items()]
    if report.get("retain_subgroups"):
        lines += ["", f"Retain set: {', '.join(report['retain_subgroups'])}"]
    for w in report.get("warnings", []):
        lines += ["", f"> warning: {w}"]
    return "\n".join(lines) + "\n"
