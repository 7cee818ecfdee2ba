"""Stage 2 — remind: fine-tune on retain images aligned to the pre-training statistics.

1. Alignment [paper Eq. 4]: an additive perturbation δ per retain image, optimised so that,
   through the ORIGINAL image tower, each BatchNorm layer's batch mean/variance of its input
   matches that layer's running mean/variance:
       min_δ Σ_l ‖μ_l(x+δ) − μ_l^BN‖₂ + ‖σ²_l(x+δ) − σ²_l^BN‖₂     (x+δ clamped to [0, 1]).
   Towers without BatchNorm (ViT) [recon]: the same with each LayerNorm's input moments matched to
   moments measured on a reference image set (``vit_fallback="layernorm"``), or no alignment
   (``"skip"``), with a logged note either way.
2. Fine-tune on the aligned images: CLIP loss against their own texts + knowledge distillation from
   the frozen original, L = L_clip + λ·τ²·KL(softmax(z₀/τ) ‖ softmax(z/τ)) over the zero-shot
   logits of the superclass prompts [paper; form recon]. With ``teacher.edit`` > 0 [recon] the
   distillation target is the *edited* original, ĝ₀(x) − γ·relu(r(x) − b)·t_c (r: the original's
   own subgroup readout, :class:`SubgroupReadout`), on the retain rows and (``teacher.forget_rows``)
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
import torch.nn.functional as F
from torch import nn

from ..embed import ENCODE_BATCH, to_input
from ..losses import RetainLoss, distillation
from ..towers import adapter_for
from ..train.loop import LoopConfig, optimize
from ..trunk import TrunkEncoder
from .forget import FORGET_LOSSES, ForgetResult, forget_objective
from .synthesize import subgroup_texts

log = logging.getLogger(__name__)


REMIND_SCOPES = ("all", "late", "forget_layers")

# the autograd graph an alignment chunk may hold to run in one pass (forward once a step, not twice),
# unless the run passes its own budget (``Context.activation_budget``; the app's is small): the
# embedded model's 128 images at 64 px take ~0.4 GiB more at the peak and ~35 % less time
ONE_PASS_BUDGET = 1 << 30
MICRO_BATCH = 16                      # images a pass otherwise


def graph_bytes(run, x: torch.Tensor, stats: "NormStats") -> int:
    """Bytes of the storages behind the tensors autograd saves for one forward of ``x`` through
    ``run`` with ``stats`` recording, each storage once (a view or an expanded tensor is its
    storage's size, not its shape's)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), stats:
        run(x)
    return sum(storages.values())


@dataclass
class AlignConfig:
    enabled: bool = True
    steps: int = 15                  # Adam steps on δ
    lr: float = 0.01                 # in [0, 1] pixel units
    chunk: int = 256                 # images whose statistics are matched together
    micro_batch: int | None = None   # images per forward/backward pass: bounds memory, not the result; None:
                                     # the whole chunk in one pass when its graph fits the run's activation
                                     # budget (default ONE_PASS_BUDGET), else 16 at a time [recon]
    content_weight: float = 1000.0   # + w·mean(1 − cos(g₀(x+δ), g₀(x))): keep what the original model sees [recon]
    keep_originals: bool = True      # fine-tune on the retain images *and* their aligned copies; progress is
                                     # checked on the real images [recon]
    max_images: int | None = 128     # align at most this many retain images (a seeded random subset) [recon]
    vit_fallback: str = "layernorm"  # towers without BatchNorm: layernorm | skip

    def __post_init__(self):
        if self.vit_fallback not in ("layernorm", "skip"):
            raise ValueError(f"vit_fallback must be 'layernorm' or 'skip', got {self.vit_fallback!r}")
        if self.steps < 0 or self.chunk < 2 or (self.micro_batch is not None and self.micro_batch < 1):
            raise ValueError("align steps must be >= 0, chunk >= 2 and micro_batch >= 1")
        if self.content_weight < 0:
            raise ValueError(f"content_weight must be >= 0, got {self.content_weight}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {self.max_images}")


