"""The baselines and CCUP: one test of each method's defining property, and one table test that
runs every registered method on a tiny model and task and checks the shared interface."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from clipforget.data.gallery import Gallery
from clipforget.data.task import ForgetRequest, SplitConfig, ViewCache, build_task
from clipforget.merge import towers
from clipforget.methods.base import Context, get_method, list_methods, text_state
from clipforget.methods.catalog import soup_base
from clipforget.train.loop import LoopConfig
from tinyworld import state_hash

TINY_SPLIT = SplitConfig(train_views=2, forget_views=2, calib_views=1, calib_target_views=1, test_views=1,
                         calib_other_images=12, calib_concept_images=12, max_other_images=16,
                         test_images=1, calib_images=1)
QUICK = LoopConfig(steps=3, lr=1e-3, grad_clip=1.0)
# few steps and samples per method: the table test checks the interface, not the quality
QUICK_CONFIGS = {
    "ours": {"forget": {"fisher_samples": 4, "loop": QUICK, "target_accuracy": None},
             "remind": {"loop": QUICK, "align": {"steps": 2}}, "restore": {"grid_points": 3}},
    "ft": {"loop": QUICK}, "ga": {"loop": QUICK, "early_stop": False},
    "fisher": {"samples": 4}, "lip": {"loop": QUICK, "copies": 2, "batch_size": 4},
    "fisher_retain": {"samples": 4},
    "emmn": {"impair": QUICK, "repair": QUICK, "early_stop": False},
    "unsir": {"noise_images": 4, "noise_loop": LoopConfig(steps=3, lr=0.1, grad_clip=None),
              "impair": QUICK, "repair": QUICK},
    "clip_lip_image": {"synthetic": 4, "synth_loop": LoopConfig(steps=2, lr=0.05, grad_clip=None), "copies": 2,
                       "batch_size": 4, "loop": QUICK},
    "clip_lip": {"copies": 2, "loop": QUICK, "early_stop": False},
    "task_negation": {"loop": QUICK, "lam_grid": (0.5, 1.0)},
    "ccup": {},
}


@pytest.fixture(scope="module")
def tiny():
    from clipforget.models import load_clip
    torch.manual_seed(0)
    return load_clip("test-tiny-rn", device="cpu")


@pytest.fixture(scope="module")
def tiny_gallery(gallery):
    """Four superclasses of the embedded gallery, three images per subgroup (one to train on, one
    for D_m, one to test), plus a few other concepts."""
    keep = {"dog", "cat", "car", "fruit"}
    items, count = [], {}
    for it in gallery.items:
        if it.kind == "hierarchy" and it.superclass in keep and not it.unseen_style:
            count[it.subgroup] = count.get(it.subgroup, 0) + 1
            if count[it.subgroup] <= 3:
                items.append(it)
    items += [it for it in gallery.items if it.kind == "other"][:8]
    return Gallery(gallery.root, items, "tiny")


@pytest.fixture(scope="module")
def tiny_task(tiny, tiny_gallery):
    return build_task(tiny_gallery, ForgetRequest("dog", "poodle"), tiny.image_size, TINY_SPLIT,
                      ViewCache(tiny_gallery, source_size=32))


def quick_config(name: str) -> dict | None:
    """QUICK_CONFIGS of a method; a ``+soup`` variant: its method's, with a 3-point α grid."""
    if soup_base(name):
        return {**QUICK_CONFIGS.get(soup_base(name), {}), "restore": {"grid_points": 3}}
    return QUICK_CONFIGS.get(name)


def with_weights(bundle, result, alpha=1.0):
    from clipforget.pipeline import edited_model
    return edited_model(bundle, result.delta, alpha)


# ---- the table: every registered method, one interface --------------------------------------------

@pytest.mark.parametrize("name", list_methods())
def test_every_method_runs_and_keeps_the_interface(name, tiny, tiny_task):
    cls = get_method(name)
    assert cls.summary, f"{name} needs a one-line summary"
    assert dataclasses.is_dataclass(cls.Config)
    before = state_hash(tiny.model)
    result = cls(quick_config(name)).run(tiny, tiny_task)
    assert state_hash(tiny.model) == before, f"{name} mutated the model it was given"
    assert all(p.grad is None for p in tiny.model.parameters()), f"{name} left gradients on the given model"
    assert result.delta, f"{name} changed nothing"
    assert towers(result.delta) == (["text"] if cls.edits_text else ["image"])   # the tower it says it edits
    assert all(torch.isfinite(v).all() for v in result.delta.values())
    assert 0.0 <= result.alpha <= 1.0 and result.method == name


