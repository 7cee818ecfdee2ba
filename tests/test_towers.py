"""Every tower adapter, on a tiny tower of its family: the trunk split is exact, the layers Fisher
ranks exist, the functionally used ones are found, the norm layers are the family's, CCUP's
projection edit works and a forget stage runs. Parametrized over ``list_adapters()``, so a new
adapter is tested the day it is added (it needs an entry in TINY_TOWERS)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipforget.towers import NoTowerAdapter, adapter_for, called_layers, list_adapters, register_adapter
from clipforget.towers.base import PRUNABLE, TowerAdapter

# adapter -> tiny open_clip configs of its family (registered in conftest) and their norm layers
TINY_TOWERS = {
    "resnet": [("test-tiny-rn", "batchnorm")],
    "vit": [("test-tiny-vit", "layernorm")],
    "timm": [("test-tiny-timm-resnet", "batchnorm"), ("test-tiny-timm-vit", "layernorm")],
}
CASES = [(a, m, norm) for a in list_adapters() for m, norm in TINY_TOWERS.get(a, [(None, None)])]
IDS = [f"{a}-{m}" for a, m, _ in CASES]


@pytest.fixture(scope="module")
def towers():
    """One tiny CLIP per model name, built once (seeded: the same weights for every test)."""
    from clipforget.models import load_clip
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = load_clip(name, device="cpu")
        return cache[name]
    return get


def _images(bundle, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return bundle.normalize(torch.rand(n, 3, bundle.image_size, bundle.image_size, generator=g))


def _features(visual, x):
    with torch.no_grad():
        return F.normalize(visual(x).float(), dim=-1)


def test_every_adapter_has_a_tiny_tower():
    missing = [a for a in list_adapters() if a not in TINY_TOWERS]
    assert not missing, f"add a tiny tower of each new adapter's family to TINY_TOWERS: {missing}"


@pytest.mark.parametrize("adapter,model,norm", CASES, ids=IDS)
def test_adapter_is_found_for_its_tower(towers, adapter, model, norm):
    visual = towers(model).model.visual
    assert adapter_for(visual).name == adapter
    assert type(adapter_for(visual)).__doc__          # every adapter says what is special about its family


@pytest.mark.parametrize("adapter,model,norm", CASES, ids=IDS)
def test_trunk_split_gives_the_whole_towers_features(towers, adapter, model, norm):
    """At every split point, the stages after it on the trunk's output equal a full forward pass;
    the trunk encoder splits where the adapter has stages and runs whole where it has none."""
    from clipforget.trunk import TrunkEncoder, run_stages, split_index, stages
    visual = copy.deepcopy(towers(model).model.visual).eval()
    x = _images(towers(model))
    ref = _features(visual, x)
    order = stages(visual)
    with torch.no_grad():
        for i in range(1, len(order)):
            out = run_stages(visual, run_stages(visual, x, 0, i), i)
            assert torch.allclose(F.normalize(out.float(), dim=-1), ref, atol=1e-5), order[i]
    last = list(adapter_for(visual).prunable_layers(visual))[-1]
    enc = TrunkEncoder(visual, [last], batch_size=4)
    prepared = enc.prepare(x)
    assert enc.split == bool(order) and prepared.start == (split_index(visual, [last]) or 0)
    with torch.no_grad():             # only the layer after the trunk changes, as in training
        dict(visual.named_modules())[last].weight.add_(0.05)
    assert torch.allclose(enc.encode(prepared), _features(visual, x), atol=1e-5)


@pytest.mark.parametrize("adapter,model,norm", CASES, ids=IDS)
def test_prunable_layers_are_conv_or_linear(towers, adapter, model, norm):
    visual = towers(model).model.visual
    layers = adapter_for(visual).prunable_layers(visual)
    mods = dict(visual.named_modules())
    assert layers and all(isinstance(m, PRUNABLE) and mods[n] is m for n, m in layers.items())


@pytest.mark.parametrize("adapter,model,norm", CASES, ids=IDS)
def test_functional_layers_are_those_whose_forward_never_runs(towers, adapter, model, norm):
    """What an adapter declares used functionally is what a forward pass shows: those layers get
    the parametrization path, the others peft's LoRA wrapper."""
    bundle = towers(model)
    visual = bundle.model.visual
    names = list(adapter_for(visual).prunable_layers(visual))
    x = _images(bundle, 1)
    declared = adapter_for(visual).functional_layers(visual, names, x)
    assert declared == set(names) - called_layers(visual, x, names)
    expected = {"resnet": {"attnpool.q_proj", "attnpool.k_proj", "attnpool.v_proj", "attnpool.c_proj"},
                "vit": {"transformer.resblocks.0.attn.out_proj"}}.get(adapter, set())
    assert declared >= expected


