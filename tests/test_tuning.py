"""The tuning protocol (clipforget/tuning.py, bench/tune.py): every method's search space, the same
budget for all, tuning tasks apart from the benchmark's, selection by the calibration Score only."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clipforget import tuning
from clipforget.benchmark import PRESETS, method_config
from clipforget.methods.base import config_from_dict, get_method, list_methods
from clipforget.methods.catalog import soup_base
from clipforget.data.task import ForgetRequest, ViewCache, build_task
from test_baselines import QUICK_CONFIGS, TINY_SPLIT, tiny, tiny_gallery, tiny_task  # noqa: F401 (fixtures)

@pytest.mark.parametrize("name", list_methods())
def test_every_method_declares_a_valid_space_that_fills_the_budget(name):
    """Every key is a Config field, every value a valid setting, and the space has enough points
    for the default budget of distinct trials (defaults first)."""
    space = tuning.search_space(name)
    assert space, f"{name}: declare Config.search_space"
    tuning.check_space(name)
    trials = tuning.method_trials(name)
    assert len(trials) == tuning.DEFAULT_TRIALS and trials[0] == {}
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == len(trials)            # no repeats
    for t in trials:
        assert set(t) <= set(space)
        config_from_dict(get_method(name).Config, tuning.nested(t))
    if soup_base(name):
        assert space == tuning.search_space(soup_base(name))           # a variant's is its method's


@pytest.mark.parametrize("name", tuning.tunable_methods())
def test_every_space_holds_its_methods_defaults(name):
    """Each knob's default is one of its candidates: the space is around what the method runs by
    default (ours' once still listed forget weights {20, 50} after the default had become 150)."""
    space = tuning.search_space(name)
    defaults = tuning.defaults_of(name, space)
    outside = {k: v for k, v in defaults.items() if v not in space[k]}
    assert not outside, f"{name}: defaults outside its search_space: {outside}"


def test_check_space_names_a_bad_key_or_value():
    with pytest.raises(ValueError, match=r"search_space\['loop.nope'\]"):
        tuning.check_space("ga", {"loop.nope": (1,)})
    with pytest.raises(ValueError, match=r"search_space\['loop.lr'\] = -1"):
        tuning.check_space("ga", {"loop.lr": (1e-4, -1)})
    with pytest.raises(ValueError, match="no candidate"):
        tuning.check_space("ga", {"loop.lr": ()})


def test_trials_are_a_seeded_sample_with_the_defaults_first():
    space = {"a": (1, 2, 3), "b": (4, 5, 6)}
    one = tuning.sample_trials(space, 5, seed=0, defaults={"a": 1, "b": 4})
    assert one == tuning.sample_trials(space, 5, seed=0, defaults={"a": 1, "b": 4})
    assert one[0] == {} and {"a": 1, "b": 4} not in one[1:] and len(one) == 5
    assert one != tuning.sample_trials(space, 5, seed=1, defaults={"a": 1, "b": 4})
    assert len(tuning.sample_trials(space, 50, seed=0)) == 10                 # the whole grid, then stop
    assert tuning.sample_trials({}, 8) == [{}]


def test_tuning_tasks_are_disjoint_from_the_benchmarks(gallery):
    """No tuning task shares a superclass (so no subgroup, and not class:dog's images) with any
    request the benchmark's presets evaluate; each names a subgroup of the embedded gallery."""
    bench = tuning.bench_specs()
    assert {"dog/poodle", "monkey/gorilla", "reptile/turtle", "car@line-art", "class:dog", "big cat/leopard"} <= bench
    assert len(tuning.TUNING_TASKS) >= 2
    assert not {tuning.superclass_of(s) for s in tuning.TUNING_TASKS} & {tuning.superclass_of(s) for s in bench}
    assert not set(tuning.TUNING_TASKS) & {s for specs in PRESETS.values() for s in specs}
    for spec in tuning.TUNING_TASKS:
        superclass, _, subgroup = spec.partition("/")
        assert subgroup in gallery.subgroups(superclass), spec


def _row(method, trial, task, score, target, chance=0.25):
    return {"method": method, "trial": trial, "overrides": {"x": trial}, "task": task, "score": score,
            "target_after": target, "chance": chance}


def test_the_rule_is_the_best_calibration_score_among_trials_that_forget():
    rows = [_row("m", 0, "a", 90, 0.0), _row("m", 0, "b", 70, 0.5),    # best Score but task b not forgotten
            _row("m", 1, "a", 80, 0.0), _row("m", 1, "b", 80, 0.25),   # forgets on both (at chance): mean 80
            _row("m", 2, "a", 70, 0.0), _row("m", 2, "b", 70, 0.0),
            _row("n", 0, "a", 99, 0.9), _row("n", 1, "a", 50, 0.5), _row("n", 2, "a", 60, 0.5)]   # none forgets
    chosen = tuning.choose(rows)
    assert chosen["m"]["trial"] == 1 and chosen["m"]["score"] == 80 and chosen["m"]["forgets"]
    assert chosen["n"]["trial"] == 2 and not chosen["n"]["forgets"]      # lowest target, then best Score


class Exploding(dict):
    """Test columns that fail when anything reads them."""

    def _boom(self, *a, **k):
        raise AssertionError("the tuner read the test columns")
    __getitem__ = __iter__ = __len__ = items = values = keys = get = __contains__ = _boom


@pytest.fixture(scope="module")
def taxi_task(tiny, tiny_gallery):
    """The tiny (random) model calls every image a car: taxi is the request whose calibration target
    it recognises before unlearning (poodle's calibration Score is undefined for it)."""
    return build_task(tiny_gallery, ForgetRequest("car", "taxi"), tiny.image_size, TINY_SPLIT,
                      ViewCache(tiny_gallery, source_size=32))


def test_tune_picks_by_calibration_and_never_reads_the_test_columns(tiny, taxi_task, tmp_path):
    """Short loops: the same rows and choice when the test columns explode on any read."""
    base = {m: QUICK_CONFIGS[m] for m in ("ga", "fisher")}
    kwargs = dict(methods=["ga", "fisher"], trials=2, seed=0, base=base)
    tuned = tuning.tune(tiny, {"car/taxi": taxi_task}, **kwargs)
    blind = tuning.tune(tiny, {"car/taxi": dataclasses.replace(taxi_task, test=Exploding())}, **kwargs)
    tiny_task = taxi_task
    assert blind["_protocol"]["chosen"] == tuned["_protocol"]["chosen"]
    assert {m: blind[m] for m in ("ga", "fisher")} == {m: tuned[m] for m in ("ga", "fisher")}
    assert [r["score"] for r in blind["_trials"]] == [r["score"] for r in tuned["_trials"]]
    rows = tuned["_trials"]
    assert [(r["method"], r["trial"]) for r in rows] == [("ga", 0), ("ga", 1), ("fisher", 0), ("fisher", 1)]
    assert all(not any(k.startswith(("other_styles", "unseen")) for k in r) for r in rows)   # calib columns only
    assert set(k.removesuffix("_after") for r in rows for k in r if k.endswith("_after")) == set(tiny_task.calib)
    for m in ("ga", "fisher"):
        own = [r for r in rows if r["method"] == m]
        chosen = tuned["_protocol"]["chosen"][m]
        forgetting = [r for r in own if r["target_after"] <= r["chance"]]
        pick = (max(forgetting, key=lambda r: r["score"]) if forgetting
                else min(own, key=lambda r: (r["target_after"], -r["score"])))
        assert chosen["trial"] == pick["trial"] and tuned[m] == tuning.nested(pick["overrides"])
    assert "| ga | 0 | (defaults) |" in tuning.table(tuned)
    # the file the benchmark reads: each method's overrides, a +soup variant falls back to its method's
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(tuned))
    configs = json.loads(path.read_text())
    assert method_config(configs, "ga+soup") == configs["ga"] == method_config(configs, "ga")
    get_method("ga+soup")(method_config(configs, "ga+soup"))
    assert method_config(configs, "ccup") is None


