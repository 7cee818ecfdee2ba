"""open_clip's ``ModifiedResNet``: the paper's RN50/RN101 and the embedded model."""
from __future__ import annotations

import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from .base import TowerAdapter, register_adapter

# ModifiedResNet.forward runs these in order; the stem owns conv1..3, bn1..3, act1..3, avgpool.
RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "attnpool")
_STEM_PARTS = ("conv", "bn", "act", "avgpool")
# AttentionPool2d.forward hands these weights to F.multi_head_attention_forward; their own
# forward never runs, so LoRA reaches them only as a weight parametrization
POOL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "c_proj")


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