NEW_METHOD = '''
from dataclasses import dataclass

from clipforget.methods.base import Unlearner, register_method


@dataclass
class DroppedInConfig:
    seed: int = 0


@register_method
class DroppedIn(Unlearner):
    name, Config = "dropped-in", DroppedInConfig
    summary = "a method file nobody listed anywhere"

    def unlearn(self, ctx):
        pass
'''


def test_a_method_file_dropped_into_the_package_is_found(tmp_path, monkeypatch):
    """Registering a method is writing its file: the registry, the CLI's choices and the app's
    menu (read from the source, without importing it) all find it with no list to edit."""
    import sys

    import clipforget.methods as methods
    from clipforget.cli import build_parser
    from clipforget.methods import base
    from clipforget.methods.catalog import builtin_methods, method_modules
    (tmp_path / "dropped_in.py").write_text(NEW_METHOD)
    (tmp_path / "_private_helper.py").write_text("raise AssertionError('private modules are not scanned')\n")
    # a second folder of the package, as if the file had been saved next to ours.py
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    try:
        assert "dropped_in" in method_modules()
        assert builtin_methods()["dropped-in"] == "a method file nobody listed anywhere"
        assert "dropped-in" in list_methods() and get_method("dropped-in").name == "dropped-in"
        assert list(builtin_methods()) == list_methods()           # the menu and the registry agree
        forget = next(a for a in build_parser()._subparsers._group_actions[0].choices["forget"]._actions
                      if a.dest == "method")
        assert "dropped-in" in forget.choices
    finally:
        base._REGISTRY.pop("dropped-in", None)
        sys.modules.pop("clipforget.methods.dropped_in", None)
        monkeypatch.undo()
    assert "dropped-in" not in list_methods() + list(builtin_methods())      # gone with its folder


def test_configs_name_the_bad_field():
    cases = {"ft": {"loss": "mse"}, "ga": {"target_accuracy": 2.0}, "fisher": {"scale": 0.0},
             "fisher_retain": {"cap": 0.0}, "lip": {"sigma": 0.0}, "emmn": {"forget_weight": 0.0},
             "unsir": {"noise_images": 0}, "clip_lip_image": {"top_k_layers": 0}, "clip_lip": {"lora_rank": 0},
             "task_negation": {"lam": -1.0}, "ccup": {"strength": 1.5}}
    for name, bad in cases.items():
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):
            get_method(name)(bad)


# ---- defining properties -------------------------------------------------------------------------

def _spy_inputs(monkeypatch) -> list[tuple[str, object]]:
    """(stage, view set) of every batch a method feeds the model through ``Context.inputs``."""
    seen = []
    real = Context.inputs

    def spy(self, views, idx=None, model=None):
        seen.append((self.current_stage, views))
        return real(self, views, idx, model)
    monkeypatch.setattr(Context, "inputs", spy)
    return seen


def test_ft_never_sees_a_forget_image(tiny, tiny_task, monkeypatch):
    """FT's only data is D_r: every image it feeds the model is a retain view."""
    spy = _spy_inputs(monkeypatch)
    get_method("ft")({"loop": QUICK}).run(tiny, tiny_task)
    seen = [v for _, v in spy]
    assert seen and all(v is tiny_task.retain for v in seen)
    assert not any(it.subgroup == "poodle" for v in seen for it in v.items)


def _forget_loss(bundle, task, model):
    from clipforget.methods.common import forget_loss
    ctx = Context(bundle, task)
    with torch.no_grad():
        return float(forget_loss(ctx, ctx.inputs(task.forget), model))


def test_ga_raises_the_forget_loss(tiny, tiny_task):
    result = get_method("ga")({"loop": LoopConfig(steps=5, lr=1e-3), "early_stop": False}).run(tiny, tiny_task)
    before = _forget_loss(tiny, tiny_task, tiny.model.eval())
    after = _forget_loss(tiny, tiny_task, with_weights(tiny, result))
    assert after > before + 1e-3


