"""Ours: forget (LoRA on relative-Fisher layers) -> remind (aligned retain, KD, EMA) -> restore (soup),
with stand-ins [recon] (siblings the original model is made to take for the subgroup) forgotten
alongside the examples so the forgetting reaches drawings the method never saw.

Every stage and ingredient can be switched off for ablations: ``forget.layer_selection``
("relative" | "plain" | "all"), ``forget.use_lora``, ``remind.enabled``, ``remind.align.enabled``,
``remind.kd_weight = 0``, ``remind.ema``, ``restore.enabled``, ``stand_ins.enabled``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..stages.forget import ForgetConfig, forget_stage
from ..stages.remind import RemindConfig, remind_stage
from ..stages.restore import RestoreConfig, restore_stage
from ..stages.synthesize import StandInConfig, stand_ins
from .base import Context, Unlearner, register_method


@dataclass
class OursConfig:
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    remind: RemindConfig = field(default_factory=RemindConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)
    stand_ins: StandInConfig = field(default_factory=StandInConfig)
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
        extra = None
        if cfg.stand_ins.enabled:
            with ctx.stage("stand-ins"):
                made = stand_ins(ctx, cfg.stand_ins)
            if made is not None:
                extra = made.inputs
                ctx.info["stand_ins"] = {"images": len(made.inputs), "recognised_before": made.recognised_before,
                                         "recognised_after": made.recognised_after}
        with ctx.stage("forget"):
            forgot = forget_stage(ctx, cfg.forget, extra)
            ctx.info["forget"] = forgot.to_dict()
        if cfg.remind.enabled:
            with ctx.stage("remind"):
                ctx.info["remind"] = remind_stage(ctx, cfg.remind, forgot, extra)
        with ctx.stage("restore"):
            ctx.info["restore"] = restore_stage(ctx, cfg.restore)
