"""Ours: each stage's defining property, and the method end to end on the embedded world."""
import json

import open_clip
import pytest
import torch

from clipforget.cli import main as cli_main
from clipforget.data.task import ForgetRequest, SplitConfig, build_task
from clipforget.eval.score import score
from clipforget.merge import apply_delta, interpolate
from clipforget.methods.base import Context, config_from_dict, get_method, list_methods
from clipforget.methods.ours import OursConfig
from clipforget.pipeline import Evaluator, edited_model, forget, merge_runs, save_run
from clipforget.stages.fisher import relative_fisher, rank_layers
from clipforget.stages.forget import ForgetConfig, forget_stage, select_layers
from clipforget.stages.align import AlignConfig, align_images
from clipforget.stages.remind import RemindConfig, remind_stage
from clipforget.stages.restore import RestoreConfig, choose_alpha
from clipforget.train.loop import LoopConfig


# ---- pure pieces ----------------------------------------------------------------------------
def test_score_formula():
    cols = {"target": {"before": 0.8, "after": 0.0}, "retain": {"before": 0.9, "after": 0.9},
            "other": {"before": 0.5, "after": 0.25}}
    assert score(cols) == pytest.approx(100 / 3 * (1 + 1 + 0.5))
    cols["other"]["after"] = 0.9          # gains are capped at 1
    assert score(cols) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="target"):
        score({"retain": {"before": 1, "after": 1}})


# The paper's RN50 "marmoset" table: the original model's accuracy per column, then rows of
# (after accuracies, printed Score). Columns: target, retain, ImageNet, CIFAR, Food, STL, ObjectNet.
MARMOSET_BEFORE = (51.0, 54.7, 59.8, 70.4, 60.9, 92.0, 68.9)
MARMOSET_ROWS = {"ours": ((0.0, 50.2, 54.5, 85.7, 62.9, 81.5, 45.2), 91.0),
                 "ga": ((0.0, 0.9, 32.2, 16.4, 22.9, 63.3, 22.1), 45.3),
                 "lip": ((0.7, 0.2, 1.3, 10.7, 0.2, 10.3, 1.6), 18.6)}


def paper_columns(after):
    names = ("target", "retain", "imagenet", "cifar", "food", "stl", "objectnet")
    return {n: {"before": b, "after": a} for n, b, a in zip(names, MARMOSET_BEFORE, after)}


@pytest.mark.parametrize("method", sorted(MARMOSET_ROWS))
def test_score_reproduces_the_papers_rows(method):
    after, printed = MARMOSET_ROWS[method]
    assert round(score(paper_columns(after)), 1) == printed


def test_score_caps_the_target_ratio_too():
    # a method that makes the target *more* recognised (the paper's style table, FT row: 68.1 -> 99.5)
    # scores 0 on the target term, not a negative one that would pull the Score below its other columns
    after = list(MARMOSET_ROWS["ours"][0])
    after[0] = 99.5
    cols = paper_columns(after)
    kept = sum(min(1.0, c["after"] / c["before"]) for n, c in cols.items() if n != "target")
    assert score(cols) == pytest.approx(100 / 7 * kept)
    assert score(cols) == pytest.approx(score(paper_columns([51.0] + after[1:])))      # same as no change


def test_relative_fisher_ranking():
    ff = {"a": 4.0, "b": 1.0, "c": 3.0}
    fr = {"a": 4.0, "b": 0.1, "c": 1.0}
    rel = relative_fisher(ff, fr)
    assert rank_layers(rel, 2) == ["b", "c"]          # relative: b (10x), c (3x)
    assert rank_layers(ff, 2) == ["a", "c"]           # plain Fisher would pick a


def test_choose_alpha_prefers_kept_accuracy_under_the_target():
    curve = [{"alpha": 0.0, "target": 1.0, "retain": 1.0}, {"alpha": 0.5, "target": 0.0, "retain": 0.9},
             {"alpha": 1.0, "target": 0.0, "retain": 0.6}]
    assert choose_alpha(curve, 0.04) == (0.5, True)
    near = curve[:2] + [{"alpha": 1.0, "target": 0.0, "retain": 0.895}]
    assert choose_alpha(near, 0.04, tolerance=0.01) == (1.0, True)     # a stronger soup that costs < 1 point
    assert choose_alpha(curve, 0.04, tolerance=0.01) == (0.5, True)    # but not one that costs 30
    assert choose_alpha([{"alpha": 0.0, "target": 1.0, "retain": 1.0}, {"alpha": 1.0, "target": 0.5, "retain": 0.4}],
                        0.04) == (1.0, False)