def test_fisher_noise_variance_scales_with_inverse_fisher():
    from clipforget.methods.fisher import noise_std
    f = torch.tensor([1.0, 4.0, 100.0, 1e-9])
    std = noise_std(f, scale=0.2, cap=0.5)
    assert torch.allclose(std[:3] ** 2 * f[:3], torch.full((3,), 0.2), rtol=1e-5)   # σ² = scale / F
    assert std[3] == 0.5                                                           # capped
    assert std[0] > std[1] > std[2]


@pytest.mark.parametrize("name,data", [("fisher", "forget"), ("fisher_retain", "retain")])
def test_fisher_method_perturbs_less_where_its_fisher_is_large(name, data, tiny, tiny_task):
    """fisher: the Fisher of D_f (the paper's A.1); fisher_retain: of D_r (Golatkar et al.)."""
    from clipforget.methods.common import diagonal_fisher
    cfg = {"samples": 8, "scale": 1e-6, "cap": 1.0}
    result = get_method(name)(cfg).run(tiny, tiny_task)
    assert result.info["mean_noise_std"] > 0 and result.info["fisher_set"] == data
    # the noise on each entry is N(0, min(scale/F, cap²)); normalised by that std it is N(0, 1)
    ctx = Context(tiny, tiny_task)
    params = dict(ctx.model.visual.named_parameters())
    layer = "attnpool.c_proj.weight"
    views = getattr(tiny_task, data)
    idx = ctx.sample(views, 8)
    labels = tiny_task.superclass_labels(views)

    def per_sample(i):
        logits = ctx.superclass_logits(ctx.inputs(views, idx[i:i + 1]))
        return torch.nn.functional.cross_entropy(logits, labels[idx[i:i + 1]])
    f = diagonal_fisher([params[layer]], per_sample, len(idx))[0]
    z = result.delta[f"visual.{layer}"] / (1e-6 / (f + 1e-8)).sqrt().clamp(max=1.0)
    assert 0.8 < float(z.std()) < 1.2


@pytest.mark.parametrize("name,data", [("fisher", "forget"), ("fisher_retain", "retain")])
def test_fisher_reads_its_data_set(name, data, tiny, tiny_task, monkeypatch):
    """Every image of the Fisher estimate comes from D_f (fisher) or D_r (fisher_retain)."""
    seen = _spy_inputs(monkeypatch)
    get_method(name)({"samples": 4}).run(tiny, tiny_task)
    read = [views for stage, views in seen if stage == "fisher"]
    assert len(read) == min(4, len(getattr(tiny_task, data))) and all(v is getattr(tiny_task, data) for v in read)


def test_lip_lowers_the_lipschitz_ratio(tiny, tiny_task):
    from clipforget.methods.common import lipschitz_ratio
    result = get_method("lip")({"loop": LoopConfig(steps=4, lr=1e-3), "copies": 3, "batch_size": 4}).run(tiny, tiny_task)
    ctx = Context(tiny, tiny_task)
    x = ctx.inputs(tiny_task.forget)

    def ratio(model):
        with torch.no_grad():
            return float(lipschitz_ratio(ctx, x, 4, 1.0, torch.Generator().manual_seed(7), model.eval()))
    assert ratio(with_weights(tiny, result)) < ratio(tiny.model)


