"""open_clip's ``VisionTransformer``: ViT-B-32 and the other ViT CLIPs."""
from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from .base import TowerAdapter, register_adapter

# VisionTransformer._embeds owns these: patchify, class token, positions, patch dropout, ln_pre
_EMBED_PARTS = ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "ln_pre")
# VisionTransformer._pool and the projection after it
_HEAD_PARTS = ("ln_post", "proj", "attn_pool", "attn_pool_contrastive")
_BLOCKS = "transformer.resblocks"


@register_adapter
class ViTAdapter(TowerAdapter):
    """VisionTransformer: stages are the patch embedding, each residual block and the pooled head,
    so the trunk cache splits between blocks. No BatchNorm: alignment falls back to LayerNorm
    inputs [recon]. torch's ``nn.MultiheadAttention`` passes its ``out_proj`` weight to
    ``F.multi_head_attention_forward`` (functional); its q/k/v ``in_proj_weight`` is a bare
    parameter, not a prunable layer. CCUP edits ``proj`` (applied as ``pooled @ proj``)."""
    name, tower = "vit", VisionTransformer

    def stages(self, visual: nn.Module) -> tuple[str, ...]:
        # the stages call open_clip's own pieces of forward(); a version without them runs whole
        if not (hasattr(visual, "_embeds") and hasattr(visual, "_pool")):
            return ()
        blocks = tuple(f"{_BLOCKS}.{i}" for i in range(len(visual.transformer.resblocks)))
        return ("embed",) + blocks + ("head",)

    def stage_of(self, name: str) -> str | None:
        head = name.split(".")[0]
        if head in _EMBED_PARTS:
            return "embed"
        if head in _HEAD_PARTS:
            return "head"
        if name.startswith(_BLOCKS + "."):
            return ".".join(name.split(".")[:3])
        return None

    def run_stage(self, visual: nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
        if stage == "embed":
            return visual._embeds(x)
        if stage == "head":          # as the end of VisionTransformer.forward
            pooled, tokens = visual._pool(x)
            if visual.proj is not None:
                pooled = pooled @ visual.proj
            return (pooled, tokens) if visual.output_tokens else pooled
        block = visual.transformer.resblocks[int(stage.rsplit(".", 1)[1])]
        if visual.transformer.batch_first:      # the cache always holds (N, L, D): it is indexed by image
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    def functional_layers(self, visual: nn.Module, names: list[str], example: torch.Tensor) -> set[str]:
        mods = dict(visual.named_modules())
        return {n for n in names if n.endswith(".out_proj")
                and isinstance(mods.get(n.rsplit(".", 1)[0]), nn.MultiheadAttention)}

    def norm_layers(self, visual: nn.Module) -> tuple[str, list[nn.Module]]:
        ln = [m for m in visual.modules() if isinstance(m, nn.LayerNorm)]
        return ("layernorm", ln) if ln else ("none", [])

    def projection(self, visual: nn.Module) -> tuple[str, str]:
        if not isinstance(getattr(visual, "proj", None), nn.Parameter):
            raise ValueError("this VisionTransformer has no `proj` (its head was pruned): nothing for CCUP to edit")
        return "proj", "in_out"
