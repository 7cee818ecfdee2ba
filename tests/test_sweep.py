"""The sweep's bookkeeping: spread order, partial results, resume. The forget runs themselves are
replaced by a stand-in here (test_method covers them)."""
import json

import pytest

from clipforget import sweep
from clipforget.data.task import ForgetRequest

REQUESTS = [ForgetRequest("dog", f"dog-{i}") for i in range(6)]


class Stop(Exception):
    pass


def stand_in(calls, stop_after=None):
    def run(self, request, fold=0):
        if stop_after is not None and len(calls) == stop_after:
            raise Stop("killed")
        calls.append(request.subgroup if not fold else (request.subgroup, fold))
        return {"superclass": request.superclass, "subgroup": request.subgroup, "style": request.style, "fold": fold,
                "score": 90.0 + len(calls), "alpha": 1.0, "chance": 0.04, "target_after": 0.1 * fold,
                "columns": {}, "seconds": 1.0, "stage_seconds": {"forget": 1.0}}
    return run


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(sweep._Runner, "__init__", lambda self, *args: None)


def test_spread_order_visits_every_request_once_spread_first():
    order = sweep.spread_order(10, stride=4)
    assert sorted(order) == list(range(10)) and order[:3] == [0, 4, 8]


def test_every_and_offset_split_the_hierarchy_into_disjoint_samples(gallery):
    every = sweep.sweep_requests(gallery)
    halves = [sweep.sweep_requests(gallery, every=2, offset=k) for k in (0, 1)]
    assert halves[0] == every[0::2] and halves[1] == every[1::2]
    assert not set(map(str, halves[0])) & set(map(str, halves[1]))
    assert len(halves[0]) + len(halves[1]) == len(every)
    with pytest.raises(ValueError, match="offset"):
        sweep.sweep_requests(gallery, every=2, offset=2)


def test_a_stopped_sweep_resumes_with_the_missing_requests_only(tmp_path, monkeypatch, no_model):
    calls = []
    monkeypatch.setattr(sweep._Runner, "__call__", stand_in(calls, stop_after=3))
    with pytest.raises(Stop):
        sweep.run_sweep(object(), None, REQUESTS, out=tmp_path)
    partial = json.loads((tmp_path / "sweep.json").read_text())
    assert partial["runs"] == 3 and calls == ["dog-0", "dog-4", "dog-1"]

    again = []
    monkeypatch.setattr(sweep._Runner, "__call__", stand_in(again))
    summary = sweep.run_sweep(object(), None, REQUESTS, out=tmp_path, resume=True)
    assert sorted(again) == ["dog-2", "dog-3", "dog-5"]
    assert [r["subgroup"] for r in summary["rows"]] == [r.subgroup for r in REQUESTS]   # request order
    assert summary["runs"] == 6 and (tmp_path / "sweep.md").exists()


def test_folds_run_every_request_once_per_fold_and_average_per_request(tmp_path, monkeypatch, no_model):
    calls = []
    monkeypatch.setattr(sweep._Runner, "__call__", stand_in(calls))
    summary = sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, folds=3)
    assert sorted(map(str, calls)) == sorted(map(str, ["dog-0", ("dog-0", 1), ("dog-0", 2),
                                                       "dog-1", ("dog-1", 1), ("dog-1", 2)]))
    assert summary["runs"] == 6 and summary["requests"] == 2 and summary["folds"] == 3
    by_request = {r["subgroup"]: r for r in summary["per_request"]}
    for sg in ("dog-0", "dog-1"):
        rows = [r for r in summary["rows"] if r["subgroup"] == sg]
        assert by_request[sg]["score"] == pytest.approx(sum(r["score"] for r in rows) / 3)
        assert by_request[sg]["target_after"] == pytest.approx(0.1)        # folds 0, 1, 2: 0.0, 0.1, 0.2
    assert summary["target_at_or_below_chance"] == 0                        # the mean, not the best fold, counts
    assert "3 folds each" in (tmp_path / "sweep.md").read_text()


