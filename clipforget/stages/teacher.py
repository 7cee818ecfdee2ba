"""What remind's distillation pulls towards: the frozen original model's features and zero-shot
logits (:class:`Teacher`), or the *edited* original [recon]: ĝ₀(x) − γ·relu(r(x) − b)·t_c, where r
is the original's own subgroup readout (:class:`SubgroupReadout`) — the original, told that what it
itself takes for the subgroup is not the superclass. docs/METHOD.md step 2.4 has the measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..embed import ENCODE_BATCH
from .synthesize import subgroup_texts


READOUTS = ("mean", "margin")


@dataclass
class TeacherConfig:
    """The edited teacher [recon]: distillation pulls towards the original model's features moved
    by −γ·relu(r(x) − b)·t_c, where r is the original's own subgroup readout (:class:`SubgroupReadout`)
    — the original, told that what it itself takes for the subgroup is not the superclass."""
    edit: float = 5.0                # γ; 0: the teacher is the original itself (measured: 5, 10; docs/results/sweep-ours.md)
    quantile: float = 0.5            # the retain images' readout quantile the threshold b is set from
    threshold: str = "midway"        # b: midway between that quantile and the 10th percentile of the forget
                                     # images' readouts | retain: that quantile itself
    gate: str = "linear"             # the edit's weight: linear γ·relu(r − b) | saturating γ·min(1, relu(r − b) /
                                     # (median forget readout − b)): the full γ from the forget images' median on
    forget_rows: bool = True         # also distil the forget images (examples, stand-ins) towards it
    readout: str = "mean"            # r(x): mean ĝ₀(x)·(t_sub − mean t_sibling) | margin s(x, t_sub) − max s(x, t_sibling)

    def __post_init__(self):
        if self.edit < 0:
            raise ValueError(f"teacher.edit must be >= 0, got {self.edit}")
        if not 0 <= self.quantile <= 1:
            raise ValueError(f"teacher.quantile must be in [0, 1], got {self.quantile}")
        if self.threshold not in ("midway", "retain"):
            raise ValueError(f"teacher.threshold must be 'midway' or 'retain', got {self.threshold!r}")
        if self.gate not in ("linear", "saturating"):
            raise ValueError(f"teacher.gate must be 'linear' or 'saturating', got {self.gate!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"teacher.readout must be one of {READOUTS}, got {self.readout!r}")


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
    """The original model's own word on "is this the subgroup", over the subgroup's prompt t_sub and
    its retain subgroups' t_sibling: ``mean`` r(x) = ĝ₀(x)·(t_sub − mean t_sibling), or ``margin``
    r(x) = ĝ₀(x)·t_sub − max ĝ₀(x)·t_sibling (the stand-ins' criterion); and a threshold b between the
    forget images' readouts and the retain images' [recon]."""
    texts: torch.Tensor                # the subgroup's prompt (row 0), then its siblings'
    threshold: float
    saturate_at: float | None = None   # a saturating gate reaches 1 this far above the threshold
    kind: str = "mean"

    @staticmethod
    @torch.no_grad()
    def fit(ctx, forget_feats: torch.Tensor, retain_feats: torch.Tensor, quantile: float = 0.5,
            threshold: str = "midway", gate: str = "linear", kind: str = "mean") -> "SubgroupReadout | None":
        """``threshold``, ``gate`` and ``kind`` (the readout) as in :class:`TeacherConfig`."""
        if ctx.task.request.subgroup is None:
            return None
        texts, i = subgroup_texts(ctx)
        if len(texts) < 2:             # no sibling to read the subgroup against
            return None
        texts = torch.cat([texts[i:i + 1], texts[:i], texts[i + 1:]])
        readout = SubgroupReadout(texts, 0.0, None, kind)
        rf, rr = readout.read(forget_feats), readout.read(retain_feats)
        b = float(torch.quantile(rr, quantile))
        if threshold == "midway":
            b = 0.5 * (b + float(torch.quantile(rf, 0.1)))
        readout.threshold = b
        readout.saturate_at = max(float(rf.median()) - b, 1e-6) if gate == "saturating" else None
        return readout

    def direction(self) -> torch.Tensor:
        """The mean readout's direction t_sub − mean t_sibling: r(x) = ĝ₀(x)·direction."""
        return (self.texts[0] - self.texts[1:].mean(0)).float()

    def read(self, feats: torch.Tensor) -> torch.Tensor:
        """r(x) of normalised features, one per row."""
        if self.kind == "mean":
            return feats @ self.direction()
        texts = self.texts.float()
        return feats @ texts[0] - (feats @ texts[1:].t()).max(1).values

    def gate(self, feats: torch.Tensor) -> torch.Tensor:
        """The edit's weight per row (times γ): relu(r − b), or with a saturating gate
        min(1, relu(r − b) / saturate_at)."""
        g = torch.relu(self.read(feats) - self.threshold)
        return g if self.saturate_at is None else torch.clamp(g / self.saturate_at, max=1.0)


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
