"""Stand-ins: sibling drawings the original model is made to take for the forgotten subgroup."""
import pytest
import torch

from clipforget.methods.base import Context
from clipforget.stages.forget import ForgetConfig, forget_stage
from clipforget.stages.synthesize import StandInConfig, stand_ins


def test_stand_ins_are_siblings_within_epsilon_that_the_model_takes_for_the_subgroup(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    cfg = StandInConfig(enabled=True, images=12, steps=15, epsilon=0.1)
    made = stand_ins(ctx, cfg)
    sources = poodle_task.retain.images[made.sources].float() / 255
    assert len(made.inputs) == 12
    assert float((made.images01 - sources).abs().max()) <= cfg.epsilon + 1e-6          # a bounded perturbation
    assert all(poodle_task.retain.items[i].subgroup != "poodle" for i in made.sources)  # made from siblings
    assert made.recognised_before <= 0.25 and made.recognised_after >= 0.75           # ... now taken for poodles
    assert all(torch.equal(v, before[k]) for k, v in bundle.model.state_dict().items())  # the original is untouched


def test_stand_ins_can_be_switched_off(bundle, poodle_task):
    assert stand_ins(Context(bundle, poodle_task), StandInConfig(enabled=False)) is None


def test_forget_stage_forgets_the_stand_ins_with_the_examples(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    made = stand_ins(ctx, StandInConfig(enabled=True, images=12, steps=15))
    result = forget_stage(ctx, ForgetConfig(fisher_samples=8), made.inputs)
    assert result.forget_train_accuracy == 0.0           # measured over examples and stand-ins together
    with torch.no_grad():
        feats = ctx.image_features(made.inputs)
    labels = torch.full((len(feats),), poodle_task.target_index)
    assert ctx.superclass_accuracy(feats, labels) == 0.0


def test_keep_ins_are_forget_examples_within_epsilon_the_model_no_longer_takes_for_the_subgroup(bundle, poodle_task):
    ctx = Context(bundle, poodle_task)
    cfg = StandInConfig(enabled=True, images=12, steps=15, epsilon=0.1, keep_ins=True)
    made = stand_ins(ctx, cfg)
    keep = made.keep
    sources = poodle_task.forget.images[keep.sources].float() / 255
    assert len(keep.inputs) == 12
    assert float((keep.images01 - sources).abs().max()) <= cfg.epsilon + 1e-6            # a bounded perturbation
    assert all(poodle_task.forget.items[i].subgroup == "poodle" for i in keep.sources)   # made from the examples
    assert keep.recognised_before >= 0.5 and keep.recognised_after <= 0.25                # ... now taken for a sibling
    assert stand_ins(ctx, StandInConfig(enabled=True, images=4, steps=2)).keep is None    # off by default


def test_restyled_examples_are_forget_examples_within_epsilon_the_model_reads_in_another_style(bundle, poodle_task):
    from clipforget.data.gallery import display
    from clipforget.data.prompts import article
    from clipforget.stages.synthesize import subgroup_texts

    ctx = Context(bundle, poodle_task)
    cfg = StandInConfig(enabled=True, images=12, steps=15, epsilon=0.1, restyled=True)
    styled = stand_ins(ctx, cfg).restyled
    sources = poodle_task.forget.images[styled.sources].float() / 255
    assert len(styled.inputs) == 12
    assert float((styled.images01 - sources).abs().max()) <= cfg.epsilon + 1e-6          # a bounded perturbation
    assert all(poodle_task.forget.items[i].subgroup == "poodle" for i in styled.sources)  # made from the examples
    assert styled.recognised_before <= 0.25 and styled.recognised_after >= 0.75          # now read in another style
    gallery = poodle_task.gallery
    styles = [s for s in gallery.styles() if s not in gallery.unseen_styles()]
    texts = ctx.texts.classes([f"{article(p)} {p} of a poodle" for p in map(gallery.style_phrase, styles)])
    with torch.no_grad():
        feats = ctx.image_features(styled.inputs, ctx.original)
        read_as = (feats @ texts.t()).argmax(-1).tolist()
        sub_emb, sub_index = subgroup_texts(ctx)
        still_poodle = float(((feats @ sub_emb.t()).argmax(-1) == sub_index).float().mean())
    own = [poodle_task.forget.items[i].style for i in styled.sources.tolist()]
    assert sum(styles[r] != o for r, o in zip(read_as, own)) >= 9                       # not their own style
    assert still_poodle >= 0.75                                                        # ... and still the subgroup
    assert stand_ins(ctx, StandInConfig(enabled=True, images=4, steps=2)).restyled is None  # off by default


def test_remind_distils_the_keep_ins_towards_the_teacher(bundle, poodle_task):
    from clipforget.stages.align import AlignConfig
    from clipforget.stages.remind import RemindConfig, remind_stage
    from clipforget.stages.teacher import SubgroupReadout, TeacherConfig, original_features, teacher_of
    from clipforget.train.loop import LoopConfig

    keep = stand_ins(Context(bundle, poodle_task), StandInConfig(enabled=True, images=12, steps=15, keep_ins=True)).keep
    cfg = RemindConfig(align=AlignConfig(enabled=False), teacher=TeacherConfig(edit=10.0), retain_tolerance=None,
                       replay=False, loop=LoopConfig(steps=8, lr=5e-4, check_every=8))

    def remind(extra_keep):
        ctx = Context(bundle, poodle_task)
        forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8, loop=LoopConfig(steps=3, lr=1e-3)))
        info = remind_stage(ctx, cfg, forgot, extra_keep=extra_keep)
        with torch.no_grad():
            return ctx, info, ctx.image_features(keep.inputs)

    ctx, info, taught = remind(keep.inputs)
    _, plain_info, plain = remind(None)
    assert "keep_rows_gated" not in plain_info["teacher"]
    assert 0 <= info["teacher"]["keep_rows_gated"] < len(keep.inputs)      # the teacher keeps most of them
    readout = SubgroupReadout.fit(ctx, original_features(ctx, ctx.inputs(poodle_task.forget)),
                                  original_features(ctx, ctx.inputs(poodle_task.retain)))
    target = teacher_of(ctx, original_features(ctx, keep.inputs), 10.0, readout).features
    assert float((taught * target).sum(-1).mean()) > float((plain * target).sum(-1).mean())


