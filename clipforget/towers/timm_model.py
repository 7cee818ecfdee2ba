"""open_clip's ``TimmModel``: a timm network as the image tower (configs with ``timm_model_name``)."""
from __future__ import annotations

from open_clip.timm_model import TimmModel
from torch import nn

from .base import TowerAdapter, register_adapter


@register_adapter
class TimmAdapter(TowerAdapter):
    """TimmModel wraps any of timm's hundreds of architectures (``trunk``) and an optional
    pooling / projection ``head``. They share no forward API that resumes from an intermediate
    output, so the tower is not split (it runs whole: exact, only slower), and which weights are
    used functionally is asked of a forward pass (the base default). Norm layers: BatchNorm
    (timm ResNets), else the channels-last LayerNorms (ViTs; a channels-first ``LayerNorm2d``
    normalises another axis than alignment measures, so it is left out). CCUP edits the last
    Linear of ``head`` (``head.proj``, ``head.mlp.fc2``, an attention pool's ``proj``), else the
    trunk's classifier, which open_clip sizes to the embedding when no head projection is asked."""
    name, tower = "timm", TimmModel

    def norm_layers(self, visual: nn.Module) -> tuple[str, list[nn.Module]]:
        bn = [m for m in visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bn:
            return "batchnorm", bn
        ln = [m for m in visual.modules() if isinstance(m, nn.LayerNorm) and not type(m).__name__.endswith("2d")]
        return ("layernorm", ln) if ln else ("none", [])

    def projection(self, visual: nn.Module) -> tuple[str, str]:
        head = [f"head.{n}" for n, m in visual.head.named_modules() if isinstance(m, nn.Linear)]
        if head:
            return head[-1], "out_in"
        classifier = visual.trunk.get_classifier() if hasattr(visual.trunk, "get_classifier") else None
        for n, m in visual.trunk.named_modules():
            if m is classifier and isinstance(m, nn.Linear):
                return f"trunk.{n}", "out_in"
        raise ValueError(f"TimmModel ({type(visual.trunk).__name__}) has no linear projection to the embedding "
                         "(proj 'none' and no classifier): nothing for CCUP to edit")
