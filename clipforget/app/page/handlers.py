"""The page's events: each handler is a thin call into :class:`~clipforget.app.AppCore` and returns
``{component: value}`` for the components it changes (components left out keep their value);
:func:`wire` connects them to the widgets of :class:`.layout.Page`."""
from __future__ import annotations

import contextlib
import inspect
import time

import gradio as gr

from ...jobs import WORKING, JobBusy, JobError
from ..loading import NotReady
from ..views import alpha_label
from .layout import ALL_STYLES, Page

K = 12                      # images per grid
PRIVATE = {"api_visibility": "private"}     # the page's events are not API endpoints (see api.py)


LIBRARY_ERRORS = (ValueError, JobBusy, JobError, NotReady)


@contextlib.contextmanager
def _for_the_page():
    """The library's errors inside the block become gr.Error messages the page shows (Gradio 6
    shows any other exception as a bare "Error"); a gr.Error already made passes as it is."""
    try:
        yield
    except gr.Error:                        # already for the page (a wrapped handler it called)
        raise
    except LIBRARY_ERRORS as e:
        raise gr.Error(str(e)) from None


def errors(fn):
    """Wrap a handler in :func:`_for_the_page`. A generator handler stays a generator function —
    Gradio streams what it yields only then — whose errors while it runs are turned the same way."""
    if inspect.isgeneratorfunction(fn):
        def streamed(*args, **kwargs):
            with _for_the_page():
                yield from fn(*args, **kwargs)
        streamed.__name__ = fn.__name__
        return streamed

    def wrapped(*args, **kwargs):
        with _for_the_page():
            return fn(*args, **kwargs)
    wrapped.__name__ = fn.__name__
    return wrapped


def _style(style: str) -> str:
    return "" if style == ALL_STYLES else style


def _grid(hits):
    return [(h["path"], h["caption"]) for h in hits]


def _shown(search: dict) -> list | None:
    """What a search's right grid shows: [job id, query, α], None without a job."""
    return [search["job_id"], search["query"], search["alpha_shown"]] if search.get("job_id") else None


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


def _score(table: dict, st: dict) -> str:
    s = st["summary"]
    if "alpha_grid_points" in s:
        grid = f"{s['alpha_grid_points']} α-grid points precomputed in {s.get('alpha_grid_seconds', 0):.1f}s"
    elif st["status"] == "ready":
        grid = "the α-grid's other points are computing (the slider gains them as they arrive)"
    else:
        grid = f"α-grid incomplete ({s.get('unfinished', 'not computed')})"
    return (f"**Score {table['score']:.1f}** / 100 · method `{table['method']}` · "
            f"{alpha_label(table['alpha'], s.get('calibrated_alpha'))} · {grid}")


