"""Per-layer (relative) Fisher information of the image tower — which layers hold the subgroup.

F_l(D) = mean over (x, t) in D of Σ_{p ∈ θ_l} (∂ s(x, t) / ∂p)²   (diagonal empirical Fisher of the
similarity s = cos(g_img(x), g_txt(t))), and the relative Fisher I_l = F_l(D_f) / (F_l(D_r) + ε).
[paper; exact form reconstructed] Layers are what the tower's adapter calls prunable
(:meth:`clipforget.towers.TowerAdapter.prunable_layers`): the Conv2d / Linear modules of the tower.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..towers import adapter_for


def prunable_layers(visual: nn.Module) -> dict[str, nn.Module]:
    """The layers Fisher ranks and LoRA edits, by qualified name (relative to ``visual``), in
    forward order: the tower adapter's answer (Conv2d / Linear modules for open_clip's towers)."""
    return adapter_for(visual).prunable_layers(visual)


def layer_fisher(model: nn.Module, inputs, text_emb: torch.Tensor,
                 layers: dict[str, nn.Module], max_samples: int | None = 64,
                 encode: Callable | None = None) -> dict[str, float]:
    """Diagonal empirical Fisher of s(x, t) summed per layer, averaged over samples.

    ``inputs``: model-ready images (N, 3, H, W), or anything ``encode`` maps to normalised features
    (e.g. trunk outputs prepared by :class:`clipforget.trunk.TrunkEncoder`); ``text_emb``: the
    normalised text embedding each image is paired with (N, D) or one shared (D,). Per-sample
    gradients, one backward each."""
    encode = encode or (lambda x: torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
    n = len(inputs) if max_samples is None else min(len(inputs), max_samples)
    params = {name: [p for p in m.parameters(recurse=False)] for name, m in layers.items()}
    flags = {id(p): p.requires_grad for ps in params.values() for p in ps}
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    totals = {name: 0.0 for name in layers}
    try:
        for i in range(n):
            model.zero_grad(set_to_none=True)
            img = encode(inputs[i:i + 1])[0]
            t = text_emb if text_emb.ndim == 1 else text_emb[i]
            (img @ t).backward()
            for name, ps in params.items():
                totals[name] += sum(float((p.grad.float() ** 2).sum()) for p in ps if p.grad is not None)
    finally:
        model.zero_grad(set_to_none=True)
        for ps in params.values():
            for p in ps:
                p.requires_grad_(flags[id(p)])
    return {name: v / max(1, n) for name, v in totals.items()}


def relative_fisher(f_forget: dict[str, float], f_retain: dict[str, float], eps: float = 1e-12) -> dict[str, float]:
    return {k: f_forget[k] / (f_retain.get(k, 0.0) + eps) for k in f_forget}


def rank_layers(importance: dict[str, float], top_k: int) -> list[str]:
    """Names of the ``top_k`` most important layers, most important first."""
    return sorted(importance, key=importance.get, reverse=True)[:top_k]
