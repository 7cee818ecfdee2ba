"""Batched, seeded image augmentation (rotation, scale/crop, shift, flip, background, contrast, and
drawing-style changes: greyscale, swapped colour channels, line drawings).

Used both to train the embedded model (random views) and to build deterministic held-out views
for evaluation and for the forget / retain / calibration / test splits (a view is fully defined by
its seed, so the splits never share a view).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 15.0            # uniform in [-r, r]
    scale: tuple[float, float] = (0.75, 1.2)   # >1 zooms in (crops), <1 zooms out
    shift: float = 0.12                   # fraction of the image, per axis
    hflip: float = 0.5                    # probability
    bg_white: float = 0.55                # probability of a white background
    bg_light: float = 0.35                # probability of a light random colour; the rest: any colour
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05
    # drawing-style changes (probabilities; 0 draws no random numbers, so other views stay as they were)
    greyscale: float = 0.0                # luminance only
    channel_swap: float = 0.0             # a random permutation of the colour channels
    line_drawing: float = 0.0             # dark edges on white (Sobel magnitude of the luminance)

    def __post_init__(self):
        for name in ("greyscale", "channel_swap", "line_drawing"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {self.hflip}")
        if self.bg_white + self.bg_light > 1:
            raise ValueError("bg_white + bg_light must be <= 1")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {self.scale}")


CLEAN = AugmentConfig(0.0, (1.0, 1.0), 0.0, 0.0, 1.0, 0.0, (1.0, 1.0), 0.0)
# Held-out views for evaluation and for the forget / retain / calibration / test splits: the same
# kinds of change as training (crop/scale, rotation, shift, flip, background, contrast) but milder,
# and only white or light backgrounds. `clipforget eval` also reports the training distribution.
VIEWS = AugmentConfig(rotation_deg=10.0, scale=(0.85, 1.1), shift=0.08, bg_white=0.6, bg_light=0.4)
# Training views of the forget examples: the same, plus changes of drawing style, so that what the
# forget stage learns is less tied to the examples' own styles (held-out drawings must follow) [recon]
STYLE_VIEWS = AugmentConfig(rotation_deg=10.0, scale=(0.85, 1.1), shift=0.08, bg_white=0.6, bg_light=0.4,
                            greyscale=0.15, channel_swap=0.25, line_drawing=0.15)


def luminance(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


@dataclass
class AugmentDraw:
    """The random numbers of one augmentation of N images, drawn in a fixed order from one
    generator (so a view is the same whether it is made alone or in a batch with others)."""
    bg: torch.Tensor                 # (N, 3) background colour
    theta: torch.Tensor              # (N, 2, 3) affine map, output coords -> input coords
    contrast: torch.Tensor           # (N,)
    brightness: torch.Tensor         # (N,)
    swap: torch.Tensor | None        # (N,) bool and (N, 3) channel permutation, when channel_swap > 0
    perm: torch.Tensor | None
    grey: torch.Tensor | None        # (N,) bool, when greyscale > 0
    lines: torch.Tensor | None       # (N,) bool, when line_drawing > 0

    @staticmethod
    def cat(draws: list["AugmentDraw"]) -> "AugmentDraw":
        return AugmentDraw(*(None if getattr(draws[0], f) is None else torch.cat([getattr(d, f) for d in draws])
                             for f in ("bg", "theta", "contrast", "brightness", "swap", "perm", "grey", "lines")))


def draw(n: int, generator: torch.Generator | None = None, cfg: AugmentConfig = AugmentConfig()) -> AugmentDraw:
    """The random numbers of :func:`augment` for ``n`` images."""
    g = generator

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    pick = torch.rand(n, generator=g)
    light = 0.75 + 0.25 * torch.rand(n, 3, generator=g)
    anyc = torch.rand(n, 3, generator=g)
    bg = torch.where((pick < cfg.bg_white)[:, None], torch.ones(n, 3),
                     torch.where((pick < cfg.bg_white + cfg.bg_light)[:, None], light, anyc))
    angle = u(-cfg.rotation_deg, cfg.rotation_deg) * math.pi / 180
    scale = torch.exp(u(math.log(cfg.scale[0]), math.log(cfg.scale[1])))
    flip = torch.where(torch.rand(n, generator=g) < cfg.hflip, -1.0, 1.0)
    tx, ty = u(-cfg.shift, cfg.shift) * 2, u(-cfg.shift, cfg.shift) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], -1),
                         torch.stack([sin * flip, cos, ty], -1)], 1)
    contrast = u(*cfg.contrast)
    brightness = u(-cfg.brightness, cfg.brightness)
    swap = perm = grey = lines = None
    if cfg.channel_swap > 0:
        swap = torch.rand(n, generator=g) < cfg.channel_swap
        perm = torch.argsort(torch.rand(n, 3, generator=g), dim=1)
    if cfg.greyscale > 0:
        grey = torch.rand(n, generator=g) < cfg.greyscale
    if cfg.line_drawing > 0:
        lines = torch.rand(n, generator=g) < cfg.line_drawing
    return AugmentDraw(bg, theta, contrast, brightness, swap, perm, grey, lines)


def style_changes(x: torch.Tensor, d: AugmentDraw) -> torch.Tensor:
    """Greyscale, channel permutations and line drawings of (N,3,H,W) images in [0, 1]."""
    if d.swap is not None:
        swapped = torch.gather(x, 1, d.perm[:, :, None, None].expand_as(x))
        x = torch.where(d.swap[:, None, None, None], swapped, x)
    if d.grey is not None:
        x = torch.where(d.grey[:, None, None, None], luminance(x).expand_as(x), x)
    if d.lines is not None:
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([sobel, sobel.t()])[:, None]
        edges = F.conv2d(F.pad(luminance(x), (1, 1, 1, 1), mode="replicate"), kernels).norm(dim=1, keepdim=True)
        lines = (1 - (edges * 2).clamp(0, 1)).expand_as(x)
        x = torch.where(d.lines[:, None, None, None], lines, x)
    return x


def apply(images: torch.Tensor, masks: torch.Tensor, out_size: int, d: AugmentDraw) -> torch.Tensor:
    """uint8 (N,3,S,S) images + (N,1,S,S) foreground masks, transformed by the draws ``d`` -> float
    (N,3,out,out) in [0, 1]. Each image's result depends on its own draws only."""
    x = images.float() / 255.0
    m = masks.float()
    grid = F.affine_grid(d.theta, (images.shape[0], 3, out_size, out_size), align_corners=False)
    fg = F.grid_sample(torch.cat([x * m, m], 1), grid, mode="bilinear", padding_mode="zeros",
                       align_corners=False)
    out = fg[:, :3] + (1 - fg[:, 3:]) * d.bg[:, :, None, None]
    # photometric
    c = d.contrast[:, None, None, None]
    b = d.brightness[:, None, None, None]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * c + mean + b).clamp(0, 1)
    return style_changes(out, d)


def augment(images: torch.Tensor, masks: torch.Tensor, out_size: int,
            generator: torch.Generator | None = None, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """uint8 (N,3,S,S) images + (N,1,S,S) foreground masks -> float (N,3,out,out) in [0, 1]."""
    return apply(images, masks, out_size, draw(images.shape[0], generator, cfg))


def views(images: torch.Tensor, masks: torch.Tensor, out_size: int, seeds: list[int],
          cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Deterministic views: one augmented copy of every image per seed, seed-major order
    (len(seeds) * N images). The same seed always gives the same view."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(augment(images, masks, out_size, g, CLEAN if s < 0 else cfg))
    return torch.cat(out)
