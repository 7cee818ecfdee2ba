"""CLIP-LIP (Kravets & Namboodiri: zero-shot CLIP class forgetting by adapting the text side of
the joint image–text space, with the Lipschitz regularisation of their synthetic-sample CLIP
unlearning). The method edits the **text tower only**, through LoRA; the image tower, and so every
image embedding, is the original's. [recon for the details; no official code is used]

1. Samples of the class to forget, embedded once by the frozen image tower: the forget training
   views and (``synthetic`` > 0) inputs optimised from Gaussian noise so the original model embeds
   them on the target's coarse text (data-free stand-ins, as in the synthetic-sample paper), each
   with ``copies`` noisy copies x + ε (ε ~ N(0, σ²) in input units). The retain training views are
   embedded once too.
2. Layers: the ``top_k_layers`` Linear layers of the text tower (open_clip's ``transformer``
   blocks or a Hugging Face tower's, found through the model, outside ``visual``) with the largest
   mean gradient magnitude of the loss below at the start; each gets a LoRA update
   W + (α/r)·B·A, merged into the weights at the end (like peft's ``merge_and_unload``).
3. Loss over the class embeddings T = g_txt(prompts) of every superclass, from the edited text
   tower (prompt ensemble, as evaluation computes them):
     L = L_forget + λ_lip·L_lip + λ_retain·L_retain
   - L_forget = mean −log(1 − p_c(e)): forget-sample embeddings e stop matching the target class c
     (p = softmax of the zero-shot logits) — the target's text moves in the joint space;
   - L_lip = mean_j ‖s(e_j, t+η) − s(e, t)‖ / ‖(e_j − e, η)‖: the Lipschitz ratio of the
     image–text similarities to the perturbation of the sample in the joint space (the noisy
     copy's embedding e_j and text noise η ~ N(0, σ_t²)), which flattens what the text side
     reads from the forgotten samples;
   - L_retain = cross-entropy of the retain embeddings against their superclass + ‖T_k − T⁰_k‖²
     summed over the other superclasses and the retained subgroup names (the semantically close
     classes the source says must be kept explicitly).
   Training stops early once no forget training view is classified as the target (``early_stop``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..stages.forget import add_low_rank, merge_low_rank
from ..train.loop import LoopConfig, optimize
from .base import Context, Unlearner, register_method
from .clip_lip_image import check_samples, synthesize
from .common import trainable


@dataclass
class CLIPLIPConfig:
    synthetic: int = 0                # synthetic samples inverted from the coarse text (0: the forget images only)
    synth_loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=20, lr=0.05, grad_clip=None))
    use_forget_images: bool = True    # add the forget training views to the synthetic samples
    top_k_layers: int = 4             # text-tower Linear layers given LoRA, picked by gradient magnitude
    lora_rank: int = 8
    lora_alpha: float = 16.0
    copies: int = 4                   # noisy copies per forget sample
    sigma: float = 1.0                # image noise std (normalised input units)
    text_sigma: float = 0.05          # text-embedding noise std (joint space)
    lip_weight: float = 1.0           # λ_lip
    retain_weight: float = 1.0        # λ_retain
    anchor_weight: float = 10.0       # weight of ‖T_k − T⁰_k‖² inside L_retain
    early_stop: bool = True           # stop once the forget training views are no longer the target
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=30, lr=1e-3, grad_clip=1.0))
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"loop.lr": (3e-4, 1e-3, 3e-3), "lora_rank": (4, 8), "top_k_layers": (2, 4, 8)}

    def __post_init__(self):
        check_samples(self)
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        for name in ("lip_weight", "retain_weight", "anchor_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def text_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear layers of the text side of ``model`` (names of ``model.named_modules()``, outside
    ``visual``): open_clip's transformer blocks (``mlp.c_fc``, ``attn.out_proj``…) or a Hugging
    Face tower's (``text.transformer…query``, ``text.proj``)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not n.startswith("visual.") and n != "visual"}


@torch.no_grad()
def embed_fixed(ctx: Context, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Image embeddings of inputs ``x`` by the original (frozen, eval-mode) image tower."""
    was = ctx.original.visual.training
    ctx.original.visual.eval()
    try:
        return torch.cat([ctx.image_features(x[i:i + batch], ctx.original) for i in range(0, len(x), batch)])
    finally:
        ctx.original.visual.train(was)


