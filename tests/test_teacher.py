"""The edited teacher of remind: the original model, told that what it itself takes for the
subgroup is not the superclass."""
import pytest
import torch

from clipforget.methods.base import Context
from clipforget.stages.teacher import SubgroupReadout, original_features, teacher_outputs


def _features(ctx, views):
    return original_features(ctx, ctx.inputs(views))


def test_the_readout_separates_the_forget_examples_from_their_siblings(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    forget, retain = _features(ctx, poodle_task.forget), _features(ctx, poodle_task.retain)
    readout = SubgroupReadout.fit(ctx, forget, retain, quantile=0.5)
    assert readout is not None
    r_forget, r_retain = readout.read(forget), readout.read(retain)
    assert float(r_forget.mean()) > readout.threshold > float(r_retain.median())
    assert float((readout.gate(forget) > 0).float().mean()) > 0.9     # the model's own poodles pass the gate
    assert float((readout.gate(retain) > 0).float().mean()) < 0.5     # most siblings do not


def test_the_edited_teacher_lowers_the_superclass_only_where_the_gate_is_open(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    x = torch.cat([ctx.inputs(poodle_task.forget, slice(0, 32)), ctx.inputs(poodle_task.retain, slice(0, 32))])
    feats = original_features(ctx, x)
    readout = SubgroupReadout.fit(ctx, feats[:32], feats[32:], quantile=0.5)
    plain, edited = teacher_outputs(ctx, x), teacher_outputs(ctx, x, edit=10.0, readout=readout)
    assert torch.equal(teacher_outputs(ctx, x, edit=0.0, readout=readout).features, plain.features)
    open_ = readout.gate(feats) > 0
    assert open_.any() and (~open_).any()
    assert torch.allclose(edited.features[~open_], plain.features[~open_])
    t = poodle_task.target_index
    p_plain, p_edited = plain.logits.softmax(-1)[:, t], edited.logits.softmax(-1)[:, t]
    assert bool((p_edited[open_] < p_plain[open_]).all())
    assert float(p_edited[:32][open_[:32]].max()) < 0.5          # the gated poodles are no longer "a dog"


def test_remind_with_the_edited_teacher_moves_the_forget_examples_towards_it(bundle, poodle_task):
    from clipforget.stages.forget import ForgetConfig, forget_stage
    from clipforget.stages.align import AlignConfig
    from clipforget.stages.remind import RemindConfig, remind_stage
    from clipforget.stages.teacher import TeacherConfig
    from clipforget.train.loop import LoopConfig

    def remind(teacher):
        ctx = Context(bundle, poodle_task)
        forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8, loop=LoopConfig(steps=3, lr=1e-3)))
        cfg = RemindConfig(align=AlignConfig(enabled=False), teacher=teacher, retain_tolerance=None,
                           loop=LoopConfig(steps=8, lr=5e-4, check_every=8))
        info = remind_stage(ctx, cfg, forgot)
        with torch.no_grad():
            return ctx, info, ctx.image_features(ctx.inputs(poodle_task.forget))

    ctx, _, plain = remind(TeacherConfig(edit=0.0))           # the original itself as the teacher
    _, info, taught = remind(TeacherConfig(edit=10.0, quantile=0.5, forget_rows=True))
    assert 0 <= info["teacher"]["retain_rows_gated"] < len(poodle_task.retain)
    x = ctx.inputs(poodle_task.forget)
    readout = SubgroupReadout.fit(ctx, original_features(ctx, x), _features(ctx, poodle_task.retain), 0.5)
    target = teacher_outputs(ctx, x, 10.0, readout).features      # the edited teacher of the examples
    assert float((taught * target).sum(-1).mean()) > float((plain * target).sum(-1).mean())


def test_a_saturating_gate_gives_the_full_edit_from_the_forget_images_median_on(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    forget, retain = _features(ctx, poodle_task.forget), _features(ctx, poodle_task.retain)
    linear = SubgroupReadout.fit(ctx, forget, retain, quantile=0.9, threshold="retain")
    sat = SubgroupReadout.fit(ctx, forget, retain, quantile=0.9, threshold="retain", gate="saturating")
    r_retain, r_forget = sat.read(retain), sat.read(forget)
    assert sat.threshold == linear.threshold == pytest.approx(float(torch.quantile(r_retain, 0.9)))
    assert float((linear.gate(retain) > 0).float().mean()) == pytest.approx(0.1, abs=0.02)   # the retain tail only
    g = sat.gate(forget)
    assert float(g.max()) == 1.0 and float(g.min()) >= 0.0
    above = r_forget >= r_forget.median()
    assert bool((g[above] == 1.0).all())                                   # full edit from the median on
    below = (r_forget > sat.threshold) & ~above
    assert torch.allclose(g[below], linear.gate(forget)[below] / sat.saturate_at)   # linear below it
    midway = SubgroupReadout.fit(ctx, forget, retain, quantile=0.9)
    assert midway.threshold == pytest.approx(0.5 * (float(torch.quantile(r_retain, 0.9))
                                                    + float(torch.quantile(r_forget, 0.1))))


def test_the_margin_readout_is_the_subgroup_score_over_the_closest_sibling(bundle, poodle_task):
    """``readout = "margin"``: r(x) = ĝ₀(x)·t_sub − max ĝ₀(x)·t_sibling, the stand-ins' criterion;
    the mean readout is the difference-of-means direction. Both fit their threshold the same way."""
    from clipforget.stages.synthesize import subgroup_texts
    ctx = Context(bundle, poodle_task)
    forget, retain = _features(ctx, poodle_task.forget), _features(ctx, poodle_task.retain)
    texts, i = subgroup_texts(ctx)
    siblings = torch.cat([texts[:i], texts[i + 1:]]).float()
    mean = SubgroupReadout.fit(ctx, forget, retain, quantile=0.5)
    margin = SubgroupReadout.fit(ctx, forget, retain, quantile=0.5, kind="margin")
    expected = forget @ texts[i].float() - (forget @ siblings.t()).max(1).values
    assert torch.allclose(margin.read(forget), expected, atol=1e-6)
    assert torch.allclose(mean.read(forget), forget @ (texts[i].float() - siblings.mean(0)), atol=1e-6)
    assert not torch.allclose(margin.read(forget), mean.read(forget))
    rf, rr = margin.read(forget), margin.read(retain)
    assert margin.threshold == pytest.approx(0.5 * (float(torch.quantile(rr, 0.5)) + float(torch.quantile(rf, 0.1))))
    assert float((margin.gate(forget) > 0).float().mean()) > 0.9 > float((margin.gate(retain) > 0).float().mean())


def test_teacher_config_names_a_bad_gate():
    from clipforget.stages.teacher import TeacherConfig
    with pytest.raises(ValueError, match="teacher.readout"):
        TeacherConfig(readout="max")
    with pytest.raises(ValueError, match="teacher.gate"):
        TeacherConfig(gate="step")
    with pytest.raises(ValueError, match="teacher.threshold"):
        TeacherConfig(threshold="forget")
