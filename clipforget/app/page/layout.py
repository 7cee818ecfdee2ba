"""The page's widgets, top to bottom: pick what to forget, compare retrieval, results, export, the
certificate. Layout only: :mod:`.handlers` wires the events, :mod:`.api` adds the script endpoints."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import gradio as gr

from ..loading import default_pick

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
#alpha-note p, #alpha-points p {margin: 0; color: var(--body-text-color-subdued)}
footer {display: none !important}
"""


class Page(SimpleNamespace):
    """The page's components by name (``page.query``, ``page.left``, …), as :func:`build` made them."""

    @property
    def grids(self) -> list:
        """What a search fills: both grids, their recall lines, the α note, the query they show and
        what the right grid shows."""
        return [self.left, self.left_md, self.right, self.right_md, self.alpha_md, self.shown_query, self.shown_right]

    @property
    def report(self) -> list:
        """What a job's evaluation fills once its report is there: plot, score, table, downloads."""
        return [self.plot, self.score_md, self.table, self.dl_model, self.dl_md, self.dl_json]

    @property
    def results(self) -> list:
        """What a job's results (or clearing them) fill: status, plot, score, table, α, downloads,
        grids, α points, history."""
        return [self.status_md, self.plot, self.score_md, self.table, self.alpha, self.dl_model, self.dl_md,
                self.dl_json] + self.grids + [self.points_md, self.history]


