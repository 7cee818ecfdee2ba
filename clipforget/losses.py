"""Losses shared by the methods and by the embedded model's training."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