def test_untuned_methods_are_named_not_silently_run(tiny, tiny_task, monkeypatch):
    monkeypatch.setattr(get_method("ga").Config, "search_space", {})
    tuned = tuning.tune(tiny, {"dog/poodle": tiny_task}, methods=["ga"], trials=2)    # runs nothing
    assert tuned["_protocol"]["untuned"] == ["ga"] and not tuned["_trials"] and "ga" not in tuned


def test_bench_runs_a_soup_variant_with_its_methods_config(tiny, tiny_gallery, tmp_path):
    """A tuned file's ``ga`` entry drives ``ga+soup`` too; the variant's row carries restore's α and
    its α-curve is plotted (the tiny model, car/taxi as above)."""
    from clipforget.benchmark import run_bench
    configs = {"_protocol": {"note": "ignored"}, "ga": {**QUICK_CONFIGS["ga"], "loop": {"steps": 2, "lr": 1e-3}}}
    out = run_bench("car/taxi", ["ga", "ga+soup"], tiny, tiny_gallery, tmp_path, configs, TINY_SPLIT,
                    cache=ViewCache(tiny_gallery, source_size=32))
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["ga"]["alpha"] == 1.0 and 0.0 <= rows["ga+soup"]["alpha"] <= 1.0
    assert out["plots"] == ["alpha_curve-ga+soup.png"] and (tmp_path / "alpha_curve-ga+soup.png").is_file()
    assert "| ga+soup |" in (tmp_path / "table.md").read_text()


