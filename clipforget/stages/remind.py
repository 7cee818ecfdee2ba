"""Stage 2 — remind: fine-tune on retain images aligned to the pre-training statistics.

1. Alignment [paper Eq. 4]: each retain image gets a perturbation that matches the ORIGINAL
   tower's BatchNorm statistics (LayerNorm moments on a ViT) — :mod:`.align`.
2. Fine-tune on the aligned images: CLIP loss against their own texts + knowledge distillation from
   the frozen original, L = L_clip + λ·τ²·KL(softmax(z₀/τ) ‖ softmax(z/τ)) over the zero-shot
   logits of the superclass prompts [paper; form recon]. With ``teacher.edit`` > 0 [recon] the
   distillation target is the *edited* original, ĝ₀(x) − γ·relu(r(x) − b)·t_c (r: the original's
   own subgroup readout; :mod:`.teacher`), on the retain rows and (``teacher.forget_rows``)
   the forget examples and stand-ins: the fine-tuned layers are taught what the original itself
   takes for the subgroup, not only which files were shown.
3. EMA of the weights [paper Eq. 5]: θ_ema ← β θ_ema + (1−β) θ, θ_ema starting at the ORIGINAL
   weights; the model ends as θ_ema. Few steps: 5–20 help, 30+ hurt (the paper's ablation).
   [recon] The stage stops early once the retain views are classified as well as by the original
   model (within ``retain_tolerance``) while the forget views stay forgotten; ``scope`` limits
   fine-tuning to the layers the forget stage edited, so the rest of the tower keeps what it knew.

:func:`remind_stage` reads top to bottom with named pieces: :func:`training_rows`, the shared
:class:`~clipforget.losses.RetainLoss`, :func:`teacher_outputs`, :func:`trained_parameters`,
:class:`EMA` and :class:`BestCheckpoint`; what the forget stage did comes in as a
:class:`~clipforget.stages.forget.ForgetResult`.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..embed import ENCODE_BATCH, to_input
from ..losses import RetainLoss, distillation
from ..train.loop import LoopConfig, optimize
from ..trunk import Prepared, TrunkEncoder
from .align import AlignConfig, NormStats, align_images
from .forget import FORGET_LOSSES, ForgetResult, forget_objective
from .synthesize import feature_stand_ins
from .teacher import SubgroupReadout, Teacher, TeacherConfig, original_features, teacher_of, teacher_outputs

log = logging.getLogger(__name__)


REMIND_SCOPES = ("all", "late", "forget_layers")


@dataclass
class RemindConfig:
    enabled: bool = True
    align: AlignConfig = field(default_factory=AlignConfig)
    kd_weight: float = 1.0           # λ; 0 disables distillation
    kd_tau: float = 2.0              # τ
    feature_kd_weight: float = 50.0  # + w·mean(1 − cos(g(x), g₀(x))) on retain images: keep their embeddings [recon]
    forget_weight: float = 150.0     # μ·(forget objective on D_f) keeps D_f forgotten while reminding [recon]; 0: off
    forget_loss: str = "probability"  # that objective: similarity | probability (see stages/forget.py)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)   # what distillation pulls towards
    scope: str = "forget_layers"     # what is fine-tuned [recon]: all (the image tower) | late (the layers the forget
                                     # stage ranked) | forget_layers (those it edited)
    ema: bool = True
    ema_decay: float = 0.5           # β; 1.0 keeps the original weights
    batch_size: int = 64
    keep_batch: int | None = None    # keep-in and replay rows distilled each step (a third batch); None: batch_size
    bn_mode: str = "eval"            # BatchNorm during fine-tuning: eval | train
    forget_goal: float | None = None  # forget accuracy (train views, the forget stage's margin) that still counts as
                                     # forgotten while reminding; None: chance level (restore then holds D_m at
                                     # its own restore.target_accuracy, 0 by default) [recon]
    retain_tolerance: float | None = 0.02  # stop once retain accuracy (train views) is within this of the
                                     # original's and the forget set is still forgotten [recon]; None: all steps
    check_calibration: bool = False  # "still forgotten" also asks it of D_m's held-out forget images (never trained
                                     # on; they only say when to stop and which check to keep) [recon]
    check_retain: str = "train"      # the retain accuracy the stop and the best check read: train (the
                                     # training rows) | calibration (D_m's held-out retain files) [recon]
    style_matched_weight: float = 1.0  # retain rows drawn in a style of the forget examples are sampled this
                                     # many times as often as the others (1: uniform) [recon]
    feature_stand_ins: int = 64      # retain rows turned into stand-ins in the trunk's output (the input of the
                                     # first trained layer), forgotten with the others (:func:`feature_stand_ins`) [recon];
                                     # 0: off (docs/results/sweep-ours.md: at chance 98 -> 110 of 169)
    feature_radius: float = 0.5      # their bound: ‖δ‖₂ ≤ this · ‖h‖₂ per row (1.0 measured: level, sweep-ours.md)
    feature_styles: str = "any"      # which retain rows become feature stand-ins: any | others (first those drawn
                                     # in a style none of the forget examples has, the styles the examples leave
                                     # out; then the rest) [recon]
    replay: bool = True              # distil the task's replay files (files no column reads, task.replay) towards
                                     # the teacher too, like keep-ins: the rest of the world stays as it was [recon];
                                     # docs/results/sweep-ours.md: mean Score +1.9 over 169, other concepts kept
    rank: int | None = None          # the live weights' change in each trained matrix kept to this rank
                                     # (projected on its top singular directions after every step) [recon];
                                     # with EMA the returned average of those can have a higher rank;
                                     # None: unrestricted
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=100, lr=5e-4, grad_clip=1.0, check_every=2))

    def __post_init__(self):
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.kd_weight < 0 or self.kd_tau <= 0 or self.feature_kd_weight < 0:
            raise ValueError("kd_weight and feature_kd_weight must be >= 0 and kd_tau > 0")
        if self.bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {self.bn_mode!r}")
        if self.scope not in REMIND_SCOPES:
            raise ValueError(f"scope must be one of {REMIND_SCOPES}, got {self.scope!r}")
        if self.forget_weight < 0:
            raise ValueError(f"forget_weight must be >= 0, got {self.forget_weight}")
        if self.forget_goal is not None and not 0 <= self.forget_goal <= 1:
            raise ValueError(f"forget_goal must be in [0, 1] or None, got {self.forget_goal}")
        if self.retain_tolerance is not None and not 0 <= self.retain_tolerance <= 1:
            raise ValueError(f"retain_tolerance must be in [0, 1] or None, got {self.retain_tolerance}")
        if self.feature_stand_ins < 0 or self.feature_radius <= 0:
            raise ValueError("feature_stand_ins must be >= 0 and feature_radius > 0")
        if self.feature_styles not in ("any", "others"):
            raise ValueError(f"feature_styles must be 'any' or 'others', got {self.feature_styles!r}")
        if self.keep_batch is not None and self.keep_batch < 1:
            raise ValueError(f"keep_batch must be >= 1 or None (batch_size), got {self.keep_batch}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1 or None, got {self.rank}")
        if self.style_matched_weight <= 0:
            raise ValueError(f"style_matched_weight must be > 0, got {self.style_matched_weight}")
        if self.check_retain not in ("train", "calibration"):
            raise ValueError(f"check_retain must be 'train' or 'calibration', got {self.check_retain!r}")
        if self.forget_loss not in FORGET_LOSSES:
            raise ValueError(f"forget_loss must be one of {FORGET_LOSSES}, got {self.forget_loss!r}")


# ---- the pieces of the fine-tuning -----------------------------------------------------------------

@dataclass
class TrainingRows:
    """What remind fine-tunes on: the retain images and/or their aligned copies."""
    parts: list[torch.Tensor]     # image tensors, the rows in this order
    source: torch.Tensor          # the retain image each row comes from (its caption and superclass)
    n_check: int                  # progress is checked on the first n_check rows (the real images when
                                  # they are trained on)


def training_rows(retain: torch.Tensor, aligned: torch.Tensor, chosen: torch.Tensor, was_aligned: bool,
                  keep_originals: bool) -> TrainingRows:
    """``aligned``: copies of the retain images ``chosen`` (when alignment ran)."""
    n = len(retain)
    if not was_aligned:
        return TrainingRows([retain], torch.arange(n), n)
    if keep_originals:
        return TrainingRows([retain, aligned], torch.cat([torch.arange(n), chosen]), n)
    return TrainingRows([aligned], chosen, len(chosen))


def alignment_reference(task) -> torch.Tensor:
    """[0, 1] images whose LayerNorm moments a ViT's retain images are aligned to (it has no BatchNorm
    statistics): the task's replay files, which no column reads, else the retain images themselves —
    never D_m, which only restore reads."""
    views = task.replay if len(task.replay_items) else task.retain
    return views.images.float() / 255.0


def in_example_styles(task, source: torch.Tensor) -> torch.Tensor:
    """Whether each training row (``source``: the retain image of each) is drawn in a style one of
    the forget examples has (bool)."""
    styles = {it.style for it in task.forget.items}
    return torch.tensor([task.retain.items[i].style in styles for i in source.tolist()], dtype=torch.bool)


def style_matched(task, source: torch.Tensor, weight: float) -> torch.Tensor | None:
    """Sampling weights of the training rows (``source``: the retain image of each row): ``weight`` for
    the rows drawn in a style one of the forget examples has, 1 for the rest; None when uniform."""
    if weight == 1.0:
        return None
    return 1.0 + (weight - 1.0) * in_example_styles(task, source).float()


def stand_in_sources(ctx, source: torch.Tensor, k: int, styles: str) -> torch.Tensor:
    """Which of the training rows (``source``: the retain image of each) become feature stand-ins:
    ``k`` at random ("any"), or ("others") first the rows drawn in a style none of the forget examples
    has, at random, then the rest: stand-ins in the styles the examples do not show."""
    if styles == "any":
        return ctx.sample_indices(len(source), k)
    other = ~in_example_styles(ctx.task, source)
    order = torch.randperm(len(source), generator=ctx.generator)
    return torch.cat([order[other[order]], order[~other[order]]])[:k]


def trained_parameters(visual: nn.Module, scope: str, forget: ForgetResult | None) -> tuple[list[str], list]:
    """(layer names, parameters) fine-tuned for ``scope``: the layers the forget stage edited
    ("forget_layers") or ranked ("late"), else — or without a forget stage — the whole tower."""
    names = {"late": forget.candidates, "forget_layers": forget.layers}.get(scope) if forget else None
    if names:
        mods = dict(visual.named_modules())
        return list(names), [p for n in names for p in mods[n].parameters(recurse=False)]
    return [n for n, _ in visual.named_parameters()], list(visual.parameters())


class EMA:
    """θ_ema ← β·θ_ema + (1 − β)·θ after every step [paper Eq. 5], starting at the ORIGINAL weights
    θ₀, over the weights fine-tuning moves (``moving``, names in ``live``, the tower's state dict
    whose tensors share storage with its parameters). The stage ends as θ_ema."""

    def __init__(self, theta0: dict, live: dict, moving: list[str], decay: float):
        self.weights = {k: v.detach().clone().float() for k, v in theta0.items()}
        self.live, self.moving, self.decay = live, moving, decay

    def update(self, step: int = 0) -> None:
        with torch.no_grad():
            for k in self.moving:
                self.weights[k].mul_(self.decay).add_(self.live[k].float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside the block the tower holds the EMA weights, the ones the stage returns: a check
        measures those, not the live ones being trained."""
        with torch.no_grad():
            saved = {n: self.live[n].clone() for n in self.moving}
            for n in self.moving:
                self.live[n].copy_(self.weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self.moving:
                    self.live[n].copy_(saved[n])

    def final_state(self) -> dict:
        """The tower's state dict with the EMA weights (in the tower's dtypes) where fine-tuning moved
        them, the live values elsewhere (e.g. BatchNorm statistics an earlier stage updated)."""
        moving = set(self.moving)
        return {k: self.weights[k].to(v.dtype) if k in moving else v for k, v in self.live.items()}


class LowRankChange:
    """Keeps what fine-tuning changes in each weight matrix (2-D or more: linear and conv weights,
    read as out × rest) of rank at most ``rank`` from where the stage started: after every step the
    change is replaced by its truncated SVD [recon]."""

    def __init__(self, live: dict, names: list[str], rank: int):
        self.live, self.rank = live, rank
        self.start = {k: live[k].detach().clone() for k in names if live[k].dim() >= 2}

    def __call__(self, step: int = 0) -> None:
        with torch.no_grad():
            for k, w0 in self.start.items():
                d = (self.live[k] - w0).reshape(len(w0), -1).float()
                u, s, vh = torch.linalg.svd(d, full_matrices=False)
                r = self.rank
                self.live[k].copy_(w0 + ((u[:, :r] * s[:r]) @ vh[:r]).view_as(w0).to(w0.dtype))


class BestCheckpoint:
    """The last check that kept D_f forgotten with the best retain accuracy: the live weights and
    the EMA at that step, to go back to when the step budget runs out after a worse check."""

    def __init__(self, live: dict, moving: list[str], ema: EMA | None):
        self.live, self.moving, self.ema = live, moving, ema
        self.step: int | None = None
        self.retain_acc = -1.0
        self._live: dict = {}
        self._ema: dict | None = None

    def __bool__(self) -> bool:
        return self.step is not None

    def offer(self, step: int, retain_acc: float, forgotten: bool) -> None:
        if forgotten and retain_acc >= self.retain_acc:
            self.step, self.retain_acc = step, retain_acc
            self._live = {n: self.live[n].detach().clone() for n in self.moving}
            self._ema = None if self.ema is None else {n: self.ema.weights[n].clone() for n in self.moving}

    def restore(self) -> None:
        with torch.no_grad():
            for n in self.moving:
                self.live[n].copy_(self._live[n])
                if self.ema is not None:
                    self.ema.weights[n].copy_(self._ema[n])


# ---- the stage ------------------------------------------------------------------------------------

def remind_stage(ctx, cfg: RemindConfig, forget: ForgetResult | None = None,
                 extra_forget: torch.Tensor | None = None, extra_keep: torch.Tensor | None = None) -> dict:
    """Fine-tune ``ctx.model.visual`` on the retain images (and aligned copies): retain loss,
    distillation from the original, the forget objective, EMA. ``forget`` is what the forget stage
    did: its layers set ``cfg.scope`` and its margin what still counts as forgotten (None: the
    whole tower, no margin). ``extra_forget``: more forget images (stand-ins); ``extra_keep``: images
    only distilled towards the teacher (keep-ins, :func:`..synthesize.keep_ins`)."""
    task = ctx.task
    if not len(task.retain):
        log.warning("remind skipped: the retain set is empty")
        return {"skipped": "empty retain set"}
    retain = task.retain.images       # uint8; float copies are made a batch at a time
    reference = alignment_reference(task) if NormStats(ctx.original.visual).kind == "layernorm" else None
    n = len(retain)
    cap = cfg.align.max_images
    chosen = torch.arange(n) if cap is None or n <= cap else ctx.sample_indices(n, cap).sort().values
    aligned, info = align_images(ctx, retain[chosen].float() / 255.0, cfg.align, reference)
    rows = training_rows(retain, aligned, chosen, bool(info.get("aligned")), cfg.align.keep_originals)
    device = ctx.bundle.device
    retain_loss = RetainLoss(ctx)
    row_source = rows.source.to(device)
    with torch.no_grad():
        x_all = torch.cat([to_input(ctx.bundle, part[i:i + ENCODE_BATCH], ctx.model)
                           for part in rows.parts for i in range(0, len(part), ENCODE_BATCH)])
    original = teacher_outputs(ctx, x_all)
    teacher = original
    del aligned
    rows.parts.clear()
    visual = ctx.model.visual
    names, params = trained_parameters(visual, cfg.scope, forget)
    # only the trained layers change: the stages before them run once per image
    enc = TrunkEncoder(visual, names, enabled=cfg.bn_mode == "eval")
    forget_in = ctx.inputs(task.forget)
    forget_labels = task.superclass_labels(task.forget)
    if extra_forget is not None:        # stand-ins (:mod:`.synthesize`) are forget images too
        forget_in = torch.cat([forget_in, extra_forget.to(forget_in)])
        forget_labels = torch.cat([forget_labels, torch.full((len(extra_forget),), task.target_index,
                                                             dtype=forget_labels.dtype)])
    retain_x, forget_x = enc.prepare(x_all), enc.prepare(forget_in)
    forget_feats = original_features(ctx, forget_in) if cfg.teacher.edit > 0 else None
    n_fit = len(forget_in)                 # the teacher's threshold is fitted on the image rows alone
    if cfg.feature_stand_ins and task.request.subgroup is not None:
        sources = retain_x[stand_in_sources(ctx, rows.source[:rows.n_check], cfg.feature_stand_ins,
                                            cfg.feature_styles)]                       # real retain rows
        made = None
        if sources.start and sources.start == forget_x.start:    # where the trained layers read them
            made = feature_stand_ins(ctx, sources, cfg.feature_radius)
        else:
            log.warning("feature stand-ins skipped: no frozen trunk before the trained layers to perturb the output of")
        if made is not None:
            forget_x = Prepared(torch.cat([forget_x.data, made.prepared.data]), forget_x.start)
            forget_labels = torch.cat([forget_labels, torch.full((len(made.features),), task.target_index,
                                                                 dtype=forget_labels.dtype)])
            if forget_feats is not None:
                forget_feats = torch.cat([forget_feats, made.features.to(forget_feats)])
            info["feature_stand_ins"] = {"rows": len(made.features), "recognised_before": made.recognised_before,
                                         "recognised_after": made.recognised_after}
    forget_teacher = readout = None
    if cfg.teacher.edit > 0:               # the original's features are encoded once, then edited
        readout = SubgroupReadout.fit(ctx, forget_feats[:n_fit], original.features, cfg.teacher.quantile,
                                      cfg.teacher.threshold, cfg.teacher.gate, cfg.teacher.readout)
    if readout is not None:
        teacher = teacher_of(ctx, original.features, cfg.teacher.edit, readout)
        if cfg.teacher.forget_rows:
            forget_teacher = teacher_of(ctx, forget_feats, cfg.teacher.edit, readout)
        info["teacher"] = {"threshold": readout.threshold,
                           "retain_rows_gated": int((readout.gate(original.features) > 0).sum())}
    if cfg.replay and len(task.replay):
        replay = ctx.inputs(task.replay)
        extra_keep = replay if extra_keep is None else torch.cat([extra_keep, replay.to(extra_keep)])
        info["replay"] = len(replay)
    keep_teacher = None
    if extra_keep is not None:
        keep_feats = original_features(ctx, extra_keep)
        keep_teacher = teacher_of(ctx, keep_feats, cfg.teacher.edit, readout)
        if readout is not None:
            info["teacher"]["keep_rows_gated"] = int((readout.gate(keep_feats) > 0).sum())
    keep_x = enc.prepare(extra_keep) if extra_keep is not None else None
    calib = task.calib.get("target") if cfg.check_calibration else None
    calib_x = enc.prepare(ctx.inputs(calib.views)) if calib is not None else None
    del x_all                             # the trunk's output replaces it (or is it, when there is no split)
    for p in params:
        p.requires_grad_(True)
    visual.train(cfg.bn_mode == "train")
    live = visual.state_dict()            # shares storage with the parameters
    trained = [k for k, v in visual.named_parameters() if any(v is p for p in params)]
    # what fine-tuning changes, so what the EMA averages: the trained weights, and in train-mode
    # BatchNorm its running statistics too
    moving = trained + ([k for k, v in live.items() if v.is_floating_point() and k not in trained]
                        if cfg.bn_mode == "train" else [])
    ema = EMA(ctx.theta0, live, moving, cfg.ema_decay) if cfg.ema else None

    def distilled(loss, feats, target: Teacher, rows):
        """``loss`` plus distillation of ``feats`` (normalised) towards ``target``'s ``rows``: the
        zero-shot logits' KL and the features' cosine."""
        if cfg.kd_weight > 0:
            z = ctx.logit_scale * feats @ ctx.superclass_emb.t()
            loss = loss + cfg.kd_weight * distillation(z, target.logits[rows], cfg.kd_tau)
        if cfg.feature_kd_weight > 0:
            loss = loss + cfg.feature_kd_weight * (1 - (feats * target.features[rows]).sum(-1)).mean()
        return loss

    weights = style_matched(task, rows.source, cfg.style_matched_weight)

    def loss_fn(step):
        idx = (ctx.sample_indices(len(retain_x), cfg.batch_size) if weights is None else
               torch.multinomial(weights, min(cfg.batch_size, len(weights)), generator=ctx.generator)).to(device)
        img = enc(retain_x[idx])
        loss = distilled(retain_loss.of_features(img, row_source[idx]), img, teacher, idx)
        if cfg.forget_weight > 0 or forget_teacher is not None:
            fi = ctx.sample_indices(len(forget_x), cfg.batch_size)
            feats = enc(forget_x[fi])
            loss = loss + cfg.forget_weight * forget_objective(ctx, feats, cfg.forget_loss)
            if forget_teacher is not None:
                loss = distilled(loss, feats, forget_teacher, fi.to(device))
        if keep_x is not None:
            ki = ctx.sample_indices(len(keep_x), cfg.keep_batch or cfg.batch_size)
            loss = distilled(loss, enc(keep_x[ki]), keep_teacher, ki.to(device))
        return loss

    held_out = task.calib.get("retain") if cfg.check_retain == "calibration" else None
    if held_out is not None:              # D_m's retain files, never trained on
        held_in, retain_labels = ctx.inputs(held_out.views), held_out.labels
        check_x = enc.prepare(held_in)
        retain_goal = ctx.superclass_accuracy(original_features(ctx, held_in), retain_labels)
    else:
        check_x = retain_x[:rows.n_check]
        retain_labels = task.superclass_labels(task.retain)[rows.source[:rows.n_check]]
        retain_goal = float((original.logits[:rows.n_check].argmax(-1).cpu() == retain_labels).float().mean())
    retain_goal -= cfg.retain_tolerance or 0
    forget_goal = ctx.chance if cfg.forget_goal is None else cfg.forget_goal
    margin = forget.margin if forget is not None else 0.0       # forgotten as the forget stage defined it
    checks: list[dict] = []
    best = BestCheckpoint(live, moving, ema)

    def check(step):
        """Measures the weights remind would return (the EMA's), records the check and offers it as the
        best; True once both goals are met (the loop then stops)."""
        if cfg.retain_tolerance is None or step == 0:
            return False
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            r = ctx.superclass_accuracy(enc.encode(check_x), retain_labels)
            f = ctx.superclass_accuracy(enc.encode(forget_x), forget_labels, margin)
            if calib_x is not None:       # the held-out forget images of D_m must stay forgotten too
                f = max(f, ctx.superclass_accuracy(enc.encode(calib_x), calib.labels, margin))
        checks.append({"step": step, "retain_acc": r, "forget_acc": f})
        best.offer(step, r, f <= forget_goal)
        return r >= retain_goal and f <= forget_goal

    low_rank = LowRankChange(live, trained, cfg.rank) if cfg.rank is not None else None

    def after_step(step):
        if low_rank is not None:
            low_rank(step)
        if ema is not None:
            ema.update(step)

    history = optimize(params, loss_fn, cfg.loop, "remind", ctx.callbacks, should_stop=check,
                       after_step=after_step)
    for p in params:
        p.requires_grad_(False)
    if cfg.retain_tolerance is not None and history and (not checks or checks[-1]["step"] < len(history)):
        check(len(history))               # the budget ran out after the last check: the final weights are checked too
    last = checks[-1] if checks else None
    if best and last is not None and (last["forget_acc"] > forget_goal or last["retain_acc"] < best.retain_acc) \
            and len(history) > best.step:
        best.restore()                    # the step budget ran out after a better check: go back to it
        info["restored_check"] = best.step
    if ema is not None:
        visual.load_state_dict(ema.final_state())
    ctx.log_history("remind", history)
    info.update(steps=len(history), ema=cfg.ema, train_images=len(retain_x), checks=checks, retain_goal=retain_goal,
                forget_goal=forget_goal)
    return info