def test_rows_record_the_fold_they_ran_at_and_resume_keys_on_it(tmp_path, monkeypatch, no_model):
    from clipforget.data.task import SplitConfig
    calls = []
    monkeypatch.setattr(sweep._Runner, "__call__", stand_in(calls))
    summary = sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, folds=2, split=SplitConfig(fold=1))
    assert sorted(map(str, calls)) == sorted(map(str, [("dog-0", 1), ("dog-0", 2), ("dog-1", 1), ("dog-1", 2)]))
    assert sorted(r["fold"] for r in summary["rows"]) == [1, 1, 2, 2]
    assert summary["split"]["fold"] == 1 and "split: fold 1 to 2" in (tmp_path / "sweep.md").read_text()

    again = []                                 # same split: nothing left to run
    monkeypatch.setattr(sweep._Runner, "__call__", stand_in(again))
    sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, folds=2, split=SplitConfig(fold=1), resume=True)
    assert again == []
    sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, folds=1, resume=True)    # fold 0: not run yet
    assert sorted(again) == ["dog-0", "dog-1"]


def test_subgroups_picks_those_named_in_the_hierarchys_order(gallery):
    every = sweep.sweep_requests(gallery)
    names = [every[5].subgroup, every[2].subgroup]
    assert sweep.sweep_requests(gallery, subgroups=names) == [every[2], every[5]]
    with pytest.raises(ValueError, match="no subgroup 'not-a-subgroup' in the gallery.*subgroup folders"):
        sweep.sweep_requests(gallery, subgroups=[names[0], "not-a-subgroup"])


def test_resume_refuses_another_methods_sweep(tmp_path, monkeypatch, no_model):
    monkeypatch.setattr(sweep._Runner, "__call__", stand_in([]))
    sweep.run_sweep(object(), None, REQUESTS[:2], method="ga", out=tmp_path)
    with pytest.raises(ValueError, match="not 'ours'"):
        sweep.run_sweep(object(), None, REQUESTS[:2], method="ours", out=tmp_path, resume=True)


