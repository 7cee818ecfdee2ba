"""Bad input through the library and the CLI: every case ends in an error that says what was wrong
and what to do (CLI: exit status 2, one line on stderr, no traceback; out of memory: 3), and the
cheap checks run before the model is loaded. Runs on the tiny world (tests/tinyworld.py); the app's
side of these cases is in test_nothing_lost.py and test_security.py."""
from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil

import open_clip
import pytest
import torch

from clipforget.cli import main as cli_main
from clipforget.data.gallery import Gallery
from clipforget.data.task import ForgetRequest, SplitConfig, resolve
from clipforget.io import OutputError, check_writable, write_json
from clipforget.merge import apply_delta
from clipforget.methods.base import Unlearner, get_method
from clipforget.models import load_clip
from clipforget.pipeline import edited_model, forget, save_run
from clipforget.train.loop import NonFiniteLoss
from tinyworld import TINY_CONFIG, TINY_MODEL, TINY_SPLIT, file_hash, recognising_checkpoint, state_hash, tree

ABSURD_LR = {"steps": 2, "lr": 1e30}
NAN_MESSAGE = r"stage 'forget': the (weights|model's image features) became NaN/inf.*lower the learning rate"


@pytest.fixture
def no_model(monkeypatch):
    """The test fails if the CLI loads a model: input that can be checked cheaply must be."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr("clipforget.models.load_clip", refuse)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_ckpt):
    return load_clip(TINY_MODEL, str(tiny_ckpt), device="cpu")


@pytest.fixture(scope="module")
def tiny_gallery(tiny_world):
    return Gallery.open(tiny_world)


def run_tiny(bundle, gallery, request=("dog", "poodle"), config=None, **kw):
    return forget(bundle, ForgetRequest(*request), config=TINY_CONFIG if config is None else config, gallery=gallery,
                  split=SplitConfig(**TINY_SPLIT), **kw)


@pytest.fixture(scope="module")
def tiny_forget(tiny_bundle, tiny_gallery, tiny_ckpt):
    """One run of ours, with hashes of the model's state dict and checkpoint file around it."""
    before = state_hash(tiny_bundle.model), file_hash(tiny_ckpt)
    run = run_tiny(tiny_bundle, tiny_gallery)
    return run, before, (state_hash(tiny_bundle.model), file_hash(tiny_ckpt))


@pytest.fixture(scope="module")
def tiny_run(tiny_forget):
    return tiny_forget[0]


def test_forget_never_modifies_the_model_or_its_checkpoint(tiny_forget):
    run, before, after = tiny_forget
    assert after == before and run.result.delta      # the run did change weights, in its own copy