def test_clip_lip_image_synthesizes_the_class_and_smooths_only_the_layers_it_picks(tiny, tiny_task):
    """The earlier, image-tower variant of CLIP-LIP (``clip_lip_image``)."""
    from clipforget.methods.clip_lip_image import synthesize
    from clipforget.methods.common import lipschitz_ratio
    ctx = Context(tiny, tiny_task)
    torch.manual_seed(0)
    start = torch.randn(6, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))
    ctx.generator.manual_seed(0)
    samples = synthesize(ctx, 6, LoopConfig(steps=10, lr=0.05, grad_clip=None))
    with torch.no_grad():
        def sim(x):
            return float((ctx.image_features(x, ctx.original) @ ctx.coarse_emb).mean())
        assert sim(samples) > sim(start)             # inverted towards the coarse text
    cfg = {"synthetic": 4, "synth_loop": LoopConfig(steps=3, lr=0.05, grad_clip=None), "copies": 3, "batch_size": 4,
           "top_k_layers": 2, "text_sigma": 0.05, "loop": LoopConfig(steps=4, lr=1e-3)}
    result = get_method("clip_lip_image")(cfg).run(tiny, tiny_task)
    chosen = result.info["layers"]
    magnitude = result.info["grad_magnitude"]
    assert len(chosen) == 2 and min(magnitude[n] for n in chosen) >= max(
        v for n, v in magnitude.items() if n not in chosen)           # the largest gradients are picked
    assert {k.removeprefix("visual.").rsplit(".", 1)[0] for k in result.delta} <= set(chosen)
    x = ctx.inputs(tiny_task.forget)

    def ratio(model):       # the joint image-text Lipschitz ratio it minimises
        with torch.no_grad():
            return float(lipschitz_ratio(ctx, x, 4, 1.0, torch.Generator().manual_seed(7), model.eval(),
                                         text_sigma=0.05))
    assert ratio(with_weights(tiny, result)) < ratio(tiny.model)


def test_clip_lip_changes_only_the_text_tower_through_low_rank_updates(tiny, tiny_task):
    """CLIP-LIP (its source's version): LoRA on the text-tower layers with the largest gradients;
    the image tower is untouched, its objective falls, and its forget term alone (the random tiny
    model cannot tell poodles from the dogs the retain term keeps) lowers the target's probability
    for the forget samples."""
    from clipforget.methods.clip_lip import embed_fixed
    before = state_hash(tiny.model)
    cfg = {"copies": 2, "top_k_layers": 2, "lora_rank": 2, "early_stop": False, "loop": LoopConfig(steps=6, lr=1e-2)}
    full = get_method("clip_lip")(cfg).run(tiny, tiny_task)
    losses = [h["loss"] for h in full.history["lipschitz"]]
    assert losses[-1] < losses[0] and towers(full.delta) == ["text"]
    result = get_method("clip_lip")({**cfg, "retain_weight": 0.0, "lip_weight": 0.0}).run(tiny, tiny_task)
    assert state_hash(tiny.model) == before
    assert result.delta and towers(result.delta) == ["text"]
    assert set(result.delta) <= set(text_state(tiny.model))                   # only text-tower weights
    chosen, magnitude = result.info["layers"], result.info["grad_magnitude"]
    assert len(chosen) == 2 and min(magnitude[n] for n in chosen) >= max(
        v for n, v in magnitude.items() if n not in chosen)                   # the largest gradients
    assert {k.rsplit(".", 1)[0] for k in result.delta} <= set(chosen)
    for v in result.delta.values():                                          # merged LoRA: rank <= r
        assert torch.linalg.matrix_rank(v.float()) <= 2
    ctx = Context(tiny, tiny_task)
    e = embed_fixed(ctx, ctx.inputs(tiny_task.forget))
    c = tiny_task.target_index

    def target_prob(model):
        with torch.no_grad():
            text = ctx.text_features(tiny_task.superclasses, model)
            return float((ctx.logit_scale * e @ text.t()).softmax(-1)[:, c].mean())
    assert target_prob(with_weights(tiny, result)) < target_prob(tiny.model)


def test_a_text_delta_alpha_curve_recomputes_the_class_embeddings(tiny, tiny_task):
    """The restore α-curve of a text-tower edit: α = 0 is the original model's row, α = 1 the
    edited model's, each with class embeddings from its own text tower."""
    from clipforget.eval.zeroshot import TextCache, column_accuracy
    from clipforget.stages.restore import alpha_curve
    ctx = Context(tiny, tiny_task, edits_text=True)
    g = torch.Generator().manual_seed(0)
    ctx.set_text({k: v + torch.randn(v.shape, generator=g) for k, v in ctx.text_weights().items()
                  if k == "text_projection"})
    tdelta = ctx.text_delta()
    assert list(tdelta) == ["text_projection"] and ctx.current_delta() == {}
    curve = alpha_curve(ctx, {}, [0.0, 1.0], tdelta)
    assert torch.equal(ctx.text_weights()["text_projection"], ctx.text_theta0["text_projection"] + tdelta["text_projection"])
    from clipforget.pipeline import edited_model
    for row, a in zip(curve, (0.0, 1.0)):
        model = edited_model(tiny, ctx.delta(), a)
        texts = TextCache(tiny, model)
        for name, col in {**tiny_task.calib, **tiny_task.trained}.items():
            assert row[name] == pytest.approx(column_accuracy(tiny, col, texts, model)), (a, name)
    plain = TextCache(tiny)
    assert curve[0]["target"] == pytest.approx(column_accuracy(tiny, tiny_task.calib["target"], plain, tiny.model))
    edited = TextCache(tiny, edited_model(tiny, ctx.delta(), 1.0))
    assert not torch.allclose(edited.classes(tiny_task.superclasses), plain.classes(tiny_task.superclasses), atol=1e-3)


