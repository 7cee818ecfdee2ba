"""The app in a real browser (Debian chromium + PyPI playwright), one job from the click to the end:
load, pick a subgroup, run the job (reloading the page mid-job; a second tab is refused); the grids,
Score and the α points that exist shown while the α-grid is held back (again after a reload), the
forgotten subgroup gone from the right grid but not the left, the slider at a point not computed yet
showing the nearest one; the α-grid let go: every point listed, the slider's own point shown; α = 0
and both grids agree. Screenshots go to $CLIPFORGET_SCREENSHOTS
or bench/out/screenshots. The server is conftest.py's ``server``."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} missing: install Debian chromium (apt-get install -y chromium)"),
]


def shots_dir() -> Path:
    d = Path(os.environ.get("CLIPFORGET_SCREENSHOTS", ROOT / "bench" / "out" / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser():
    pw = pytest.importorskip("playwright.sync_api")
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def captions(page, grid: str) -> list[str]:
    return [c.strip() for c in page.locator(f"#{grid} .caption-label").all_inner_texts()]


def wait_for(cond, timeout: float, what: str, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_full_flow(server, browser, gated_alpha_grid, gated_evaluation):
    """One job, held at the start of its evaluation (after its results: the grids show) and of its
    α-grid (after its report: the metrics show) until the test lets each go."""
    core, out, gate = server.core, shots_dir(), gated_alpha_grid
    try:
        page = browser.new_page(viewport={"width": 1440, "height": 1100})
        page.set_default_timeout(120_000)          # screenshots and clicks on a machine busy with other work
        page.goto(server.url)
        page.wait_for_selector("#cards img", timeout=120_000)

        # pick: another subgroup's card first, then poodle's; the retain set follows the pick
        page.locator("#cards button", has=page.locator("img[alt='dog face']")).click()
        wait_for(lambda: "dog face" in page.locator("#retain").inner_text().split("Retain")[0], 15,
                 "retain set for dog face")
        page.locator("#cards button", has=page.locator("img[alt='poodle']")).click()
        wait_for(lambda: page.locator("#retain").inner_text().startswith("Forget poodle"), 15, "retain set for poodle")
        retain = page.locator("#retain").inner_text()
        assert "dog face" in retain and "poodle" not in retain.split("Retain")[1]
        assert "held out" in retain.split("Retain")[0]          # the page says which poodles the method never sees
        assert page.locator("#query textarea, #query input").first.input_value() == "a dog"
        wait_for(lambda: len(captions(page, "left-grid")) == 12, 300, "the original grid (model loading)")
        page.screenshot(path=str(out / "01-picked.png"), full_page=True)

        # run, and reload mid-job: the page re-attaches to the job from the browser's storage
        page.locator("#run").click()
        wait_for(lambda: "running" in page.locator("#status, #progress").all_inner_texts().__str__(), 60, "job running")
        page.screenshot(path=str(out / "02-running.png"), full_page=True)

        # another browser (its own storage) cannot start a second job: the page names the running one
        other = browser.new_page(viewport={"width": 1440, "height": 1100})
        other.set_default_timeout(120_000)
        other.goto(server.url)
        other.wait_for_selector("#cards img", timeout=120_000)
        other.locator("#run").click()
        wait_for(lambda: "wait for it to finish" in other.locator("body").inner_text(), 30, "refusal of a second job")
        assert "(poodle (dog) · ours) is still" in other.locator("body").inner_text()      # names the running job
        other.screenshot(path=str(out / "02b-second-tab-refused.png"), full_page=True)
        other.close()
        page.reload()
        page.wait_for_selector("#cards img", timeout=120_000)

        # the grids show while the evaluation is held: both grids, the α points that exist, a line
        # saying the metrics are coming; then the Score and the table arrive without a click
        points = page.locator("#alpha-points")
        wait_for(lambda: len(captions(page, "right-grid")) == 12 and "computing" in " ".join(points.all_inner_texts()),
                 1200, "both grids while the evaluation runs", poll=0.5)
        job = core.jobs.running()
        assert job is not None and job.status == "ready"              # results shown, the report still to come
        # the job thread reaches the (held) evaluation just after the results are saved: under load the
        # grids can show while it is still in "save"
        wait_for(lambda: core.jobs.get(job.id).stage == "evaluate", 120, "the job held in its evaluation")
        assert "Evaluating on the held-out images" in page.locator("#score").inner_text()
        assert "Target" not in page.locator("#metrics").inner_text()
        page.screenshot(path=str(out / "03a-grids-before-metrics.png"), full_page=True)
        gated_evaluation.set()
        wait_for(lambda: "Score" in page.locator("#score").inner_text(), 300, "the Score after the evaluation", poll=0.5)
        assert core.jobs.get(job.id).status == "ready"                    # shown before the job is done
        wait_for(lambda: "alpha-grid" in page.locator("#progress").inner_text(), 30, "the α-grid's progress")
        assert "results ready" in page.locator("#progress").inner_text()
        left, right = captions(page, "left-grid"), captions(page, "right-grid")
        # the subgroup is there originally, and fewer of its drawings come up after unlearning: the grids
        # show every poodle file, the held-out ones too, and the quick job here (no remind, 2 views per
        # image) is not held to forgetting every held-out drawing — the sweep measures how often it does
        n_left, n_right = (sum("FORGOTTEN" in c for c in g) for g in (left, right))
        assert n_left >= 1 and n_right < n_left, (left, right)
        assert page.locator("#metrics").inner_text().count("Target") == 1
        page.screenshot(path=str(out / "03-done.png"), full_page=True)

        # a reload mid-α-grid shows what exists: the grids and the points so far
        page.reload()
        page.wait_for_selector("#cards img", timeout=120_000)
        wait_for(lambda: len(captions(page, "right-grid")) == 12 and "computing" in " ".join(points.all_inner_texts()),
                 120, "both grids after a reload mid-α-grid", poll=0.5)
        state = core.alpha_points(job.id)
        assert not state["complete"]
        # while the component updates Gradio overlays its timer ("0.1s") on it: wait for the text itself
        wait_for(lambda: points.inner_text().strip() == state["text"], 30, f"the α points line {state['text']!r}")
        # the slider at a point not computed yet shows the nearest one
        missing = next(a for a in state["planned"] if a not in state["ready"])
        slider, note = page.locator("#alpha input[type=range]"), page.locator("#alpha-note")
        slider.focus()
        page.keyboard.press("Home")
        for _ in range(round(missing / 0.05)):
            page.keyboard.press("ArrowRight")
        wait_for(lambda: f"nearest computed point to {missing:.2f}" in note.inner_text(), 30,
                 f"the nearest computed point while α = {missing} is missing")
        page.screenshot(path=str(out / "05-grids-before-alpha-grid.png"), full_page=True)

        # the α-grid let go: the page lists every point and the same slider position shows its own
        gate.set()
        wait_for(lambda: "(all " in points.inner_text(), 600, "every α point", poll=0.5)
        # the page lists the last point as soon as it exists; the job is marked done just after
        wait_for(lambda: core.jobs.get(job.id).status == "done", 60, "the job done after its last α point")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowLeft")             # back to the same position: its own point now
        wait_for(lambda: f"showing α = {missing:.2f};" in note.inner_text(), 30, f"α = {missing} once computed")
        assert "nearest" not in note.inner_text()
        page.screenshot(path=str(out / "06-alpha-point-arrived.png"), full_page=True)

        # slide α to 0: the unlearned encoder at α = 0 is the original one
        page.keyboard.press("Home")
        wait_for(lambda: "α = 0.00" in note.inner_text(), 15, "α = 0 shown")
        wait_for(lambda: captions(page, "right-grid") == captions(page, "left-grid"), 15, "right grid == left grid")
        page.screenshot(path=str(out / "04-alpha0.png"), full_page=True)
        page.close()
    finally:
        gate.set()
