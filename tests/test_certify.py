"""The forgetting certificate: its pieces on small inputs, then a real unlearning run against a
sham (the same run at α = 0, i.e. the original model) on the embedded world."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from clipforget.certify import (CertifyConfig, ProbeConfig, RelearnConfig, Thresholds, balanced_accuracy, certify,
                                checks, fit_probe, load_certificate, read_run, retrieval_queries, split_groups,
                                verdict_line, _probe_predict)
from clipforget.cli import main as cli_main
from clipforget.data.gallery import Item
from clipforget.data.task import ForgetRequest
from conftest import CERTIFY_SMALL

def _items(n_styles=5, subgroup="poodle"):
    return [Item(f"{s}/{subgroup}.png", subgroup, "dog", subgroup, s, "hierarchy")
            for s in ["fluent-flat", "line-art", "noto", "openmoji", "twemoji"][:n_styles]]


# ---- pieces ---------------------------------------------------------------------------------------

def test_relearning_sample_and_evaluation_share_no_image():
    mode, sample, held = split_groups(_items(), 0.4, seed=0)
    assert mode == "style" and len(sample) == 2 and len(held) == 3
    assert not {it.path for it in sample} & {it.path for it in held}
    assert split_groups(_items(), 0.4, seed=0) == (mode, sample, held)          # deterministic
    # a style request: one style, many subgroups -> split by subgroup
    cars = [Item(f"line-art/{sg}.png", sg, "car", sg, "line-art", "hierarchy") for sg in "abcdefgh"]
    mode, sample, held = split_groups(cars, 0.4, seed=0)
    assert mode == "subgroup" and len(sample) == 3 and not set(sample) & set(held) and len(sample + held) == 8
    # a single image: only disjoint augmented views are left, and the mode says so
    mode, sample, held = split_groups(_items(1), 0.4, seed=0)
    assert mode == "views" and sample == held


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="relearn.steps"):
        RelearnConfig(steps=0)
    with pytest.raises(ValueError, match="relearn.control"):
        RelearnConfig(control="taxi")
    with pytest.raises(ValueError, match="probe.lr"):
        ProbeConfig(lr=0)
    with pytest.raises(ValueError, match="thresholds.max_relearn_recovery"):
        Thresholds(max_relearn_recovery=1.5)
    with pytest.raises(ValueError, match="kept_images"):
        CertifyConfig(kept_images=0)
    with pytest.raises(ValueError, match="unknown field"):
        CertifyConfig.from_dict({"relearn": {"stepz": 3}})
    assert CertifyConfig.from_dict(CERTIFY_SMALL).relearn.steps == 4


def test_probe_separates_separable_data_and_balanced_accuracy_ignores_imbalance():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200, 8, generator=g), dim=-1)
    y = (x[:, 0] > 0.5).long()                     # imbalanced: about a third positive
    probe = fit_probe(x, y, ProbeConfig(steps=200), seed=0)
    assert balanced_accuracy(_probe_predict(probe, x), y) > 0.9
    assert balanced_accuracy(torch.zeros_like(y), y) == 0.5          # "always negative" is chance


def test_retrieval_queries_name_the_coarse_label_the_subgroup_and_paraphrases(gallery):
    qs = retrieval_queries(ForgetRequest("bird", "owl"), gallery, ("a picture of a {}", "an image showing a {}"))
    texts = [q for _, q in qs]
    assert texts[:3] == ["a bird", "a picture of a bird", "an image showing a bird"]
    assert "an owl" in texts and "an image showing an owl" in texts and "an owl, a kind of bird" in texts
    kinds = dict((q, k) for k, q in qs)
    assert kinds["a bird"] == "coarse" and kinds["an owl"] == "subgroup"
    styled = [q for _, q in retrieval_queries(ForgetRequest("car", style="line-art"), gallery, ())]
    assert styled[0] == "a black and white line drawing of a car"


def _cert(target, recovery, recall_after, probe_after, kept_after=0.95):
    return {"label": "poodle", "relearn": {"curve": [{"forget_sample": target}], "recovery": recovery, "steps": 4},
            "kept": {"images": 64, "before": 1.0, "after": kept_after},
            "probes": {"coarse": {"before": 0.8, "after": probe_after}},
            "retrieval": {"k": 20, "queries": [{"kind": "coarse", "query": "a dog", "before": 0.8,
                                                "after": recall_after}]}}


def test_verdict_applies_each_threshold_and_prints_it():
    th = Thresholds()
    good = _cert(0.0, 0.2, 0.0, 0.1)
    good["checks"] = checks(good, th)
    assert all(c["passed"] for c in good["checks"])
    bad = _cert(0.05, 0.9, 0.4, 0.1, kept_after=0.5)
    bad["checks"] = checks(bad, th)
    assert [c["passed"] for c in bad["checks"]] == [True, False, False, True, False]
    bad["certified"] = False
    line = verdict_line(bad)
    assert line.startswith("NOT CERTIFIED: poodle")
    assert "relearning 0.90 > 0.50 FAIL" in line and "coarse-label retrieval 0.50 > 0.25 FAIL" in line
    assert "target accuracy 0.05 <= 0.10 pass" in line and "rest kept 0.50 < 0.90 FAIL" in line


def test_a_folder_without_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        read_run(tmp_path)
    assert cli_main(["certify", str(tmp_path)]) == 2


def test_a_run_whose_own_embedded_weights_are_gone_is_refused(tmp_path, monkeypatch):
    """θ₀ is the model the run was made from: weights trained by the user that are gone are an error,
    never silently the shipped ones (another installation's shipped file is found here)."""
    from types import SimpleNamespace

    from clipforget.runfolder import load_run_model
    loaded = []
    monkeypatch.setattr("clipforget.models.load_clip", lambda name, weights, device: loaded.append((name, weights)))
    gone = SimpleNamespace(path=tmp_path / "run", model="embedded", pretrained=str(tmp_path / "my-weights.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"was made from the embedded weights .*my-weights.safetensors, which no "
                                                r"longer exist; pass them with --model embedded --pretrained PATH"):
        load_run_model(gone, "cpu")
    assert not loaded
    load_run_model(SimpleNamespace(path=tmp_path, model="embedded", pretrained="/elsewhere/clipforget/weights/"
                                   "embedded.safetensors"), "cpu")
    assert loaded == [("embedded", None)]                     # the shipped weights of this installation


# ---- a real run vs a sham ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def poodle_run(runs):
    """The default-config poodle run of ours (conftest's ``runs``, shared with test_method.py)."""
    return runs["poodle"][1]


@pytest.mark.slow
def test_certificate_separates_a_real_run_from_a_sham(bundle, gallery, view_cache, poodle_run, tmp_path, capsys):
    real = certify(bundle, poodle_run, gallery, CertifyConfig.from_dict(CERTIFY_SMALL), cache=view_cache)
    # the sham: the same run folder certified at α = 0 (the original model), through the CLI
    sham_dir = tmp_path / "sham"
    shutil.copytree(poodle_run, sham_dir)
    sets = [f"--set=relearn.{k}={v}" for k, v in CERTIFY_SMALL["relearn"].items()] + \
           [f"--set=probe.{k}={v}" for k, v in CERTIFY_SMALL["probe"].items()] + ["--set=retrieval.pool=100"]
    assert cli_main(["certify", str(sham_dir), "--alpha", "0", *sets]) == 0
    assert "NOT CERTIFIED" in capsys.readouterr().out
    sham = load_certificate(sham_dir)
    assert (sham_dir / "certificate.md").read_text().startswith("# Forgetting certificate: poodle")

    # the sham is the original model: every forgetting check fails (the rest is kept, trivially),
    # and before == after everywhere
    assert sham["alpha"] == 0.0 and not sham["certified"]
    assert [c["name"] for c in sham["checks"] if c["passed"]] == ["rest kept"]
    assert sham["kept"]["after"] == sham["kept"]["before"]
    assert sham["relearn"]["curve"][0]["forget_sample"] == sham["relearn"]["original_accuracy"] >= 0.9
    assert sham["probes"]["coarse"]["after"] == sham["probes"]["coarse"]["before"]
    assert sham["probes"]["subgroup"]["after"] == sham["probes"]["subgroup"]["before"]
    assert all(q["after"] == q["before"] for q in sham["retrieval"]["queries"])

    # the real run: mostly forgotten on held-out styles (not every held-out drawing down to the
    # certificate's 0.10), gone from coarse-label retrieval, weaker in a probe
    by_name = {c["name"]: c for c in real["checks"]}
    sham_checks = {c["name"]: c for c in sham["checks"]}
    assert by_name["target accuracy"]["value"] <= 0.5 * sham_checks["target accuracy"]["value"], real["verdict"]
    assert by_name["coarse-label retrieval"]["passed"], real["verdict"]
    assert by_name["rest kept"]["passed"], real["verdict"]            # the rest of the gallery is still known
    assert real["relearn"]["curve"][0]["forget_sample"] < sham["relearn"]["curve"][0]["forget_sample"] - 0.5
    coarse = [q for q in real["retrieval"]["queries"] if q["kind"] == "coarse"][0]
    assert coarse["before"] > 0 and coarse["after"] < coarse["before"]
    assert real["probes"]["coarse"]["after"] < real["probes"]["coarse"]["before"]
    assert sum(c["passed"] for c in real["checks"]) > sum(c["passed"] for c in sham["checks"])

    # the relearning attack is reported step by step, on images disjoint from its sample
    rl = real["relearn"]
    assert [r["step"] for r in rl["curve"]] == [0, 2, 4]
    assert rl["split"] == "style" and not set(rl["sample"]) & set(rl["evaluated_on"])
    assert rl["control"].split("/")[0] != "dog"
    assert real["verdict"].startswith("CERTIFIED" if real["certified"] else "NOT CERTIFIED")
    json.dumps(real)                                   # the certificate is plain JSON


# ---- in the app: a background job with progress and cancel --------------------------------------------

@pytest.mark.slow
def test_app_certifies_a_finished_job_in_the_background(core, finished_job):
    """The app tests' shared AppCore (conftest: certifies with CERTIFY_SMALL) and its finished poodle job."""
    from clipforget.jobs import JobError
    job_id = finished_job.id
    assert "Not certified yet" in core.certificate_view(job_id)["markdown"]

    # cancelled mid-stage: nothing is written
    job = core.start_certificate(job_id)
    assert job.kind == "certify"
    deadline = time.monotonic() + 300
    while not core.jobs.get(job.id).stage.startswith("certify: relearn"):
        assert core.jobs.get(job.id).active and time.monotonic() < deadline
        time.sleep(0.05)
    assert "certify" in core.certificate_view(job_id)["markdown"]          # the running job's progress
    core.cancel(job.id)
    assert core.jobs.wait(job.id, timeout=120).status == "cancelled"
    assert core.certificate(job_id) is None

    done = core.jobs.wait(core.start_certificate(job_id).id, timeout=600)
    assert done.status == "done", done.error
    assert {"certify: relearn on the forgotten subgroup", "certify: probes", "certify: retrieval"} <= set(done.stages)
    cert = core.certificate(job_id)
    view = core.certificate_view(job_id)
    assert view["markdown"].startswith("# Forgetting certificate: poodle") and cert["verdict"] in view["markdown"]
    assert view["file"].endswith("certificate.md")
    assert cert["verdict"] in core.job_status(done.id)["text"]
    reopen = [j for _, j in core.history()]
    assert job_id in reopen and job.id not in reopen and done.id not in reopen   # certify jobs are not in the reopen list
    with pytest.raises(JobError, match="certify a forget job"):
        core.start_certificate(done.id)


def test_a_text_edit_is_certified_with_the_unlearned_models_own_text_tower(bundle, gallery):
    """A run that edits the text tower (CLIP-LIP) is checked with the unlearned model's own class
    and query embeddings; the same edit read through the original text tower changes nothing."""
    from clipforget.certify.retrieval import retrieval_check
    from clipforget.certify.zeroshot import superclass_texts
    from clipforget.data.task import resolve
    from clipforget.pipeline import edited_model

    weight = bundle.model.state_dict()["text.proj.2.weight"]
    delta = {"text.proj.2.weight": torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 3}
    models = {"original": bundle.model, "unlearned": edited_model(bundle, delta, 1.0)}
    _, shared = superclass_texts(bundle, gallery, models, edits_text=False)
    _, own = superclass_texts(bundle, gallery, models, edits_text=True)
    assert torch.equal(shared["original"], shared["unlearned"]) and torch.equal(own["original"], shared["original"])
    assert (own["unlearned"] - own["original"]).norm(dim=-1).min() > 0.1

    req = ForgetRequest("dog", "poodle")
    forget_items = resolve(gallery, req)[0]
    cfg = CertifyConfig.from_dict({"retrieval": {"pool": 100}})
    read_through_original = retrieval_check(bundle, models, gallery, req, forget_items, cfg, [], edits_text=False)
    read_through_own = retrieval_check(bundle, models, gallery, req, forget_items, cfg, [], edits_text=True)
    assert all(r["after"] == r["before"] for r in read_through_original["queries"])   # the image tower is untouched
    assert any(r["after"] != r["before"] for r in read_through_own["queries"])