def joint_lipschitz(e: torch.Tensor, en: torch.Tensor, text: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """mean ‖s(e_j, t+η_j) − s(e, t)‖ / ‖(e_j − e, η_j)‖ over copies j and samples: ``e`` (N, D),
    ``en`` (J, N, D) noisy copies' embeddings, ``text`` (T, D), ``eta`` (J, T, D)."""
    s0 = e @ text.t()                                                  # (N, T)
    tn = F.normalize(text.unsqueeze(0) + eta, dim=-1)                  # (J, T, D)
    sn = torch.einsum("jnd,jtd->jnt", en, tn)
    joint = ((en - e.unsqueeze(0)).norm(dim=-1) ** 2 + eta.flatten(1).norm(dim=-1, keepdim=True) ** 2).sqrt()
    return ((sn - s0.unsqueeze(0)).norm(dim=-1) / joint.clamp_min(1e-8)).mean()


@register_method
class CLIPLIP(Unlearner):
    name, Config = "clip_lip", CLIPLIPConfig
    summary = "baseline: LoRA on the text tower, forgetting in the joint image–text space with a Lipschitz loss"
    edits_text = True
    learned = True                    # trains its delta: `clip_lip+soup` adds ours' restore

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        with ctx.stage("synthesize"):
            parts = [synthesize(ctx, cfg.synthetic, cfg.synth_loop)] if cfg.synthetic else []
            if cfg.use_forget_images:
                parts.append(ctx.inputs(task.forget, model=ctx.original))
            x = torch.cat(parts)
            eps = cfg.sigma * torch.randn((cfg.copies,) + tuple(x.shape), generator=gen).to(x.device, x.dtype)
            e_f = embed_fixed(ctx, x)
            e_n = embed_fixed(ctx, (x.unsqueeze(0) + eps).flatten(0, 1)).view(cfg.copies, len(x), -1)
            e_r = embed_fixed(ctx, ctx.inputs(task.retain, model=ctx.original)) if len(task.retain) else None
            y_r = task.superclass_labels(task.retain).to(e_f.device) if e_r is not None else None
            others = [s for s in task.superclasses if s != task.superclasses[task.target_index]]
            kept = list(dict.fromkeys(others + [s for s in task.retain_subgroups if s not in task.superclasses]))
            with torch.no_grad():
                kept0 = ctx.text_features(kept, ctx.original) if kept else None
        c, scale = task.target_index, ctx.logit_scale

        def loss_fn(step):
            text = ctx.text_features(task.superclasses)                  # (C, D), edited text tower
            p = (scale * e_f @ text.t()).softmax(-1)[:, c]
            loss = -torch.log1p(-p.clamp(max=1 - 1e-6)).mean()
            if cfg.lip_weight:
                eta = cfg.text_sigma * torch.randn((cfg.copies,) + tuple(text.shape), generator=gen).to(text.device)
                loss = loss + cfg.lip_weight * joint_lipschitz(e_f, e_n, text, eta)
            if cfg.retain_weight:
                retain = F.cross_entropy(scale * e_r @ text.t(), y_r) if e_r is not None else 0.0
                if kept0 is not None and cfg.anchor_weight:
                    retain = retain + cfg.anchor_weight * (ctx.text_features(kept) - kept0).pow(2).sum(-1).mean()
                loss = loss + cfg.retain_weight * retain
            return loss

        @torch.no_grad()
        def forgotten(step) -> bool:
            text = ctx.text_features(task.superclasses)
            return bool(((e_f @ text.t()).argmax(-1) != c).all())

        layers = text_linear_layers(ctx.model)
        if not layers:
            raise ValueError("CLIP-LIP: the model's text tower has no Linear layers to adapt")
        with ctx.stage("select"):
            weights = [m.weight for m in layers.values()]
            with trainable(weights):
                loss_fn(-1).backward()
                magnitude = {n: float(m.weight.grad.abs().mean()) if m.weight.grad is not None else 0.0
                             for n, m in layers.items()}
                for w in weights:
                    w.grad = None
            chosen = sorted(magnitude, key=magnitude.get, reverse=True)[:cfg.top_k_layers]
        modules = {n: layers[n] for n in chosen}
        params = add_low_rank(modules, cfg.lora_rank, cfg.lora_alpha)
        try:
            with ctx.stage("lipschitz"):
                ctx.log_history("lipschitz", optimize(params, loss_fn, cfg.loop, "lipschitz", ctx.callbacks,
                                                      should_stop=forgotten if cfg.early_stop else None))
        finally:
            merge_low_rank(modules)          # plain weights again: the text delta is θ_u − θ₀ of them
        ctx.info.update(layers=chosen, grad_magnitude=magnitude)