class Handlers:
    def __init__(self, core, page: Page):
        self.core, self.p = core, page

    def done(self, job_id) -> bool:
        """The job's results can be shown (its report may still be coming, its α-grid growing)."""
        return bool(job_id) and self.core.job_status(job_id)["results"]

    # ---- pick ----------------------------------------------------------------------------------
    def pick_superclass(self, sc):
        subs = self.core.subgroups(sc)
        return {self.p.cards: gr.update(value=self.core.subgroup_cards(sc), selected_index=None),
                self.p.subgroup: gr.update(choices=subs, value=subs[0])}

    def pick_card(self, sc, evt: gr.SelectData):
        return {self.p.subgroup: self.core.subgroups(sc)[evt.index]}

    def describe(self, sc, sg, style):
        try:
            info = self.core.describe_retain(sc, sg, _style(style))
        except ValueError as e:
            return {self.p.retain_md: f"⚠️ {e}"}
        return {self.p.retain_md: self.core.retain_markdown(info), self.p.query: info["query"],
                self.p.suggestions: gr.update(choices=info["queries"], value=info["query"])}

    def retain(self, sc, sg, style):
        """The editable retain set (the siblings selected) and the over-forgetting warnings."""
        try:
            ed = self.core.retain_editor(sc, sg, _style(style))
        except ValueError:
            return {self.p.suggest_md: ""}        # describe shows the error
        return {self.p.retain_pick: gr.update(choices=ed["choices"], value=ed["value"]),
                self.p.suggest_md: ed["markdown"]}

    @errors
    def upload(self, files, label):
        res = self.core.suggest_uploads(files, label)
        return {self.p.upload_md: res["markdown"], self.p.retain_pick: gr.update(value=res["retain"])}

    def method_info(self, method):
        return {self.p.method: gr.update(info=self.core.method_summary(method))}

    # ---- jobs ----------------------------------------------------------------------------------
    @errors
    def start(self, sc, sg, style, method, retain):
        job = self.core.start_job(sc, sg, _style(style), method, retain=retain)
        return {self.p.job_state: job.id, self.p.saved_job: job.id,
                self.p.status_md: f"Started job `{job.id[:8]}` {job.label}; progress below (a reload re-attaches)."}

    @errors
    def certify(self, job_id):
        if not self.done(job_id):
            raise gr.Error("run or reopen a finished job first, then certify it")
        job = self.core.start_certificate(job_id)
        return {self.p.cert_state: job.id, self.p.cert_progress: f"Certifying in the background (job `{job.id[:8]}`)…"}

    def show_certificate(self, job_id):
        if not self.done(job_id):
            return {self.p.cert_md: "", self.p.dl_cert: None}
        view = self.core.certificate_view(job_id)
        return {self.p.cert_md: view["markdown"], self.p.dl_cert: view["file"]}

    def watcher(self, output):
        """A handler that observes a job until it has results or ended, showing its progress in
        ``output`` as text (wired with ``show_progress="hidden"``: no animated overlay); closing
        the tab stops this, never the job."""
        def watch(job_id):
            if not job_id:
                yield {output: ""}
                return
            while True:
                st = self.core.job_status(job_id)
                if st["status"] not in WORKING:
                    yield {output: ""}              # the results and final status: show
                    return
                yield {output: st["progress_text"]}
                time.sleep(0.5)
        return errors(watch)

    @errors
    def watch_grid(self, job_id):
        """After the grids are shown: the job's progress (its evaluation, then the α-grid: as text, a
        progress overlay would cover the α points and the status), its metrics, plot and downloads
        as soon as its report is there, and the α points the slider gains as they arrive, until the
        job is done (the slider's searches pick the new points up)."""
        p = self.p
        filled = False              # the report's widgets, filled once here
        while job_id:
            st = self.core.job_status(job_id)
            if st["status"] != "ready":
                break
            out = {p.progress_md: st["text"], p.points_md: self.core.alpha_points(job_id)["text"]}
            if not filled and self.core.evaluated(job_id):
                out.update(self.report(job_id, st))
                filled = True
            yield out
            time.sleep(0.5)
        if not self.done(job_id):
            yield {p.progress_md: ""}
            return
        st = self.core.job_status(job_id)
        # the report's widgets once; after that only the Score line changes (it says the α-grid is done)
        report = self.report(job_id, st) if not filled else {p.score_md: _score(self.core.metrics_table(job_id), st)}
        yield {p.progress_md: "", p.status_md: st["text"], p.points_md: self.core.alpha_points(job_id)["text"], **report}

    def report(self, job_id, st) -> dict:
        """The evaluation's widgets (plot, Score, table, downloads): filled once the job's report is
        there; before, a line saying it is coming (the grids show the unlearned model already)."""
        p, core = self.p, self.core
        if not core.evaluated(job_id):
            note = ("*Evaluating on the held-out images… the metrics, the α-curve and the downloads follow "
                    "in seconds; the grids already show the unlearned model.*" if st["status"] == "ready" else
                    f"No report: {st['summary'].get('unfinished', 'the evaluation did not finish')}")
            return {p.plot: None, p.score_md: note, p.table: None, p.dl_model: None, p.dl_md: None, p.dl_json: None}
        shown = core.evaluation(job_id)
        table, files = shown["table"], shown["downloads"]
        return {p.plot: str(shown["plot"]), p.score_md: _score(table, st),
                p.table: {"headers": table["headers"], "data": table["rows"]},
                p.dl_model: files["model_zip"], p.dl_md: files["report_md"], p.dl_json: files["report_json"]}

    @errors
    def cancel(self, job_id):
        if not job_id:
            raise gr.Error("no job to cancel")
        return {self.p.status_md: self.core.cancel(job_id)["text"]}

    # ---- compare -------------------------------------------------------------------------------
    @errors
    def search(self, query, job_id, alpha):
        """Both grids for ``query``; it becomes the query the slider moves the right grid for."""
        done = self.done(job_id)
        res = self.core.search(query, job_id if done else None, alpha, K)
        p = self.p
        return {p.left: _grid(res["left"]), p.left_md: _recall(res, "left"),
                p.right: _grid(res["right"]) if done else [], p.right_md: _recall(res, "right") if done else "",
                p.alpha_md: _alpha_note(res), p.shown_query: res["query"], p.shown_right: _shown(res)}

    @errors
    def slide(self, shown, query, job_id, alpha, right):
        """The right grid at the new α for the query both grids show (not a query typed since and
        not searched yet: the left grid would not match). A move that stays nearest to the computed
        point the grid already shows changes the α note only: the same grid is not sent again."""
        if not self.done(job_id):
            return {self.p.alpha_md: _alpha_note({})}
        res = self.core.search(shown or query, job_id, alpha, K)
        if _shown(res) == right:
            return {self.p.alpha_md: _alpha_note(res)}
        return {self.p.right: _grid(res["right"]), self.p.right_md: _recall(res, "right"),
                self.p.alpha_md: _alpha_note(res), self.p.shown_right: _shown(res)}

    # ---- results -------------------------------------------------------------------------------
    @errors
    def show(self, job_id, query):
        """Fill the results of a job with results (or clear them): the grids at once, the report's
        widgets when it is there (:meth:`watch_grid` fills them when it comes later)."""
        p, core = self.p, self.core
        hist = {p.history: gr.update(choices=core.history(), value=job_id or None)}
        if not self.done(job_id):
            st = core.job_status(job_id)["text"] if job_id else ""
            return {p.status_md: st, p.plot: None, p.score_md: "", p.table: None, p.points_md: "",
                    **self.search(query, "", 1.0), **hist}
        st = core.job_status(job_id)
        alpha = st["summary"].get("alpha", 1.0)
        return {p.status_md: st["text"], **self.report(job_id, st), p.points_md: core.alpha_points(job_id)["text"],
                p.alpha: gr.update(value=alpha), **self.search(query, job_id, alpha), **hist}

    def reattach(self, saved):
        """After a reload: pick up the job this browser last ran or opened."""
        try:
            self.core.job_status(saved)
            return {self.p.job_state: saved}
        except (JobError, TypeError):
            return {self.p.job_state: ""}

    def reopen(self, job_id):
        if not job_id:
            return {self.p.job_state: gr.update()}
        req = self.core.jobs.get(job_id).spec["request"]
        qs = self.core.suggested_queries(req["superclass"], req.get("subgroup"), req.get("style"))
        return {self.p.job_state: job_id, self.p.saved_job: job_id, self.p.query: qs[0],
                self.p.suggestions: gr.update(choices=qs, value=qs[0])}

    def tick(self):
        return {self.p.model_md: self.core.model_status(), self.p.timer: gr.Timer(active=not self.core.ready)}