def test_emmn_maximises_the_forget_loss_and_minimises_the_retain_loss(tiny, tiny_task, monkeypatch):
    """The paper's EMMN (A.1): each impair step reads a D_f batch and a D_r batch; repair reads D_r."""
    from clipforget.methods.common import RetainLoss
    spy = _spy_inputs(monkeypatch)
    cfg = {"impair": LoopConfig(steps=4, lr=1e-3), "repair": LoopConfig(steps=2, lr=1e-3), "early_stop": False}
    get_method("emmn")(cfg).run(tiny, tiny_task)
    impair = [v for stage, v in spy if stage == "impair"]
    assert sum(v is tiny_task.forget for v in impair) == 4 and sum(v is tiny_task.retain for v in impair) == 4
    assert {id(v) for stage, v in spy if stage == "repair"} == {id(tiny_task.retain)}
    monkeypatch.undo()
    # the impair stage alone raises the forget loss, and keeps the retain loss below what the same
    # ascent without the retain term (GA) leaves
    result = get_method("emmn")({**cfg, "repair": LoopConfig(steps=0)}).run(tiny, tiny_task)
    assert "repair" not in result.history
    ga = get_method("ga")({"loop": cfg["impair"], "early_stop": False}).run(tiny, tiny_task)
    edited = with_weights(tiny, result)
    assert _forget_loss(tiny, tiny_task, edited) > _forget_loss(tiny, tiny_task, tiny.model.eval()) + 1e-3
    retain, every = RetainLoss(Context(tiny, tiny_task)), torch.arange(len(tiny_task.retain))
    with torch.no_grad():
        assert float(retain(every, edited)) < float(retain(every, with_weights(tiny, ga)))


def test_unsir_noise_raises_the_forget_loss_and_never_sees_a_forget_image(tiny, tiny_task, monkeypatch):
    from clipforget.methods.unsir import UNSIRConfig, error_maximising_noise
    ctx = Context(tiny, tiny_task)
    cfg = UNSIRConfig(noise_images=4, noise_loop=LoopConfig(steps=5, lr=0.1, grad_clip=None))
    noise, info = error_maximising_noise(ctx, cfg)
    assert info["forget_loss_learned_noise"] > info["forget_loss_initial_noise"]
    assert noise.shape == (4, 3, tiny.image_size, tiny.image_size)
    spy = _spy_inputs(monkeypatch)
    get_method("unsir")(QUICK_CONFIGS["unsir"]).run(tiny, tiny_task)
    assert spy and all(v is tiny_task.retain for _, v in spy)


def test_task_negation_with_zero_lambda_is_the_original(tiny, tiny_task):
    result = get_method("task_negation")({"lam": 0.0, "loop": QUICK}).run(tiny, tiny_task)
    assert result.delta == {}
    assert result.info["lam"] == 0.0
    moved = get_method("task_negation")({"lam": 1.0, "loop": QUICK}).run(tiny, tiny_task)
    assert moved.delta    # the same fine-tuning with λ = 1 does change the weights


