"""The verdict (every check against its threshold), the certificate's Markdown, and saving it into
the run folder."""
from __future__ import annotations

from pathlib import Path

from .. import runfolder
from ..runfolder import load_certificate  # noqa: F401 - read back where it is written
from .config import Thresholds


def checks(cert: dict, th: Thresholds) -> list[dict]:
    """One row per verdict check: the measured value, the threshold, passed."""
    rl, pr, rt = cert["relearn"], cert["probes"], cert["retrieval"]
    out = []

    def add(name, value, limit, text, op="<="):
        ok = value is not None and (value <= limit if op == "<=" else value >= limit)
        out.append({"name": name, "value": value, "threshold": limit, "op": op, "passed": ok, "text": text})

    add("target accuracy", rl["curve"][0]["forget_sample"], th.max_target_accuracy,
        "zero-shot accuracy of the forgotten subgroup's held-out images, before any relearning")
    add("relearning", rl["recovery"], th.max_relearn_recovery,
        f"best accuracy within {rl['steps']} relearning steps / the original model's accuracy")
    coarse = [q for q in rt["queries"] if q["kind"] == "coarse"]
    ratio = _ratio(coarse[0]["after"], coarse[0]["before"]) if coarse else None
    add("coarse-label retrieval", ratio, th.max_coarse_recall_ratio,
        f"recall@{rt['k']} for '{coarse[0]['query']}' after / before" if coarse else "no coarse query")
    cp = pr["coarse"]
    add("coarse-class probe", _ratio(cp.get("after"), cp.get("before")), th.max_coarse_probe_ratio,
        "forgotten images a linear coarse-class probe still recognises, after / before")
    kp = cert["kept"]
    add("rest kept", _ratio(kp["after"], kp["before"]), th.min_kept_ratio,
        f"zero-shot accuracy on {kp['images']} held-out images of other superclasses, after / before", op=">=")
    return out


def _ratio(after, before):
    if after is None or before is None:
        return None
    return after / before if before > 0 else (0.0 if after == 0 else 1.0)


def verdict_line(cert: dict) -> str:
    """One line: CERTIFIED / NOT CERTIFIED, then every check as measured vs its threshold."""
    parts = []
    for c in cert["checks"]:
        v = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        op = c.get("op", "<=")
        shown = op if c["passed"] else {"<=": ">", ">=": "<"}[op]
        parts.append(f"{c['name']} {v} {shown} {c['threshold']:.2f} "
                     f"{'pass' if c['passed'] else 'FAIL'}")
    head = "CERTIFIED" if cert["certified"] else "NOT CERTIFIED"
    return f"{head}: {cert['label']} — " + "; ".join(parts)


# ---- report -----------------------------------------------------------------------------------------

def markdown(cert: dict) -> str:
    rl, pr, rt = cert["relearn"], cert["probes"], cert["retrieval"]
    f3 = _fmt
    half = rl["steps_to_half_original"]
    back = half if half is not None else f"not within {rl['steps']}"
    lines = [f"# Forgetting certificate: {cert['label']} ({cert['request']['superclass']})", "",
             f"**{cert['verdict']}**", "",
             f"- run: `{cert['run']}` · method `{cert['method']}` · model `{cert['model']}` · "
             f"α = {cert['alpha']:.2f}" + ("" if cert["alpha"] == cert["run_alpha"] else
                                          f" (the run's calibrated α is {cert['run_alpha']:.2f})"),
             "", "## Checks", "", "| check | measured | threshold | result |", "|---|---:|---:|---|"]
    for c in cert["checks"]:
        bound = "≥" if c.get("op") == ">=" else "≤"
        lines.append(f"| {c['name']} — {c['text']} | {f3(c['value'])} | {bound} {c['threshold']:.2f} | "
                     f"{'pass' if c['passed'] else '**fail**'} |")
    lines += ["", "## Relearning attack", "",
              f"Split by {rl['split']}: {rl['split_note']}. Sample: {', '.join(rl['sample'])} ({rl['sample_views']} "
              f"views); evaluation: {', '.join(rl['evaluated_on'])} ({rl['evaluation_views']} views). Control: the "
              f"same fine-tuning on `{rl['control']}` ({rl['control_views']} views). Every batch is half these "
              f"views, half {rl['anchor_images']} images of other superclasses with their own labels; Adam lr "
              f"{rl['lr']}, whole image tower, BatchNorm statistics frozen.", "",
              f"The original model's accuracy on these images: {f3(rl['original_accuracy'])} "
              f"(chance {rl['chance']:.3f}). Steps until half of it is back: {back}. Best recovery within "
              f"{rl['steps']} steps: {f3(rl['recovery'])} of the original's accuracy (control fine-tuning: "
              f"{f3(rl['control_recovery'])}).",
              "", "| step | target acc., relearning on the subgroup | target acc., control fine-tuning |",
              "|---:|---:|---:|"]
    lines += [f"| {r['step']} | {f3(r['forget_sample'])} | {f3(r['control_sample'])} |" for r in rl["curve"]]
    lines += ["", "## Linear probes on frozen image embeddings (held-out evaluation)", "",
              "| probe | before (original) | after (unlearned) | note |", "|---|---:|---:|---|"]
    sp, cp = pr["subgroup"], pr["coarse"]
    if "skipped" in sp:
        lines.append(f"| subgroup vs siblings | – | – | skipped: {sp['skipped']} |")
    else:
        lines.append(f"| subgroup vs siblings (balanced accuracy) | {f3(sp['before'])} | {f3(sp['after'])} | "
                     f"leave-one-{sp['split']}-out, {sp['folds']} folds, chance 0.5 |")
    if "skipped" in cp:
        lines.append(f"| coarse class on the forgotten images | – | – | skipped: {cp['skipped']} |")
    else:
        lines.append(f"| coarse class on the forgotten images (share recognised) | {f3(cp['before'])} | "
                     f"{f3(cp['after'])} | fitted without them; rest of the superclass: "
                     f"{f3(cp['before_rest_of_superclass'])} → {f3(cp['after_rest_of_superclass'])} |")
    kp = cert["kept"]
    lines += ["", "## The rest kept", "",
              f"Zero-shot superclass accuracy on held-out views of {kp['images']} images of the other superclasses: "
              f"{f3(kp['before'])} before, {f3(kp['after'])} after."]
    lines += ["", f"## Retrieval: recall@{rt['k']} of the forgotten images ({rt['relevant']} of {rt['pool']} "
              "gallery images)", "", "| query | kind | before | after |", "|---|---|---:|---:|"]
    lines += [f"| {q['query']} | {q['kind']} | {f3(q['before'])} | {f3(q['after'])} |" for q in rt["queries"]]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in cert["seconds"].items())]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def save_certificate(cert: dict, run_dir: str | Path) -> tuple[Path, Path]:
    """certificate.json and certificate.md next to the run, each written atomically."""
    return runfolder.save_certificate(run_dir, cert, markdown(cert))