@dataclass
class TeacherConfig:
    """The edited teacher [recon]: distillation pulls towards the original model's features moved
    by −γ·relu(r(x) − b)·t_c, where r is the original's own subgroup readout (:class:`SubgroupReadout`)
    — the original, told that what it itself takes for the subgroup is not the superclass."""
    edit: float = 5.0                # γ; 0: the teacher is the original itself (measured: 5, 10; docs/results/sweep-ours.md)
    quantile: float = 0.5            # the readout's threshold b: midway between this quantile of the retain
                                     # images' readouts and the 10th percentile of the forget images'
    forget_rows: bool = True         # also distil the forget images (examples, stand-ins) towards it

    def __post_init__(self):
        if self.edit < 0:
            raise ValueError(f"teacher.edit must be >= 0, got {self.edit}")
        if not 0 <= self.quantile <= 1:
            raise ValueError(f"teacher.quantile must be in [0, 1], got {self.quantile}")


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
    bn_mode: str = "eval"            # BatchNorm during fine-tuning: eval | train
    forget_goal: float | None = None  # forget accuracy (train views, the forget stage's margin) that still counts as
                                     # forgotten while reminding; None: chance level, the bar restore then holds [recon]
    retain_tolerance: float | None = 0.02  # stop once retain accuracy (train views) is within this of the
                                     # original's and the forget set is still forgotten [recon]; None: all steps
    check_calibration: bool = False  # "still forgotten" also asks it of D_m's held-out forget images (never trained
                                     # on; they only say when to stop and which check to keep) [recon]
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
        if self.forget_loss not in FORGET_LOSSES:
            raise ValueError(f"forget_loss must be one of {FORGET_LOSSES}, got {self.forget_loss!r}")


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No gradient flows into ``module``'s parameters inside the block (flags restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class NormStats:
    """Forward pre-hooks that sum each norm layer's input per channel — Σ(x − c) and Σ(x − c)²,
    with c the layer's target mean (a shift that keeps the variance exact in float32) — and the
    target moments to match (BatchNorm running stats, or LayerNorm moments of a reference). Which
    layers, and of which kind, is the tower adapter's answer (``norm_layers``).

    Sums add over batches, so the moments of a whole image set come from batches run one at a
    time: ``align_images`` matches the statistics of all its images without holding all their
    activations at once."""

    def __init__(self, visual: nn.Module):
        self.kind, self.layers = adapter_for(visual).norm_layers(visual)
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = (
            [(m.running_mean.detach().float(), m.running_var.detach().float()) for m in self.layers]
            if self.kind == "batchnorm" else [])
        self.sums: list[list[torch.Tensor]] = []     # per layer [Σ(x − c), Σ(x − c)², count]
        self.dtype = torch.float32    # of the sums; float64 where there is no target mean to shift by
        self._hooks = []

    def _record(self, i: int, x: torch.Tensor) -> None:
        x = x.to(self.dtype)
        if self.kind == "layernorm":  # (..., C): statistics over every position
            x = x.reshape(-1, x.shape[-1])
        channels = x.shape[1]         # (N, C, ...) or (positions, C)
        dims = [0] + list(range(2, x.ndim))
        c = self.shift(i).to(x.dtype)
        d = x - (c.view(channels, *[1] * (x.ndim - 2)) if c.ndim else c)
        s = [d.sum(dims), (d * d).sum(dims), torch.tensor(float(x.numel() // channels), dtype=x.dtype)]
        if i < len(self.sums):
            self.sums[i] = [a + b for a, b in zip(self.sums[i], s)]
        else:
            self.sums.append(s)

    def shift(self, i: int) -> torch.Tensor:
        return self.targets[i][0] if self.targets else torch.zeros(())

    def __enter__(self):
        """Start a pass: the sums restart at zero and add up over every forward until exit."""
        self.sums = []
        self._hooks = [m.register_forward_pre_hook(lambda m, inp, i=i: self._record(i, inp[0]))
                       for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    def moments(self, sums: list[list[torch.Tensor]] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (mean, variance) of everything seen in the pass (or of ``sums``)."""
        out = []
        for i, (s1, s2, n) in enumerate(self.sums if sums is None else sums):
            m = s1 / n
            out.append((self.shift(i) + m, s2 / n - m * m))
        return out

    def loss(self, sums: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        return sum(torch.linalg.vector_norm(mu - tm) + torch.linalg.vector_norm(var - tv)
                   for (mu, var), (tm, tv) in zip(self.moments(sums), self.targets))


def pass_size(ctx, cfg: AlignConfig, run, images01: torch.Tensor, stats: "NormStats") -> int:
    """Images per forward/backward pass of the alignment: ``cfg.micro_batch`` when given, else the
    whole chunk when its autograd graph (what one more image adds, measured on one- and two-image
    probes; weights autograd saves count once) fits the run's activation budget, else MICRO_BATCH."""
    if cfg.micro_batch is not None:
        return cfg.micro_batch
    budget = ONE_PASS_BUDGET if ctx.activation_budget is None else ctx.activation_budget
    n = min(cfg.chunk, len(images01))
    one, two = (graph_bytes(run, images01[:k].to(ctx.bundle.device).requires_grad_(), stats) for k in (1, 2))
    return n if max(two - one, 1) * n + one <= budget else MICRO_BATCH


def drift_of(feats: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Σ (1 − cos) of the tower's features to the original model's (normalised) ``content``."""
    return (1 - (F.normalize(feats.float(), dim=-1) * content).sum(-1)).sum()


def align_images(ctx, images01: torch.Tensor, cfg: AlignConfig, reference01: torch.Tensor | None = None):
    """Return (aligned images in [0, 1], info). ``images01``: float (N, 3, H, W).

    The statistics of a chunk are those of all its images; forward and backward passes run
    :func:`pass_size` images at a time. A chunk that fits one pass runs forward once per step, with
    its statistics' graph kept, and backward once. A larger chunk, per step: one pass without gradients sums the statistics
    of the chunk at x + δ; the gradient of the statistics loss with respect to those sums (a few
    small tensors) then weights the same sums of each micro-batch, whose backward pass adds its
    images' part of the exact gradient."""
    visual = ctx.original.visual
    stats = NormStats(visual)
    if not cfg.enabled or cfg.steps == 0:
        return images01, {"aligned": False}
    if stats.kind == "none" or (stats.kind == "layernorm" and cfg.vit_fallback == "skip"):
        log.warning("image tower has no BatchNorm; alignment skipped (vit_fallback=%s)", cfg.vit_fallback)
        return images01, {"aligned": False, "note": "no BatchNorm: alignment skipped"}
    was = visual.training
    visual.eval()
    device = ctx.bundle.device
    dtype = next(visual.parameters()).dtype

    def run(x01):                     # the original tower on [0, 1] images
        return visual(ctx.bundle.normalize(x01.to(device)).to(dtype))

    def batches(n):
        return [slice(j, j + per_pass) for j in range(0, n, per_pass)]

    def measure(images01):            # one pass without gradients: ``stats`` sums over all the images
        with torch.no_grad(), stats:
            for b in batches(len(images01)):
                run(images01[b])

    with frozen(visual):
        per_pass = pass_size(ctx, cfg, run, images01, stats)
        if stats.kind == "layernorm":
            log.warning("image tower has no BatchNorm; aligning LayerNorm input moments to a reference set [recon]")
            if reference01 is None:
                raise ValueError("LayerNorm alignment needs reference images")
            stats.dtype = torch.float64
            measure(reference01)
            stats.targets = [(m.float(), v.float()) for m, v in stats.moments()]
            stats.dtype = torch.float32
        out, before, after = [], [], []
        for i in range(0, len(images01), cfg.chunk):
            x = images01[i:i + cfg.chunk].to(device)
            n = len(x)
            delta = torch.zeros_like(x, requires_grad=True)
            with torch.no_grad():
                content = torch.cat([F.normalize(run(x[b]).float(), dim=-1) for b in batches(n)])

            def one_pass(x=x, delta=delta, content=content, n=n):
                """The chunk in one pass: its statistics keep their graph; one backward."""
                with stats:
                    feats = run((x + delta).clamp(0, 1))
                stat_loss = stats.loss()
                drift = drift_of(feats, content) if cfg.content_weight > 0 else torch.zeros(())
                (stat_loss + cfg.content_weight * drift / n).backward()
                return float(stat_loss.detach()), float(drift.detach())

            def micro_batched(x=x, delta=delta, content=content, n=n):
                measure((x + delta.detach()).clamp(0, 1))     # the chunk's statistics at x + δ
                sums = [[s.requires_grad_() for s in layer[:2]] + layer[2:] for layer in stats.sums]
                stat_loss = stats.loss(sums)
                grads = torch.autograd.grad(stat_loss, [s for layer in sums for s in layer[:2]])
                drift_sum = 0.0
                for b in batches(n):                   # backward, a micro-batch at a time
                    with stats:
                        feats = run((x[b] + delta[b]).clamp(0, 1))
                    part = sum((g * s).sum() for g, s in zip(grads, (s for layer in stats.sums for s in layer[:2])))
                    if cfg.content_weight > 0:
                        drift = drift_of(feats, content[b])
                        part = part + cfg.content_weight * drift / n
                        drift_sum += float(drift.detach())
                    part.backward()
                return float(stat_loss.detach()), drift_sum

            def loss_fn(step, n=n):
                stat, drift_sum = one_pass() if n <= per_pass else micro_batched()
                if step == 0:
                    before.append(stat)
                return stat + cfg.content_weight * drift_sum / n

            optimize([delta], loss_fn, LoopConfig(steps=cfg.steps, lr=cfg.lr, grad_clip=None), "align",
                     ctx.callbacks)
            final = (x + delta).detach().clamp(0, 1)
            measure(final)
            after.append(float(stats.loss()))
            out.append(final.cpu())
    visual.train(was)
    info = {"aligned": True, "norm": stats.kind, "stat_loss_before": sum(before) / len(before),
            "stat_loss_after": sum(after) / len(after)}
    log.info("alignment: statistics loss %.4f -> %.4f", info["stat_loss_before"], info["stat_loss_after"])
    return torch.cat(out), info


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


@dataclass
class Teacher:
    """The frozen original model's view of the training rows: what distillation pulls towards."""
    features: torch.Tensor        # normalised image features (rows, D)
    logits: torch.Tensor          # zero-shot logits over the superclass prompts (rows, classes)


@torch.no_grad()
def original_features(ctx, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([ctx.image_features(x[i:i + ENCODE_BATCH], ctx.original) for i in range(0, len(x), ENCODE_BATCH)])


@dataclass
class SubgroupReadout:
    """The original model's own word on "is this the subgroup": r(x) = ĝ₀(x)·(t_sub − mean t_sibling)
    over the subgroup's and its retain subgroups' prompts, and a threshold b between the forget
    images' readouts and the retain images' [recon]."""
    direction: torch.Tensor
    threshold: float

    @staticmethod
    @torch.no_grad()
    def fit(ctx, forget_feats: torch.Tensor, retain_feats: torch.Tensor, quantile: float = 0.5
            ) -> "SubgroupReadout | None":
        if ctx.task.request.subgroup is None:
            return None
        texts, i = subgroup_texts(ctx)
        if len(texts) < 2:             # no sibling to read the subgroup against
            return None
        others = torch.cat([texts[:i], texts[i + 1:]])
        a = (texts[i] - others.mean(0)).float()
        rf, rr = forget_feats @ a, retain_feats @ a
        return SubgroupReadout(a, float(0.5 * (torch.quantile(rr, quantile) + torch.quantile(rf, 0.1))))

    def gate(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.relu(feats @ self.direction - self.threshold)


@torch.no_grad()
def teacher_of(ctx, feats: torch.Tensor, edit: float = 0.0, readout: SubgroupReadout | None = None) -> Teacher:
    """The teacher for the original model's (normalised) features ``feats``; with ``edit`` > 0 and a
    ``readout``, the edited teacher's: ĝ₀(x) − γ·relu(r(x) − b)·t_c, renormalised — the original,
    told that what it itself takes for the subgroup is not the superclass."""
    if edit > 0 and readout is not None:
        feats = F.normalize(feats - edit * readout.gate(feats)[:, None] * ctx.coarse_emb.float()[None], dim=-1)
    return Teacher(feats, ctx.logit_scale * feats @ ctx.superclass_emb.t())


def teacher_outputs(ctx, x: torch.Tensor, edit: float = 0.0, readout: SubgroupReadout | None = None) -> Teacher:
    """:func:`teacher_of` the original model's features of the inputs ``x``."""
    return teacher_of(ctx, original_features(ctx, x), edit, readout)


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
        """The tower's state dict with the EMA weights (in the tower's dtypes)."""
        return {k: self.weights[k].to(v.dtype) if v.is_floating_point() else v for k, v in self.live.items()}


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
                 extra_forget: torch.Tensor | None = None) -> dict:
    """Fine-tune ``ctx.model.visual`` on the retain images (and aligned copies): retain loss,
    distillation from the original, the forget objective, EMA. ``forget`` is what the forget stage
    did: its layers set ``cfg.scope`` and its margin what still counts as forgotten (None: the
    whole tower, no margin)."""
    task = ctx.task
    if not len(task.retain):
        log.warning("remind skipped: the retain set is empty")
        return {"skipped": "empty retain set"}
    retain = task.retain.images       # uint8; float copies are made a batch at a time
    reference = None
    if NormStats(ctx.original.visual).kind == "layernorm":
        col = task.calib.get("other_superclasses") or next(iter(task.calib.values()))
        reference = col.views.images.float() / 255.0
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
    forget_teacher = readout = None
    if cfg.teacher.edit > 0:               # the original's features are encoded once, then edited
        forget_feats = original_features(ctx, forget_in)
        readout = SubgroupReadout.fit(ctx, forget_feats, original.features, cfg.teacher.quantile)
    if readout is not None:
        teacher = teacher_of(ctx, original.features, cfg.teacher.edit, readout)
        if cfg.teacher.forget_rows:
            forget_teacher = teacher_of(ctx, forget_feats, cfg.teacher.edit, readout)
        info["teacher"] = {"threshold": readout.threshold,
                           "retain_rows_gated": int((readout.gate(original.features) > 0).sum())}
    retain_x, forget_x = enc.prepare(x_all), enc.prepare(forget_in)
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

    def loss_fn(step):
        idx = ctx.sample_indices(len(retain_x), cfg.batch_size).to(device)
        img = enc(retain_x[idx])
        loss = distilled(retain_loss.of_features(img, row_source[idx]), img, teacher, idx)
        if cfg.forget_weight > 0 or forget_teacher is not None:
            fi = ctx.sample_indices(len(forget_x), cfg.batch_size)
            feats = enc(forget_x[fi])
            loss = loss + cfg.forget_weight * forget_objective(ctx, feats, cfg.forget_loss)
            if forget_teacher is not None:
                loss = distilled(loss, feats, forget_teacher, fi.to(device))
        return loss

    check_x = retain_x[:rows.n_check]
    retain_labels = task.superclass_labels(task.retain)[rows.source[:rows.n_check]]
    retain_goal = float((original.logits[:rows.n_check].argmax(-1).cpu() == retain_labels).float().mean()) - \
        (cfg.retain_tolerance or 0)
    forget_goal = ctx.chance if cfg.forget_goal is None else cfg.forget_goal
    margin = forget.margin if forget is not None else 0.0       # forgotten as the forget stage defined it
    checks: list[dict] = []
    best = BestCheckpoint(live, moving, ema)

    def should_stop(step):
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

    history = optimize(params, loss_fn, cfg.loop, "remind", ctx.callbacks, should_stop=should_stop,
                       after_step=ema.update if ema is not None else None)
    for p in params:
        p.requires_grad_(False)
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