def wire(core, p: Page, demo: gr.Blocks) -> None:
    """Connect the page's events (inside ``demo``, the page's ``gr.Blocks``)."""
    h = Handlers(core, p)
    picked = [p.superclass, p.subgroup, p.style]
    described = [p.retain_md, p.query, p.suggestions]
    retained = [p.retain_pick, p.suggest_md]
    searched = [p.query, p.job_state, p.alpha]
    certified = [p.cert_md, p.dl_cert]
    p.superclass.change(h.pick_superclass, p.superclass, [p.cards, p.subgroup], **PRIVATE)
    p.cards.select(h.pick_card, p.superclass, p.subgroup, **PRIVATE)
    for comp in (p.subgroup, p.style):     # a new pick: its retain set, its queries, both grids for them
        comp.change(h.describe, picked, described, **PRIVATE).then(h.search, searched, p.grids, **PRIVATE)
        comp.change(h.retain, picked, retained, **PRIVATE)
    p.model_md.change(h.retain, picked, retained, **PRIVATE)
    p.upload_btn.click(h.upload, [p.uploads, p.upload_label], [p.upload_md, p.retain_pick], **PRIVATE)
    grid_watched = [p.progress_md, p.points_md, p.status_md] + p.report
    p.run_btn.click(h.start, picked + [p.method, p.retain_pick], [p.job_state, p.saved_job, p.status_md], **PRIVATE) \
        .success(h.watcher(p.progress_md), p.job_state, p.progress_md, concurrency_limit=None,
                  show_progress="hidden", **PRIVATE) \
        .then(h.show, [p.job_state, p.query], p.results, **PRIVATE) \
        .then(h.show_certificate, p.job_state, certified, **PRIVATE) \
        .then(h.watch_grid, p.job_state, grid_watched, concurrency_limit=None, show_progress="hidden", **PRIVATE)
    p.cert_btn.click(h.certify, p.job_state, [p.cert_state, p.cert_progress], **PRIVATE) \
        .success(h.watcher(p.cert_progress), p.cert_state, p.cert_progress, concurrency_limit=None,
                  show_progress="hidden", **PRIVATE) \
        .then(h.show_certificate, p.job_state, certified, **PRIVATE)
    p.cancel_btn.click(h.cancel, p.job_state, p.status_md, **PRIVATE)
    p.method.change(h.method_info, p.method, p.method, **PRIVATE)
    gr.on([p.search_btn.click, p.query.submit], h.search, searched, p.grids, **PRIVATE)
    p.alpha.input(h.slide, [p.shown_query, p.query, p.job_state, p.alpha, p.shown_right],
                  [p.right, p.right_md, p.alpha_md, p.shown_right],
                  trigger_mode="always_last", show_progress="hidden", **PRIVATE)
    p.history.input(h.reopen, p.history, [p.job_state, p.saved_job, p.query, p.suggestions], **PRIVATE) \
        .then(h.show, [p.job_state, p.query], p.results, **PRIVATE) \
        .then(h.show_certificate, p.job_state, certified, **PRIVATE) \
        .then(h.watch_grid, p.job_state, grid_watched, concurrency_limit=None, show_progress="hidden", **PRIVATE)
    demo.load(h.describe, picked, described, **PRIVATE)
    demo.load(h.retain, picked, retained, **PRIVATE)
    p.suggestions.input(lambda q: {p.query: q}, p.suggestions, p.query, **PRIVATE) \
        .then(h.search, searched, p.grids, **PRIVATE)
    demo.load(h.reattach, p.saved_job, p.job_state, **PRIVATE) \
        .then(h.watcher(p.progress_md), p.job_state, p.progress_md, concurrency_limit=None,
                  show_progress="hidden", **PRIVATE) \
        .then(h.show, [p.job_state, p.query], p.results, **PRIVATE) \
        .then(h.show_certificate, p.job_state, certified, **PRIVATE) \
        .then(h.watch_grid, p.job_state, grid_watched, concurrency_limit=None, show_progress="hidden", **PRIVATE)
    p.timer.tick(h.tick, None, [p.model_md, p.timer], show_progress="hidden", **PRIVATE)
