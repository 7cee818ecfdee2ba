"""What the app says, as text and Markdown: the model line, the retain summary, a job's status,
the warning about a non-loopback host. Pure functions of plain data; no gradio, no torch."""
from __future__ import annotations

import ipaddress

from ..data.gallery import display
from ..jobs import Job

CERTIFY_INVITATION = ("Not certified yet: **Certify** runs a relearning attack, linear probes and "
                      "retrieval checks in the background.")


def model_status(model_name: str, gallery, loaded: bool, error: BaseException | None, bundle=None) -> str:
    """The page's model line: loading, failed (why), or what runs where."""
    if not loaded:
        return f"Loading model `{model_name}` and encoding the gallery…"
    if error is not None:
        return f"The app could not start: {error}"
    return (f"Model `{model_name}` ({bundle.arch}, {bundle.image_size} px) · gallery `{gallery.name}`: "
            f"{len(gallery)} images, {len(gallery.superclasses())} superclasses\n\n"
            + device_line(bundle.device, bundle.precision))


def device_line(device, precision: str) -> str:
    """Where the app's model runs, for the page: ``Runs on `cuda:0` (NVIDIA H200) · fp32``."""
    name = ""
    if getattr(device, "type", str(device)) == "cuda":
        import torch
        name = f" ({torch.cuda.get_device_name(device)})"
    return f"Runs on `{device}`{name} · {precision}"


def bind_warning(host: str) -> str | None:
    """What to tell the operator when the app will listen beyond this machine (None: loopback)."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
        return (f"binding to {host}: the app (and starting jobs) is reachable from other machines and has "
                "no authentication; use --host 127.0.0.1 unless you trust everyone on that network")
    except ValueError:
        return (f"binding to host name {host!r}: the app has no authentication; make sure that name is not "
                "reachable by people you do not trust (--host 127.0.0.1 keeps it on this machine)")


def retain_markdown(info: dict) -> str:
    """What a job would forget and keep (:func:`clipforget.app.retain.describe_retain`)."""
    def styles(key):
        return ", ".join(info[key]) or "—"
    kept = ", ".join(f"{display(n)} ({c})" for n, c in info["retain_counts"].items()) or "none"
    lines = [f"**Forget** {info['label']} ({info['request']['superclass']}): {len(info['forget'])} images. "
             f"The method trains on {len(info['examples'])} (styles {styles('example_styles')}); "
             f"{len(info['held_out'])} are held out to calibrate and to test whether it forgot the subgroup, "
             f"not just its examples (styles {styles('held_out_styles')}).",
             f"**Retain** {info['retain_images']} images of {len(info['retain_subgroups'])} subgroups: {kept}.",
             f"Also checked, not trained on: {info['other_superclass_images']} images of other superclasses "
             "and the other-concepts pool."]
    lines += [f"⚠️ {w}" for w in info["warnings"]]
    return "\n\n".join(lines)


def _done_forget(job: Job) -> str:
    s = job.summary
    grid = (f"α-grid {s['alpha_grid_points']} points in {s.get('alpha_grid_seconds', float('nan')):.1f}s"
            if "alpha_grid_points" in s else f"α-grid incomplete ({s.get('unfinished', 'not computed')})")
    score = f"Score {s['score']:.1f}" if s.get("score") is not None else "no Score (not evaluated)"
    return f"Job `{job.id[:8]}` {job.label}: done in {job.seconds:.0f}s · {score} · α = {s.get('alpha', 1.0):.2f} · {grid}"


def alpha_label(used: float, calibrated: float | None = None) -> str:
    """The strength a job's results are at, for people. The job's α (report.json's ``alpha``) is
    the calibrated α plus restore's margin (capped at 1), not the calibrated α itself
    (clipforget/stages/restore.py): ``calibrated`` (the job summary's ``calibrated_alpha``) is
    named beside it when known."""
    if calibrated is None:
        return f"α used = {used:.2f}"
    if abs(used - calibrated) < 1e-9:
        return f"α used = calibrated α = {used:.2f}"
    return f"α used = {used:.2f} (calibrated α {calibrated:.2f} + restore's margin)"


def alpha_points_text(state: dict, job: Job) -> str:
    """Which α points the slider can show: ``α points ready: 0, 0.4, 1.0 (computing 3 more)``;
    for a job that ended without the rest, why they are missing."""
    ready = ", ".join(f"{a:g}" for a in state["ready"])
    more = state["computing"]
    if state["complete"] or not more:
        return f"α points ready: {ready} (all {len(state['ready'])})"
    if job.active:
        return f"α points ready: {ready} (computing {more} more)"
    return f"α points ready: {ready} ({more} not computed: {job.summary.get('unfinished', 'the job ended')})"


def _done_certify(job: Job) -> str:
    return f"Job `{job.id[:8]}` {job.label}: done in {job.seconds:.0f}s · {job.summary.get('verdict', '')}"


DONE_TEXT = {"forget": _done_forget, "certify": _done_certify}     # per job kind


def progress_text(job: Job, width: int = 20) -> str:
    """A running job's progress as one line of text: a bar of the stage's fraction, the stage with
    its step count and time left, the stages so far. Text, not an animated overlay: a browser
    repainting an animation shares the CPU with the job on a small machine."""
    filled = round(max(0.0, min(1.0, job.fraction)) * width)
    return (f"`{'█' * filled}{'·' * (width - filled)}` {100 * job.fraction:3.0f} % · {status_text(job)} "
            f"· stage {len(job.stages)}")


def status_text(job: Job) -> str:
    if job.status == "queued":
        return f"Job `{job.id[:8]}` {job.label}: queued"
    if job.status == "running":
        return f"Job `{job.id[:8]}` {job.label}: running · {job.where} · {job.seconds:.0f}s"
    if job.status == "ready":
        return f"Job `{job.id[:8]}` {job.label}: results ready, still running · {job.where} · {job.seconds:.0f}s"
    if job.status == "done":
        return DONE_TEXT.get(job.kind, _done_forget)(job)
    if job.status == "cancelled":
        return f"Job `{job.id[:8]}` {job.label}: cancelled (nothing saved)"
    return f"Job `{job.id[:8]}` {job.label}: failed · {job.error}"