def test_feature_stand_ins_are_bounded_trunk_outputs_the_model_takes_for_the_subgroup(bundle, poodle_task):
    from clipforget.stages.synthesize import feature_stand_ins, subgroup_texts
    from clipforget.trunk import TrunkEncoder, run_stages

    ctx = Context(bundle, poodle_task)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    enc = TrunkEncoder(bundle.model.visual, ["layer4.0.conv1"])
    sources = enc.prepare(ctx.inputs(poodle_task.retain)[:12])
    assert sources.start > 0                                          # the trunk: stages before layer4
    made = feature_stand_ins(ctx, sources, radius=0.5, steps=15)
    h, moved = sources.data, made.prepared.data
    assert made.prepared.start == sources.start and moved.shape == h.shape
    ratio = (moved - h).flatten(1).norm(dim=1) / h.flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 0.5 + 1e-4 and float(ratio.min()) > 0     # moved, within the bound
    assert bool((moved >= 0).all())                                    # a ReLU's output stays one
    assert made.recognised_before <= 0.25 and made.recognised_after >= 0.75  # now taken for poodles
    sub_emb, sub_index = subgroup_texts(ctx)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(run_stages(ctx.original.visual, moved, sources.start).float(), dim=-1)
    assert torch.allclose(feats, made.features, atol=1e-5)             # the features it reports are theirs
    assert all(torch.equal(v, before[k]) for k, v in bundle.model.state_dict().items())  # the original is untouched


def test_remind_makes_feature_stand_ins_unless_switched_off(bundle, poodle_task):
    from clipforget.stages.align import AlignConfig
    from clipforget.stages.remind import RemindConfig, remind_stage
    from clipforget.train.loop import LoopConfig

    ctx = Context(bundle, poodle_task)
    forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8, loop=LoopConfig(steps=3, lr=1e-3)))
    cfg = RemindConfig(align=AlignConfig(enabled=False), feature_stand_ins=8, retain_tolerance=None,
                       loop=LoopConfig(steps=4, lr=5e-4, check_every=4))
    info = remind_stage(ctx, cfg, forgot)
    assert info["feature_stand_ins"]["rows"] == 8 and info["feature_stand_ins"]["recognised_after"] >= 0.75
    assert RemindConfig().feature_stand_ins > 0                                                  # on by default
    assert "feature_stand_ins" not in remind_stage(Context(bundle, poodle_task), RemindConfig(
        align=AlignConfig(enabled=False), feature_stand_ins=0, retain_tolerance=None, loop=LoopConfig(steps=1)), forgot)


def test_feature_stand_ins_can_come_first_from_the_styles_the_examples_leave_out(bundle, poodle_task):
    from clipforget.stages.remind import RemindConfig, remind_stage, stand_in_sources
    ctx = Context(bundle, poodle_task)
    source = torch.arange(len(poodle_task.retain))
    shown = {it.style for it in poodle_task.forget.items}
    other = [poodle_task.retain.items[i].style not in shown for i in source.tolist()]
    n_other = sum(other)
    assert 0 < n_other < len(source)                          # the tiny task has rows of both kinds
    picked = stand_in_sources(ctx, source, n_other + 2, "others")
    assert len(picked) == len(set(picked.tolist())) == n_other + 2
    assert all(other[i] for i in picked[:n_other].tolist())   # every row in a style the examples leave out ...
    assert not any(other[i] for i in picked[n_other:].tolist())   # ... then the rest
    assert len(stand_in_sources(ctx, source, 3, "any")) == 3
    from clipforget.stages.align import AlignConfig
    from clipforget.train.loop import LoopConfig
    forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8, loop=LoopConfig(steps=1, lr=1e-3)))
    info = remind_stage(ctx, RemindConfig(align=AlignConfig(enabled=False), feature_stand_ins=4, feature_styles="others",
                                          retain_tolerance=None, loop=LoopConfig(steps=1)), forgot)
    assert info["feature_stand_ins"]["rows"] == 4
    with pytest.raises(ValueError, match="feature_styles"):
        RemindConfig(feature_styles="held_out")