def cli(capsys, world, out, *args, ckpt=None):
    """Run ``clipforget forget`` on the tiny world; (exit status, stderr)."""
    argv = ["forget", "--model", TINY_MODEL, "--gallery", str(world), "--out", str(out),
            "--split", json.dumps(TINY_SPLIT), *args]
    if ckpt is not None:
        argv += ["--pretrained", str(ckpt)]
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# ---- names and requests ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--superclass", "dgo", "--subgroup", "poodle"], "superclass 'dgo' not in gallery; did you mean 'dog'?"),
    (["--superclass", "dog", "--subgroup", "poodel"], "subgroup 'poodel' not in gallery; did you mean 'poodle'?"),
    (["--superclass", "dog", "--subgroup", "poodle", "--style", "notto"], "style 'notto' not in gallery; did you mean 'noto'?"),
    (["--superclass", "dog", "--subgroup", "poodle", "--retain", "dog-fcae"], "did you mean 'dog-face'?"),
    (["--superclass", "dog", "--subgroup", "xyzzy"], "choose one of: dog, dog-face, poodle"),
    # cat face exists, but not in twemoji: the forget set would be empty
    (["--superclass", "cat", "--subgroup", "cat-face", "--style", "twemoji"],
     "no images for cat face (twemoji): the gallery has no 'cat-face' in style 'twemoji'; pick another style or subgroup"),
    (["--superclass", "dog"], "name a subgroup, a style, or both"),
    (["--superclass", "dog", "--subgroup", "poodle", "--retain", "poodle"], "retain set contains the forget subgroup"),
    (["--superclass", "dog", "--subgroup", "poodle", "--set", "forget.top_k=2"], "unknown field(s) ['top_k']"),
    (["--superclass", "dog", "--subgroup", "poodle", "--set", "forget.loop.lr=fast"], "a value has the wrong type"),
    (["--superclass", "dog", "--subgroup", "poodle", "--config", "{not json"], "is not valid JSON"),
    (["--superclass", "dog", "--subgroup", "poodle", "--split", "{bad"], "--split: '{bad' (not a file either) is not valid JSON"),
])
def test_bad_requests_fail_before_the_model_loads(args, message, tiny_world, tmp_path, capsys, no_model):
    code, err = cli(capsys, tiny_world, tmp_path / "out", *args)
    assert code == 2 and message in err, err
    assert err.startswith("clipforget forget: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_gallery_that_is_not_a_folder(tmp_path, capsys, no_model):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a gallery")
    for gallery, message in [(notes, f"gallery {notes} is a file, not a folder; pass an image folder"),
                             (tmp_path / "missing", f"image folder {tmp_path / 'missing'} does not exist"),
                             (tmp_path, f"gallery at {tmp_path} has no images; check the folder layout")]:
        code, err = cli(capsys, gallery, tmp_path / "out", "--superclass", "dog", "--subgroup", "poodle")
        assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_method_names():
    with pytest.raises(ValueError, match="unknown method 'our'; did you mean 'ours'"):
        get_method("our")
    with pytest.raises(SystemExit) as e:            # argparse: the choices are list_methods()
        cli_main(["forget", "--superclass", "dog", "--subgroup", "poodle", "--method", "our", "--out", "x"])
    assert e.value.code == 2


def test_nothing_to_retain_is_a_warning_and_the_run_completes(tiny_world, tiny_gallery, tmp_path, caplog):
    forget_items, retain, names, warnings = resolve(tiny_gallery, ForgetRequest("fish", "shark"))
    assert forget_items and retain == [] and names == []
    assert warnings == ["nothing to retain for shark: the superclass 'fish' has no other subgroup or style; "
                        "only the other columns guard against over-forgetting"]
    assert resolve(tiny_gallery, ForgetRequest("dog", "poodle", retain=()))[3][0].startswith("nothing to retain")
    ckpt = recognising_checkpoint(tiny_world, tmp_path / "fish.safetensors", "fish", "shark")
    bundle = load_clip(TINY_MODEL, str(ckpt), device="cpu")
    with caplog.at_level("WARNING", logger="clipforget"):
        run = run_tiny(bundle, tiny_gallery, ("fish", "shark"))
    assert "nothing to retain for shark" in caplog.text
    assert [w for w in run.report["warnings"] if not w.startswith("restore:")] == warnings
    assert "retain" not in run.report["columns"] and 0 <= run.report["score"] <= 100
    with pytest.raises(ValueError, match="ft needs a retain set"):   # a method that cannot do without one
        run_tiny(bundle, tiny_gallery, ("fish", "shark"), method="ft", config={})


def test_a_model_that_does_not_know_the_subgroup_is_refused_before_training(tiny_bundle, tiny_gallery, monkeypatch):
    from clipforget import pipeline
    events, encoded, real = [], [], pipeline.column_accuracy
    monkeypatch.setattr(pipeline, "column_accuracy", lambda b, col, *a, **k: encoded.append(col) or real(b, col, *a, **k))
    with pytest.raises(ValueError, match="does not recognise taxi as 'car'.*nothing to forget"):
        run_tiny(tiny_bundle, tiny_gallery, ("car", "taxi"), callbacks=[events.append])
    assert {e["stage"] for e in events} == {"data"}       # the task was built; no training stage started
    assert len(encoded) == 1 and {it.subgroup for it in encoded[0].views.items} == {"taxi"}   # the target alone
    # check=False (bench/bench_towers.py: what the stages cost on untrained weights) runs every stage anyway
    run = run_tiny(tiny_bundle, tiny_gallery, ("car", "taxi"), check=False)
    assert run.report["columns"]["target"]["before"] == 0 and run.report["score"] is None
    assert {"forget", "restore", "evaluate"} <= set(run.report["seconds"])


