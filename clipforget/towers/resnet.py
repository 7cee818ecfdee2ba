"""open_clip's ``ModifiedResNet``: the paper's RN50/RN101 and the embedded model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn

from .base import TowerAdapter, register_adapter

# ModifiedResNet.forward runs these in order; the stem owns conv1..3, bn1..3, act1..3, avgpool.
RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "attnpool")
_STEM_PARTS = ("conv", "bn", "act", "avgpool")
# AttentionPool2d.forward hands these weights to F.multi_head_attention_forward; their own
# forward never runs, so LoRA reaches them only as a weight parametrization
POOL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "c_proj")


class PooledQueryAttentionPool2d(AttentionPool2d):
    """open_clip's attention pool, computing only the output it returns. ``AttentionPool2d``
    attends from every position (the mean token and the HW grid cells) and keeps the mean
    token's row; here the mean token is the only query. The keys and values are every position
    either way, so the result is the same (up to float rounding) with the query and output
    projections applied to one token instead of HW + 1: a faster pool, forward and backward,
    on the embedded model (about 1.5×). Installed by :meth:`ResNetAdapter.speed_up`."""

    def forward(self, x):
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=False)
        return out[0]


@register_adapter
class ResNetAdapter(TowerAdapter):
    """ModifiedResNet: six stages (stem, four residual layers, attention pool) that the trunk
    cache splits at; BatchNorm layers with running statistics for alignment [paper Eq. 4]; the
    attention pool's q/k/v/c projections used functionally; CCUP edits ``attnpool.c_proj``, the
    last map to the embedding."""
    name, tower = "resnet", ModifiedResNet

    def stages(self, visual: nn.Module) -> tuple[str, ...]:
        return RESNET_STAGES if hasattr(visual, "stem") else ()

    def stage_of(self, name: str) -> str | None:
        head = name.split(".")[0]
        stage = "stem" if head.startswith(_STEM_PARTS) else head
        return stage if stage in RESNET_STAGES else None

    def run_stage(self, visual: nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
        return visual.stem(x) if stage == "stem" else getattr(visual, stage)(x)

    def functional_layers(self, visual: nn.Module, names: list[str], example: torch.Tensor) -> set[str]:
        return {n for n in names if n in {f"attnpool.{p}" for p in POOL_PROJECTIONS}}

    def norm_layers(self, visual: nn.Module) -> tuple[str, list[nn.Module]]:
        bn = [m for m in visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return ("batchnorm", bn) if bn else ("none", [])   # none: open_clip's lock() froze them

    def projection(self, visual: nn.Module) -> tuple[str, str]:
        return "attnpool.c_proj", "out_in"

    def speed_up(self, visual: nn.Module) -> list[str]:
        done = []
        for name, m in visual.named_modules():
            if type(m) is AttentionPool2d:       # exactly open_clip's: a subclass may do more
                m.__class__ = PooledQueryAttentionPool2d
                done.append(f"{name}: the mean token is the only query")
        return done
