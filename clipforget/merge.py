"""Merging weights: pure functions over state dicts (no model, no device).

θ(α) = θ₀ + α·(θ_u − θ₀) is the soup of the restore stage; deltas (θ_u − θ₀) are what the
methods return and what continual forgetting adds up. A delta's keys are those of
``model.state_dict()``: ``visual.*`` is the image tower, every other key the text side (the text
tower, its projection; :func:`image_part` / :func:`text_part`). Merging is per key, so an image
delta and a text delta simply sum to one delta that edits both towers.
"""
from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]

VISUAL = "visual."          # the image tower's prefix in model.state_dict()


def is_text_key(key: str) -> bool:
    """A key of ``model.state_dict()`` outside the image tower (the text side)."""
    return not key.startswith(VISUAL)


def image_part(d: StateDict) -> StateDict:
    """The image-tower entries of a delta (keys keep their ``visual.`` prefix)."""
    return {k: v for k, v in d.items() if not is_text_key(k)}


def text_part(d: StateDict) -> StateDict:
    """The text-side entries of a delta (every key not under ``visual.``)."""
    return {k: v for k, v in d.items() if is_text_key(k)}


def towers(keys) -> list[str]:
    """Which towers a delta (or its keys) edits: a sub-list of ["image", "text"]."""
    keys = list(keys)
    return [t for t, hit in (("image", any(not is_text_key(k) for k in keys)),
                             ("text", any(is_text_key(k) for k in keys))) if hit]


def delta(theta0: StateDict, theta1: StateDict) -> StateDict:
    """θ₁ − θ₀ over the floating-point entries that changed shape-compatibly (others are skipped)."""
    return {k: (theta1[k].float() - theta0[k].float()) for k in theta1
            if k in theta0 and theta0[k].is_floating_point() and not torch.equal(theta0[k], theta1[k])}


def apply_delta(theta0: StateDict, d: StateDict, alpha: float = 1.0) -> StateDict:
    """θ₀ + α·Δ; entries without a delta are returned unchanged (same tensor). A delta of another
    model (a key θ₀ lacks, a tensor of another shape) is a ``ValueError`` that says so."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (unlearning strength) must be in [0, 1], got {alpha}")
    out = dict(theta0)
    for k, v in d.items():
        if k not in theta0 or theta0[k].shape != v.shape:
            what = "is not a weight of this model" if k not in theta0 else \
                f"has shape {tuple(v.shape)}, the model's weight {tuple(theta0[k].shape)}"
            raise ValueError(f"delta entry {k!r} {what}: the delta was made from another model; apply it "
                             "to the model its run was made from (its run.json names it: --model, --pretrained)")
        out[k] = (theta0[k].float() + alpha * v.to(theta0[k].device)).to(theta0[k].dtype)
    return out


def write_delta(weights: StateDict, base: StateDict, d: StateDict, alpha: float) -> None:
    """In place: ``weights[k]`` ← base[k] + α·Δ[k] for every entry of ``d``, computed as
    :func:`apply_delta` does (in float, then the weight's dtype), so a model's own parameters can be
    moved along the soup line without new tensors (the α-grid, text embeddings at α)."""
    for k, v in d.items():
        b = base[k]
        weights[k].copy_((b.float() + alpha * v.to(b.device)).to(b.dtype))


def interpolate(theta0: StateDict, theta1: StateDict, alpha: float) -> StateDict:
    """The soup θ₀ + α(θ₁ − θ₀); non-float entries (BN counters) come from θ₁."""
    return {k: theta0[k] + alpha * (theta1[k] - theta0[k]) if theta0[k].is_floating_point() else theta1[k]
            for k in theta0}


def sum_deltas(deltas: list[StateDict], weights: list[float] | None = None) -> StateDict:
    """Continual forgetting by task arithmetic: Σ_i w_i Δ_i (w_i = 1 by default)."""
    weights = weights or [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise ValueError("one weight per delta")
    out: StateDict = {}
    for w, d in zip(weights, deltas):
        for k, v in d.items():
            out[k] = out.get(k, 0) + w * v.float()
    return out


def average_deltas(deltas: list[StateDict]) -> StateDict:
    """The plain average of the unlearned models θ_i, expressed as a delta: mean_i Δ_i."""
    return sum_deltas(deltas, [1.0 / len(deltas)] * len(deltas))