@pytest.mark.parametrize("args, sweep_json, message", [
    ([], None, "--resume needs --out (the folder of the sweep to continue)"),
    (["--out", "{out}"], {"method": "ga", "rows": []}, "holds a sweep of 'ga', not 'ours'"),
    (["--out", "{out}"], '{"method": "ours", "ro', "is unreadable"),
    (["--out", "{out}"], "[1, 2]", "is not a sweep summary"),
])
def test_resume_checks_come_before_the_model_loads(args, sweep_json, message, tmp_path, monkeypatch, capsys):
    from clipforget.cli import main as cli_main

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr("clipforget.models.load_clip", refuse)
    if sweep_json is not None:
        text = sweep_json if isinstance(sweep_json, str) else json.dumps(sweep_json)
        (tmp_path / "sweep.json").write_text(text)
    code = cli_main(["sweep", "--resume", *[a.format(out=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("clipforget sweep: error: "), err


def test_an_unknown_subgroup_is_refused_before_the_model_loads(monkeypatch, capsys):
    from clipforget.cli import main as cli_main

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr("clipforget.models.load_clip", refuse)
    assert cli_main(["sweep", "--subgroup", "dog,not-a-subgroup"]) == 2
    assert "no subgroup 'not-a-subgroup' in the gallery" in capsys.readouterr().err


def test_a_request_the_model_does_not_recognise_is_skipped_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """A weak model (the 800-step embedded ViT) recognises some subgroups not at all: the pipeline
    refuses them (nothing to forget) and the sweep records why, scores the rest and says how many."""
    from types import SimpleNamespace

    from clipforget.data.task import SplitConfig
    from clipforget.pipeline import NothingToForget

    def init(self, *args):
        self.bundle = self.gallery = self.method = self.config = self.cache = self.evaluator = None
        self.split = SplitConfig()
    monkeypatch.setattr(sweep._Runner, "__init__", init)

    def fake_forget(bundle, request, *args, **kwargs):
        if request.subgroup == "dog-1":
            raise NothingToForget("the model does not recognise dog-1")
        report = {"score": 90.0, "alpha": 1.0, "chance": 0.04, "columns": {"target": {"before": 1.0, "after": 0.0}},
                  "seconds": {"total": 1.0}}
        return SimpleNamespace(report=report, task=SimpleNamespace(request=request), result=SimpleNamespace(info={}))
    monkeypatch.setattr(sweep, "forget", fake_forget)
    summary = sweep.run_sweep(object(), None, REQUESTS[:3], out=tmp_path)
    assert summary["requests"] == 2 and summary["median_score"] == 90.0 and summary["target_at_or_below_chance"] == 2
    assert [r["subgroup"] for r in summary["skipped"]] == ["dog-1"] and "recognise" in summary["skipped"][0]["skipped"]
    assert [r["subgroup"] for r in summary["rows"]] == ["dog-0", "dog-1", "dog-2"]      # request order, kept for resume
    assert "skipped 1 run(s)" in (tmp_path / "sweep.md").read_text()


def test_row_line_says_what_a_run_gave_or_why_it_was_skipped():
    row = {"superclass": "dog", "subgroup": "poodle", "fold": 1, "score": 91.25, "alpha": 0.5, "seconds": 40.0,
           "target_after": 0.0, "columns": {"target": {"before": 1.0, "after": 0.0}}}
    assert sweep.row_line(row) == "  dog/poodle fold 1: Score 91.2, held-out target 1.00 -> 0.00, alpha 0.50, 40.0s"
    skipped = {"superclass": "dog", "subgroup": "poodle", "fold": 0, "skipped": "not recognised"}
    assert sweep.row_line(skipped) == "  dog/poodle fold 0: skipped (not recognised)"


def _fake_runs(monkeypatch, files_of):
    """The pipeline replaced by its split alone: ``files_of[subgroup]`` files split at the run's fold
    (a fold past the last raises as the real task would), and a fixed report otherwise."""
    from types import SimpleNamespace

    from clipforget.data.gallery import Item
    from clipforget.data.task import SplitConfig, split_forget

    def init(self, *args):
        self.bundle = self.gallery = self.method = self.config = self.cache = self.evaluator = None
        self.split = args[4] if len(args) > 4 and args[4] is not None else SplitConfig()
    monkeypatch.setattr(sweep._Runner, "__init__", init)

    def fake_forget(bundle, request, method, config, gallery, split, **kwargs):
        items = [Item(f"{request.subgroup}/{i}.png", request.subgroup, "dog", request.subgroup, "", "hierarchy")
                 for i in range(files_of[request.subgroup])]
        split_forget(items, split, request.label)
        report = {"score": 90.0, "alpha": 1.0, "chance": 0.04, "columns": {"target": {"before": 1.0, "after": 0.0}},
                  "seconds": {"total": 1.0}}
        return SimpleNamespace(report=report, task=SimpleNamespace(request=request), result=SimpleNamespace(info={}))
    monkeypatch.setattr(sweep, "forget", fake_forget)


def test_a_fold_past_a_subgroups_last_is_skipped_and_said_so(tmp_path, monkeypatch):
    """9 files, 3 held out a fold: folds 0-2. ``--folds 4`` once ran fold 3 on fold 0's files and
    counted them twice in the subgroup's mean."""
    _fake_runs(monkeypatch, {"dog-0": 9, "dog-1": 12})
    summary = sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, folds=4)
    assert summary["runs"] == 7 and [(r["subgroup"], r["fold"]) for r in summary["skipped"]] == [("dog-0", 3)]
    assert summary["skipped"][0]["skip_reason"] == "no_such_fold" and "3 fold(s)" in summary["skipped"][0]["skipped"]
    assert {r["subgroup"]: r["folds"] for r in summary["per_request"]} == {"dog-0": 3, "dog-1": 4}
    md = (tmp_path / "sweep.md").read_text()
    assert "skipped 1 run(s) at a fold past the subgroup's last (too few files for that many folds): dog/dog-0 fold 3" in md
    assert "does not recognise" not in md


def test_resume_refuses_rows_of_another_split(tmp_path, monkeypatch, no_model, caplog):
    from clipforget.data.task import SplitConfig
    calls = []
    monkeypatch.setattr(sweep._Runner, "__call__", stand_in(calls))
    sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, split=SplitConfig(seed=0, test_images=3))
    with pytest.raises(ValueError, match="another split: seed 0 there, 1 asked for.*same --split"):
        sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, resume=True, split=SplitConfig(seed=1))
    with pytest.raises(ValueError, match="test_images 3 there, 2 asked for"):
        sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, resume=True, split=SplitConfig(test_images=2))
    assert len(calls) == 2                                       # refused before any run
    # a sweep written before splits were recorded: its rows are kept, and the log says why
    old = json.loads((tmp_path / "sweep.json").read_text())
    del old["split"]
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    with caplog.at_level("INFO", logger="clipforget"):
        sweep.run_sweep(object(), None, REQUESTS[:2], out=tmp_path, resume=True, split=SplitConfig(seed=1))
    assert len(calls) == 2 and "records no split" in caplog.text