def test_an_infeasible_curve_falls_back_to_the_best_calibration_score_when_asked():
    """No α forgets D_m: "least_target" takes the most forgetting however much it costs; "score"
    takes the α with the best Score on D_m, the original (α 0) included."""
    costly = [{"alpha": 0.0, "target": 1.0, "retain": 1.0, "forget_examples": 1.0},
              {"alpha": 0.5, "target": 0.9, "retain": 0.95, "forget_examples": 0.0},
              {"alpha": 1.0, "target": 0.8, "retain": 0.5, "forget_examples": 0.0}]
    # Score on D_m (2 columns): α 0 -> 50, α 0.5 -> 100/2 · (0.1 + 0.95) = 52.5, α 1 -> 100/2 · (0.2 + 0.5) = 35
    assert choose_alpha(costly, 0.0) == (1.0, False)
    assert choose_alpha(costly, 0.0, infeasible="score") == (0.5, False)
    worthless = [dict(r, target=1.0) for r in costly]           # nothing forgotten at any α: the original
    assert choose_alpha(worthless, 0.0, infeasible="score") == (0.0, False)
    assert choose_alpha(costly[:1] + [dict(costly[1], target=0.0)], 0.0, infeasible="score") == (0.5, True)
    with pytest.raises(ValueError, match="infeasible must be"):
        RestoreConfig(infeasible="best")


def test_restore_says_in_its_info_when_no_alpha_forgets_the_calibration_images(monkeypatch):
    from types import SimpleNamespace

    from clipforget.stages import restore
    ctx = SimpleNamespace(chance=0.04, task=SimpleNamespace(trained={}), current_delta=lambda: {},
                          text_delta=lambda: None)
    infeasible = [{"alpha": 0.0, "target": 1.0, "retain": 1.0}, {"alpha": 1.0, "target": 0.5, "retain": 0.9}]
    monkeypatch.setattr(restore, "alpha_curve", lambda *a: infeasible)
    info = restore.restore_stage(ctx, RestoreConfig(grid_points=2))
    assert (info["feasible"], ctx.alpha) == (False, 1.0)
    assert info["warning"].startswith("restore: no α brought the held-out calibration images") and "forgets them most" in info["warning"]
    info = restore.restore_stage(ctx, RestoreConfig(grid_points=2, infeasible="score"))
    assert ctx.alpha == 1.0 and "with the best Score on them" in info["warning"]     # 100/2 · (0.5 + 0.9) = 70 > 50
    monkeypatch.setattr(restore, "alpha_curve", lambda *a: [infeasible[0], dict(infeasible[1], target=0.0)])
    assert "warning" not in restore.restore_stage(ctx, RestoreConfig(grid_points=2))


def test_restore_can_ask_the_target_to_be_forgotten_by_a_logit_margin(monkeypatch):
    """``restore.target_margin``: D_m's target views count as recognised while their superclass is
    within the margin of the best other class, so α must go as far as forgetting them by it; the
    margin's accuracy is shown in the curve, never counted as a column."""
    from types import SimpleNamespace

    from clipforget.stages import restore
    from clipforget.stages.restore import MARGIN_KEY, calibration_score
    curve = [{"alpha": 0.0, "target": 1.0, MARGIN_KEY: 1.0, "retain": 1.0},
             {"alpha": 0.5, "target": 0.0, MARGIN_KEY: 0.5, "retain": 0.9},
             {"alpha": 1.0, "target": 0.0, MARGIN_KEY: 0.0, "retain": 0.8}]
    assert choose_alpha(curve, 0.0) == (0.5, True)                       # the argmax: forgotten at 0.5
    assert choose_alpha(curve, 0.0, target_key=MARGIN_KEY) == (1.0, True)
    plain = [{k: v for k, v in r.items() if k != MARGIN_KEY} for r in curve]
    assert calibration_score(curve, 0.5) == calibration_score(plain, 0.5)
    ctx = SimpleNamespace(chance=0.04, task=SimpleNamespace(trained={}), current_delta=lambda: {},
                          text_delta=lambda: None)
    asked = []
    monkeypatch.setattr(restore, "alpha_curve", lambda *a: asked.append(a[-1]) or curve)
    assert restore.restore_stage(ctx, RestoreConfig(margin=0.0))["alpha"] == 0.5
    info = restore.restore_stage(ctx, RestoreConfig(margin=0.0, target_margin=2.0))
    assert (info["alpha"], info["target_margin"], asked) == (1.0, 2.0, [0.0, 2.0])
    monkeypatch.setattr(restore, "alpha_curve", lambda *a: [dict(r, **{MARGIN_KEY: 0.5}) for r in curve])
    info = restore.restore_stage(ctx, RestoreConfig(target_margin=2.0))
    assert not info["feasible"] and "within a logit margin of 2" in info["warning"]
    with pytest.raises(ValueError, match="target_margin"):
        RestoreConfig(target_margin=-1.0)


