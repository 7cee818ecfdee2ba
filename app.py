"""clipforget web app: pick a subgroup, forget it in the background, compare retrieval, slide α.

    python app.py                                   # embedded model + gallery on http://127.0.0.1:7860
    GRADIO_SERVER_PORT=8080 python app.py           # Gradio's variables are the defaults; flags win
    python app.py --model RN50 --pretrained /path/rn50.safetensors --gallery /path/images

The entry point: options, launch, and the page, whose layout, event handlers and script endpoints are
in ``clipforget/app/page/``; every handler calls :class:`clipforget.app.AppCore`, which does the
work without gradio (and is what the tests and ``gr.api`` endpoints exercise).
"""
from __future__ import annotations

import os
import sys

for _k, _v in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import logging  # noqa: E402

import gradio as gr  # noqa: E402

# No torch in these (nor in building the page): the model stack is imported by the core's loader
# thread once the page is served, so the page comes up seconds sooner (bench/bench_app.py).
from clipforget.alphas import DEFAULT_ALPHA_POINTS  # noqa: E402
from clipforget.app import AppCore, bind_warning  # noqa: E402
from clipforget.app.page import api, handlers, layout  # noqa: E402
from clipforget.jobs import RunsDirBusy  # noqa: E402
from clipforget.uploads import UploadConfig  # noqa: E402

log = logging.getLogger("clipforget.app")

# The only files the app takes are example images for a retain-set suggestion: gradio's upload route
# is capped at their per-file limit (clipforget/uploads.py checks type, pixels and count, and stores
# them under the runs folder all-or-nothing); gradio reduces an upload's name to a bare file name
# inside its own upload folder.
MAX_UPLOAD_BYTES = UploadConfig().max_bytes


def build_app(core: AppCore) -> gr.Blocks:
    """The page: its widgets (clipforget/app/page/layout.py), their events (handlers.py) and the
    endpoints for scripts (api.py), all calling ``core``."""
    with gr.Blocks(title="clipforget") as demo:
        page = layout.build(core)
        # the endpoints first: a private page event whose function is also called "search" or "cancel"
        # would otherwise take the name and push the endpoint to "/search_1"
        api.register(core)
        handlers.wire(core, page, demo)
    return demo


def theme() -> gr.themes.Base:
    """System fonts only: nothing fetched from the network."""
    return gr.themes.Soft(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                          font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])


def launch(core: AppCore, host: str = "127.0.0.1", port: int | None = None, prevent_thread_lock: bool = False,
           quiet: bool = False):
    demo = build_app(core)
    demo.queue(default_concurrency_limit=4)
    calm_queue(demo)
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, quiet=quiet,
                prevent_thread_lock=prevent_thread_lock, theme=theme(), css=layout.CSS, footer_links=["api"],
                allowed_paths=[str(core.gallery.root.resolve()), str(core.runs_dir)],
                max_file_size=MAX_UPLOAD_BYTES)
    return demo


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860

# Gradio 6's queue looks for a new event every 1 ms and for progress to send every 10 ms while it
# waits (gradio/queueing.py): some 800 wake-ups a second of the server's thread. With a job's two
# torch threads on two cores each wake-up preempts one of them inside a parallel region while the
# other waits at its barrier: the main part of why the default job reached its grids 4–5 s later
# in the app than in a plain process (docs/results/README.md). Every 10 ms costs an event up to 10 ms before it starts;
# the page's progress is a text line it polls for, not Gradio's progress messages.
QUEUE_POLL_S, QUEUE_PROGRESS_POLL_S = 0.01, 0.1


