"""The same functions for scripts: ``gr.api`` endpoints over :class:`~clipforget.app.AppCore`
(``/search``, ``/start_job``, ``/job_status``, ``/cancel``, ``/certify``, ``/certificate``)."""
from __future__ import annotations

import gradio as gr

from .handlers import K, errors


def register(core) -> None:
    """Add the endpoints to the current ``gr.Blocks``."""

    def search_api(query: str, job_id: str = "", alpha: float = -1.0, k: int = K) -> dict:
        """Top-k gallery images for a query: original encoder, and unlearned at α in [0, 1] for a
        finished job (α = -1: the job's α, its calibrated α plus restore's margin)."""
        return errors(core.search)(query, job_id or None, None if alpha == -1 else alpha, int(k))

    def start_job_api(superclass: str, subgroup: str = "", style: str = "", method: str = "ours",
                      retain: str = "") -> dict:
        """Start forgetting in the background; returns the job (id, status). ``retain``:
        comma-separated retain subgroups (empty: the siblings)."""
        job = errors(core.start_job)(superclass, subgroup, style, method,
                                     retain=[r.strip() for r in retain.split(",")] if retain.strip() else None)
        return core.job_status(job.id)

    def certify_api(job_id: str) -> dict:
        """Certify a finished forget job in the background; returns the certify job (id, status)."""
        job = errors(core.start_certificate)(job_id)
        return core.job_status(job.id)

    def certificate_api(job_id: str) -> dict:
        """The saved certificate of a finished forget job ({} when it has none yet)."""
        return errors(core.certificate)(job_id) or {}

    def job_status_api(job_id: str) -> dict:
        """Status, stage and progress of a job; the summary once done."""
        return errors(core.job_status)(job_id)

    def cancel_api(job_id: str) -> dict:
        """Cancel a queued or running job: it stops mid-stage; before its results nothing is saved,
        after them (while it evaluates or computes its α-grid) the results stay."""
        return errors(core.cancel)(job_id)

    gr.api(search_api, api_name="search")
    gr.api(start_job_api, api_name="start_job")
    gr.api(job_status_api, api_name="job_status", concurrency_limit=None)
    gr.api(cancel_api, api_name="cancel", concurrency_limit=None)
    gr.api(certify_api, api_name="certify")
    gr.api(certificate_api, api_name="certificate", concurrency_limit=None)
