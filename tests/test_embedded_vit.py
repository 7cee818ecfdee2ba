"""The embedded world's ViT (``--model embedded-vit``): loads by name, has no BatchNorm, is handled by
the ViT tower adapter, and a short ``forget`` on it changes only the image tower."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from clipforget.data.request import SplitConfig
from clipforget.data.task import ForgetRequest
from clipforget.models import (EMBEDDED, EMBEDDED_VIT, EMBEDDED_VIT_ARCH, EMBEDDED_VIT_WEIGHTS, load_clip,
                               trainable_state_dict)
from clipforget.towers import adapter_for

from conftest import QUICK_SPLIT


@pytest.fixture(scope="module")
def vit():
    return load_clip(EMBEDDED_VIT, device="cpu")


def test_loads_by_name_without_batchnorm(vit):
    from open_clip.transformer import VisionTransformer
    assert EMBEDDED_VIT_WEIGHTS.stat().st_size < 15 * 2**20
    assert vit.arch == EMBEDDED_VIT_ARCH and vit.image_size == 64
    assert isinstance(vit.model.visual, VisionTransformer)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in vit.model.modules())
    assert any(isinstance(m, nn.LayerNorm) for m in vit.model.visual.modules())
    # the shipped file holds every weight but the frozen MiniLM, and nothing else
    from safetensors import safe_open
    with safe_open(str(EMBEDDED_VIT_WEIGHTS), "pt") as f:
        assert set(f.keys()) == set(trainable_state_dict(vit.model, EMBEDDED_VIT_ARCH))


def test_tower_adapter_is_the_vit_one(vit):
    adapter = adapter_for(vit.model.visual)
    assert adapter.name == "vit"
    kind, layers = adapter.norm_layers(vit.model.visual)
    assert kind == "layernorm" and layers
    assert adapter.projection(vit.model.visual) == ("proj", "in_out")
    # the trunk's stages: patch embedding, each block, the pooled head
    assert adapter.stages(vit.model.visual)[0] == "embed" and adapter.stages(vit.model.visual)[-1] == "head"


def test_run_folder_of_the_vit_loads_the_vit():
    from clipforget.runfolder import load_run_model
    for recorded in (EMBEDDED_VIT, EMBEDDED_VIT_ARCH):
        b = load_run_model(SimpleNamespace(model=recorded, pretrained="/gone/embedded-vit.safetensors"), "cpu")
        assert b.arch == EMBEDDED_VIT_ARCH


def test_train_config_of_the_vit():
    from clipforget.cli import build_parser
    from clipforget.train.embedded import TrainEmbeddedConfig, default_config, default_weights
    assert default_weights("vit") == EMBEDDED_VIT_WEIGHTS
    cfg = default_config("vit", seed=3)
    assert cfg.arch == "vit" and cfg.seed == 3 and cfg.grad_clip > 0
    assert default_config("rn") == TrainEmbeddedConfig()   # the ResNet's recipe is untouched
    assert build_parser().parse_args(["train-embedded", "--arch", "vit"]).arch == "vit"
    with pytest.raises(ValueError, match="arch"):
        TrainEmbeddedConfig(arch="mlp")
    # the ViT learns from the ResNet's image features; nothing distils from itself
    assert cfg.distill_from == EMBEDDED and TrainEmbeddedConfig().distill_from is None
    with pytest.raises(ValueError, match="itself"):
        TrainEmbeddedConfig(arch="rn", distill_from=EMBEDDED)
    with pytest.raises(ValueError, match="distill_from"):
        TrainEmbeddedConfig(arch="vit", distill_from="RN50")


def test_distillation_teacher_is_frozen_and_shares_the_text_projection(vit):
    """The teacher of the ViT's recipe: the ResNet's image tower, frozen; the student's text
    projection and temperature start as the teacher's, so both embed into one space."""
    from clipforget.train.embedded import _teacher
    student = copy.deepcopy(vit.model)
    with torch.no_grad():
        for p in student.text.proj.parameters():
            p.zero_()
    teacher = _teacher(EMBEDDED, student)
    rn = load_clip(EMBEDDED, device="cpu").model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for a, b in zip(student.text.proj.state_dict().values(), rn.text.proj.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(teacher(x), rn.visual(x), atol=1e-5)


@pytest.mark.slow
def test_quick_forget_changes_only_the_image_tower(vit, gallery, view_cache):
    """The BN-free path end to end: stand-ins, Fisher, LoRA forget, remind with the LayerNorm
    alignment, restore — a few steps each."""
    from clipforget.pipeline import edited_model, forget
    cfg = {"stand_ins": {"images": 8, "steps": 3}, "forget": {"fisher_samples": 8, "loop": {"steps": 4}},
           "remind": {"align": {"steps": 2, "max_images": 16}, "loop": {"steps": 2, "check_every": 2}},
           "restore": {"grid_points": 3}}
    before = {k: v.clone() for k, v in vit.model.state_dict().items()}
    # taxi: a subgroup the shipped ViT recognises on this split's test files (2 of 3; poodle: none)
    run = forget(vit, ForgetRequest("car", "taxi"), "ours", cfg, gallery, split=SplitConfig(**QUICK_SPLIT),
                 cache=view_cache)
    assert all(torch.equal(v, before[k]) for k, v in vit.model.state_dict().items()), "the given model changed"
    delta = run.result.delta
    assert delta and all(k.startswith("visual.") for k in delta)
    assert any(float(v.abs().max()) > 0 for v in delta.values())
    edited = edited_model(vit, delta, 1.0).state_dict()
    changed = {k for k, v in edited.items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert run.report["columns"]["target"]["before"] > 0
    remind = run.result.info["remind"]   # no BatchNorm: the LayerNorm inputs were aligned [recon]
    assert remind["aligned"] is True and remind["norm"] == "layernorm"