# ---- images in a gallery ---------------------------------------------------------------------------

def test_a_bad_image_in_a_user_gallery_names_the_file(tiny_world, tiny_ckpt, tmp_path, capsys):
    g = shutil.copytree(tiny_world, tmp_path / "g")
    n = len(Gallery.open(g))
    # junk that folder galleries skip: hidden files, macOS resource forks, a folder named like an image
    (g / "dog" / "poodle" / "noto" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (g / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (g / "dog" / "poodle" / "noto" / "thumbs.png").mkdir()
    assert len(Gallery.open(g)) == n
    bad = g / "dog" / "poodle" / "noto" / "1.png"
    bad.write_bytes((g / "dog" / "poodle" / "noto" / "0.png").read_bytes()[:60])     # cut short
    code, err = cli(capsys, g, tmp_path / "out", "--superclass", "dog", "--subgroup", "poodle", ckpt=tiny_ckpt)
    assert code == 2 and str(bad) in err and "re-export or remove it" in err
    bad.write_text("a text file named .png")
    code, err = cli(capsys, g, tmp_path / "out", "--superclass", "dog", "--subgroup", "poodle", ckpt=tiny_ckpt)
    assert code == 2 and f"{bad} is not an image" in err
    assert not (tmp_path / "out").exists()


# ---- checkpoints -----------------------------------------------------------------------------------

class Payload:  # a class only full unpickling can rebuild
    pass


@pytest.mark.parametrize("case, message", [
    ("pickle", "needs full unpickling, which can run arbitrary code. Convert it to safetensors, or if you trust "
               "the file pass allow_pickle=True (CLI: --allow-pickle)"),
    ("wrong-arch", "does not fit architecture 'test-tiny-rn'"),
    ("missing", "not found"),
    ("corrupt", "is not a valid safetensors file"),
    ("truncated-pt", "cannot read checkpoint"),
])
def test_bad_checkpoints_via_the_cli(case, message, tiny_world, tmp_path, capsys):
    rn, _, _ = open_clip.create_model_and_transforms(TINY_MODEL)
    path = tmp_path / ("ckpt.pt" if case in ("pickle", "truncated-pt") else "ckpt.safetensors")
    if case == "pickle":
        torch.save({"state_dict": rn.state_dict(), "extra": Payload()}, path)
    elif case == "wrong-arch":
        vit, _, _ = open_clip.create_model_and_transforms("test-tiny-vit")
        from clipforget.io import save_safetensors
        save_safetensors(vit.state_dict(), path)
    elif case == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    elif case == "truncated-pt":
        torch.save(rn.state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    before = path.read_bytes() if path.exists() else None
    code, err = cli(capsys, tiny_world, tmp_path / "out", "--superclass", "dog", "--subgroup", "poodle", ckpt=path)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()
    assert (path.read_bytes() if path.exists() else None) == before


# ---- the same cases in the app ----------------------------------------------------------------------

def tiny_app(world, ckpt, runs, **kwargs):
    from clipforget.app import AppCore
    return AppCore(TINY_MODEL, str(ckpt), str(world), runs, "cpu", alpha_points=2, job_config=TINY_CONFIG,
                   job_split=TINY_SPLIT, **kwargs)


def test_bad_requests_in_the_app_are_refused_before_a_job_starts(tiny_world, tiny_ckpt, tmp_path):
    core = tiny_app(tiny_world, tiny_ckpt, tmp_path / "runs")
    try:
        for args, message in [(("dgo", "poodle"), "superclass 'dgo' not in gallery; did you mean 'dog'?"),
                              (("dog", "poodel"), "subgroup 'poodel' not in gallery; did you mean 'poodle'?"),
                              (("dog", "poodle", "notto"), "style 'notto' not in gallery; did you mean 'noto'?"),
                              (("cat", "cat-face", "twemoji"), "no images for cat face (twemoji)"),
                              (("dog",), "pick a subgroup of 'dog' (or a style)"),
                              (("",), "pick a superclass first")]:
            for call in (core.describe_retain, core.start_job):
                with pytest.raises(ValueError, match=re.escape(message)):
                    call(*args)
        with pytest.raises(ValueError, match="unknown method 'our'; did you mean 'ours'"):
            core.start_job("dog", "poodle", method="our")
        assert core.history() == [] and [p.name for p in core.runs_dir.iterdir() if not p.name.startswith(".")] == []
        info = core.describe_retain("fish", "shark")          # allowed, with the warning on the page
        assert info["retain_images"] == 0 and info["warnings"][0].startswith("nothing to retain for shark")
        assert f"⚠️ {info['warnings'][0]}" in core.retain_markdown(info)
    finally:
        core.close()


@pytest.mark.parametrize("case, message", [
    ("pickle", "the model 'test-tiny-rn' could not be loaded: .*needs full unpickling, which can run arbitrary "
               "code.*--allow-pickle"),
    ("wrong-arch", "the model 'test-tiny-rn' could not be loaded: .*does not fit architecture 'test-tiny-rn'"),
    ("bad-image", "the gallery 'g' could not be loaded: .*0.png is corrupted or truncated.*re-export or remove it"),
], ids=["pickle", "wrong-arch", "bad-image"])
def test_a_bad_checkpoint_or_gallery_in_the_app_says_what_to_do(case, message, tiny_world, tiny_ckpt, tmp_path):
    from clipforget.app import NotReady
    from safetensors.torch import load_file
    path = tmp_path / ("ckpt.safetensors" if case == "bad-image" else "ckpt.pt")
    world = shutil.copytree(tiny_world, tmp_path / "g")
    if case == "pickle":
        torch.save({"state_dict": load_file(str(tiny_ckpt)), "extra": Payload()}, path)
    elif case == "wrong-arch":
        vit, _, _ = open_clip.create_model_and_transforms("test-tiny-vit")
        torch.save(vit.state_dict(), path)
    else:
        shutil.copy(tiny_ckpt, path)
        bad = world / "dog" / "poodle" / "noto" / "0.png"
        bad.write_bytes(bad.read_bytes()[:60])
    before = file_hash(path)
    core = tiny_app(world, path, tmp_path / "runs")
    try:
        with pytest.raises(NotReady, match=f"the app could not start: {message}"):
            core.resources(timeout=120)
        assert core.model_status().startswith("The app could not start: ") and not core.ready
    finally:
        core.close()
    if case == "pickle":         # the operator trusts the file: python app.py --allow-pickle
        core = tiny_app(world, path, tmp_path / "runs", allow_pickle=True)
        try:
            assert core.resources(timeout=120).bundle.arch == TINY_MODEL
        finally:
            core.close()
    assert file_hash(path) == before


# ---- numbers: NaN/inf, α ---------------------------------------------------------------------------

@pytest.mark.parametrize("remind", [True, False])
def test_an_absurd_learning_rate_aborts_the_forget_stage(tiny_bundle, tiny_gallery, remind):
    """A real run of ours: after one step at lr 1e30 the weights are NaN. Early stopping would take
    them (NaN features are 'not a dog'); the loop's weight check stops the stage with the reason."""
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["forget"]["loop"] = ABSURD_LR
    cfg["remind"]["enabled"] = remind
    stages = []
    with pytest.raises(NonFiniteLoss, match=NAN_MESSAGE):
        run_tiny(tiny_bundle, tiny_gallery, config=cfg, callbacks=[lambda e: stages.append(e["stage"])])
    assert set(stages) == {"data", "stand-ins", "forget"}      # stopped in the forget stage: nothing after it ran


def test_a_method_that_produces_nan_weights_is_stopped(tiny_bundle, tiny_gallery):
    """Methods without the optimisation loop (closed forms, noise) are checked when they return."""
    from dataclasses import dataclass

    from clipforget.data.task import build_task

    @dataclass
    class NoKnobs:
        pass

    class Broken(Unlearner):            # not registered: a local stand-in
        name, Config = "broken", NoKnobs

        def unlearn(self, ctx):
            w = ctx.model.visual.attnpool.c_proj.weight
            w.data[0, 0] = float("inf")

    task = build_task(tiny_gallery, ForgetRequest("dog", "poodle"), tiny_bundle.image_size, SplitConfig(**TINY_SPLIT))
    with pytest.raises(NonFiniteLoss, match="method 'broken' produced NaN/inf weights .*attnpool.c_proj.weight"):
        Broken().run(tiny_bundle, task)


def test_forget_prints_its_retain_set_before_the_run_unless_told_not_to(tiny_world, tiny_ckpt, tmp_path, capsys):
    argv = ["forget", "--model", TINY_MODEL, "--pretrained", str(tiny_ckpt), "--gallery", str(tiny_world),
            "--split", json.dumps(TINY_SPLIT), "--config", json.dumps(TINY_CONFIG), "--superclass", "dog",
            "--subgroup", "poodle", "--no-export"]
    assert cli_main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "retain set (siblings): " in out and out.index("retain set") < out.index("Score")
    assert cli_main([*argv, "--out", str(tmp_path / "b"), "--no-suggest"]) == 0
    assert "retain set" not in capsys.readouterr().out


def test_nan_loss_and_out_of_memory_through_the_cli(tiny_world, tiny_ckpt, tmp_path, capsys, monkeypatch):
    tiny = ["--superclass", "dog", "--subgroup", "poodle", "--config", json.dumps(TINY_CONFIG)]
    code, err = cli(capsys, tiny_world, tmp_path / "out", *tiny, "--set", "forget.loop.lr=1e30", ckpt=tiny_ckpt)
    assert code == 2 and re.search(NAN_MESSAGE, err), err

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr("clipforget.train.loop.make_optimizer", oom)
    code, err = cli(capsys, tiny_world, tmp_path / "out", *tiny, ckpt=tiny_ckpt)
    assert code == 3 and "out of memory" in err and "smaller batch" in err
    assert not (tmp_path / "out").exists()


def test_alpha_outside_the_unit_interval(tiny_bundle, tiny_run, tiny_world, tmp_path, capsys, no_model):
    delta = tiny_run.result.delta
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"alpha \(unlearning strength\) must be in \[0, 1\]"):
            edited_model(tiny_bundle, delta, bad)
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            tiny_run.result.weights(tiny_bundle.model.state_dict(), bad)
    sd = {"w": torch.zeros(2)}
    assert torch.equal(apply_delta(sd, {"w": torch.ones(2)}, 1.0)["w"], torch.ones(2))
    for bad, message in (("1.5", "must be in [0, 1] (0 = original, 1 = fully unlearned), got 1.5"),
                         ("-0.2", "must be in [0, 1]"), ("nan", "must be in [0, 1]"),
                         ("strong", "expected a number in [0, 1], got 'strong'")):
        with pytest.raises(SystemExit) as e:
            cli(capsys, tiny_world, tmp_path / "out", "--superclass", "dog", "--subgroup", "poodle", "--alpha", bad)
        assert e.value.code == 2
        assert f"argument --alpha: {message}" in capsys.readouterr().err


# ---- where results go ------------------------------------------------------------------------------

def test_an_output_folder_under_a_file_fails_in_a_second(tiny_world, tmp_path, capsys, no_model):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    code, err = cli(capsys, tiny_world, blocker / "runs" / "poodle", "--superclass", "dog", "--subgroup", "poodle")
    assert code == 2 and f"{blocker} is a file, not a folder; choose another output folder" in err
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable(blocker / "x")
    with pytest.raises(OutputError, match="a part of that path is a file"):
        write_json(blocker / "x.json", {})
    assert tree(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("err, message", [(errno.EACCES, "permission denied; choose a writable folder"),
                                          (errno.EROFS, "the file system is read-only")])
def test_unwritable_output_is_explained(err, message, tmp_path, tiny_bundle, tiny_run, monkeypatch):
    """Root ignores permission bits, so the refusal is simulated where the file is created."""
    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr("clipforget.io.tempfile.mkstemp", refuse)
    monkeypatch.setattr("clipforget.io.tempfile.mkdtemp", refuse)
    with pytest.raises(OutputError, match=message):
        check_writable(tmp_path / "out")
    with pytest.raises(OutputError, match=message):
        save_run(tiny_run, tiny_bundle, tmp_path / "out")
    assert tree(tmp_path) == []


def test_disk_full_while_saving_leaves_the_old_result_and_no_half_files(tiny_bundle, tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_run(tiny_run, tiny_bundle, out)
    files = tree(out)
    assert {"report.json", "delta.safetensors", "run.json", "export/open_clip_model.safetensors"} <= set(files)
    report = (out / "report.json").read_bytes()
    real, calls = os.fsync, []

    def full_after_two(fd):        # the third file of the new save hits a full disk
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)
    monkeypatch.setattr(os, "fsync", full_after_two)
    with pytest.raises(OutputError) as e:
        save_run(tiny_run, tiny_bundle, out)
    assert "disk full while writing" in str(e.value) and "Nothing was left half-written" in str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert tree(tmp_path) == ["run"] + [f"run/{f}" for f in files]       # no .partial, no .tmp
    assert (out / "report.json").read_bytes() == report
    calls.clear()
    with pytest.raises(OutputError, match="disk full"):
        save_run(tiny_run, tiny_bundle, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and tree(tmp_path)[0] == "run"
    json.loads(report)


# ---- the inputs are never an output -----------------------------------------------------------------

def _fake_run(folder, delta=None):
    from clipforget.io import save_safetensors
    save_safetensors(delta or {"visual.nope": torch.zeros(2)}, folder / "delta.safetensors", {"alpha": 1.0})
    write_json(folder / "run.json", {"method": "ours"})
    return folder


def test_an_output_folder_over_an_input_is_refused_before_the_model_loads(tiny_world, tmp_path, capsys, no_model,
                                                                          monkeypatch):
    """`--out` that is, holds or lies inside the model folder, the checkpoint's folder or the gallery once
    replaced it after the run (the swap removed the original); so did `--out .`, after an hour of training.
    Each is refused in a second, naming the input, and every input is left as it was."""
    world = shutil.copytree(tiny_world, tmp_path / "world")
    image_folder = next(p for p in sorted(world.rglob("*.png"))).parent
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    (ckpt_dir / "w.safetensors").write_bytes(b"weights")
    export = tmp_path / "export"
    export.mkdir()
    write_json(export / "open_clip_config.json", {"model_cfg": {}, "clipforget": {"arch": "x"}})
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "keep.txt").write_text("keep me")
    before = tree(tmp_path)
    request = ["--superclass", "dog", "--subgroup", "poodle"]
    for out, args, message in [
            (world, [], f"the output folder {world} holds the gallery's image folder"),
            (image_folder, [], f"the output folder {image_folder} is the gallery's image folder"),
            (image_folder / "run", [], "lies inside the gallery's image folder"),
            (ckpt_dir, ["--pretrained", str(ckpt_dir / "w.safetensors")],
             f"the output folder {ckpt_dir} holds the checkpoint {ckpt_dir / 'w.safetensors'}, an input, which is "
             "never overwritten; choose another --out outside the inputs"),
            (export, ["--model", f"local-dir:{export}"], f"the output folder {export} is the model folder"),
            (theirs, [], f"{theirs} exists and is not a clipforget run folder; choose another --out or remove it")]:
        argv = ["forget", "--gallery", str(world), "--out", str(out), *request, *args]
        if "--model" not in args:
            argv += ["--model", TINY_MODEL]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    monkeypatch.chdir(tmp_path / "cwd")
    code, err = cli(capsys, world, ".", *request)
    assert code == 2 and "the output folder" in err and "is the current folder or holds it" in err, err
    assert tree(tmp_path) == before


def test_merge_refuses_to_write_over_a_run_it_merges(tmp_path, capsys, no_model):
    runs = tmp_path / "runs"
    a, b = _fake_run(runs / "a"), _fake_run(runs / "b")
    before = tree(tmp_path)
    for out, message in ((a, f"the output folder {a} is the run {a}"), (runs, f"{runs} holds the run"),
                         (a / "merged", "lies inside the run")):
        assert cli_main(["merge", str(a), str(b), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "choose another --out" in err, err
    assert tree(tmp_path) == before


def test_merge_of_files_that_are_no_deltas_says_what_to_pass(tmp_path, capsys, no_model):
    run = _fake_run(tmp_path / "a")
    write_json(run / "report.json", {})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "delta.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    for path, message in ((run / "report.json", f"no delta.safetensors in {run / 'report.json'}; pass run folders"),
                          (bad, f"{bad / 'delta.safetensors'} is not a readable delta (")):
        assert cli_main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert "a run folder written by `clipforget forget`, or its delta.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_merge_of_runs_of_another_model_is_explained(tiny_ckpt, tmp_path, capsys):
    conv = "visual.conv1.weight"
    shape = open_clip.create_model("test-tiny-rn").state_dict()[conv].shape
    for delta, message in (({"visual.nope.weight": torch.zeros(2)}, "delta entry 'nope.weight' is not a weight of this model"),
                           ({conv: torch.zeros(3, *shape[1:])}, "delta entry 'conv1.weight' has shape (3, ")):
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
        run = _fake_run(tmp_path / "a", delta)
        code = cli_main(["merge", str(run), "--model", TINY_MODEL, "--pretrained", str(tiny_ckpt),
                         "--device", "cpu", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "the delta was made from another model" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_library_writers_refuse_an_input_folder(tiny_bundle, tiny_run, tmp_path):
    """save_run and export_open_clip check their own inputs too (the app and scripts call them)."""
    import dataclasses
    from clipforget.models import export_open_clip
    ckpt = tmp_path / "ckpts" / "tiny.safetensors"
    ckpt.parent.mkdir()
    shutil.copy(tiny_bundle.pretrained, ckpt)
    bundle = dataclasses.replace(tiny_bundle, pretrained=str(ckpt))
    with pytest.raises(OutputError, match="holds the checkpoint"):
        save_run(tiny_run, bundle, ckpt.parent)
    with pytest.raises(OutputError, match="holds the checkpoint"):
        export_open_clip(bundle, bundle.model.state_dict(), ckpt.parent)
    with pytest.raises(OutputError, match="is the run"):
        export_open_clip(bundle, bundle.model.state_dict(), tmp_path / "r", keep=[("run", tmp_path / "r")])
    assert tree(tmp_path) == ["ckpts", "ckpts/tiny.safetensors"] and file_hash(ckpt) == file_hash(tiny_bundle.pretrained)
    save_run(tiny_run, bundle, tmp_path / "run")           # a run folder of this project is rewritten
    save_run(tiny_run, bundle, tmp_path / "run", export=False)
    assert not (tmp_path / "run" / "export").exists() and (tmp_path / "run" / "run.json").is_file()


def test_a_damaged_export_folder_is_explained(tmp_path, capsys):
    folder = tmp_path / "exp"
    folder.mkdir()
    write_json(folder / "open_clip_config.json", {"model_cfg": open_clip.get_model_config(TINY_MODEL)})
    (folder / "open_clip_model.safetensors").write_bytes(b"\xff" * 23)
    assert cli_main(["eval", "--model", f"local-dir:{folder}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot load local-dir:" in err and "its checkpoint is damaged" in err and "export the model again" in err
    assert "Traceback" not in err
