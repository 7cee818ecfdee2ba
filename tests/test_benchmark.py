"""The benchmark's task specs, the whole-class task and the table writers (no training here)."""
from __future__ import annotations

import csv
import json
import types

import pytest

from clipforget.benchmark import (ABLATIONS, ClassRequest, build_class_task, deep_update, parse_request,
                                  row_from_report, write_table)
from clipforget.data.gallery import Gallery
from clipforget.data.task import ForgetRequest, SplitConfig, ViewCache
from clipforget.methods.base import config_from_dict
from clipforget.methods.ours import OursConfig


def test_specs_parse():
    assert parse_request("dog/poodle") == ForgetRequest("dog", "poodle")
    assert parse_request("car@line-art") == ForgetRequest("car", None, "line-art")
    assert parse_request("class:dog") == ClassRequest("dog")
    with pytest.raises(ValueError, match="expected SUPER/SUB"):
        parse_request("dog")


def test_every_ablation_is_a_valid_ours_config():
    for name, over in ABLATIONS.items():
        cfg = config_from_dict(OursConfig, deep_update({"forget": {"top_k_layers": 2}}, over))
        assert cfg.forget.top_k_layers == 2, name
    off = config_from_dict(OursConfig, ABLATIONS["no alignment"])
    assert off.remind.align.enabled is False and off.remind.enabled is True
    plain = config_from_dict(OursConfig, ABLATIONS["no edited teacher (γ = 0)"])
    assert plain.remind.teacher.edit == 0.0 and OursConfig().remind.teacher.edit > 0
    pixels_only = config_from_dict(OursConfig, ABLATIONS["no feature stand-ins"])
    assert pixels_only.remind.feature_stand_ins == 0 and OursConfig().remind.feature_stand_ins > 0
    assert pixels_only.stand_ins.enabled is True
    no_replay = config_from_dict(OursConfig, ABLATIONS["no replay"])
    assert no_replay.remind.replay is False and OursConfig().remind.replay is True


def test_whole_class_task_forgets_every_subgroup_and_keeps_train_images_out_of_test(gallery):
    keep = {"dog", "cat", "car"}
    items = [it for it in gallery.items if it.kind == "hierarchy" and it.superclass in keep
             and it.style in ("noto", "twemoji", "openmoji")]          # three files a subgroup: some held out
    items += [it for it in gallery.items if it.kind == "other"][:8]
    g = Gallery(gallery.root, items, "tiny")
    split = SplitConfig(train_views=1, forget_views=1, calib_views=1, test_views=1, calib_other_images=8, calib_concept_images=4,
                        test_images=1)      # 3 files a subgroup: 1 training, 1 test, 1 calibration (D_m needs one)
    task = build_class_task(g, ClassRequest("dog"), 32, split, ViewCache(g, 32), retain_per_superclass=2)
    assert {it.subgroup for it in task.forget.items} == set(g.subgroups("dog"))
    assert {it.superclass for it in task.retain.items} == {"cat", "car"}
    retain_paths = {it.path for it in task.retain.items}
    assert not retain_paths & {it.path for it in task.test["other_superclasses"].views.items}
    assert set(task.test) == {"target", "other_superclasses", "other_concepts"}
    held_out = {it.path for col in task.test.values() for it in col.views.items}
    assert task.test["target"].views.items and not held_out & ({it.path for it in task.forget.items} | retain_paths)
    assert task.request.to_dict()["whole_class"] is True


def test_tables_are_written_in_three_formats(tmp_path):
    report = {"score": 80.0, "alpha": 0.5, "seconds": {"total": 3.0},
              "columns": {"target": {"before": 0.9, "after": 0.0}, "retain": {"before": 0.8, "after": 0.4}}}
    rows = [row_from_report("ours", report)]
    write_table(tmp_path, "table", "t", rows, {"task": "dog/poodle"})
    md = (tmp_path / "table.md").read_text()
    assert "| ours | 0.000 (0.00) | 0.400 (0.50) | **80.0** | 0.50 |" in md
    assert list(csv.DictReader(open(tmp_path / "table.csv")))[0]["retain_ratio"] == "0.5"
    assert json.loads((tmp_path / "table.json").read_text())["rows"][0]["score"] == 80.0


def test_presets_hold_five_valid_requests_of_one_kind(gallery):
    """Every preset but continual spreads over ≥ 5 requests, each naming a subgroup, trained style or
    superclass the embedded gallery has (the tuning tasks are kept apart in test_tuning)."""
    from clipforget.benchmark import PRESETS
    trained_styles = set(gallery.styles()) - set(gallery.unseen_styles())
    for name, specs in PRESETS.items():
        assert isinstance(specs, tuple) and specs, name
        if name != "continual":
            assert len(set(specs)) >= 5, name
        for spec in specs:
            body = spec.split(":", 1)[1] if spec.startswith(("continual:", "ablation:")) else spec
            for part in body.split("+"):
                req = parse_request(part)
                assert req.superclass in gallery.superclasses(), spec
                if isinstance(req, ForgetRequest) and req.subgroup:
                    assert req.subgroup in gallery.subgroups(req.superclass), spec
                if isinstance(req, ForgetRequest) and req.style:
                    assert req.style in trained_styles, spec