def test_bench_runs_a_method_and_its_soup_variant_once(tiny, tiny_gallery, tmp_path, monkeypatch):
    """``ga`` and ``ga+soup`` with one config: one run (the variant's), ``ga``'s row its delta at
    α = 1 — the same report as running ``ga`` alone; with a config of its own the variant runs apart."""
    from clipforget import benchmark
    cache = ViewCache(tiny_gallery, source_size=32)
    configs = {"ga": {**QUICK_CONFIGS["ga"], "loop": {"steps": 2, "lr": 1e-3}}}
    ran, real = [], benchmark.run_method
    monkeypatch.setattr(benchmark, "run_method", lambda b, t, m, *a, **k: ran.append(m) or real(b, t, m, *a, **k))
    out = benchmark.run_bench("car/taxi", ["ga", "ga+soup"], tiny, tiny_gallery, tmp_path / "a", configs, TINY_SPLIT,
                              cache=cache)
    assert ran == ["ga+soup"]
    rows = {r["method"]: r for r in out["rows"]}
    alone = benchmark.run_bench("car/taxi", ["ga"], tiny, tiny_gallery, tmp_path / "b", configs, TINY_SPLIT,
                                cache=cache)["rows"][0]
    assert ran == ["ga+soup", "ga"]
    for key in [k for k in alone if k.endswith("_after")] + ["score", "alpha"]:
        assert rows["ga"][key] == pytest.approx(alone[key], abs=1e-6), key
    benchmark.run_bench("car/taxi", ["ga", "ga+soup"], tiny, tiny_gallery, tmp_path / "c",
                        {**configs, "ga+soup": {**configs["ga"], "restore": {"grid_points": 3}}}, TINY_SPLIT,
                        cache=cache)
    assert ran[2:] == ["ga", "ga+soup"]


def test_the_committed_tuned_file_is_the_protocol_s_output_for_every_method():
    """bench/tuned.json (what `clipforget bench --config` reads for the "tuned" tables) holds one
    entry per tunable method, each a trial of that method's declared space under the default
    budget, the entry the rule chooses from the file's own trials, and valid settings."""
    tuned = json.loads((Path(__file__).resolve().parents[1] / "bench" / "tuned.json").read_text())
    proto = tuned["_protocol"]
    assert proto["tasks"] == list(tuning.TUNING_TASKS)
    assert proto["trials"] == tuning.DEFAULT_TRIALS and proto["seed"] == tuning.DEFAULT_SEED
    methods = [k for k in tuned if not k.startswith("_")]
    assert sorted(methods) == sorted(tuning.tunable_methods())
    chosen = tuning.choose(tuned["_trials"])
    for m in methods:
        trials = [tuning.nested(t) for t in tuning.method_trials(m)]
        assert tuned[m] in trials, f"{m}: {tuned[m]} is not one of its protocol trials"
        assert tuned[m] == tuning.nested(chosen[m]["overrides"])
        assert proto["chosen"][m]["trial"] == chosen[m]["trial"]
        config_from_dict(get_method(m).Config, tuned[m])
        if m + "+soup" in list_methods():                    # a variant runs its method's settings
            assert method_config(tuned, m + "+soup") == tuned[m]
