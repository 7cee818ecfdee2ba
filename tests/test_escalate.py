"""Escalation in ours: when restore leaves D_m's held-out forget images recognised, remind and
restore run again from the forget stage's weights with a stronger teacher edit, and the run with the
better Score on D_m is kept — weights, α, curve and the stages' info together."""
import pytest
import torch

from clipforget.eval.score import score
from clipforget.methods import ours as ours_mod
from clipforget.methods.ours import EscalateConfig, Ours
from clipforget.stages.restore import calibration_score


def _curve(target_at_1: float, retain_at_1: float) -> list[dict]:
    return [{"alpha": 0.0, "target": 1.0, "retain": 0.9, "forget_examples": 1.0},
            {"alpha": 1.0, "target": target_at_1, "retain": retain_at_1, "forget_examples": 0.0}]


def test_calibration_score_is_the_papers_score_on_the_calibration_columns():
    curve = _curve(0.25, 0.6)
    got = calibration_score(curve, 1.0, ("forget_examples",))
    assert got == pytest.approx(score({"target": {"before": 1.0, "after": 0.25},
                                       "retain": {"before": 0.9, "after": 0.6}}))
    assert calibration_score(curve, 0.0, ("forget_examples",)) == pytest.approx(50.0)   # the original


class FakeStages:
    """Each remind adds its γ to one weight (so the kept run can be read off the weights) and
    restore reports the curve this γ is given in ``outcomes``."""

    def __init__(self, monkeypatch, outcomes: dict[float, tuple[float, float]]):
        self.outcomes, self.reminded, self.start_weights = outcomes, [], []
        monkeypatch.setattr(ours_mod, "stand_ins", lambda ctx, cfg: None)
        monkeypatch.setattr(ours_mod, "forget_stage", self.forget)
        monkeypatch.setattr(ours_mod, "remind_stage", self.remind)
        monkeypatch.setattr(ours_mod, "restore_stage", self.restore)

    @staticmethod
    def _weight(ctx):
        return next(v for v in ctx.model.visual.state_dict().values() if v.is_floating_point())

    def forget(self, ctx, cfg, extra):
        with torch.no_grad():
            self._weight(ctx).add_(100.0)

        class Forgot:
            def to_dict(self):
                return {}
        return Forgot()

    def remind(self, ctx, cfg, forgot, extra, extra_keep=None):
        gamma = cfg.teacher.edit
        self.reminded.append(gamma)
        self.start_weights.append(self._weight(ctx).clone())
        ctx.log_history("remind", [{"teacher_edit": gamma}])
        with torch.no_grad():
            self._weight(ctx).add_(gamma)
        return {"teacher_edit": gamma}

    def restore(self, ctx, cfg):
        gamma = self.reminded[-1]
        ctx.alpha, ctx.alpha_curve = 1.0, _curve(*self.outcomes[gamma])
        return {"alpha": 1.0, "target_accuracy": 0.0, "teacher_edit": gamma}


def _run(bundle, poodle_task, edits, min_recognised=None):
    from clipforget.methods.base import Context
    ctx = Context(bundle, poodle_task)
    before = FakeStages._weight(ctx).clone()
    Ours({"escalate": {"teacher_edits": list(edits), "min_recognised": min_recognised}}).unlearn(ctx)
    return ctx, FakeStages._weight(ctx) - before


def test_no_escalation_once_the_calibration_forget_images_are_forgotten(bundle, poodle_task, monkeypatch):
    fake = FakeStages(monkeypatch, {5.0: (0.0, 0.8), 10.0: (0.0, 0.9)})
    ctx, moved = _run(bundle, poodle_task, [10.0])
    assert fake.reminded == [5.0] and "escalate" not in ctx.info
    assert torch.allclose(moved, torch.full_like(moved, 105.0))


