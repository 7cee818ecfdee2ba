"""clipforget web app: pick a subgroup, forget it in the background, compare retrieval, slide α.

    python app.py                                   # embedded model + gallery on http://127.0.0.1:7860
    GRADIO_SERVER_PORT=8080 python app.py           # Gradio's variables are the defaults; flags win
    python app.py --model RN50 --pretrained /path/rn50.safetensors --gallery /path/images

Layout and wiring only: every handler calls :class:`clipforget.appcore.AppCore`, which does the
work without gradio (and is what the tests and ``gr.api`` endpoints exercise).
"""
from __future__ import annotations

import os

for _k, _v in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import gradio as gr  # noqa: E402

# No torch in these (nor in building the page): the model stack is imported by the core's loader
# thread once the page is served, so the page comes up seconds sooner (bench/bench_app.py).
from clipforget.alphas import DEFAULT_ALPHA_POINTS  # noqa: E402
from clipforget.appcore import AppCore, NotReady, bind_warning  # noqa: E402
from clipforget.jobs import JobBusy, JobError, RunsDirBusy  # noqa: E402
from clipforget.uploads import UploadConfig  # noqa: E402

log = logging.getLogger("clipforget.app")

K = 12                      # images per grid
# The only files the app takes are example images for a retain-set suggestion: gradio's upload route
# is capped at their per-file limit (clipforget/uploads.py checks type, pixels and count, and stores
# them under the runs folder all-or-nothing); gradio reduces an upload's name to a bare file name
# inside its own upload folder.
MAX_UPLOAD_BYTES = UploadConfig().max_bytes
ALL_STYLES = "all styles"
CSS = """
#left-grid, #right-grid {min-height: 330px}
#left-grid .grid-container, #right-grid .grid-container {grid-template-columns: repeat(4, minmax(0, 1fr)) !important}
#cards .grid-container {grid-template-columns: repeat(3, minmax(0, 1fr)) !important}
.gallery-item, .thumbnail-item {min-width: 0 !important}
#left-grid .caption-label, #right-grid .caption-label, #cards .caption-label {font-size: 11px; max-width: 96%;
  white-space: normal; line-height: 1.15}
.recall {font-size: 1.05em}
.grid-title p {margin: 0 0 -6px 2px}
#alpha-note p {margin: 0; color: var(--body-text-color-subdued)}
footer {display: none !important}
"""