def test_task_negation_moves_opposite_to_fine_tuning_on_the_forget_set(tiny, tiny_task):
    """θ₀ − λ·(θ_ft − θ₀): fine-tuning on D_f lowers the forget loss, the negation raises it, and
    the change is −λ times the task vector."""
    cfg = {"loop": LoopConfig(steps=4, lr=1e-3)}
    one = get_method("task_negation")({**cfg, "lam": 1.0}).run(tiny, tiny_task)
    two = get_method("task_negation")({**cfg, "lam": 2.0}).run(tiny, tiny_task)
    for k, v in one.delta.items():      # the same seeded fine-tuning: the same task vector τ = −Δ(λ=1)
        assert torch.allclose(two.delta[k], 2 * v, atol=1e-6)
    finetuned = with_weights(tiny, one)
    theta0 = tiny.model.visual.state_dict()
    tau = {k.removeprefix("visual."): -v for k, v in one.delta.items()}
    finetuned.visual.load_state_dict({k: theta0[k] + tau[k] if k in tau else theta0[k] for k in theta0})
    before = _forget_loss(tiny, tiny_task, tiny.model.eval())
    assert _forget_loss(tiny, tiny_task, finetuned.eval()) < before - 1e-3          # θ₀ + τ: learned D_f
    assert _forget_loss(tiny, tiny_task, with_weights(tiny, one)) > before + 1e-3   # θ₀ − τ: the opposite


def _raw_image_embeddings(model, x):
    with torch.no_grad():
        return model.eval().encode_image(x).float()


def test_ccup_projects_forget_prompts_out_and_keeps_retained_ones(tiny, tiny_task):
    from clipforget.methods.ccup import revert
    from clipforget.methods.common import prompt_embeddings
    retained = ("cat", "car")
    cfg = {"forget_prompts": ("dog",), "retained_prompts": retained}
    result = get_method("ccup")(cfg).run(tiny, tiny_task)
    ctx = Context(tiny, tiny_task)
    x = torch.cat([ctx.inputs(tiny_task.forget), ctx.inputs(tiny_task.retain)])
    e0 = _raw_image_embeddings(tiny.model, x)
    e1 = _raw_image_embeddings(with_weights(tiny, result), x)
    t_r = prompt_embeddings(ctx, list(retained))
    t_f = prompt_embeddings(ctx, ["dog"])
    # retained prompts: raw image–text similarity unchanged
    assert torch.allclose(e1 @ t_r.t(), e0 @ t_r.t(), atol=1e-5)
    # forget prompts: their part outside the retained span is no longer seen at all
    u = result.info["U"]
    assert float((e1 @ u).abs().max()) < 1e-4 and float((e0 @ u).abs().max()) > 1e-3
    ur = torch.linalg.svd(t_r.t().double(), full_matrices=False)[0].float()
    resid = torch.nn.functional.normalize(t_f - (t_f @ ur) @ ur.t(), dim=-1)
    assert float((e1 @ resid.t()).abs().max()) < 1e-4
    # low rank and reversible
    assert result.info["rank"] == u.shape[1] <= len(t_f)
    for v in result.delta.values():
        # float32 rounding of θ_u − θ₀ leaves singular values ~1e-7 of the largest
        assert torch.linalg.matrix_rank(v.reshape(v.shape[0], -1).double(), rtol=1e-4) <= u.shape[1]
    theta0 = tiny.model.visual.state_dict()
    edited = with_weights(tiny, result).visual.state_dict()
    back = revert(edited, result.info)
    assert all(torch.allclose(back[k], theta0[k], atol=1e-6) for k in theta0 if theta0[k].is_floating_point())


def test_ccup_without_retained_prompts_zeroes_the_forget_similarity(tiny, tiny_task):
    from clipforget.methods.common import prompt_embeddings
    result = get_method("ccup")({"forget_prompts": ("dog",), "retained_prompts": ()}).run(tiny, tiny_task)
    ctx = Context(tiny, tiny_task)
    e1 = _raw_image_embeddings(with_weights(tiny, result), ctx.inputs(tiny_task.forget))
    t_f = prompt_embeddings(ctx, ["dog"])
    assert float((torch.nn.functional.normalize(e1, dim=-1) @ t_f.t()).abs().max()) < 1e-5


def test_ccup_strength_zero_is_the_identity_and_strength_is_linear(tiny, tiny_task):
    zero = get_method("ccup")({"strength": 0.0}).run(tiny, tiny_task)
    assert zero.delta == {}
    full = get_method("ccup")({"strength": 1.0}).run(tiny, tiny_task)
    half = get_method("ccup")({"strength": 0.5}).run(tiny, tiny_task)
    for k, v in full.delta.items():
        assert torch.allclose(half.delta[k], 0.5 * v, atol=1e-6)


