"""Replay: files no column reads, distilled towards the teacher while reminding."""
import pytest
import torch

from clipforget.methods.base import Context
from clipforget.stages.align import AlignConfig
from clipforget.stages.forget import ForgetConfig, forget_stage
from clipforget.stages.remind import RemindConfig, remind_stage
from clipforget.stages.teacher import SubgroupReadout, TeacherConfig, original_features, teacher_of
from clipforget.train.loop import LoopConfig


def test_remind_distils_the_replay_files_towards_the_teacher_when_asked(bundle, poodle_task):
    replay = poodle_task.replay
    assert len(replay) == 128

    def remind(on: bool):
        ctx = Context(bundle, poodle_task)
        forgot = forget_stage(ctx, ForgetConfig(fisher_samples=8, loop=LoopConfig(steps=3, lr=1e-3)))
        cfg = RemindConfig(align=AlignConfig(enabled=False), teacher=TeacherConfig(edit=10.0), retain_tolerance=None,
                           feature_stand_ins=0, replay=on, loop=LoopConfig(steps=8, lr=5e-4, check_every=8))
        info = remind_stage(ctx, cfg, forgot)
        with torch.no_grad():
            return ctx, info, ctx.image_features(ctx.inputs(replay))

    ctx, info, taught = remind(True)
    _, plain_info, plain = remind(False)
    assert info["replay"] == len(replay) and "replay" not in plain_info
    readout = SubgroupReadout.fit(ctx, original_features(ctx, ctx.inputs(poodle_task.forget)),
                                  original_features(ctx, ctx.inputs(poodle_task.retain)))
    target = teacher_of(ctx, original_features(ctx, ctx.inputs(replay)), 10.0, readout).features
    assert float((taught * target).sum(-1).mean()) > float((plain * target).sum(-1).mean())


def test_keep_batch_sets_how_many_replay_files_each_step_distils(bundle, poodle_task, monkeypatch):
    drawn: list[tuple[int, int]] = []
    sample = Context.sample_indices

    def recording(self, n, batch_size):
        drawn.append((n, batch_size))
        return sample(self, n, batch_size)

    monkeypatch.setattr(Context, "sample_indices", recording)
    ctx = Context(bundle, poodle_task)
    cfg = RemindConfig(align=AlignConfig(enabled=False), retain_tolerance=None, feature_stand_ins=0,
                       keep_batch=16, loop=LoopConfig(steps=3, lr=5e-4, check_every=3))
    remind_stage(ctx, cfg)
    n_replay = len(poodle_task.replay)
    assert drawn.count((n_replay, 16)) == 3                      # one replay batch of 16 per step
    assert (n_replay, cfg.batch_size) not in drawn
    with pytest.raises(ValueError, match="keep_batch"):
        RemindConfig(keep_batch=0)
