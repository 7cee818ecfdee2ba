"""CLIP-LIP, image-tower variant (``clip_lip_image``): clipforget's earlier CLIP-LIP, which edits
image-tower layers. Its source (Kravets & Namboodiri) applies LoRA to the text encoder: that is
``clip_lip`` (:mod:`.clip_lip`). This variant keeps the Lipschitz forgetting of Kravets &
Namboodiri's synthetic-sample CLIP unlearning on the image side [recon for the details].

1. Synthetic samples: inputs optimised from Gaussian noise so the ORIGINAL model embeds them on
   the target's coarse text (data-free stand-ins for the class), joined by the forget images.
2. Layers: the ``top_k_layers`` Conv2d/Linear layers with the largest mean gradient magnitude of
   the Lipschitz loss on those samples; only they are trained.
3. Loss: the Lipschitz ratio in the joint space — image noise ε and text-embedding noise η —
   ‖g(x) − g(x+ε)‖/‖ε‖ + ‖s(x, t) − s(x+ε, t+η)‖/‖(ε, η)‖ over the superclass prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..train.loop import frozen
from ..train.loop import LoopConfig, optimize
from .base import Context, Unlearner, register_method
from .common import layer_params, lipschitz_ratio, named_layers, trainable


@dataclass
class CLIPLIPImageConfig:
    synthetic: int = 16               # synthetic samples inverted from the coarse text
    synth_loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=20, lr=0.05, grad_clip=None))
    use_forget_images: bool = True    # add the forget images to the synthetic samples
    top_k_layers: int = 5             # layers trained, picked by gradient magnitude
    copies: int = 10                  # noisy copies per sample
    sigma: float = 1.0                # image noise std (normalised input units)
    text_sigma: float = 0.05          # text-embedding noise std (joint space)
    batch_size: int = 8               # samples per step
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=30, lr=2e-4, grad_clip=1.0))
    seed: int = 0
    # tuning (bench/tune.py): dotted config keys -> candidates, the same budget for every method
    search_space = {"loop.lr": (1e-4, 2e-4, 5e-4), "sigma": (0.5, 1.0), "top_k_layers": (3, 5)}

    def __post_init__(self):
        check_samples(self)


def synthesize(ctx: Context, n: int, loop: LoopConfig) -> torch.Tensor:
    """Inputs whose original image embedding matches the coarse text of the target."""
    size = ctx.task.image_size
    dtype = next(ctx.original.visual.parameters()).dtype
    x = torch.randn(n, 3, size, size, generator=ctx.generator).to(ctx.bundle.device, dtype).requires_grad_(True)
    was = ctx.original.visual.training
    ctx.original.visual.eval()
    with frozen(ctx.original.visual):    # gradients flow to the samples only, never into the original
        optimize([x], lambda s: -(ctx.image_features(x, ctx.original) @ ctx.coarse_emb).mean(), loop, "synthesize",
                 ctx.callbacks)
    ctx.original.visual.train(was)
    return x.detach()


def check_samples(cfg) -> None:
    """The checks both CLIP-LIP configs share: samples, layers and noise."""
    if cfg.synthetic < 0:
        raise ValueError(f"synthetic must be >= 0, got {cfg.synthetic}")
    if cfg.synthetic == 0 and not cfg.use_forget_images:
        raise ValueError("synthetic must be > 0 when use_forget_images is False (no samples left)")
    if cfg.top_k_layers < 1:
        raise ValueError(f"top_k_layers must be >= 1, got {cfg.top_k_layers}")
    if cfg.copies < 1 or not cfg.sigma > 0 or cfg.text_sigma < 0:
        raise ValueError(f"copies must be >= 1, sigma > 0, text_sigma >= 0; got copies={cfg.copies}, "
                         f"sigma={cfg.sigma}, text_sigma={cfg.text_sigma}")


@register_method
class CLIPLIPImage(Unlearner):
    name, Config = "clip_lip_image", CLIPLIPImageConfig
    learned = True                    # trains its delta: `clip_lip_image+soup` adds ours' restore
    summary = ("baseline (earlier CLIP-LIP variant): Lipschitz forgetting of image-tower layers picked by gradient, "
               "on synthetic samples")

    def unlearn(self, ctx: Context) -> None:
        cfg, task = self.config, ctx.task
        with ctx.stage("synthesize"):
            parts = [synthesize(ctx, cfg.synthetic, cfg.synth_loop)] if cfg.synthetic else []
            if cfg.use_forget_images:
                parts.append(ctx.inputs(task.forget))
            samples = torch.cat(parts)
        visual = ctx.model.visual
        visual.eval()
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def loss_fn(step):
            idx = torch.randperm(len(samples), generator=ctx.generator)[:cfg.batch_size].to(samples.device)
            return lipschitz_ratio(ctx, samples[idx], cfg.copies, cfg.sigma, gen, text_sigma=cfg.text_sigma)

        with ctx.stage("select"):
            names = named_layers(visual)
            with trainable(layer_params(visual, names)):
                visual.zero_grad(set_to_none=True)
                loss_fn(-1).backward()
                mods = dict(visual.named_modules())
                magnitude = {n: float(torch.cat([p.grad.abs().flatten() for p in mods[n].parameters(recurse=False)
                                                 if p.grad is not None] or [torch.zeros(1)]).mean()) for n in names}
                visual.zero_grad(set_to_none=True)
            chosen = sorted(magnitude, key=magnitude.get, reverse=True)[:cfg.top_k_layers]
        with ctx.stage("lipschitz"), trainable(layer_params(visual, chosen)) as params:
            ctx.log_history("lipschitz", optimize(params, loss_fn, cfg.loop, "lipschitz", ctx.callbacks))
        ctx.info.update(layers=chosen, grad_magnitude=magnitude)
