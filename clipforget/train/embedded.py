"""Train the embedded model on the emoji gallery (``clipforget train-embedded``).

The MiniLM text encoder stays frozen, so its pooled output is computed once per unique caption and
only the MLP text projection, the image tower and the logit scale train. ``arch`` picks the image
tower: ``rn`` the BatchNorm ResNet of ``embedded``, ``vit`` the VisionTransformer of ``embedded-vit``. The loss is a
multi-positive contrastive loss: a caption is a positive for every image in the batch whose concept
or superclass and style match it (``a dog`` is positive for a poodle, ``a black and white line
drawing of a car`` for every line-art car).

``distill_from`` (the ViT's default: the shipped ResNet ``embedded``) adds feature distillation: the
student's text projection starts from the teacher's, and each step adds
``distill_weight · (1 − cos(student image embedding, teacher image embedding))`` on the same
augmented batch — dense targets a small ViT learns from far faster than from captions alone.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.augment import AugmentConfig, augment
from ..data.gallery import Gallery
from ..data.prompts import training_captions
from ..io import save_safetensors
from ..losses import multi_positive_loss
from ..models import EMBEDDED, EMBEDDED_MODELS, EMBEDDED_VIT, _create, register_embedded, trainable_state_dict

log = logging.getLogger(__name__)

# --arch of `clipforget train-embedded` -> the embedded model it trains
ARCHS = {"rn": EMBEDDED, "vit": EMBEDDED_VIT}


@dataclass
class TrainEmbeddedConfig:
    steps: int = 2800                # optimisation steps
    batch_size: int = 128
    lr: float = 1e-3                 # AdamW peak learning rate
    weight_decay: float = 0.05
    warmup: float = 0.05             # fraction of steps with linear warm-up, then cosine
    hierarchy_fraction: float = 0.6  # share of each batch drawn from hierarchy images
    source_size: int = 96            # images are loaded at this size and augmented down to 64
    grad_clip: float = 0.0          # max gradient norm (0: none)
    distill_from: str | None = None  # an embedded model whose image features the tower also regresses
    distill_weight: float = 1.0      # weight of the cosine distillation term
    seed: int = 0
    arch: str = "rn"                 # rn: the ResNet of `embedded`; vit: the ViT of `embedded-vit`
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps must be >= 1 and batch_size >= 2")
        if not 0 < self.hierarchy_fraction < 1:
            raise ValueError(f"hierarchy_fraction must be in (0, 1), got {self.hierarchy_fraction}")
        if self.distill_from is not None and self.distill_from not in EMBEDDED_MODELS:
            raise ValueError(f"distill_from must be one of {', '.join(EMBEDDED_MODELS)} or None, "
                             f"got {self.distill_from!r}")
        if self.distill_from is not None and ARCHS[self.arch] == self.distill_from:
            raise ValueError(f"arch {self.arch!r} cannot distil from itself ({self.distill_from})")


@torch.no_grad()
def pooled_text_features(model, tokenizer, texts: list[str], batch: int = 512) -> torch.Tensor:
    """Frozen MiniLM mean-pooled outputs (before the trainable projection)."""
    enc = model.text
    out = []
    for i in range(0, len(texts), batch):
        tokens = tokenizer(texts[i:i + batch])
        mask = (tokens != enc.config.pad_token_id).long()
        hidden = enc.transformer(input_ids=tokens, attention_mask=mask)
        out.append(enc.pooler(hidden, mask))
    return torch.cat(out)


def training_items(gallery: Gallery) -> list:
    """The images the embedded model trains on: neither an other-pool concept held out of training
    (``unseen``) nor an image in a held-out drawing style (``unseen_style``)."""
    return [it for it in gallery.items if not it.unseen and not it.unseen_style]


# the ViT's own defaults (a ViT trained from scratch wants a longer warm-up and clipped gradients);
# its step count is about the 20-minute budget of a quiet 2-core machine (docs/results/embedded-vit.md)
ARCH_DEFAULTS = {"rn": {}, "vit": {"steps": 2500, "warmup": 0.1, "grad_clip": 1.0, "distill_from": EMBEDDED}}


def default_config(arch: str = "rn", **overrides) -> TrainEmbeddedConfig:
    """``TrainEmbeddedConfig`` with ``arch``'s defaults, then ``overrides``."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return TrainEmbeddedConfig(arch=arch, **{**ARCH_DEFAULTS[arch], **overrides})


