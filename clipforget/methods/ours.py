"""Ours: forget (LoRA on relative-Fisher layers) -> remind (aligned retain, KD, EMA) -> restore (soup),
with stand-ins [recon] (siblings the original model is made to take for the subgroup) forgotten
alongside the examples so the forgetting reaches drawings the method never saw.

Every stage and ingredient can be switched off for ablations: ``forget.layer_selection``
("relative" | "plain" | "all"), ``forget.use_lora``, ``remind.enabled``, ``remind.align.enabled``,
``remind.kd_weight = 0``, ``remind.ema``, ``restore.enabled``, ``stand_ins.enabled``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..stages.forget import ForgetConfig, forget_stage
from ..stages.remind import RemindConfig, remind_stage
from ..stages.restore import MARGIN_KEY, RestoreConfig, calibration_score, curve_row, restore_stage
from ..stages.synthesize import StandInConfig, stand_ins
from .base import Context, Unlearner, register_method


@dataclass
class EscalateConfig:
    """[recon] When restore leaves D_m's held-out forget images recognised, remind and restore run
    again from the forget stage's weights with a stronger teacher edit (each γ in turn, until D_m's
    forget images are forgotten), and the run that scores best on D_m is kept: the paper's Score
    over the calibration columns, before = α 0, after = the chosen α. Only D_m decides
    (docs/METHOD.md step 2.5; measured in docs/results/sweep-ours.md)."""
    teacher_edits: tuple[float, ...] = ()   # γ to try in turn after remind.teacher.edit; (): off
    min_recognised: float | None = None     # escalate only while D_m's forget accuracy at the chosen α is at
                                            # least this; None: whenever it is above restore's target

    def __post_init__(self):
        if any(g <= 0 for g in self.teacher_edits):
            raise ValueError(f"escalate.teacher_edits must all be > 0, got {self.teacher_edits}")
        if self.min_recognised is not None and not 0 < self.min_recognised <= 1:
            raise ValueError(f"escalate.min_recognised must be in (0, 1] or None, got {self.min_recognised}")

    def wanted(self, recognised: float, target: float) -> bool:
        """Escalate, with D_m's forget accuracy ``recognised`` at the chosen α and restore's ``target``?"""
        if self.min_recognised is not None:
            return recognised >= self.min_recognised - 1e-9
        return recognised > target + 1e-9


def calibration_target(curve: list[dict], alpha: float) -> float:
    """D_m's target accuracy at ``alpha`` as restore counted it (with its logit margin, if any)."""
    row = curve_row(curve, alpha)
    return row.get(MARGIN_KEY, row["target"])


@dataclass
class OursConfig:
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    remind: RemindConfig = field(default_factory=RemindConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)
    stand_ins: StandInConfig = field(default_factory=StandInConfig)
    escalate: EscalateConfig = field(default_factory=EscalateConfig)
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"forget.loop.lr": (3e-4, 1e-3, 3e-3), "forget.top_k_layers": (2, 3, 4),
                    "remind.loop.lr": (2e-4, 5e-4, 1e-3), "remind.forget_weight": (50.0, 150.0, 300.0),
                    "remind.teacher.edit": (0.0, 5.0, 10.0)}


@register_method
class Ours(Unlearner):
    name, Config = "ours", OursConfig
    summary = "three stages of the paper: forget (LoRA on relative-Fisher layers), remind, restore (soup)"
    learned, restores = True, True   # trains its delta; calibrates α itself (restore stage)

    def unlearn(self, ctx: Context) -> None:
        cfg = self.config
        extra = keep = None
        if cfg.stand_ins.enabled:
            with ctx.stage("stand-ins"):
                made = stand_ins(ctx, cfg.stand_ins)
            if made is not None:
                extra = made.inputs
                ctx.info["stand_ins"] = {"images": len(made.inputs), "recognised_before": made.recognised_before,
                                         "recognised_after": made.recognised_after}
                if made.restyled is not None:
                    extra = torch.cat([extra, made.restyled.inputs])
                    ctx.info["stand_ins"].update(restyled=len(made.restyled.inputs),
                                                 restyled_recognised_after=made.restyled.recognised_after)
                if made.keep is not None:
                    keep = made.keep.inputs
                    ctx.info["stand_ins"].update(keep_ins=len(made.keep.inputs),
                                                 keep_ins_recognised_after=made.keep.recognised_after)
        with ctx.stage("forget"):
            forgot = forget_stage(ctx, cfg.forget, extra)
            ctx.info["forget"] = forgot.to_dict()
        edits = cfg.escalate.teacher_edits if cfg.remind.enabled and cfg.restore.enabled else ()
        if edits:               # where a second remind starts: the forget stage's weights and history
            after_forget = {k: v.clone() for k, v in ctx.model.visual.state_dict().items()}
            history = {k: list(v) for k, v in ctx.history.items()}
        self._remind_and_restore(ctx, cfg.remind, forgot, extra, keep)
        tried = []
        for gamma in edits:
            if not cfg.escalate.wanted(calibration_target(ctx.alpha_curve, ctx.alpha),
                                       ctx.info["restore"]["target_accuracy"]):
                break
            kept = self._outcome(ctx)
            ctx.set_visual(after_forget)
            ctx.history = {k: list(v) for k, v in history.items()}
            remind = replace(cfg.remind, teacher=replace(cfg.remind.teacher, edit=gamma))
            self._remind_and_restore(ctx, remind, forgot, extra, keep)
            new = self._outcome(ctx)
            tried.append({"teacher_edit": gamma, "calibration_score": new["score"], "against": kept["score"],
                          "calibration_target": calibration_target(new["curve"], new["alpha"]),
                          "against_target": calibration_target(kept["curve"], kept["alpha"]),
                          "kept": new["score"] > kept["score"]})
            if new["score"] <= kept["score"]:
                self._set_outcome(ctx, kept)
        if tried:
            ctx.info["escalate"] = tried

    def _remind_and_restore(self, ctx: Context, remind, forgot, extra, keep) -> None:
        if remind.enabled:
            with ctx.stage("remind"):
                ctx.info["remind"] = remind_stage(ctx, remind, forgot, extra, extra_keep=keep)
        with ctx.stage("restore"):
            ctx.info["restore"] = restore_stage(ctx, self.config.restore)

    @staticmethod
    def _outcome(ctx: Context) -> dict:
        """What one remind + restore left: θ_u, α, the curve, the history, the stages' info and its
        D_m Score."""
        return {"visual": {k: v.clone() for k, v in ctx.model.visual.state_dict().items()},
                "alpha": ctx.alpha, "curve": ctx.alpha_curve, "history": ctx.history,
                "info": {k: ctx.info[k] for k in ("remind", "restore")},
                "score": calibration_score(ctx.alpha_curve, ctx.alpha, tuple(ctx.task.trained))}

    @staticmethod
    def _set_outcome(ctx: Context, outcome: dict) -> None:
        ctx.set_visual(outcome["visual"])
        ctx.alpha, ctx.alpha_curve, ctx.history = outcome["alpha"], outcome["curve"], outcome["history"]
        ctx.info.update(outcome["info"])