def build(core) -> Page:
    """Lay out the page inside the current ``gr.Blocks``; the first pick is dog / poodle when the
    gallery has them."""
    superclasses = core.superclasses()
    sc0, sg0 = default_pick(core.gallery)
    subs0 = core.subgroups(sc0)
    p = Page()
    p.job_state = gr.State("")
    p.shown_query = gr.State("")            # the query both grids show (the slider searches it)
    p.shown_right = gr.State(None)          # [job id, query, α] the right grid shows: a slider move to the
                                            # same computed point updates the α note only
    # a stable secret per runs folder, so a job id stored in the browser survives an app restart
    p.saved_job = gr.BrowserState("", storage_key="clipforget-job",
                                  secret=hashlib.sha256(str(core.runs_dir).encode()).hexdigest())
    gr.Markdown("# clipforget · make CLIP forget one subgroup\n"
                "Pick a subgroup (poodles, not other dogs), forget it in the background, then compare "
                "text-to-image retrieval of the original and the unlearned encoder and slide the soup "
                "coefficient α.")
    p.model_md = gr.Markdown(core.model_status(), elem_id="model-status")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            gr.Markdown("### 1 · Pick what to forget")
            p.superclass = gr.Dropdown(superclasses, value=sc0, label="Superclass", elem_id="superclass")
            gr.Markdown("Subgroups, every style — click one", elem_classes="grid-title")
            p.cards = gr.Gallery(core.subgroup_cards(sc0), label="Subgroups", show_label=False,
                                 columns=3, height="auto", allow_preview=False, object_fit="contain",
                                 elem_id="cards")
            with gr.Row():
                p.subgroup = gr.Dropdown(subs0, value=sg0, label="Subgroup", elem_id="subgroup")
                p.style = gr.Dropdown([ALL_STYLES] + core.styles(), value=ALL_STYLES, label="Style",
                                      elem_id="style")
            p.method = gr.Dropdown(core.methods(), value="ours", label="Method", info=core.method_summary("ours"),
                                   elem_id="method")
            p.retain_md = gr.Markdown(elem_id="retain")
            ed0 = core.retain_editor(sc0, sg0)
            p.retain_pick = gr.Dropdown(ed0["choices"], value=ed0["value"], multiselect=True,
                                        elem_id="retain-pick",
                                        label="Retain set: the siblings by default; add at-risk concepts, "
                                              "remove subgroups — the job uses this set")
            p.suggest_md = gr.Markdown(ed0["markdown"], elem_id="retain-suggestion")
            with gr.Accordion("Example images instead? Upload them for a retain suggestion", open=False):
                p.uploads = gr.File(file_count="multiple", file_types=["image"], elem_id="uploads",
                                    label="A few images of what to forget (checked: size, type, pixels)")
                p.upload_label = gr.Textbox(label="Their coarse label, e.g. dog", elem_id="upload-label")
                p.upload_btn = gr.Button("Suggest a retain set", elem_id="upload-suggest")
                p.upload_md = gr.Markdown(elem_id="upload-suggestion")
            with gr.Row():
                p.run_btn = gr.Button("Forget it", variant="primary", elem_id="run")
                p.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            p.status_md = gr.Markdown(elem_id="status")
            p.progress_md = gr.Markdown(elem_id="progress")
            p.history = gr.Dropdown(core.history(), value=None, label="Reopen a past job", elem_id="history")
        with gr.Column(scale=5):
            gr.Markdown("### 2 · Compare retrieval")
            with gr.Row():
                p.query = gr.Textbox(core.default_query(sc0, sg0), label="Query", scale=5, elem_id="query")
                p.search_btn = gr.Button("Search", scale=1, elem_id="search")
            p.suggestions = gr.Radio(core.suggested_queries(sc0, sg0), value=core.default_query(sc0, sg0),
                                     label="Suggested queries: the coarse label, the subgroup name, both",
                                     elem_id="suggestions")
            p.alpha = gr.Slider(0, 1, value=1.0, step=0.05, label="α · unlearning strength (0 = original, "
                                "1 = fully unlearned)", elem_id="alpha")
            p.alpha_md = gr.Markdown(elem_id="alpha-note")
            p.points_md = gr.Markdown(elem_id="alpha-points")     # which α points exist; grows after the grids
            with gr.Row():
                with gr.Column():
                    gr.Markdown("**Original encoder**", elem_classes="grid-title")
                    p.left = gr.Gallery(label="Original encoder", show_label=False, columns=4, height="auto",
                                        allow_preview=False, object_fit="contain", elem_id="left-grid")
                    p.left_md = gr.Markdown(elem_classes="recall", elem_id="left-recall")
                with gr.Column():
                    gr.Markdown("**Unlearned encoder at α** (the slider)", elem_classes="grid-title")
                    p.right = gr.Gallery(label="Unlearned encoder at α", show_label=False, columns=4,
                                         height="auto", allow_preview=False, object_fit="contain",
                                         elem_id="right-grid")
                    p.right_md = gr.Markdown(elem_classes="recall", elem_id="right-recall")
            gr.Markdown("### 3 · Results")
            p.score_md = gr.Markdown(elem_id="score")
            with gr.Row():
                p.plot = gr.Image(label="α-curve (calibration set)", type="filepath", height=320,
                                  buttons=["download"], elem_id="alpha-plot")
                p.table = gr.Dataframe(headers=["column", "images", "before", "after", "ratio"],
                                       label="Zero-shot accuracy per column (test set)", interactive=False,
                                       elem_id="metrics")
            gr.Markdown("### 4 · Export")
            with gr.Row():
                p.dl_model = gr.DownloadButton("Unlearned model (open_clip export, .zip)", elem_id="dl-model")
                p.dl_md = gr.DownloadButton("Report (.md)", elem_id="dl-md")
                p.dl_json = gr.DownloadButton("Report (.json)", elem_id="dl-json")
            gr.Markdown("### 5 · Forgetting certificate")
            with gr.Row():
                p.cert_btn = gr.Button("Certify this run (relearning attack, probes, retrieval)", elem_id="certify")
                p.dl_cert = gr.DownloadButton("Certificate (.md)", elem_id="dl-cert")
            p.cert_progress = gr.Markdown(elem_id="cert-progress")
            p.cert_md = gr.Markdown(elem_id="certificate")
            p.cert_state = gr.State("")
    p.timer = gr.Timer(1.0, active=not core.ready)
    return p