def calm_queue(demo: gr.Blocks) -> None:
    """The queue's idle polling at :data:`QUEUE_POLL_S` / :data:`QUEUE_PROGRESS_POLL_S`, or Gradio's
    own where it polls less often (on Windows). Private attributes of gradio 6's ``Queue``: a Gradio
    without them keeps its own, with a warning."""
    queue = demo._queue
    for name, value in (("sleep_when_free", QUEUE_POLL_S), ("progress_update_sleep_when_free", QUEUE_PROGRESS_POLL_S)):
        if isinstance(getattr(queue, name, None), (int, float)):
            setattr(queue, name, max(getattr(queue, name), value))
        else:
            log.warning("this Gradio's queue has no %s: its idle polling is left as it is", name)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _alpha_points(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of α points (2 or more)") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"{n} α points cannot make a slider: give 2 or more (α = 0 and 1 at least; "
                                         f"default {DEFAULT_ALPHA_POINTS})")
    return n


def parse_args(argv: list[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    """The app's options. ``--host``/``--port`` default to Gradio's own ``GRADIO_SERVER_NAME`` /
    ``GRADIO_SERVER_PORT`` when set (127.0.0.1 and 7860 otherwise); a flag given wins."""
    environ = os.environ if environ is None else environ
    env_host, env_port = environ.get("GRADIO_SERVER_NAME"), environ.get("GRADIO_SERVER_PORT")
    p = argparse.ArgumentParser(description="clipforget web app")
    p.add_argument("--model", default="embedded", help="'embedded', 'embedded-vit', an open_clip architecture, or local-dir:PATH")
    p.add_argument("--pretrained", default=None, help="pretrained tag or local checkpoint for --model")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow full unpickling of a trusted .pt --pretrained checkpoint (it can run code)")
    p.add_argument("--gallery", default=None, help="image folder or manifest CSV (default: the embedded gallery)")
    p.add_argument("--runs-dir", default="runs/app", help="job history and results (default: runs/app)")
    p.add_argument("--host", default=env_host or DEFAULT_HOST,
                   help=f"bind address (default: $GRADIO_SERVER_NAME, else {DEFAULT_HOST}: loopback only)")
    p.add_argument("--port", type=_port, default=None,
                   help=f"port (default: $GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when there is one, else the CPU) | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--alpha-points", type=_alpha_points, default=DEFAULT_ALPHA_POINTS,
                   help=f"α values precomputed per job, evenly over 0..1 (2 or more), plus the job's α (default: {DEFAULT_ALPHA_POINTS})")
    args = p.parse_args(argv)
    if args.port is None:
        try:
            args.port = _port(env_port) if env_port else DEFAULT_PORT
        except argparse.ArgumentTypeError as e:
            p.error(f"GRADIO_SERVER_PORT: {e}; set it to a port number, unset it, or pass --port")
    return args


def without_triton() -> None:
    """Keep Triton out of this process. The app never compiles a model, but importing torchvision
    (open_clip does) imports torch._dynamo, which loads Triton, torch.compile's GPU kernel compiler,
    when it is installed: ~75 MiB of the app's resident memory for nothing it uses
    (docs/results/README.md). Marked missing before torch is imported, it is not loaded — as with
    a CPU-only torch, which has no Triton. Called by :func:`main` only: importing this module
    changes nothing."""
    sys.modules.setdefault("triton", None)


def main(argv: list[str] | None = None) -> None:
    without_triton()            # first: nothing has imported torch yet
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if (warning := bind_warning(args.host)) is not None:
        log.warning(warning)
    try:
        core = AppCore(args.model, args.pretrained, args.gallery, args.runs_dir, args.device, args.alpha_points,
                       allow_pickle=args.allow_pickle, load=False)
    except (OSError, ValueError, RunsDirBusy) as e:     # a bad --gallery / --runs-dir: say so, no traceback
        raise SystemExit(f"clipforget app: error: {e}") from None
    try:
        demo = launch(core, args.host, args.port, prevent_thread_lock=True)
        core.start_loading()        # after the page is served: it shows "Loading model…" meanwhile
        demo.block_thread()
    finally:
        core.close()


if __name__ == "__main__":
    main()
