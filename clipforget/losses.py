"""Losses shared by the methods, the stages of ours and the embedded model's training."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, scale) -> torch.Tensor:
    """Symmetric CLIP loss with soft targets spread over all positives (``pos[i, j]``: caption j
    describes image i). With one positive per row and column it is the usual CLIP loss."""
    logits = scale * img @ txt.t()
    pos = pos.float()
    i2t = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t2i = -(pos / pos.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (i2t + t2i) / 2


def clip_loss(img: torch.Tensor, txt_by_image: torch.Tensor, caption_ids: torch.Tensor, scale) -> torch.Tensor:
    """CLIP loss of images against their own captions; images sharing a caption are all positives.
    ``txt_by_image`` holds one text embedding per unique caption, ``caption_ids`` its index per image."""
    pos = caption_ids[:, None] == caption_ids[None, :]
    return multi_positive_loss(img, txt_by_image[caption_ids], pos, scale)


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(softmax(z₀/τ) ‖ softmax(z/τ)) (Hinton et al.)."""
    return tau ** 2 * F.kl_div(F.log_softmax(student_logits / tau, -1), F.log_softmax(teacher_logits / tau, -1),
                               log_target=True, reduction="batchmean")


def soft_target_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row's logits against its positives (``pos[i, j] = 1``), spread evenly."""
    return -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()


class RetainLoss:
    """CLIP loss of retain images against their own captions and their superclass prompt (both
    positives; a batch holds few distinct captions, so every superclass prompt is a negative too).
    Shared by the baselines (fine-tuning, EMMN's repair) and ours' remind stage.
    ``superclass=False``: the plain CLIP loss, each image against its own caption among the retain
    set's captions, no superclass prompt.

    ``ctx`` is a method's :class:`~clipforget.methods.base.Context`."""

    def __init__(self, ctx, superclass: bool = True):
        self.ctx = ctx
        task = ctx.task
        device = ctx.bundle.device
        cap_emb, cap_ids = ctx.caption_embeddings(task.retain)
        self.texts = torch.cat([cap_emb, ctx.superclass_emb]) if superclass else cap_emb
        n = len(task.retain)
        self.pos = torch.zeros(n, len(self.texts), device=device)
        self.pos[torch.arange(n), cap_ids] = 1
        if superclass:
            self.pos[torch.arange(n), task.superclass_labels(task.retain).to(device) + len(cap_emb)] = 1

    def of_features(self, img: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The loss of normalised image features ``img`` of the retain images ``rows``."""
        logits = self.ctx.logit_scale * img @ self.texts.t()
        return soft_target_loss(logits, self.pos[rows.to(self.pos.device)])

    def __call__(self, idx: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        ctx = self.ctx
        return self.of_features(ctx.image_features(ctx.inputs(ctx.task.retain, idx), model), idx)
