"""Starting the app the way Gradio apps are started: Gradio's environment variables give the
defaults of --host/--port, flags win; the device is chosen as the CLI chooses it and the page says it;
the queue waits for events without waking the server's thread some 800 times a second."""
import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_app_module

from clipforget.app import device_line
from clipforget.cli import build_parser


@pytest.fixture(scope="module")
def app():
    return load_app_module()


def test_host_and_port_default_to_gradio_variables(app):
    args = app.parse_args([], environ={})
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    args = app.parse_args([], environ={"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8123"})
    assert (args.host, args.port) == ("0.0.0.0", 8123)
    assert app.parse_args([], environ={"GRADIO_SERVER_PORT": ""}).port == 7860     # set but empty: unset


def test_flags_win_over_gradio_variables(app):
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8123"}
    args = app.parse_args(["--host", "127.0.0.1", "--port", "9000"], environ=env)
    assert (args.host, args.port) == ("127.0.0.1", 9000)
    # an explicit --port wins even over a variable that is not a port
    assert app.parse_args(["--port", "9000"], environ={"GRADIO_SERVER_PORT": "http"}).port == 9000


@pytest.mark.parametrize("value", ["eighty", "0", "70000", "80.5"])
def test_bad_gradio_server_port_is_a_clear_error(app, value, capsys):
    with pytest.raises(SystemExit) as e:
        app.parse_args([], environ={"GRADIO_SERVER_PORT": value})
    err = capsys.readouterr().err
    assert e.value.code == 2 and "GRADIO_SERVER_PORT" in err and "not a port number" in err and "--port" in err


def test_bad_port_flag_is_a_clear_error(app, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--port", "99999"], environ={})
    assert "99999 is not a port number" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [("1", "1 α points cannot make a slider: give 2 or more"),
                                            ("0", "0 α points cannot make a slider"),
                                            ("-3", "-3 α points cannot make a slider"),
                                            ("six", "'six' is not a whole number of α points")])
def test_too_few_alpha_points_are_refused_at_start_up(app, value, message, capsys):
    """Every job would otherwise train fully, then fail on its α-grid."""
    with pytest.raises(SystemExit) as e:
        app.parse_args(["--alpha-points", value], environ={})
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--alpha-points" in err and message in err, err
    assert app.parse_args(["--alpha-points", "2"], environ={}).alpha_points == 2


@pytest.mark.parametrize("points", [1, 0, 2.5, True])
def test_a_forget_job_runner_refuses_too_few_alpha_points(points):
    """The same check where the app's core (and a script) makes its job runner: before any job."""
    from clipforget.work import ForgetWork
    with pytest.raises(ValueError, match="alpha points .* must be a whole number >= 2"):
        ForgetWork(lambda: None, points)
    assert ForgetWork(lambda: None, 2).alpha_points == 2


def test_device_defaults_to_auto_as_in_the_cli(app):
    assert app.parse_args([], environ={}).device == "auto"
    assert build_parser().parse_args(["forget", "--superclass", "dog", "--out", "x"]).device == "auto"
    assert app.parse_args(["--device", "cpu"], environ={}).device == "cpu"


def test_page_says_device_and_precision():
    assert device_line(torch.device("cpu"), "fp32") == "Runs on `cpu` · fp32"
    if torch.cuda.is_available():
        line = device_line(torch.device("cuda", 0), "bf16")
        assert line.startswith("Runs on `cuda:0` (") and torch.cuda.get_device_name(0) in line


def test_model_status_names_the_device(core):
    status = core.model_status()
    assert "Runs on `cpu` · fp32" in status        # the tests' core is on the CPU, fp32


def test_queue_polls_every_10_ms_while_it_waits(app, server):
    """Gradio's 1 ms polling preempted a job's torch threads (app.calm_queue): the launched app's
    queue polls at the app's intervals."""
    queue = server.demo._queue
    assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) == (0.01, 0.1)


def test_a_queue_without_those_settings_is_left_alone(app, caplog):
    class Demo:
        _queue = object()
    with caplog.at_level("WARNING", logger="clipforget.app"):
        app.calm_queue(Demo())
    assert "sleep_when_free" in caplog.text and "left as it is" in caplog.text


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_app_does_not_load_triton():
    """Importing open_clip loads Triton (torchvision → torch._dynamo); the app's main() marks it
    missing first, which keeps ~75 MiB out of its memory. The control — the app's module imported,
    main() not run — loads it."""
    probe = "\n".join([
        "import contextlib, importlib.util, sys",
        f"spec = importlib.util.spec_from_file_location('app', {str(ROOT / 'app.py')!r})",
        "app = importlib.util.module_from_spec(spec)",
        "spec.loader.exec_module(app)",
        "{run}",
        "import open_clip, torch",
        "print(any('libtriton' in line for line in open('/proc/self/maps')), sys.modules.get('triton') is not None)"])
    runs = {name: subprocess.run([sys.executable, "-c", probe.format(run=run)], capture_output=True, text=True,
                                 cwd=ROOT, timeout=300)
            for name, run in (("control", "pass"),
                              ("main", "with contextlib.suppress(SystemExit):\n    app.main(['--help'])"))}
    assert runs["control"].stdout.split()[-2:] == ["True", "True"], runs["control"].stderr[-2000:]
    assert runs["main"].stdout.split()[-2:] == ["False", "False"], runs["main"].stderr[-2000:]