@pytest.mark.parametrize("adapter,model,norm", CASES, ids=IDS)
def test_norm_layers_are_the_familys(towers, adapter, model, norm):
    from clipforget.stages.align import NormStats
    visual = towers(model).model.visual
    kind, layers = adapter_for(visual).norm_layers(visual)
    cls = nn.modules.batchnorm._BatchNorm if norm == "batchnorm" else nn.LayerNorm
    assert kind == norm and layers and all(isinstance(m, cls) for m in layers)
    stats = NormStats(visual)
    assert stats.kind == kind and len(stats.targets) == (len(layers) if kind == "batchnorm" else 0)


@pytest.mark.parametrize("adapter,model,norm", CASES, ids=IDS)
def test_ccup_projection_edit_removes_the_forget_directions(towers, adapter, model, norm):
    from clipforget.methods.ccup import forget_basis, low_rank_delta, projection_site
    bundle = towers(model)
    visual = copy.deepcopy(bundle.model.visual).eval()
    x = _images(bundle)
    before = visual(x).detach()
    u = forget_basis(F.normalize(torch.randn(before.shape[1], 2, generator=torch.Generator().manual_seed(1)), dim=0),
                     None)
    state = visual.state_dict()
    for k, d in low_rank_delta(state, projection_site(visual), u, 1.0).items():
        state[k].copy_((state[k].double() + d).to(state[k].dtype))
    with torch.no_grad():
        after = visual(x).double()
    assert not torch.allclose(after.float(), before, atol=1e-4)
    assert float((after @ u).abs().max()) < 1e-5            # the embedding has no forget direction left


@pytest.mark.parametrize("adapter,model,norm", CASES, ids=IDS)
def test_forget_stage_runs_on_the_tiny_tower(towers, adapter, model, norm, gallery):
    """Ranked layers, then explicit layers: functionally used ones where the family has any (the
    parametrization path). The stage trains, merges its low-rank updates and leaves a plain tower
    whose edited weights changed."""
    from clipforget.data.gallery import Gallery
    from clipforget.data.task import ForgetRequest, SplitConfig, ViewCache, build_task
    from clipforget.methods.base import Context
    from clipforget.stages.forget import ForgetConfig, forget_stage
    from clipforget.train.loop import LoopConfig
    bundle = towers(model)
    keep, items, count = {"dog", "cat", "car"}, [], {}
    for it in gallery.items:
        if it.kind == "hierarchy" and it.superclass in keep and not it.unseen_style:
            count[it.subgroup] = count.get(it.subgroup, 0) + 1
            if count[it.subgroup] <= 3:
                items.append(it)
    tiny = Gallery(gallery.root, items, "tiny")
    split = SplitConfig(train_views=2, forget_views=2, calib_views=1, calib_target_views=1, test_views=1,
                        calib_other_images=4, calib_concept_images=4, max_other_images=4, test_images=1,
                        calib_images=1)
    task = build_task(tiny, ForgetRequest("dog", "poodle"), bundle.image_size, split, ViewCache(tiny, source_size=32))
    visual = bundle.model.visual
    names = list(adapter_for(visual).prunable_layers(visual))
    functional = sorted(adapter_for(visual).functional_layers(visual, names, _images(bundle, 1)))
    plain = [n for n in names if n not in functional]
    explicit = tuple(functional[:2] or plain[-2:])
    # a margin no view can beat: never "forgotten", so every step runs
    base = dict(fisher_samples=4, batch_size=8, top_k_layers=2, target_accuracy=0.0, margin=1e6,
                loop=LoopConfig(steps=2, lr=1e-2))
    for cfg in (ForgetConfig(**base), ForgetConfig(**base, layers=explicit)):
        ctx = Context(bundle, task)
        result = forget_stage(ctx, cfg)
        assert result.steps == 2 and len(result.layers) == len(cfg.layers or "ab")
        assert set(result.lora_layers) == set(result.layers)
        edited = ctx.model.visual
        assert type(edited) is type(visual) and not any("lora" in k for k in edited.state_dict())
        changed = {n for n in result.layers
                   if not torch.equal(edited.state_dict()[f"{n}.weight"], ctx.theta0[f"{n}.weight"])}
        assert changed == set(result.layers)
    assert set(functional[:2]) <= set(result.layers)


