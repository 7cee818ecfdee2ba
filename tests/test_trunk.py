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


def _delta(bundle, names, seed=0, scale=0.05):
    """A delta on the weights of ``names`` (modules of the image tower, or full parameter names)."""
    g = torch.Generator().manual_seed(seed)
    state = bundle.model.state_dict()
    keys = [k for k in state if any(k == n or k == f"visual.{n}.weight" for n in names)]
    return {k: scale * torch.randn(state[k].shape, generator=g) for k in keys}


@pytest.mark.parametrize("names", [["layer4.0.conv2", "attnpool.k_proj"],     # split before layer4
                                   ["conv1", "attnpool.c_proj"],              # the stem: no split
                                   ["text.transformer.encoder.layer.0.output.dense.weight"]])  # text side only
def test_encode_pair_equals_two_passes(bundle, poodle_task, names):
    """Before and after from one trunk: the embeddings two separate passes give."""
    from clipforget.embed import encode_images
    from clipforget.pipeline import edited_model
    from clipforget.trunk import encode_pair
    delta = _delta(bundle, names)
    assert delta, names
    model = edited_model(bundle, delta, 0.7)
    images = poodle_task.retain.images[:70]          # two batches of 64, the second short
    emb0, emb1 = encode_pair(bundle, images, model, delta.keys())
    assert torch.allclose(emb0, encode_images(bundle, images), atol=1e-5)
    assert torch.allclose(emb1, encode_images(bundle, images, model), atol=1e-5)
    image_side = any(k.startswith("visual.") for k in delta)
    assert (emb0 - emb1).abs().max() > 1e-3 if image_side else emb1 is emb0


def test_report_before_after_equals_separate_evaluations(bundle, gallery, view_cache):
    """The report's columns from the shared trunk equal the original's and the edited model's own
    evaluations; memoised columns (the cheap check's target) are still evaluated after."""
    from clipforget.data.task import ForgetRequest, SplitConfig, build_task
    from clipforget.pipeline import Evaluator
    poodle_task = build_task(gallery, ForgetRequest("dog", "poodle"), bundle.image_size,
                             SplitConfig(max_other_images=48), view_cache)
    delta = _delta(bundle, ["layer4.0.conv3", "attnpool.v_proj"], scale=0.2)
    ev = Evaluator(bundle)
    ev.before(poodle_task, names=["target"])                 # memoised, as forget()'s cheap check leaves it
    before, after = ev.before_after(poodle_task, delta, 1.0, "test+trained")
    fresh = Evaluator(bundle)
    want_before = {**fresh.before(poodle_task), **fresh.before(poodle_task, "trained")}
    want_after = fresh.after(poodle_task, delta, 1.0, "test+trained")
    assert before.keys() == want_before.keys() == after.keys() == want_after.keys()
    for k in before:    # accuracies over a column's views: equal embeddings to 1e-5 give equal argmaxes here
        assert before[k] == pytest.approx(want_before[k], abs=1e-9) and after[k] == pytest.approx(want_after[k], abs=1e-9), k
    assert any(after[k] != before[k] for k in before)        # the delta changed something