def test_a_stronger_edit_that_scores_better_on_the_calibration_set_is_kept(bundle, poodle_task, monkeypatch):
    fake = FakeStages(monkeypatch, {5.0: (0.5, 0.85), 10.0: (0.0, 0.8)})
    ctx, moved = _run(bundle, poodle_task, [10.0])
    assert fake.reminded == [5.0, 10.0]
    assert torch.equal(fake.start_weights[0], fake.start_weights[1])      # both from the forget stage's weights
    assert torch.allclose(moved, torch.full_like(moved, 110.0))
    assert ctx.alpha_curve[1]["target"] == 0.0 and ctx.info["restore"]["teacher_edit"] == 10.0
    assert ctx.info["remind"] == {"teacher_edit": 10.0}
    assert ctx.info["escalate"][0]["kept"] is True
    assert ctx.history["remind"] == [{"teacher_edit": 10.0}]            # the kept run's history only
    assert (ctx.info["escalate"][0]["against_target"], ctx.info["escalate"][0]["calibration_target"]) == (0.5, 0.0)


def test_a_stronger_edit_that_scores_worse_is_dropped(bundle, poodle_task, monkeypatch):
    # γ 10 and 20 forget D_m's images but lose retain; the kept run still leaves them recognised,
    # so every γ is tried in turn, each from the forget stage's weights
    fake = FakeStages(monkeypatch, {5.0: (0.25, 0.9), 10.0: (0.0, 0.3), 20.0: (0.0, 0.2)})
    ctx, moved = _run(bundle, poodle_task, [10.0, 20.0])
    assert fake.reminded == [5.0, 10.0, 20.0]
    assert all(torch.equal(w, fake.start_weights[0]) for w in fake.start_weights)
    assert torch.allclose(moved, torch.full_like(moved, 105.0))            # the kept run's weights are back
    assert ctx.alpha_curve[1]["target"] == 0.25 and ctx.info["remind"] == {"teacher_edit": 5.0}
    assert ctx.history["remind"] == [{"teacher_edit": 5.0}]
    assert [e["kept"] for e in ctx.info["escalate"]] == [False, False]


def test_a_stricter_trigger_leaves_a_mostly_forgotten_calibration_set_alone(bundle, poodle_task, monkeypatch):
    fake = FakeStages(monkeypatch, {5.0: (0.25, 0.85), 10.0: (0.0, 0.8)})
    ctx, moved = _run(bundle, poodle_task, [10.0], min_recognised=0.5)
    assert fake.reminded == [5.0] and "escalate" not in ctx.info       # 0.25 of D_m recognised: no second run
    fake = FakeStages(monkeypatch, {5.0: (0.5, 0.85), 10.0: (0.0, 0.8)})
    ctx, moved = _run(bundle, poodle_task, [10.0], min_recognised=0.5)
    assert fake.reminded == [5.0, 10.0] and ctx.info["escalate"][0]["kept"] is True


def test_escalation_settings_are_checked():
    with pytest.raises(ValueError, match="teacher_edits"):
        EscalateConfig(teacher_edits=(0.0,))
    with pytest.raises(ValueError, match="min_recognised"):
        EscalateConfig(teacher_edits=(10.0,), min_recognised=0.0)


def test_a_sweep_row_says_what_the_calibration_set_chose():
    from types import SimpleNamespace
    from clipforget.data.task import ForgetRequest
    from clipforget.sweep import sweep_row
    report = {"score": 80.0, "alpha": 1.0, "chance": 0.04, "seconds": {"total": 1.0},
              "columns": {"target": {"before": 1.0, "after": 0.5}}}
    chose = [{"teacher_edit": 10.0, "calibration_score": 79.0, "against": 73.0, "kept": True}]
    run = lambda info: SimpleNamespace(report=report, task=SimpleNamespace(request=ForgetRequest("cat", "cat")),
                                       result=SimpleNamespace(info=info))
    assert sweep_row(run({"escalate": chose}))["escalate"] == chose
    assert "escalate" not in sweep_row(run({}))