def test_ccup_on_a_vit_edits_proj():
    from clipforget.models import load_clip
    from clipforget.methods.ccup import forget_basis, low_rank_delta, projection_site
    vit = load_clip("test-tiny-vit", device="cpu")
    site = projection_site(vit.model.visual)
    assert site == ("proj", "in_out")
    u = forget_basis(torch.nn.functional.normalize(torch.randn(16, 2), dim=0), None)
    d = low_rank_delta(vit.model.visual.state_dict(), site, u, 1.0)
    new = vit.model.visual.proj.detach().double() + d["proj"]
    assert torch.allclose(new @ u, torch.zeros(new.shape[0], 2, dtype=torch.double), atol=1e-10)


# ---- at their defaults, on the embedded model: the learned baselines forget held-out images ------

# few views and images: the held-out target column is 2 poodle files x 8 views the methods never see
HELD_OUT_SPLIT = SplitConfig(train_views=2, forget_views=8, calib_views=1, calib_target_views=1, test_views=8,
                             calib_other_images=8, calib_concept_images=4, max_other_images=8,
                             test_images=2, calib_images=2)


@pytest.fixture(scope="module")
def held_out_task(bundle, gallery, view_cache):
    return build_task(gallery, ForgetRequest("dog", "poodle"), bundle.image_size, HELD_OUT_SPLIT, view_cache)


@pytest.mark.parametrize("name", ["ft", "ga", "emmn"])
def test_learned_baselines_lower_the_held_out_target_at_their_defaults(name, bundle, held_out_task):
    """The paper reports that FT, GA and EMMN forget the in-domain subgroup (marmoset); at their
    default configs they lower the target accuracy on held-out files here too."""
    from clipforget.eval.zeroshot import TextCache, column_accuracy
    texts = TextCache(bundle)
    column = held_out_task.test["target"]
    before = column_accuracy(bundle, column, texts, bundle.model.eval())
    result = get_method(name)().run(bundle, held_out_task, texts=texts)
    after = column_accuracy(bundle, column, texts, with_weights(bundle, result))
    assert before >= 0.75 and after <= before - 0.25, f"{name}: target {before:.2f} -> {after:.2f}"


# ---- +soup: every learned method followed by ours' restore stage -----------------------------------

def test_every_learned_method_has_a_soup_variant_and_only_those():
    from clipforget.methods.catalog import SOUP_SUFFIX, builtin_methods
    names = list_methods()
    plain = [n for n in names if not soup_base(n)]
    learned = [n for n in plain if get_method(n).learned and not get_method(n).restores]
    assert {"ft", "ga", "emmn", "unsir", "lip", "task_negation"} <= set(learned)
    assert "ours" in plain and get_method("ours").learned and "ours+soup" not in names   # restores itself
    assert {n for n in names if soup_base(n)} == {n + SOUP_SUFFIX for n in learned}
    for n in learned:
        variant = get_method(n + SOUP_SUFFIX)
        assert variant.soup_of == n and issubclass(variant, get_method(n)) and variant.restores
        assert issubclass(variant.Config, get_method(n).Config)
    assert {"fisher", "fisher_retain", "ccup"}.isdisjoint(learned)           # noise / closed form: no training
    assert list(builtin_methods()) == names          # the app's menu lists the variants too, from the source
    from clipforget.cli import build_parser
    commands = build_parser()._subparsers._group_actions[0].choices
    forget = next(a for a in commands["forget"]._actions if a.dest == "method")
    assert {n + SOUP_SUFFIX for n in learned} <= set(forget.choices)               # clipforget forget --method
    bench = next(a for a in commands["bench"]._actions if a.dest == "methods")
    assert "ga+soup" in bench.help                                                   # bench --methods


def test_clip_lip_is_declared_learned():
    assert get_method("clip_lip").learned


def test_a_soup_variant_takes_its_methods_overrides_and_a_restore_field():
    from clipforget.methods.soup import soup_config
    from clipforget.stages.restore import RestoreConfig
    cls = get_method("ga+soup")
    m = cls({"loop": {"lr": 3e-5}, "restore": {"margin": 0.0}})
    assert m.config.loop.lr == 3e-5 and m.config.loop.steps == 40 and m.config.restore.margin == 0.0
    assert cls().config.restore == RestoreConfig()                                       # ours' defaults
    with pytest.raises(ValueError, match="target_accuracy"):
        cls({"target_accuracy": 2.0})                                                   # the method's checks
    with pytest.raises(TypeError, match="restore"):
        soup_config(get_method("ours").Config)