def test_the_margin_curve_counts_views_near_their_superclass_as_recognised(bundle, poodle_task):
    """On a real α-curve the margin's target accuracy is never below the argmax's, equals it at a
    negligible margin, and counts exactly the views whose superclass is within the margin."""
    from clipforget.eval.zeroshot import TextCache, column_accuracy
    from clipforget.stages.restore import MARGIN_KEY, alpha_curve
    from clipforget.data.task import Column
    ctx = Context(bundle, poodle_task)
    col = poodle_task.calib["target"]
    emb = ctx.image_features(ctx.inputs(col.views)).detach()
    wrong = Column("wrong", col.views, col.classes, (col.labels + 1) % len(col.classes))  # mostly misread
    sims = emb @ TextCache(bundle).classes(col.classes).t()
    own = sims.gather(1, wrong.labels[:, None])[:, 0]
    gap = own - sims.scatter(1, wrong.labels[:, None], float("-inf")).max(1).values   # < 0: not recognised
    m = float((-gap).median())
    expected = float((gap + m > 0).float().mean())
    plain = column_accuracy(bundle, wrong, TextCache(bundle), image_emb=emb)
    assert plain < expected < 1
    assert column_accuracy(bundle, wrong, TextCache(bundle), image_emb=emb, margin=m) == pytest.approx(expected)
    for margin in (1e-9, 4.0):
        curve = alpha_curve(ctx, {}, [0.0, 1.0], target_margin=margin)
        for row in curve:
            assert row[MARGIN_KEY] >= row["target"]
            if margin < 1e-6:
                assert row[MARGIN_KEY] == row["target"]
    assert MARGIN_KEY not in alpha_curve(ctx, {}, [0.0])[0]


def test_soup_endpoints():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_delta(a, {"w": b["w"] - a["w"]}, 1.5)


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="top_k_layers"):
        ForgetConfig(top_k_layers=0)
    with pytest.raises(ValueError, match="ema_decay"):
        RemindConfig(ema_decay=1.5)
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict(OursConfig, {"forgett": {}})
    cfg = config_from_dict(OursConfig, {"forget": {"top_k_layers": 2, "loop": {"steps": 3}}, "remind": {"enabled": False}})
    assert cfg.forget.top_k_layers == 2 and cfg.forget.loop.steps == 3 and not cfg.remind.enabled
    # a nested override keeps the stage's own values of the fields it leaves out (not the class defaults)
    stage_loop, plain_loop = ForgetConfig().loop, LoopConfig()
    assert (stage_loop.steps, stage_loop.grad_clip) != (plain_loop.steps, plain_loop.grad_clip)
    assert cfg.forget.loop.grad_clip == stage_loop.grad_clip and cfg.forget.loop.lr == stage_loop.lr
    assert cfg.remind.loop == RemindConfig().loop
    assert "ours" in list_methods() and get_method("ours").summary


