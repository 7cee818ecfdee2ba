"""The frozen-trunk shortcut is exact: the same features as full forward passes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from clipforget.trunk import TrunkEncoder, split_index, stage_of


def test_stage_names(bundle):
    visual = bundle.model.visual
    assert stage_of(visual, "visual.conv2.weight") == "stem"
    assert stage_of(visual, "bn3.running_mean") == "stem"
    assert stage_of(visual, "layer4.0.downsample.0") == "layer4"
    assert stage_of(visual, "base_model.model.attnpool.c_proj.lora_A.default.weight") == "attnpool"
    assert stage_of(visual, "not_a_stage.weight") is None


def test_split_point(bundle):
    visual = bundle.model.visual
    assert split_index(visual, ["layer4.0.conv2", "attnpool.v_proj"]) == 4
    assert split_index(visual, ["layer3.0.conv1.weight"]) == 3
    assert split_index(visual, ["conv1.weight", "attnpool.v_proj"]) is None     # the stem changes too
    assert split_index(visual, []) is None


def _perturb(visual, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = dict(visual.named_modules())
    with torch.no_grad():
        for n in names:
            mods[n].weight.add_(0.05 * torch.randn(mods[n].weight.shape, generator=g))


@pytest.mark.parametrize("names", [["layer4.0.conv2", "attnpool.c_proj"], ["layer3.0.downsample.0"]])
def test_prepared_trunk_equals_full_forward(bundle, poodle_task, names):
    visual = copy.deepcopy(bundle.model.visual).eval()
    x = bundle.normalize(poodle_task.retain.images[:40].float() / 255)
    enc = TrunkEncoder(visual, names, batch_size=16)
    prepared = enc.prepare(x)
    assert prepared.start == split_index(visual, names) and len(prepared) == 40
    _perturb(visual, names)              # only the layers after the trunk change, as in training
    with torch.no_grad():
        ref = F.normalize(visual(x).float(), dim=-1)
        assert torch.allclose(enc(prepared[5:17]), ref[5:17], atol=1e-5)
    assert torch.allclose(enc.encode(prepared), ref, atol=1e-5)


def test_trunk_under_a_lora_wrapper_and_gradients(bundle, poodle_task):
    from peft import LoraConfig, get_peft_model
    visual = copy.deepcopy(bundle.model.visual).eval()
    wrapped = get_peft_model(visual, LoraConfig(target_modules=["layer4.0.conv2"], r=4, lora_alpha=8)).eval()
    x = bundle.normalize(poodle_task.forget.images[:8].float() / 255)
    enc = TrunkEncoder(wrapped, ["layer4.0.conv2"])
    prepared = enc.prepare(x)
    assert prepared.start == 4
    feats = enc(prepared)
    feats.sum().backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    with torch.no_grad():
        assert torch.allclose(feats, F.normalize(wrapped(x).float(), dim=-1), atol=1e-5)


def test_no_split_when_disabled_or_over_budget(bundle, poodle_task):
    x = bundle.normalize(poodle_task.forget.images[:4].float() / 255)
    visual = bundle.model.visual
    assert TrunkEncoder(visual, ["attnpool.c_proj"], enabled=False).prepare(x).start == 0
    tiny = TrunkEncoder(visual, ["attnpool.c_proj"], budget_bytes=1024).prepare(x)
    assert tiny.start == 0 and torch.equal(tiny.data, x)     # falls back to model inputs
    with torch.no_grad():
        assert torch.allclose(TrunkEncoder(visual, ["attnpool.c_proj"], budget_bytes=1024).encode(tiny),
                              F.normalize(visual(x).float(), dim=-1), atol=1e-5)