def test_soup_keeps_the_methods_delta_and_picks_alpha_by_the_restore_rule(tiny, tiny_task):
    from clipforget.stages.restore import choose_alpha
    over = {"loop": QUICK, "early_stop": False}
    plain = get_method("ga")(over).run(tiny, tiny_task)
    soup = get_method("ga+soup")({**over, "restore": {"grid_points": 5}}).run(tiny, tiny_task)
    assert plain.alpha == 1.0 and plain.alpha_curve == []
    assert soup.delta.keys() == plain.delta.keys()
    assert all(torch.equal(soup.delta[k], plain.delta[k]) for k in plain.delta)      # Δ is the method's
    assert [r["alpha"] for r in soup.alpha_curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    best, feasible = choose_alpha(soup.alpha_curve, 0.0, 0.01, tuple(tiny_task.trained))
    assert soup.alpha == (min(1.0, round(best + 0.1, 6)) if feasible else best)
    assert soup.info["restore"]["alpha"] == soup.alpha and soup.info["restore"]["feasible"] == feasible
    assert soup.config["restore"]["grid_points"] == 5 and soup.method == "ga+soup"


def test_soup_backs_off_a_delta_that_destroys_the_retain_set(tiny, tiny_task, monkeypatch):
    """A curve on which α = 1 forgets but wrecks the retain column: restore keeps the weakest α
    that still forgets (plus the margin), as it does for ours; forgetting nowhere -> lowest target."""
    import clipforget.stages.restore as restore
    def wrecking(ctx, delta, alphas, text_delta=None, target_margin=0.0):
        return [{"alpha": a, "target": 1.0 if a < 0.3 else 0.0, "retain": 1.0 - a, "forget_examples": 0.0}
                for a in alphas]
    monkeypatch.setattr(restore, "alpha_curve", wrecking)
    over = {"loop": QUICK, "early_stop": False}
    soup = get_method("ga+soup")(over).run(tiny, tiny_task)
    assert soup.alpha == pytest.approx(0.4) and soup.info["restore"]["calibrated_alpha"] == pytest.approx(0.3)
    assert soup.alpha_curve == wrecking(None, None, [i / 10 for i in range(11)])
    monkeypatch.setattr(restore, "alpha_curve", lambda ctx, d, alphas, text_delta=None, target_margin=0.0: [
        {"alpha": a, "target": 1.0 - 0.5 * a, "retain": 1.0} for a in alphas])
    soup = get_method("ga+soup")(over).run(tiny, tiny_task)
    assert soup.alpha == 1.0 and soup.info["restore"]["feasible"] is False


def test_a_method_and_its_soup_come_from_one_run(tiny, tiny_task, monkeypatch):
    """bench --methods ga,ga+soup with one config: one run; ga's row is that run's delta at α = 1,
    evaluated on the same test columns, restore left out of its config and seconds."""
    from clipforget import benchmark
    from clipforget.pipeline import Evaluator
    ran = []
    real = benchmark.run_method
    monkeypatch.setattr(benchmark, "run_method", lambda bundle, task, method, *rest: ran.append(method) or
                        real(bundle, task, method, *rest))
    evaluator = Evaluator(tiny)
    runs = benchmark.run_methods(tiny, tiny_task, ["ga", "ga+soup"], {"ga": {"loop": QUICK, "early_stop": False}},
                                 evaluator)
    assert ran == ["ga+soup"] and list(runs) == ["ga", "ga+soup"]
    plain, soup = runs["ga"], runs["ga+soup"]
    assert plain.result.method == "ga" and plain.result.alpha == 1.0 and plain.result.alpha_curve == []
    assert plain.result.delta is soup.result.delta
    assert "restore" not in plain.result.config and "restore" not in plain.report["seconds"]
    assert plain.report["seconds"]["total"] < soup.report["seconds"]["total"]
    assert plain.report["seed"] == soup.report["seed"]
    assert plain.report["columns"] == evaluator.report(tiny_task, plain.result)["columns"]
    assert plain.report["alpha"] == 1.0 and plain.report["score"] == evaluator.report(tiny_task, plain.result)["score"]