def _errors(fn):
    """Turn the library's errors into gr.Error messages the page shows."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, JobBusy, JobError, NotReady) as e:
            raise gr.Error(str(e)) from None
    wrapped.__name__ = fn.__name__
    return wrapped


def _grid(hits):
    return [(h["path"], h["caption"]) for h in hits]


def _recall(search: dict, side: str) -> str:
    r = search.get(f"recall_{side}")
    if r is None:
        return "recall@k of the forgotten subgroup: run or reopen a job to mark it"
    n = search["forget_count"]
    return f"**recall@{search['k']} of the forgotten subgroup: {r:.2f}** ({round(r * n)}/{n} of its images in the top {search['k']})"


def _alpha_note(search: dict) -> str:
    if "alpha_note" not in search:
        return "no finished job yet: the right grid fills when one is done"
    return f"{search['alpha_note']} · grids for “{search['query']}”"


def build_app(core: AppCore) -> gr.Blocks:
    superclasses = core.superclasses()
    sc0 = "dog" if "dog" in superclasses else superclasses[0]
    subs0 = core.subgroups(sc0)
    sg0 = "poodle" if "poodle" in subs0 else subs0[0]

    # ---- handlers: thin calls into the core -------------------------------------------------------
    def on_pick_superclass(sc):
        subs = core.subgroups(sc)
        return gr.update(value=core.subgroup_cards(sc), selected_index=None), gr.update(choices=subs, value=subs[0])

    def on_pick_card(sc, evt: gr.SelectData):
        return core.subgroups(sc)[evt.index]

    def on_describe(sc, sg, style):
        style = "" if style == ALL_STYLES else style
        try:
            info = core.describe_retain(sc, sg, style)
        except ValueError as e:
            return f"⚠️ {e}", gr.update(), gr.update()
        return core.retain_markdown(info), info["query"], gr.update(choices=info["queries"], value=info["query"])

    def on_retain(sc, sg, style):
        """The editable retain set (the siblings selected) and the over-forgetting warnings."""
        try:
            ed = core.retain_editor(sc, sg, "" if style == ALL_STYLES else style)
        except ValueError:
            return gr.update(), ""        # on_describe shows the error
        return gr.update(choices=ed["choices"], value=ed["value"]), ed["markdown"]

    @_errors
    def on_upload(files, label):
        res = core.suggest_uploads(files, label)
        return res["markdown"], gr.update(value=res["retain"])

    @_errors
    def on_start(sc, sg, style, method, retain):
        job = core.start_job(sc, sg, "" if style == ALL_STYLES else style, method, retain=retain)
        return job.id, job.id, f"Started job `{job.id[:8]}` {job.label}; progress below (a reload re-attaches)."

    @_errors
    def on_certify(job_id):
        if not job_id or core.job_status(job_id)["status"] != "done":
            raise gr.Error("run or reopen a finished job first, then certify it")
        job = core.start_certificate(job_id)
        return job.id, f"Certifying in the background (job `{job.id[:8]}`)…"

    def on_show_cert(job_id):
        if not job_id or core.job_status(job_id)["status"] != "done":
            return "", None
        view = core.certificate_view(job_id)
        return view["markdown"], view["file"]

    def on_watch(job_id, progress=gr.Progress()):
        """Observe the job until it ends; closing the tab stops this, never the job."""
        if not job_id:
            yield ""
            return
        while True:
            st = core.job_status(job_id)
            if st["status"] not in ("queued", "running"):
                yield ""              # the final status goes to the status line (on_show)
                return
            progress(st["fraction"], desc=f"{st['stage'] or 'starting'} ({len(st['stages'])} stages so far)")
            yield st["text"]
            time.sleep(0.5)

    @_errors
    def on_cancel(job_id):
        if not job_id:
            raise gr.Error("no job to cancel")
        return core.cancel(job_id)["text"]

    def on_search(query, job_id, alpha):
        """Both grids for ``query``; it becomes the query the slider moves the right grid for."""
        try:
            done = bool(job_id) and core.job_status(job_id)["status"] == "done"
            res = core.search(query, job_id if done else None, alpha, K)
        except (ValueError, NotReady, JobError) as e:
            raise gr.Error(str(e)) from None
        right = _grid(res["right"]) if done else []
        return (_grid(res["left"]), _recall(res, "left"), right, _recall(res, "right") if done else "",
                _alpha_note(res), res["query"])

    def on_slide(shown, query, job_id, alpha):
        """The right grid at the new α for the query both grids show (not a query typed since and
        not searched yet: the left grid would not match)."""
        if not job_id or core.job_status(job_id)["status"] != "done":
            return gr.update(), gr.update(), _alpha_note({})
        res = core.search(shown or query, job_id, alpha, K)
        return _grid(res["right"]), _recall(res, "right"), _alpha_note(res)

    def on_show(job_id, query):
        """Fill the results of a finished job (or clear them)."""
        hist = gr.update(choices=core.history(), value=job_id or None)
        if not job_id or core.job_status(job_id)["status"] != "done":
            st = core.job_status(job_id)["text"] if job_id else ""
            empty = (None, "", None, gr.update(), gr.update(), gr.update(), gr.update())
            return (st,) + empty + on_search(query, "", 1.0) + (hist,)
        st = core.job_status(job_id)
        table = core.metrics_table(job_id)
        files = core.export(job_id)
        alpha = st["summary"].get("alpha", 1.0)
        score = (f"**Score {table['score']:.1f}** / 100 · method `{table['method']}` · calibrated α = "
                 f"{table['alpha']:.2f} · {st['summary'].get('alpha_grid_points')} α-grid points precomputed in "
                 f"{st['summary'].get('alpha_grid_seconds', 0):.1f}s")
        return (st["text"], str(core.alpha_plot(job_id)), score, {"headers": table["headers"], "data": table["rows"]},
                gr.update(value=alpha), files["model_zip"], files["report_md"], files["report_json"]) + \
            on_search(query, job_id, alpha) + (hist,)

    def on_reattach(saved):
        """After a reload: pick up the job this browser last ran or opened."""
        try:
            core.job_status(saved)
            return saved
        except (JobError, TypeError):
            return ""

    def on_reopen(job_id):
        if not job_id:
            return gr.update(), gr.update(), gr.update(), gr.update()
        req = core.jobs.get(job_id).spec["request"]
        qs = core.suggested_queries(req["superclass"], req.get("subgroup"), req.get("style"))
        return job_id, job_id, qs[0], gr.update(choices=qs, value=qs[0])

    # ---- layout ---------------------------------------------------------------------------------
    with gr.Blocks(title="clipforget") as demo:
        job_state = gr.State("")
        shown_query = gr.State("")            # the query both grids show (the slider searches it)
        # a stable secret per runs folder, so a job id stored in the browser survives an app restart
        saved_job = gr.BrowserState("", storage_key="clipforget-job",
                                    secret=hashlib.sha256(str(core.runs_dir).encode()).hexdigest())
        gr.Markdown("# clipforget · make CLIP forget one subgroup\n"
                    "Pick a subgroup (poodles, not other dogs), forget it in the background, then compare "
                    "text-to-image retrieval of the original and the unlearned encoder and slide the soup "
                    "coefficient α.")
        model_md = gr.Markdown(core.model_status(), elem_id="model-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=360):
                gr.Markdown("### 1 · Pick what to forget")
                superclass = gr.Dropdown(superclasses, value=sc0, label="Superclass", elem_id="superclass")
                gr.Markdown("Subgroups, every style — click one", elem_classes="grid-title")
                cards = gr.Gallery(core.subgroup_cards(sc0), label="Subgroups", show_label=False,
                                   columns=3, height="auto", allow_preview=False, object_fit="contain",
                                   elem_id="cards")
                with gr.Row():
                    subgroup = gr.Dropdown(subs0, value=sg0, label="Subgroup", elem_id="subgroup")
                    style = gr.Dropdown([ALL_STYLES] + core.styles(), value=ALL_STYLES, label="Style",
                                        elem_id="style")
                method = gr.Dropdown(core.methods(), value="ours", label="Method", info=core.method_summary("ours"),
                                     elem_id="method")
                retain_md = gr.Markdown(elem_id="retain")
                ed0 = core.retain_editor(sc0, sg0)
                retain_pick = gr.Dropdown(ed0["choices"], value=ed0["value"], multiselect=True,
                                          elem_id="retain-pick",
                                          label="Retain set: the siblings by default; add at-risk concepts, "
                                                "remove subgroups — the job uses this set")
                suggest_md = gr.Markdown(ed0["markdown"], elem_id="retain-suggestion")
                with gr.Accordion("Example images instead? Upload them for a retain suggestion", open=False):
                    uploads = gr.File(file_count="multiple", file_types=["image"], elem_id="uploads",
                                      label="A few images of what to forget (checked: size, type, pixels)")
                    upload_label = gr.Textbox(label="Their coarse label, e.g. dog", elem_id="upload-label")
                    upload_btn = gr.Button("Suggest a retain set", elem_id="upload-suggest")
                    upload_md = gr.Markdown(elem_id="upload-suggestion")
                with gr.Row():
                    run_btn = gr.Button("Forget it", variant="primary", elem_id="run")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status_md = gr.Markdown(elem_id="status")
                progress_md = gr.Markdown(elem_id="progress")
                history = gr.Dropdown(core.history(), value=None, label="Reopen a past job", elem_id="history")
            with gr.Column(scale=5):
                gr.Markdown("### 2 · Compare retrieval")
                with gr.Row():
                    query = gr.Textbox(core.default_query(sc0, sg0), label="Query", scale=5, elem_id="query")
                    search_btn = gr.Button("Search", scale=1, elem_id="search")
                suggestions = gr.Radio(core.suggested_queries(sc0, sg0), value=core.default_query(sc0, sg0),
                                       label="Suggested queries: the coarse label, the subgroup name, both",
                                       elem_id="suggestions")
                alpha = gr.Slider(0, 1, value=1.0, step=0.05, label="α · unlearning strength (0 = original, "
                                  "1 = fully unlearned)", elem_id="alpha")
                alpha_md = gr.Markdown(elem_id="alpha-note")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Original encoder**", elem_classes="grid-title")
                        left = gr.Gallery(label="Original encoder", show_label=False, columns=4, height="auto",
                                          allow_preview=False, object_fit="contain", elem_id="left-grid")
                        left_md = gr.Markdown(elem_classes="recall", elem_id="left-recall")
                    with gr.Column():
                        gr.Markdown("**Unlearned encoder at α** (the slider)", elem_classes="grid-title")
                        right = gr.Gallery(label="Unlearned encoder at α", show_label=False, columns=4,
                                           height="auto", allow_preview=False, object_fit="contain",
                                           elem_id="right-grid")
                        right_md = gr.Markdown(elem_classes="recall", elem_id="right-recall")
                gr.Markdown("### 3 · Results")
                score_md = gr.Markdown(elem_id="score")
                with gr.Row():
                    plot = gr.Image(label="α-curve (calibration set)", type="filepath", height=320,
                                    buttons=["download"], elem_id="alpha-plot")
                    table = gr.Dataframe(headers=["column", "images", "before", "after", "ratio"],
                                         label="Zero-shot accuracy per column (test set)", interactive=False,
                                         elem_id="metrics")
                gr.Markdown("### 4 · Export")
                with gr.Row():
                    dl_model = gr.DownloadButton("Unlearned model (open_clip export, .zip)", elem_id="dl-model")
                    dl_md = gr.DownloadButton("Report (.md)", elem_id="dl-md")
                    dl_json = gr.DownloadButton("Report (.json)", elem_id="dl-json")
                gr.Markdown("### 5 · Forgetting certificate")
                with gr.Row():
                    cert_btn = gr.Button("Certify this run (relearning attack, probes, retrieval)", elem_id="certify")
                    dl_cert = gr.DownloadButton("Certificate (.md)", elem_id="dl-cert")
                cert_progress = gr.Markdown(elem_id="cert-progress")
                cert_md = gr.Markdown(elem_id="certificate")
                cert_state = gr.State("")

        grids = [left, left_md, right, right_md, alpha_md, shown_query]
        results = [status_md, plot, score_md, table, alpha, dl_model, dl_md, dl_json] + grids + [history]
        private = {"api_visibility": "private"}

        # ---- wiring -------------------------------------------------------------------------------
        superclass.change(on_pick_superclass, superclass, [cards, subgroup], **private)
        cards.select(on_pick_card, superclass, subgroup, **private)
        for comp in (subgroup, style):     # a new pick: its retain set, its queries, both grids for them
            comp.change(on_describe, [superclass, subgroup, style], [retain_md, query, suggestions], **private) \
                .then(on_search, [query, job_state, alpha], grids, **private)
            comp.change(on_retain, [superclass, subgroup, style], [retain_pick, suggest_md], **private)
        model_md.change(on_retain, [superclass, subgroup, style], [retain_pick, suggest_md], **private)
        upload_btn.click(on_upload, [uploads, upload_label], [upload_md, retain_pick], **private)
        cert_outputs = [cert_md, dl_cert]
        run_btn.click(on_start, [superclass, subgroup, style, method, retain_pick], [job_state, saved_job, status_md],
                      **private) \
            .success(on_watch, job_state, progress_md, concurrency_limit=None, **private) \
            .then(on_show, [job_state, query], results, **private) \
            .then(on_show_cert, job_state, cert_outputs, **private)
        cert_btn.click(on_certify, job_state, [cert_state, cert_progress], **private) \
            .success(on_watch, cert_state, cert_progress, concurrency_limit=None, **private) \
            .then(on_show_cert, job_state, cert_outputs, **private)
        cancel_btn.click(on_cancel, job_state, status_md, **private)
        method.change(lambda m: gr.update(info=core.method_summary(m)), method, method, **private)
        gr.on([search_btn.click, query.submit], on_search, [query, job_state, alpha], grids, **private)
        alpha.input(on_slide, [shown_query, query, job_state, alpha], [right, right_md, alpha_md],
                    trigger_mode="always_last", show_progress="hidden", **private)
        history.input(on_reopen, history, [job_state, saved_job, query, suggestions], **private) \
            .then(on_show, [job_state, query], results, **private) \
            .then(on_show_cert, job_state, cert_outputs, **private)
        demo.load(on_describe, [superclass, subgroup, style], [retain_md, query, suggestions], **private)
        demo.load(on_retain, [superclass, subgroup, style], [retain_pick, suggest_md], **private)
        suggestions.input(lambda q: q, suggestions, query, **private) \
            .then(on_search, [query, job_state, alpha], grids, **private)
        demo.load(on_reattach, saved_job, job_state, **private) \
            .then(on_watch, job_state, progress_md, concurrency_limit=None, **private) \
            .then(on_show, [job_state, query], results, **private) \
            .then(on_show_cert, job_state, cert_outputs, **private)
        timer = gr.Timer(1.0, active=not core.ready)
        timer.tick(lambda: (core.model_status(), gr.Timer(active=not core.ready)), None, [model_md, timer],
                   show_progress="hidden", **private)

        # ---- the same functions for scripts -----------------------------------------------------------
        def search_api(query: str, job_id: str = "", alpha: float = -1.0, k: int = K) -> dict:
            """Top-k gallery images for a query: original encoder, and unlearned at α in [0, 1] for a
            finished job (α = -1: the job's calibrated α)."""
            return _errors(core.search)(query, job_id or None, None if alpha == -1 else alpha, int(k))

        def start_job_api(superclass: str, subgroup: str = "", style: str = "", method: str = "ours",
                          retain: str = "") -> dict:
            """Start forgetting in the background; returns the job (id, status). ``retain``:
            comma-separated retain subgroups (empty: the siblings)."""
            job = _errors(core.start_job)(superclass, subgroup, style, method,
                                          retain=[r.strip() for r in retain.split(",")] if retain.strip() else None)
            return core.job_status(job.id)

        def certify_api(job_id: str) -> dict:
            """Certify a finished forget job in the background; returns the certify job (id, status)."""
            job = _errors(core.start_certificate)(job_id)
            return core.job_status(job.id)

        def certificate_api(job_id: str) -> dict:
            """The saved certificate of a finished forget job ({} when it has none yet)."""
            return _errors(core.certificate)(job_id) or {}

        def job_status_api(job_id: str) -> dict:
            """Status, stage and progress of a job; the summary once done."""
            return _errors(core.job_status)(job_id)

        def cancel_api(job_id: str) -> dict:
            """Cancel a queued or running job (it stops mid-stage; nothing is saved)."""
            return _errors(core.cancel)(job_id)

        gr.api(search_api, api_name="search")
        gr.api(start_job_api, api_name="start_job")
        gr.api(job_status_api, api_name="job_status", concurrency_limit=None)
        gr.api(cancel_api, api_name="cancel", concurrency_limit=None)
        gr.api(certify_api, api_name="certify")
        gr.api(certificate_api, api_name="certificate", concurrency_limit=None)
    return demo


def theme() -> gr.themes.Base:
    """System fonts only: nothing fetched from the network."""
    return gr.themes.Soft(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                          font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])