# ---- stages on the embedded model -----------------------------------------------------------
def test_lora_touches_only_the_chosen_layers(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    cfg = ForgetConfig(top_k_layers=2, fisher_samples=8, loop=LoopConfig(steps=4, lr=1e-3, grad_clip=None))
    info = forget_stage(ctx, cfg)
    assert len(info.layers) == 2
    changed = {k.rsplit(".", 1)[0] for k in ctx.current_delta()}
    assert changed and changed <= set(info.layers)
    assert not any("lora" in k for k in ctx.model.visual.state_dict())     # merged and unloaded


def test_relative_fisher_prefers_other_layers_than_plain(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    rel, info = select_layers(ctx, ForgetConfig(top_k_layers=3, fisher_samples=8, candidate_fraction=1.0))
    plain, _ = select_layers(ctx, ForgetConfig(layer_selection="plain", top_k_layers=3, fisher_samples=8,
                                               candidate_fraction=1.0))
    assert set(info["relative_fisher"]) == set(info["fisher_forget"])
    assert rel != plain


def test_alignment_lowers_the_bn_statistics_loss(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    x = poodle_task.retain.images[:48].float() / 255
    aligned, info = align_images(ctx, x, AlignConfig(steps=8))
    assert info["norm"] == "batchnorm"
    assert info["stat_loss_after"] < 0.8 * info["stat_loss_before"]
    assert aligned.min() >= 0 and aligned.max() <= 1 and not torch.equal(aligned, x)


def test_alignment_micro_batches_give_the_statistics_of_the_whole_set(bundle, poodle_task):
    """Per micro-batch sums reproduce the mean/variance of all images at once, and the
    micro-batched gradient of the alignment objective is the gradient over the whole set."""
    from clipforget.stages.align import NormStats
    ctx = Context(bundle, poodle_task)
    visual = ctx.original.visual.eval()
    x = (poodle_task.retain.images[:24].float() / 255).requires_grad_()
    stats = NormStats(visual)
    moments = []                       # the reference: every layer's input over all 24 images at once
    hooks = [m.register_forward_pre_hook(lambda m, inp: moments.append(
        (inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3), unbiased=False)))) for m in stats.layers]
    visual(bundle.normalize(x))
    for h in hooks:
        h.remove()
    whole = sum(torch.linalg.vector_norm(mu - tm) + torch.linalg.vector_norm(var - tv)
                for (mu, var), (tm, tv) in zip(moments, stats.targets))
    (grad_whole,) = torch.autograd.grad(whole, x)
    with torch.no_grad(), stats:
        for b in (slice(0, 10), slice(10, 24)):
            visual(bundle.normalize(x[b]))
    for (mu, var), (mu_ref, var_ref) in zip(stats.moments(), moments):
        assert torch.allclose(mu, mu_ref, atol=1e-4, rtol=1e-4) and torch.allclose(var, var_ref, atol=1e-4, rtol=1e-4)
    assert float(stats.loss()) == pytest.approx(float(whole), rel=1e-4)

    def aligned(micro_batch):
        return align_images(ctx, x.detach(), AlignConfig(steps=3, micro_batch=micro_batch))
    one, info_one = aligned(24)
    many, info_many = aligned(5)
    assert info_one["stat_loss_before"] == pytest.approx(float(whole), rel=1e-4)
    assert info_many["stat_loss_after"] == pytest.approx(info_one["stat_loss_after"], rel=1e-3)
    # Adam divides by the gradient's size: a pixel whose gradient is ~0 may step either way by up
    # to lr, so the images agree in the mean, and every pixel within the 3 steps' reach
    diff = (one - many).abs()
    assert float(diff.mean()) < 1e-5 and float(diff.max()) <= 3 * AlignConfig().lr
    assert not torch.equal(one, x.detach())
    # the first Adam step moves every pixel by lr·sign(gradient): the same signs as the whole-set gradient
    first, _ = align_images(ctx, x.detach(), AlignConfig(steps=1, micro_batch=7, content_weight=0.0))
    moved = (first - x.detach()).sign()
    # (a gradient within float32 noise of 0 — 1e-4 of the largest — may take either sign: at one
    # thread a pixel at 5e-6 of it did)
    inside = (x.detach() > 0.02) & (x.detach() < 0.98) & (grad_whole.abs() > 1e-4 * grad_whole.abs().max())
    assert torch.equal(moved[inside], -grad_whole.sign()[inside])


def test_alignment_of_a_chunk_that_fits_one_pass_runs_the_tower_once_a_step(bundle, poodle_task):
    """By default (micro_batch None) a chunk whose autograd graph fits the run's activation budget
    goes in one pass: forward once per step (plus the content target and the final statistics),
    after two small probes that measure the graph. A run with a small budget (the app's) takes
    micro-batches of 16, which also run a separate pass for the statistics each step."""
    from clipforget.work import JOB_ACTIVATION_BUDGET
    x = poodle_task.retain.images[:24].float() / 255
    calls = []

    def forwards(ctx, cfg):
        calls.clear()
        hook = ctx.original.visual.register_forward_pre_hook(lambda m, inp: calls.append(len(inp[0])))
        try:
            out, _ = align_images(ctx, x, cfg)
        finally:
            hook.remove()
        return list(calls), out

    one, a = forwards(Context(bundle, poodle_task), AlignConfig(steps=3))
    assert one == [1, 2] + [24] * 5                        # probes; content, 3 steps, final statistics
    small, b = forwards(Context(bundle, poodle_task, activation_budget=JOB_ACTIVATION_BUDGET // 4), AlignConfig(steps=3))
    assert small[:2] == [1, 2] and max(small[2:]) == 16
    assert len(small) == 2 + 2 + 3 * (2 + 2) + 2           # chunks of 16 + 8: content, 3 × (statistics, grad), final
    fixed, c = forwards(Context(bundle, poodle_task), AlignConfig(steps=3, micro_batch=5))
    assert fixed == [5, 5, 5, 5, 4] * (1 + 3 * 2 + 1)      # no probe when the micro-batch is given
    assert (a - b).abs().mean() < 1e-5 and (a - c).abs().mean() < 1e-5   # the same alignment, any pass size


def test_alignment_content_term_keeps_what_the_original_model_sees(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    x = poodle_task.retain.images[:48].float() / 255

    def drift(content_weight):
        aligned, info = align_images(ctx, x, AlignConfig(steps=8, content_weight=content_weight))
        with torch.no_grad():
            a, b = (ctx.image_features(bundle.normalize(v), ctx.original) for v in (aligned, x))
        return float((1 - (a * b).sum(-1)).mean()), info

    free, free_info = drift(0.0)
    kept, kept_info = drift(1000.0)
    assert kept < 0.5 * free                       # the class content survives the alignment
    assert kept_info["stat_loss_after"] < kept_info["stat_loss_before"]    # and the statistics still move


def test_forget_probability_objective_reaches_the_target(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    info = forget_stage(ctx, ForgetConfig(fisher_samples=8, loss="probability", target_accuracy=0.0))
    assert info.forget_train_accuracy == 0.0 and info.steps < ForgetConfig().loop.steps
    assert ctx.accuracy(poodle_task.forget) == 0.0


def test_remind_stops_once_retain_is_back_and_forget_stays_forgotten(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8))
    before = ctx.accuracy(poodle_task.retain)
    align = AlignConfig(steps=5, max_images=32)
    info = remind_stage(ctx, RemindConfig(align=align), forgot)
    assert info["checks"], "remind never checked its goals"
    last = info["checks"][-1]
    assert last["step"] == info["steps"] < RemindConfig().loop.steps         # stopped early ...
    assert last["retain_acc"] >= info["retain_goal"] and last["forget_acc"] <= info["forget_goal"]   # ... at its goals
    # ... and what it checked is what it returns (the EMA weights, not the live ones it trained)
    assert ctx.accuracy(poodle_task.retain) == pytest.approx(last["retain_acc"], abs=1e-6)
    feats = torch.cat([ctx.image_features(ctx.inputs(poodle_task.forget, slice(i, i + 64)))
                       for i in range(0, len(poodle_task.forget), 64)])
    forget_acc = ctx.superclass_accuracy(feats, poodle_task.superclass_labels(poodle_task.forget),
                                         forgot.margin)
    assert forget_acc == pytest.approx(last["forget_acc"], abs=1e-6)
    assert ctx.accuracy(poodle_task.retain) > before
    n = len(poodle_task.retain)                  # the real retain images and aligned copies of (at most 32 of) them
    assert info["train_images"] == n + min(n, align.max_images)
    changed = {k.rsplit(".", 1)[0] for k in ctx.current_delta()}
    assert changed <= set(forgot.layers)          # scope: only the layers the forget stage edited


def test_remind_can_judge_retain_on_the_held_out_calibration_files(bundle, poodle_task):
    """``check_retain = "calibration"``: the stop and the best check read retain on D_m's retain files
    (never trained on): the goal is the original's accuracy there less the tolerance, and a stop
    returns the model whose accuracy on them it checked. (A tolerance of 1 makes the first check
    that finds D_f forgotten stop the run.)"""
    ctx = Context(bundle, poodle_task)
    forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8))
    held_out = poodle_task.calib["retain"]
    original = ctx.accuracy(held_out.views, ctx.original)
    cfg = RemindConfig(align=AlignConfig(enabled=False), check_retain="calibration", retain_tolerance=1.0,
                       loop=LoopConfig(steps=20, lr=5e-4, check_every=2))
    info = remind_stage(ctx, cfg, forgot)
    assert info["retain_goal"] == pytest.approx(original - 1.0, abs=1e-6)
    last = info["checks"][-1]
    assert last["step"] == info["steps"] < cfg.loop.steps and last["forget_acc"] <= info["forget_goal"]
    assert ctx.accuracy(held_out.views) == pytest.approx(last["retain_acc"], abs=1e-6)
    assert ctx.accuracy(held_out.views) != pytest.approx(ctx.accuracy(poodle_task.retain), abs=1e-3)   # not the training rows
    with pytest.raises(ValueError, match="check_retain"):
        RemindConfig(check_retain="test")


def test_remind_can_sample_retain_rows_in_the_forget_examples_styles_more_often(bundle, poodle_task):
    from clipforget.stages.remind import style_matched
    source = torch.arange(len(poodle_task.retain))
    assert style_matched(poodle_task, source, 1.0) is None                  # uniform: the default
    w = style_matched(poodle_task, source, 3.0)
    styles = {it.style for it in poodle_task.forget.items}
    matched = torch.tensor([it.style in styles for it in poodle_task.retain.items])
    assert matched.any() and (~matched).any()
    assert bool((w[matched] == 3.0).all()) and bool((w[~matched] == 1.0).all())
    ctx = Context(bundle, poodle_task)
    info = remind_stage(ctx, RemindConfig(align=AlignConfig(enabled=False), style_matched_weight=3.0,
                                          loop=LoopConfig(steps=2, lr=1e-4)))
    assert info["steps"] == 2 and ctx.current_delta()
    with pytest.raises(ValueError, match="style_matched_weight"):
        RemindConfig(style_matched_weight=0.0)


def test_remind_without_originals_trains_on_the_aligned_images_only(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8, loop=LoopConfig(steps=2, lr=1e-3)))
    info = remind_stage(ctx, RemindConfig(align=AlignConfig(steps=2, keep_originals=False),
                                          loop=LoopConfig(steps=2, lr=1e-4)), forgot)
    assert info["aligned"] and info["train_images"] == min(len(poodle_task.retain), AlignConfig().max_images)


def test_ema_with_decay_one_returns_the_original(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    remind_stage(ctx, RemindConfig(ema_decay=1.0, align=AlignConfig(enabled=False),
                                   loop=LoopConfig(steps=2, lr=1e-3)))
    assert ctx.current_delta() == {}
    ctx2 = Context(bundle, poodle_task)
    remind_stage(ctx2, RemindConfig(ema=False, align=AlignConfig(enabled=False), loop=LoopConfig(steps=2, lr=1e-3)))
    assert ctx2.current_delta()       # without EMA the same steps do change the weights


def test_alpha_zero_reproduces_the_original_exactly(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    forget_stage(ctx, ForgetConfig(fisher_samples=8, loop=LoopConfig(steps=3, lr=1e-3, grad_clip=None)))
    delta = {f"visual.{k}": v for k, v in ctx.current_delta().items()}
    assert delta
    x = poodle_task.forget.images[:4].float() / 255
    original = bundle.model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in edited_model(bundle, delta, 0.0).state_dict().items())
    with torch.no_grad():
        ref = bundle.model.encode_image(bundle.normalize(x))
        # identical weights; outputs to 1e-6 because CPU kernels may pick another algorithm per call
        assert torch.allclose(edited_model(bundle, delta, 0.0).encode_image(bundle.normalize(x)), ref, atol=1e-6)
        assert not torch.equal(edited_model(bundle, delta, 1.0).encode_image(bundle.normalize(x)), ref)


def test_layernorm_fallback_for_towers_without_batchnorm(gallery):
    from clipforget.models import load_clip
    torch.manual_seed(0)
    vit = load_clip("test-tiny-vit", device="cpu")
    task = build_task(gallery, ForgetRequest("dog", "poodle"), vit.image_size)
    ctx = Context(vit, task)
    ref = task.calib["other_superclasses"].views.images.float() / 255
    _, info = align_images(ctx, task.retain.images[:32].float() / 255, AlignConfig(steps=5), ref)
    assert info["norm"] == "layernorm" and info["stat_loss_after"] < info["stat_loss_before"]
    _, skipped = align_images(ctx, task.retain.images[:8].float() / 255, AlignConfig(vit_fallback="skip"))
    assert skipped["aligned"] is False


# ---- end to end -----------------------------------------------------------------------------
# ``runs``: default-config runs of ours (poodle; taxi, shorter), shared with the certificate tests (conftest)


@pytest.mark.slow
def test_ours_forgets_the_subgroup_and_keeps_the_rest(runs):
    run, _ = runs["poodle"]
    r = run.report
    c = r["columns"]
    assert c["target"]["before"] >= 0.9
    # poodle's held-out drawings are forgotten (the held-out sweep in docs/results measures how far
    # from chance the target stays across subgroups). Restore backs off to α < 1 here (the calibration
    # images keep it at chance there), where 1 of the 20 trained-on drawings is still "a dog": that
    # column is reported, outside the Score
    assert c["target"]["after"] <= r["chance"]
    assert r["trained_on"]["forget_examples"]["after"] <= 0.1
    assert c["retain"]["after"] >= 0.85 * c["retain"]["before"]     # held-out sibling drawings (sweep median 0.93)
    assert c["other_superclasses"]["after"] >= c["other_superclasses"]["before"] - 0.05
    assert r["score"] >= 85
    assert 0 < r["alpha"] <= 1 and len(r["alpha_curve"]) >= 2
    assert set(r["seconds"]) >= {"forget", "remind", "restore", "total"}
    hist = run.result.history
    assert hist["forget"] and hist["remind"]


@pytest.mark.slow
def test_run_folder_and_plain_open_clip_export(runs, bundle, minilm_hub_cache):
    run, d = runs["poodle"]
    report = json.loads((d / "report.json").read_text())
    assert {"method", "request", "score", "alpha", "seconds", "columns"} <= set(report)
    assert {"target", "retain", "other_superclasses", "other_concepts"} <= set(report["columns"])
    assert all(0 <= v["before"] <= 1 and 0 <= v["after"] <= 1 for v in report["columns"].values())
    record = json.loads((d / "run.json").read_text())
    assert {"config", "seed", "versions", "gallery_hash"} <= set(record)
    assert "| Target (forget) |" in (d / "report.md").read_text()
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{d / 'export'}")
    plain.eval()
    x = run.task.forget.images[:4].float() / 255
    with torch.no_grad():
        ours = edited_model(bundle, run.result.delta, run.result.alpha).encode_image(bundle.normalize(x))
        assert torch.allclose(plain.encode_image(bundle.normalize(x)), ours, atol=1e-5)


@pytest.mark.slow
def test_merging_two_forget_edits_forgets_both(runs, bundle, view_cache):
    (p_run, p_dir), (t_run, t_dir) = runs["poodle"], runs["taxi"]
    merged = merge_runs([p_dir, t_dir])
    model = edited_model(bundle, merged, 1.0)
    ev = Evaluator(bundle)
    from clipforget.eval.zeroshot import evaluate_columns
    cols = ("target", "other_superclasses")
    p = evaluate_columns(bundle, {c: p_run.task.test[c] for c in cols}, ev.texts, model)
    t = evaluate_columns(bundle, {c: t_run.task.test[c] for c in cols}, ev.texts, model)
    # held-out drawings: most poodles forgotten; the summed edits keep less of taxi's (its edit is the
    # shorter one: 16 stand-ins, 3 alignment steps on 32 images, 10 remind steps)
    assert p["target"] <= 0.5 * p_run.report["columns"]["target"]["before"]
    assert t["target"] <= 0.75 * t_run.report["columns"]["target"]["before"]
    assert p["other_superclasses"] >= 0.85


@pytest.mark.slow
def test_cli_style_request_writes_the_report(tmp_path, capsys):
    out = tmp_path / "lineart-cars"
    small = ('{"train_views": 2, "forget_views": 2, "calib_views": 1, "test_views": 1, "calib_other_images": 40, '
             '"calib_concept_images": 40, "max_other_images": 80}')
    # what a style request writes, not how well it forgets (docs/results/style.md): every stage, briefly
    # (--no-suggest: the retain-set printout encodes the whole gallery first; test_bad_input.py tests it)
    code = cli_main(["forget", "--superclass", "car", "--style", "line-art", "--out", str(out), "--no-export",
                     "--no-suggest", "--split", small, "--set", "stand_ins.images=16", "--set", "stand_ins.steps=10",
                     "--set", "forget.fisher_samples=8", "--set", "forget.loop.steps=20",
                     "--set", "remind.align.steps=3", "--set", "remind.align.max_images=32", "--set", "remind.loop.steps=5",
                     "--set", "restore.grid_points=5"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["request"]["style"] == "line-art" and report["request"]["subgroup"] is None
    assert report["columns"]["target"]["images"] > 0 and "retain" in report["columns"]
    assert "Score" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    code = cli_main(["forget", "--superclass", "dog", "--subgroup", "poodel", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "did you mean 'poodle'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_same_seed_same_report(bundle, gallery, view_cache):
    """Deterministic: the same request, config and seed give the same delta and the same report."""
    cfg = {"stand_ins": {"images": 8, "steps": 5}, "forget": {"fisher_samples": 8, "loop": {"steps": 4}},
           "remind": {"align": {"steps": 3, "max_images": 32}, "loop": {"steps": 5, "check_every": 5}},
           "restore": {"grid_points": 3}}
    ev = Evaluator(bundle)
    split = SplitConfig(train_views=3, forget_views=4, calib_views=1, test_views=1, calib_other_images=40,
                        calib_concept_images=40, max_other_images=40)
    a, b = (forget(bundle, ForgetRequest("fish", "shark"), "ours", cfg, gallery, split=split, cache=view_cache,
                   evaluator=ev) for _ in range(2))
    assert a.result.delta.keys() == b.result.delta.keys() and a.result.delta
    assert all(torch.equal(a.result.delta[k], b.result.delta[k]) for k in a.result.delta)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}   # noqa: E731 - wall time differs
    assert strip(a.report) == strip(b.report)


def test_remind_with_a_rank_keeps_its_change_to_each_weight_matrix_low_rank(bundle, poodle_task):
    def change_ranks(rank):
        ctx = Context(bundle, poodle_task)
        forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8, loop=LoopConfig(steps=2, lr=1e-3)))
        start = {k: v.clone() for k, v in ctx.model.visual.state_dict().items()}
        remind_stage(ctx, RemindConfig(ema=False, rank=rank, retain_tolerance=None, align=AlignConfig(enabled=False),
                                       loop=LoopConfig(steps=4, lr=1e-3)), forgot)
        ranks = {k: int(torch.linalg.matrix_rank((v - start[k]).reshape(len(v), -1).float(), rtol=1e-4))
                 for k, v in ctx.model.visual.state_dict().items() if v.dim() >= 2 and not torch.equal(v, start[k])}
        assert ranks                                  # remind changed some weight matrices
        return ranks

    assert max(change_ranks(1).values()) == 1
    assert max(change_ranks(None).values()) > 1
    with pytest.raises(ValueError, match="rank"):
        RemindConfig(rank=0)


def test_remind_checks_its_final_weights_when_the_budget_runs_out(bundle, poodle_task):
    """A budget that ends between two checks (3 steps, a check every 2, goals out of reach): the
    final weights are checked as well, and what remind returns is the weights of one of its checks
    (the best that kept D_f forgotten, or the final ones)."""
    ctx = Context(bundle, poodle_task)
    forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8))
    cfg = RemindConfig(align=AlignConfig(enabled=False), retain_tolerance=0.0,
                       loop=LoopConfig(steps=3, lr=5e-4, check_every=2))
    info = remind_stage(ctx, cfg, forgot)
    assert info["steps"] == 3 and [c["step"] for c in info["checks"]] == [2, 3]
    kept = next(c for c in info["checks"] if c["step"] == info.get("restored_check", 3))
    assert ctx.accuracy(poodle_task.retain) == pytest.approx(kept["retain_acc"], abs=1e-6)


def test_a_vits_alignment_reference_reads_no_column(poodle_task):
    """The LayerNorm reference is the replay files (no column reads them), else the retain images;
    never a D_m or test file."""
    import dataclasses
    from clipforget.stages.remind import alignment_reference
    ref = alignment_reference(poodle_task)
    assert torch.equal(ref, poodle_task.replay.images.float() / 255)
    no_replay = dataclasses.replace(poodle_task, replay_items=[])
    assert torch.equal(alignment_reference(no_replay), poodle_task.retain.images.float() / 255)
    read = {it.path for c in (*poodle_task.calib.values(), *poodle_task.test.values()) for it in c.views.items}
    assert poodle_task.replay_items and not {it.path for it in poodle_task.replay_items} & read


def test_ema_returns_the_live_values_of_what_fine_tuning_did_not_move():
    from clipforget.stages.remind import EMA
    theta0 = {"w": torch.zeros(2), "bn.running_mean": torch.zeros(2), "n": torch.tensor(0)}
    live = {"w": torch.ones(2), "bn.running_mean": torch.full((2,), 3.0), "n": torch.tensor(5)}
    ema = EMA(theta0, live, ["w"], decay=0.5)
    ema.update()
    final = ema.final_state()
    assert torch.equal(final["w"], torch.full((2,), 0.5))               # θ_ema = 0.5·θ₀ + 0.5·θ
    assert torch.equal(final["bn.running_mean"], live["bn.running_mean"])   # an earlier stage's statistics kept
    assert int(final["n"]) == 5