def test_summary_aggregates_each_method_over_the_requests(tmp_path):
    from clipforget.benchmark import summary_markdown, summary_rows

    def res(score_a, score_b, target_a):
        return {"rows": [
            row_from_report("a", {"score": score_a, "columns": {"target": {"before": 1.0, "after": target_a},
                                                                "retain": {"before": 0.8, "after": 0.4}}}, chance=0.04),
            row_from_report("b", {"score": score_b, "columns": {"target": {"before": 1.0, "after": 1.0},
                                                                "retain": {"before": 0.8, "after": 0.8}}}, chance=0.04)]}
    rows = {r["method"]: r for r in summary_rows({"x/1": res(90, 70, 0.0), "x/2": res(80, 74, 0.5)})}
    assert rows["a"]["requests"] == 2 and rows["a"]["score"] == pytest.approx(85.0)
    assert rows["a"]["score_sd"] == pytest.approx(5.0) and rows["a"]["score_min"] == 80
    assert rows["a"]["target_at_chance"] == 1 and rows["b"]["target_at_chance"] == 0
    assert rows["a"]["target_after"] == pytest.approx(0.25) and rows["a"]["retain_ratio"] == pytest.approx(0.5)
    md = summary_markdown("t", list(rows.values()))
    assert "| a | **85.0** ± 5.0 | 80.0 | 1/2 | 0.250 (0.25) | 0.400 (0.50) |" in md


def test_a_stopped_preset_resumes_from_the_tables_it_wrote(tmp_path, monkeypatch):
    """``--resume``: a preset's requests with a table in OUT are read back (nothing runs), and the
    summary covers them all; without it they would run again."""
    from types import SimpleNamespace
    from clipforget import benchmark
    monkeypatch.setitem(benchmark.PRESETS, "two", ("dog/poodle", "big cat/leopard"))
    for spec, score in (("dog/poodle", 90.0), ("big cat/leopard", 70.0)):
        row = row_from_report("ours", {"score": score, "columns": {"target": {"before": 1.0, "after": 0.0}}}, chance=0.04)
        write_table(tmp_path / benchmark.slug(spec), "table", spec, [row], {"task": spec})
    monkeypatch.setattr(benchmark, "make_task", lambda *a, **k: pytest.fail("a finished request ran again"))
    out = benchmark.run_bench("two", ["ours"], SimpleNamespace(arch="m"), SimpleNamespace(name="g"), tmp_path,
                              split=SplitConfig(), cache=object(), resume=True)
    assert set(out["requests"]) == {"dog/poodle", "big cat/leopard"}
    assert out["rows"][0]["score"] == pytest.approx(80.0) and out["rows"][0]["target_at_chance"] == 2
    assert "| ours | **80.0** ± 10.0 | 70.0 | 2/2 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "big-cat_leopard" / "table.json").is_file()


def test_continual_scores_each_request_without_the_other_requests_files(gallery):
    """A merged model is scored on each request's test columns less every file another merged run
    trained on (D_f, D_r, replay), calibrated on (D_m) or was asked to forget: the preset's requests
    share such files before (poodle's other-superclasses column holds gorilla drawings), none after."""
    from clipforget.benchmark import PRESETS, continual_tasks, read_by, without_files

    small = SplitConfig(train_views=1, forget_views=1, calib_views=1, calib_target_views=1, test_views=1)
    cache = ViewCache(gallery, source_size=32)
    specs = PRESETS["continual"][0].removeprefix("continual:").split("+")
    bundle = types.SimpleNamespace(image_size=32)
    tasks = continual_tasks(specs, bundle, gallery, small, cache)
    wanted = [{it.path for it in gallery.items if it.subgroup == parse_request(s).subgroup} for s in specs]
    for i, task in enumerate(tasks):     # another request's subgroup is in no shared column, nor replay
        others = set().union(*(w for j, w in enumerate(wanted) if j != i))
        shared = {it.path for n, c in {**task.calib, **task.test}.items() if n not in ("target", "retain")
                  for it in c.views.items}
        assert not (shared | {it.path for it in task.replay_items}) & others

    def test_files(task):
        return {it.path for c in task.test.values() for it in c.views.items}

    def others_files(task):    # what the other runs read, from the tasks' own fields
        out = set()
        for o in tasks:
            if o is not task:
                out |= {it.path for v in (o.forget, o.retain, o.test["target"].views) for it in v.items}
                out |= {it.path for c in o.calib.values() for it in c.views.items}
                out |= {it.path for it in o.replay_items}
        return out

    assert all(test_files(t) & others_files(t) for t in tasks)     # the case the filter is for
    for task in tasks:
        scored = without_files(task, set().union(*(read_by(o) for o in tasks if o is not task)))
        assert not test_files(scored) & others_files(task)
        assert set(scored.test) == set(task.test)                  # every column keeps files
        kept = test_files(task) - others_files(task)
        assert test_files(scored) == kept
        for col in scored.test.values():                          # labels follow their views
            assert len(col.labels) == len(col.views.items)
            assert [col.classes[i] for i in col.labels.tolist()] == [it.superclass for it in col.views.items] \
                or col.kind == "concept"
        assert task.test["target"].views.items == scored.test["target"].views.items


def test_a_target_the_model_does_not_recognise_stops_the_bench_before_any_method(gallery, tmp_path, monkeypatch):
    """No method runs (and no table with a Score of None is written) when the original model
    recognises none of the held-out target images: NothingToForget, with the pipeline's advice."""
    from clipforget import benchmark
    from clipforget.pipeline import Evaluator, NothingToForget

    monkeypatch.setattr(Evaluator, "before", lambda self, task, split="test", names=None: {"target": 0.0})
    ran = []
    monkeypatch.setattr(benchmark, "run_methods", lambda *a, **k: ran.append(a) or {})
    bundle = types.SimpleNamespace(image_size=32, arch="stand-in")
    small = SplitConfig(train_views=1, forget_views=1, calib_views=1, calib_target_views=1, test_views=1)
    with pytest.raises(NothingToForget, match="nothing to forget"):
        benchmark.run_bench("dog/poodle", ["ga"], bundle, gallery, tmp_path / "out", split=small,
                            cache=ViewCache(gallery, source_size=32))
    assert not ran and not (tmp_path / "out").exists()