@pytest.mark.parametrize("adapter,model,norm", [c for c in CASES if c[0] in ("resnet",)], ids=["resnet"])
def test_a_functional_layer_beside_a_peft_layer_trains(towers, adapter, model, norm, gallery):
    """get_peft_model freezes every parameter but its own adapters; the low-rank factors of a
    functionally used layer (a parametrization) must train all the same."""
    from clipforget.data.gallery import Gallery
    from clipforget.data.task import ForgetRequest, SplitConfig, ViewCache, build_task
    from clipforget.methods.base import Context
    from clipforget.stages.forget import ForgetConfig, forget_stage
    from clipforget.train.loop import LoopConfig
    bundle = towers(model)
    items = [it for it in gallery.items if it.kind == "hierarchy" and it.superclass in {"dog", "cat"}
             and not it.unseen_style][:200]
    tiny = Gallery(gallery.root, items, "tiny")
    split = SplitConfig(train_views=2, forget_views=2, calib_views=1, calib_target_views=1, test_views=1,
                        calib_other_images=4, calib_concept_images=4, max_other_images=4, test_images=1,
                        calib_images=1)
    task = build_task(tiny, ForgetRequest("dog", "poodle"), bundle.image_size, split, ViewCache(tiny, source_size=32))
    ctx = Context(bundle, task)
    cfg = ForgetConfig(layers=("attnpool.c_proj", "layer4.0.conv2"), batch_size=8, target_accuracy=0.0, margin=1e6,
                       loop=LoopConfig(steps=2, lr=1e-2))
    forget_stage(ctx, cfg)
    key = "attnpool.c_proj.weight"
    assert not torch.equal(ctx.model.visual.state_dict()[key], ctx.theta0[key])


# ---- a tower no adapter knows -------------------------------------------------------------------

class MyTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 8)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_a_tower_without_an_adapter_gets_a_clear_error():
    from clipforget.stages.fisher import prunable_layers
    from clipforget.trunk import TrunkEncoder
    for call in (lambda: adapter_for(MyTower()), lambda: prunable_layers(MyTower()),
                 lambda: TrunkEncoder(MyTower(), ["head"])):
        with pytest.raises(NoTowerAdapter, match=r"no tower adapter for MyTower: .*clipforget/towers/ with "
                                                  r"@register_adapter \(see towers/base.py\)"):
            call()


def test_registering_an_adapter_makes_the_tower_usable(monkeypatch):
    """What the error message tells a user to do: a small class, and every stage can read the tower."""
    from clipforget.methods.ccup import projection_site
    from clipforget.stages.fisher import prunable_layers
    from clipforget.towers import base
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @register_adapter
    class MyTowerAdapter(TowerAdapter):
        """MyTower: a conv body and a linear head."""
        name, tower = "mytower", MyTower

        def projection(self, visual):
            return "head", "out_in"

    assert "mytower" in list_adapters() and isinstance(adapter_for(MyTower()), MyTowerAdapter)
    assert list(prunable_layers(MyTower())) == ["body", "head"]
    assert projection_site(MyTower()) == ("head", "out_in")
    assert adapter_for(MyTower()).functional_layers(MyTower(), ["body", "head"], torch.rand(1, 3, 8, 8)) == set()
    with pytest.raises(ValueError, match="taken"):
        register_adapter(type("Other", (TowerAdapter,), {"name": "mytower", "tower": MyTower}))


def test_resnet_attention_pool_speed_up_keeps_open_clips_outputs_and_gradients(towers):
    """load_clip makes the mean token the pool's only query: the output open_clip's pool returns,
    and the same gradients for the input and for every projection (LoRA and CCUP edit them)."""
    from open_clip.modified_resnet import AttentionPool2d

    from clipforget.towers.resnet import PooledQueryAttentionPool2d
    pool = towers("test-tiny-rn").model.visual.attnpool
    assert type(pool) is PooledQueryAttentionPool2d and isinstance(pool, AttentionPool2d)
    side = int((pool.positional_embedding.shape[0] - 1) ** 0.5)
    x = torch.randn(4, pool.k_proj.in_features, side, side, generator=torch.Generator().manual_seed(0))
    weights = [m.weight for m in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj)]
    outs, grads = [], []
    for forward in (AttentionPool2d.forward, PooledQueryAttentionPool2d.forward):
        xi = x.clone().requires_grad_(True)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        out = forward(pool, xi)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [w.grad.clone() for w in weights])
        for w in weights:
            w.requires_grad_(False)
    assert outs[0].shape == outs[1].shape and torch.allclose(outs[0], outs[1], atol=1e-5)
    for g_ref, g_fast in zip(*grads):
        assert torch.allclose(g_ref, g_fast, atol=1e-5)
    assert grads[0][1].abs().sum() > 0              # the query projection is trained through it
