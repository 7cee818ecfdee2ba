"""Stage 3 — restore: the model soup θ(α) = θ₀ + α·(θ_u − θ₀) with a calibrated α.

α ∈ [0, 1] is the unlearning strength (0: original, 1: fully unlearned; the paper's Table 5 writes
the same line with its α = 1 − ours). [recon of Eq. 6] On the calibration set D_m, α is the grid
value that maximises the mean accuracy of the non-target columns while the target accuracy stays
at or below the forget target (default: 0; None: chance) — the largest such α within ``keep_tolerance`` of
that best, plus a small ``margin``. With ``target_margin`` > 0 the target must be forgotten by that
logit margin (:data:`MARGIN_KEY` in the curve). The whole α-curve is kept in the result.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..alphas import nearest
from ..eval.score import score
from ..eval.zeroshot import column_accuracy
from ..merge import apply_delta
from ..train.loop import emit
from ..trunk import TrunkEncoder

log = logging.getLogger(__name__)

# the α-curve's key for D_m's target accuracy counted with ``RestoreConfig.target_margin`` (a view
# still within the margin of its superclass counts as recognised); not a column of the Score
MARGIN_KEY = "target_within_margin"


@dataclass
class RestoreConfig:
    enabled: bool = True                 # False: α = 1 (no soup)
    grid_points: int = 11                # α on an even grid over [0, 1]
    keep_tolerance: float = 0.01         # prefer a larger α while it keeps mean calibration accuracy within this [recon]
    margin: float = 0.1                  # added to the chosen α (capped at 1): D_m holds few forget
                                         # images, so the boundary α forgets the test views less reliably [recon]
    target_accuracy: float | None = 0.0   # forget target on D_m; None: chance level. 0: D_m holds only a few
                                          # forget images, and at chance one unseen view in 20 could survive [recon]
    infeasible: str = "least_target"     # no α reaches the target: "least_target" (the α with the lowest
                                         # target accuracy) | "score" (the α with the best Score on D_m, α 0
                                         # included: an edit that forgets D_m too little to pay for what it
                                         # costs the other columns is backed off) [recon]
    target_margin: float = 0.0           # > 0: D_m's target views count as forgotten only when their
                                         # superclass's logit is more than this below the best other's
                                         # (the forget stage's test, ``forget.margin``); 0: the argmax [recon]

    def __post_init__(self):
        if self.grid_points < 2:
            raise ValueError(f"grid_points must be >= 2, got {self.grid_points}")
        if not 0 <= self.keep_tolerance <= 1:
            raise ValueError(f"keep_tolerance must be in [0, 1], got {self.keep_tolerance}")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")
        if self.target_accuracy is not None and not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in [0, 1], got {self.target_accuracy}")
        if self.infeasible not in ("least_target", "score"):
            raise ValueError(f"infeasible must be 'least_target' or 'score', got {self.infeasible!r}")
        if self.target_margin < 0:
            raise ValueError(f"target_margin must be >= 0 (logits), got {self.target_margin}")


def alpha_grid(points: int) -> list[float]:
    return [round(i / (points - 1), 6) for i in range(points)]


@torch.no_grad()
def alpha_curve(ctx, delta: dict, alphas: list[float], text_delta: dict | None = None,
                target_margin: float = 0.0) -> list[dict]:
    """Accuracy at each α of every calibration column and of the trained-on forget examples (shown
    beside the held-out target, never used to choose α); the model is left at θ_u. ``delta``: the
    image tower's (keys of ``model.visual``), ``text_delta``: the text side's (keys of the model;
    a method that edits the text tower). The stages before the first one the image delta touches
    are computed once for all α (exact; without an image delta, the whole image embedding). With
    a text delta the class embeddings are recomputed at each α with the text tower θ₀ + α·Δ.
    ``target_margin`` > 0 (logits) adds :data:`MARGIN_KEY`: the target counted with that margin."""
    from ..eval.zeroshot import TextCache
    theta_u = {k: v.clone() for k, v in ctx.model.visual.state_dict().items()}
    text_u = {k: v.clone() for k, v in ctx.text_weights().items()} if text_delta else None
    enc = TrunkEncoder(ctx.model.visual, delta.keys())
    columns = {**ctx.task.calib, **ctx.task.trained}
    prepared = {name: enc.prepare(ctx.inputs(col.views)) for name, col in columns.items()}
    fixed = {name: enc.encode(p) for name, p in prepared.items()} if not delta else None
    curve = []
    for i, a in enumerate(alphas):
        ctx.set_visual(apply_delta(ctx.theta0, delta, a))
        texts = ctx.texts
        if text_delta:
            ctx.set_text(apply_delta(ctx.text_theta0, text_delta, a))
            texts = TextCache(ctx.bundle, ctx.model)        # class embeddings of this α, once per class list
        row = {"alpha": a}
        for name, col in columns.items():
            emb = fixed[name] if fixed is not None else enc.encode(prepared[name])
            row[name] = column_accuracy(ctx.bundle, col, texts, image_emb=emb)
            if name == "target" and target_margin > 0:
                row[MARGIN_KEY] = column_accuracy(ctx.bundle, col, texts, image_emb=emb,
                                                  margin=target_margin / ctx.logit_scale)
        curve.append(row)
        emit(ctx.callbacks, stage="restore", step=i + 1, total=len(alphas), fraction=(i + 1) / len(alphas))
    ctx.set_visual(theta_u)
    if text_u is not None:
        ctx.set_text(text_u)
    return curve


def curve_row(curve: list[dict], alpha: float) -> dict:
    """The curve at its grid point nearest ``alpha``."""
    at = nearest([r["alpha"] for r in curve], alpha)
    return next(r for r in curve if r["alpha"] == at)


def calibration_score(curve: list[dict], alpha: float, ignore=()) -> float:
    """The paper's Score over D_m's columns at ``alpha`` against α = 0 (the original), from the curve."""
    before, after = curve_row(curve, 0.0), curve_row(curve, alpha)
    cols = [k for k in before if k not in ("alpha", MARGIN_KEY, *ignore)]
    return score({k: {"before": before[k], "after": after[k]} for k in cols})


def choose_alpha(curve: list[dict], target: float, tolerance: float = 0.0,
                 ignore: tuple[str, ...] = ("forget_examples",), infeasible: str = "least_target",
                 target_key: str = "target") -> tuple[float, bool]:
    """(α, feasible): among the α with target accuracy <= ``target``, the largest whose mean
    non-target accuracy is within ``tolerance`` of the best such α's (a stronger soup unless it
    costs more than that). Infeasible everywhere -> with ``infeasible="least_target"`` the α with
    the lowest target accuracy (largest on ties), with ``"score"`` the α with the best
    :func:`calibration_score` (smallest on ties; α 0 scores (K − 1)/K of 100). Columns in
    ``ignore`` (the trained-on forget examples) are shown, never used. ``target_key``: the target's
    accuracy that must reach ``target`` (:data:`MARGIN_KEY`: counted with the logit margin)."""
    def keep(row):
        vals = [v for k, v in row.items() if k not in ("alpha", "target", MARGIN_KEY, *ignore)]
        return sum(vals) / len(vals) if vals else 0.0
    feasible = [r for r in curve if r[target_key] <= target + 1e-9]
    if feasible:
        best = max(keep(r) for r in feasible)
        return max(r["alpha"] for r in feasible if keep(r) >= best - tolerance - 1e-9), True
    if infeasible == "score":
        return max(curve, key=lambda r: (calibration_score(curve, r["alpha"], ignore), -r["alpha"]))["alpha"], False
    return min(curve, key=lambda r: (r[target_key], -r["alpha"]))["alpha"], False


def restore_stage(ctx, cfg: RestoreConfig) -> dict:
    target = ctx.chance if cfg.target_accuracy is None else cfg.target_accuracy
    delta = ctx.current_delta()
    if not cfg.enabled:
        ctx.alpha = 1.0
        return {"alpha": 1.0, "soup": False}
    curve = alpha_curve(ctx, delta, alpha_grid(cfg.grid_points), ctx.text_delta(), cfg.target_margin)
    key = MARGIN_KEY if cfg.target_margin > 0 else "target"
    best, feasible = choose_alpha(curve, target, cfg.keep_tolerance, tuple(ctx.task.trained), cfg.infeasible, key)
    within = f" (within a logit margin of {cfg.target_margin:g})" if cfg.target_margin > 0 else ""
    if not feasible:
        log.warning("no α on the grid brings calibration forget accuracy%s to <= %.3f; using α=%.2f", within, target, best)
    alpha = min(1.0, round(best + cfg.margin, 6)) if feasible else best
    ctx.alpha, ctx.alpha_curve = alpha, curve
    info = {"alpha": alpha, "calibrated_alpha": best, "feasible": feasible, "target_accuracy": target}
    if cfg.target_margin > 0:
        info["target_margin"] = cfg.target_margin
    if not feasible:      # the report says so: held-out drawings of the subgroup are likely still recognised
        info["warning"] = (f"restore: no α brought the held-out calibration images of the subgroup to accuracy "
                           f"{target:.2f}{within}; α {alpha:.2f} is the one " + ("with the best Score on them" if
                           cfg.infeasible == "score" else "that forgets them most") + ", and other drawings of the "
                           "subgroup may still be recognised (more forget examples may reach them)")
    return info