def launch(core: AppCore, host: str = "127.0.0.1", port: int | None = None, prevent_thread_lock: bool = False,
           quiet: bool = False):
    demo = build_app(core)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, quiet=quiet,
                prevent_thread_lock=prevent_thread_lock, theme=theme(), css=CSS, footer_links=["api"],
                allowed_paths=[str(core.gallery.root.resolve()), str(core.runs_dir)],
                max_file_size=MAX_UPLOAD_BYTES)
    return demo


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def parse_args(argv: list[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    """The app's options. ``--host``/``--port`` default to Gradio's own ``GRADIO_SERVER_NAME`` /
    ``GRADIO_SERVER_PORT`` when set (127.0.0.1 and 7860 otherwise); a flag given wins."""
    environ = os.environ if environ is None else environ
    env_host, env_port = environ.get("GRADIO_SERVER_NAME"), environ.get("GRADIO_SERVER_PORT")
    p = argparse.ArgumentParser(description="clipforget web app")
    p.add_argument("--model", default="embedded", help="'embedded', an open_clip architecture, or local-dir:PATH")
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
    p.add_argument("--alpha-points", type=int, default=DEFAULT_ALPHA_POINTS,
                   help=f"α values precomputed per job, evenly over 0..1, plus the calibrated α (default: {DEFAULT_ALPHA_POINTS})")
    args = p.parse_args(argv)
    if args.port is None:
        try:
            args.port = _port(env_port) if env_port else DEFAULT_PORT
        except argparse.ArgumentTypeError as e:
            p.error(f"GRADIO_SERVER_PORT: {e}; set it to a port number, unset it, or pass --port")
    return args


def main(argv: list[str] | None = None) -> None:
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