def default_weights(arch: str = "rn") -> Path:
    """Where the shipped weights of ``arch``'s embedded model live."""
    return EMBEDDED_MODELS[ARCHS[arch]][1]


def train_embedded(cfg: TrainEmbeddedConfig = TrainEmbeddedConfig(), out: Path | None = None,
                   gallery: Gallery | None = None,
                   callback: Callable[[dict], None] | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gallery = gallery or Gallery.embedded()
    out = Path(out) if out else default_weights(cfg.arch)
    arch = EMBEDDED_MODELS[ARCHS[cfg.arch]][0]
    register_embedded()
    import open_clip
    model, _ = _create(arch, None, "fp32", torch.device("cpu"), text_pretrained=True)
    tokenizer = open_clip.get_tokenizer(arch)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]

    items = training_items(gallery)
    t0 = time.perf_counter()
    images, masks = gallery.load(items, cfg.source_size)
    # captions and their keys
    texts, keys, per_image = [], [], []
    index = {}
    for it in items:
        ids = []
        for text, key in training_captions(it.concept, it.superclass, it.style,
                                           gallery.style_phrase(it.style) if it.style else None):
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
                keys.append(key)
            ids.append(index[text])
        per_image.append(ids)
    pooled = pooled_text_features(model, tokenizer, texts)
    teacher = _teacher(cfg.distill_from, model)
    log.info("loaded %d images, %d captions in %.1fs", len(items), len(texts), time.perf_counter() - t0)

    hier = [i for i, it in enumerate(items) if it.kind == "hierarchy"]
    other = [i for i, it in enumerate(items) if it.kind != "hierarchy"]
    n_h = int(cfg.batch_size * cfg.hierarchy_fraction)

    model.visual.train()
    model.visual.to(memory_format=torch.channels_last)
    params = list(model.visual.parameters()) + list(model.text.proj.parameters()) + [model.logit_scale]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warm = max(1, int(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, cfg.steps - warm))))
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    history = []
    t_train = time.perf_counter()
    for step in range(cfg.steps):
        batch = rng.sample(hier, n_h) + rng.sample(other, cfg.batch_size - n_h)
        x = augment(images[batch], masks[batch], size, gen, cfg.augment)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        cap = [rng.choice(per_image[i]) for i in batch]
        pos = torch.tensor([[_matches(items[i], keys[c]) for c in cap] for i in batch])
        img = F.normalize(model.visual(x), dim=-1)
        txt = F.normalize(model.text.proj(pooled[cap]), dim=-1)
        loss = multi_positive_loss(img, txt, pos, model.logit_scale.exp().clamp(max=100))
        if teacher is not None:
            with torch.no_grad():
                target = F.normalize(teacher(x), dim=-1)
            loss = loss + cfg.distill_weight * (1 - (img * target).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            rec = {"step": step + 1, "steps": cfg.steps, "loss": float(loss.detach()),
                   "seconds": time.perf_counter() - t_train}
            history.append(rec)
            log.info("step %d/%d loss %.4f %.0fs", step + 1, cfg.steps, rec["loss"], rec["seconds"])
            if callback:
                callback(rec)
    model.eval()
    sd = {k: v.half() if v.is_floating_point() else v
          for k, v in trainable_state_dict(model, arch).items()}
    train_seconds = time.perf_counter() - t_train
    save_safetensors(sd, out, {"arch": arch, "config": asdict(cfg), "train_seconds": round(train_seconds),
                               "threads": torch.get_num_threads(),
                               "gallery_hash": gallery.content_hash})
    return {"out": str(out), "train_seconds": train_seconds, "captions": len(texts), "images": len(items),
            "final_loss": history[-1]["loss"]}


def _teacher(name: str | None, student) -> torch.nn.Module | None:
    """The image tower of the embedded model ``name`` (frozen, eval mode); the student's text
    projection starts as a copy of the teacher's, so both embed into the same space."""
    if name is None:
        return None
    from ..models import load_clip
    bundle = load_clip(name, device="cpu", precision="fp32")
    student.text.proj.load_state_dict(bundle.model.text.proj.state_dict())
    student.logit_scale.data.copy_(bundle.model.logit_scale.data)
    visual = bundle.model.visual.eval()
    for p in visual.parameters():
        p.requires_grad_(False)
    log.info("distilling the image features of %s", name)
    return visual


def _matches(item, key) -> bool:
    name, style = key
    return (name is None or name in (item.concept, item.superclass)) and (style is None or style == item.style)
