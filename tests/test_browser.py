"""A real browser walks through every tab of the app (Debian chromium driven by Playwright).

Opens the app, waits for the starting pool and its first merge, visits every
tab, moves the α slider and checks that the accuracy plot changed, runs ESM++
routing on samples, exports the merged model, and saves a screenshot of each
view into ``$ESM_SCREENSHOT_DIR`` (default: the test's tmp_path). Uses the
tiny random pool of tests/fake_pool.py (fast); with ``ESM_SCREENSHOT_DIR`` or
``ESM_BROWSER_DEMO=1`` set it uses the built-in demo pool (for README screenshots).
Skipped (with the reason) only when Debian's chromium is missing (``.ci/run``
installs it); never runs ``playwright install``.
"""
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo" / "config.json"
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def app_url():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from fake_pool import launch_app, make_fake_pool
    if DEMO.is_file() and (os.environ.get("ESM_SCREENSHOT_DIR") or os.environ.get("ESM_BROWSER_DEMO") == "1"):
        loader = None                                   # the real built-in demo pool
    else:
        pool = make_fake_pool()
        loader = lambda: pool                           # noqa: E731
    demo, url = launch_app(loader)
    yield url
    demo.close()


@pytest.fixture
def page(tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright import sync_api                      # a dev dependency: missing = a broken install, a failure
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"), executable_path=CHROMIUM,
                                                   headless=True, args=ARGS, viewport={"width": 1400, "height": 1000},
                                                   accept_downloads=True)
        pg = ctx.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        try:
            yield pg
        finally:
            ctx.close()


def _shots(tmp_path) -> Path:
    d = Path(os.environ.get("ESM_SCREENSHOT_DIR") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _plot_ready(page, elem_id: str) -> None:
    page.wait_for_selector(f"#{elem_id} .js-plotly-plot", state="attached")


def _trace_y(page, elem_id: str, name: str):
    return page.evaluate(
        """([id, name]) => { const g = document.querySelector('#' + id + ' .js-plotly-plot');
                             if (!g || !g.data) return null;
                             const t = g.data.find(t => t.name === name); return t ? Array.from(t.y) : null; }""",
        [elem_id, name])


def _tab(page, label: str) -> None:
    page.get_by_role("tab", name=label).click()


def test_walk_through_every_tab(app_url, page, tmp_path):
    shots = _shots(tmp_path)
    page.goto(app_url)
    # 1 pool: the starting pool is described
    page.wait_for_function("() => document.querySelector('#pool-summary')?.innerText.includes('parameters')")
    page.wait_for_selector("#pool-tasks table")
    page.wait_for_selector("#pool-gallery img")
    page.screenshot(path=str(shots / "1-pool.png"), full_page=True)

    # 2 spectra: probe + decompositions on first visit
    _tab(page, "2 · Spectra")
    _plot_ready(page, "spec-heat")
    _plot_ready(page, "spec-plot")
    page.wait_for_function("() => document.querySelector('#spec-plot .js-plotly-plot')?.data?.length >= 4")
    page.screenshot(path=str(shots / "2-spectra.png"), full_page=True)

    # 3 interference
    _tab(page, "3 · Interference")
    _plot_ready(page, "int-overlap")
    _plot_ready(page, "int-sar")
    page.wait_for_function("() => document.querySelector('#int-sar .js-plotly-plot')?.data?.length >= 1")
    page.screenshot(path=str(shots / "3-interference.png"), full_page=True)

    # 4 merge: move the α slider; the accuracy plot must change
    _tab(page, "4 · Merge")
    # the first merge (Task Arithmetic) ran right after the pool loaded
    _plot_ready(page, "acc-plot")
    page.wait_for_function("() => document.querySelector('#acc-plot .js-plotly-plot')?.data?.length > 0")
    title = "() => document.querySelector('#acc-plot .js-plotly-plot')?.layout?.title?.text || ''"
    before = page.evaluate(title)
    assert "α = 0.30" in before and _trace_y(page, "acc-plot", "merged")
    rng = page.locator("#ctl-ta-alpha input[type=range]")
    rng.fill("1.5")                                     # far from the default 0.3
    page.wait_for_function(f"() => ({title})().includes('α = 1.50')")
    assert _trace_y(page, "acc-plot", "merged")        # the plot was redrawn for the new merge
    # the comparison table keeps both merges
    page.wait_for_function("() => document.querySelector('#cmp-table').innerText.split('Task Arithmetic').length >= 3")
    page.get_by_role("button", name="α curve on validation").click()
    _plot_ready(page, "curve-plot")
    page.wait_for_function("() => document.querySelector('#curve-plot .js-plotly-plot')?.data?.length >= 1")
    page.screenshot(path=str(shots / "4-merge.png"), full_page=True)

    # switching the method to ESM shows its own controls, clears the α curve of the previous method and merges
    page.locator("#method input").click()
    page.get_by_role("option", name="ESM (esm)").click()
    page.wait_for_function(f"() => ({title})().includes('ESM (α = 1.00)')")
    assert page.locator("#ctl-esm-p_task").is_visible() and not page.locator("#ctl-ta-alpha").is_visible()
    page.wait_for_function("() => !document.querySelector('#curve-plot .js-plotly-plot')?.data?.length")
    # its α curve on validation, then "use the best α": the merge follows
    page.get_by_role("button", name="α curve on validation").click()
    curve_title = "() => document.querySelector('#curve-plot .js-plotly-plot')?.layout?.title?.text || ''"
    page.wait_for_function(f"() => ({curve_title})().startsWith('ESM')")
    best = page.get_by_role("button", name="use the best α (")
    best_alpha = float(best.inner_text().split("(")[1].rstrip(")"))
    best.click()
    page.wait_for_function(f"() => ({title})().includes('ESM (α = {best_alpha:.2f})')")
    # the curve now marks the α in use (issue 12 item 11: it kept marking the old one)
    marks = ("() => (document.querySelector('#curve-plot .js-plotly-plot')?.layout?.annotations || [])"
             ".map(a => a.text)")
    page.wait_for_function(f"() => ({marks})().includes('current α = {best_alpha:.2f}')")
    # the best α is interior, or at a bound of α: the grid was extended past its first / last point
    xs = page.evaluate("() => Array.from(document.querySelector('#curve-plot .js-plotly-plot').data[0].x)")
    assert xs.index(best_alpha) not in (0, len(xs) - 1) or best_alpha in (0.0, 3.0), (best_alpha, xs)
    page.screenshot(path=str(shots / "4-merge-esm.png"), full_page=True)
    # a rank change re-merges
    esm_title = page.evaluate(title)
    page.locator("#ctl-esm-rank_fraction input[type=range]").fill("0.25")
    page.wait_for_function(f"() => {{ const t = ({title})(); return t.includes('ESM (α =') && t !== {esm_title!r}; }}")
    page.wait_for_function("() => document.querySelector('#cmp-table').innerText.split('ESM').length >= 4")

    # 5 routing on the pool's samples
    _tab(page, "5 · Routing (ESM++)")
    page.get_by_role("button", name="Route!").click()
    _plot_ready(page, "route-heat")
    page.wait_for_function("() => document.querySelector('#route-heat .js-plotly-plot')?.data?.[0]?.type === 'heatmap'")
    _plot_ready(page, "route-map")
    assert "routed layers" in page.locator("#route-note").inner_text()
    page.screenshot(path=str(shots / "5-routing.png"), full_page=True)

    # 6 export the merged model
    _tab(page, "6 · Export")
    page.get_by_role("button", name="Merged model (.safetensors)").click()
    page.wait_for_function("() => document.querySelector('#export-file')?.innerText.includes('.safetensors')")
    page.screenshot(path=str(shots / "6-export.png"), full_page=True)
    assert len(list(shots.glob("*.png"))) >= 6


def _write_upload(tmp_path) -> dict:
    """A base and two task checkpoints of the fake pool's shapes, under names no pool has images for."""
    from esm_core.checkpoints import save_safetensors
    from fake_pool import make_fake_pool
    pool = make_fake_pool(seed=3)
    files = {"base": tmp_path / "base.safetensors", "x1": tmp_path / "x1.safetensors",
             "x2": tmp_path / "x2.safetensors"}
    save_safetensors(pool.base, files["base"])
    save_safetensors(pool.tasks["alpha"], files["x1"])
    save_safetensors(pool.tasks["beta"], files["x2"])
    return files


POOL_VIEW_OK = """() => {
    const ids = ['pool-summary', 'pool-tasks', 'pool-gallery'];
    const els = ids.map(i => document.getElementById(i));
    if (els.some(e => !e)) return 'missing';
    if (!els[0].innerText.includes('parameters')) return 'summary: ' + els[0].innerText.slice(0, 80);
    if (!els[1].querySelector('table')) return 'no table';
    if (els[2].querySelectorAll('img').length === 0) return 'no images';
    for (const e of els) {
        if (e.querySelector('.error') || /\bError\b/.test(e.innerText)) return 'error badge in ' + e.id;
    }
    return 'ok';
}"""


def test_pool_view_survives_a_failed_upload(app_url, page, tmp_path):
    """Issue 12 items 9, 10 and the gallery: a refused upload leaves the last good pool view on screen, its
    message is shown whole (not cut at '<task>') and closes by itself; the gallery shows every column and
    several classes per task."""
    from esm_core.app.common import TOAST_S
    shots = _shots(tmp_path)
    page.goto(app_url)
    page.wait_for_function("() => document.querySelector('#pool-summary')?.innerText.includes('parameters')")
    page.wait_for_selector("#pool-gallery img")
    page.wait_for_function("() => document.querySelectorAll('#pool-gallery img').length >= 6")
    # the gallery: no image cut at its right or bottom edge (it scrolled), one row per task with several classes
    cut = page.evaluate("""() => { const g = document.querySelector('#pool-gallery').getBoundingClientRect();
        return Array.from(document.querySelectorAll('#pool-gallery img'))
                    .filter(i => { const r = i.getBoundingClientRect();
                                   return r.right > g.right + 1 || r.bottom > g.bottom + 1; }).length; }""")
    assert cut == 0
    text = page.locator("#pool-gallery").inner_text()
    tasks = [r.split("\t")[0] for r in page.locator("#pool-tasks tbody").inner_text().splitlines() if r.strip()]
    for t in tasks:
        classes = {line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(f"{t}:")}
        assert len(classes) >= 2, (t, classes)
    n_images = page.locator("#pool-gallery img").count()

    files = _write_upload(tmp_path)
    page.get_by_text("Upload your own pool").click()
    page.locator("#up-base input[type=file]").set_input_files(str(files["base"]))
    page.locator("#up-tasks input[type=file]").set_input_files([str(files["x1"]), str(files["x2"])])
    for box, name in (("up-tasks", "x2"), ("up-base", "base")):      # the name shows as 'x2' + '.safetensors'
        page.wait_for_function(f"() => /{name}\\s*\\.safetensors/.test(document.querySelector('#{box}')?.innerText)")
    page.locator("#upload-btn").click()
    toast = page.locator('[data-testid="toast-text"]').first
    toast.wait_for()
    msg = toast.inner_text()
    assert "no images for task(s)" in msg and "upload <task>.zip with one folder per class" in msg, msg
    page.wait_for_timeout(500)
    assert page.evaluate(POOL_VIEW_OK) == "ok"
    assert page.locator("#pool-gallery img").count() == n_images
    page.screenshot(path=str(shots / "1-pool-failed-upload.png"), full_page=True)
    # the message closes by itself; reloading the demo pool shows the pool with nothing covering it
    page.wait_for_selector('[data-testid="toast-body"]', state="detached", timeout=(TOAST_S + 10) * 1000)
    page.get_by_role("button", name="Reload the built-in demo pool").click()
    page.wait_for_timeout(1000)
    page.wait_for_function(f"() => ({POOL_VIEW_OK})() === 'ok'")
    assert page.locator('[data-testid="toast-body"]').count() == 0
    page.screenshot(path=str(shots / "1-pool-reloaded.png"), full_page=True)


@pytest.fixture(scope="module")
def text_app_url(tiny_text_pool_dir):
    """The app starting on a text pool: the tiny built one, or with ``ESM_SCREENSHOT_DIR`` set and the real text
    pool built (``esm-studio build-pool text``), the real one (for the README screenshot)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from esm_core.pools import text_build
    from esm_core.pools.text_pool import load_text_task_pool
    from fake_pool import launch_app
    real = os.environ.get("ESM_SCREENSHOT_DIR") and (text_build.TEXT_POOL_DIR / "pool.json").is_file()
    pool = load_text_task_pool(text_build.TEXT_POOL_DIR if real else tiny_text_pool_dir[0])
    demo, url = launch_app(lambda: pool)
    yield url
    demo.close()


def test_text_pool_sentences_and_typed_sentence_routing(text_app_url, page, tmp_path):
    """A text pool in the browser: the Pool view lists sample sentences (no image gallery); the Routing view
    routes a typed sentence and says which task's expert it went to."""
    shots = _shots(tmp_path)
    page.goto(text_app_url)
    page.wait_for_function("() => document.querySelector('#pool-summary')?.innerText.includes('parameters')")
    page.wait_for_selector("#pool-sentences table")
    assert page.locator("#pool-gallery").is_hidden()
    page.screenshot(path=str(shots / "1-pool-text.png"), full_page=True)
    _tab(page, "5 · Routing (ESM++)")
    page.get_by_label("my sentence").check()
    page.locator("#route-text textarea").fill("The striker scored twice in the second half and the crowd cheered.")
    page.get_by_role("button", name="Route!").click()
    slow = 12 if os.environ.get("ESM_SCREENSHOT_DIR") else 4          # the real pool: probe, ESM, experts, scores
    page.wait_for_function("() => document.querySelector('#route-note')?.innerText.includes('Your sentence')",
                           timeout=slow * TIMEOUT_MS)
    _plot_ready(page, "route-heat")
    _plot_ready(page, "route-cos")
    page.screenshot(path=str(shots / "5-routing-text.png"), full_page=True)


def test_cancel_keeps_the_previous_merge_on_screen(app_url, page, monkeypatch, tmp_path):
    """Issue 13 item 6: Cancel stops a running merge; the page says so and keeps the previous merge on screen,
    and the session holds what it held before."""
    from fake_pool import slow_merges
    steps = 3000                                        # 30 s of progress reports if nothing stopped it
    rec = slow_merges(monkeypatch, "dare_ta", steps)
    page.goto(app_url)
    page.wait_for_function("() => document.querySelector('#pool-summary')?.innerText.includes('parameters')")
    _tab(page, "4 · Merge")
    title = "() => document.querySelector('#acc-plot .js-plotly-plot')?.layout?.title?.text || ''"
    page.wait_for_function(f"() => ({title})().includes('α = 0.30')")            # the first merge is shown
    def table_text():                                   # the table's rows, without a progress timer ("0.0s")
        return "\n".join(ln for ln in page.locator("#cmp-table").inner_text().splitlines()
                         if ln.strip() and not re.fullmatch(r"\s*\d+(\.\d+)?s\s*", ln))
    before, table = page.evaluate(title), table_text()
    page.locator("#method input").click()
    page.get_by_role("option", name="(dare_ta)").click()                        # a merge that takes a while
    assert rec["started"].wait(60)
    page.locator("#cancel-btn").click()
    toast = page.locator('[data-testid="toast-text"]').first
    toast.wait_for()
    assert toast.inner_text().startswith("Cancelled: nothing was changed, the previous result stays")
    page.wait_for_timeout(500)                          # whatever the stopped merge sends has arrived
    assert rec["ended"].wait(60) and rec["steps"] < steps
    page.screenshot(path=str(_shots(tmp_path) / "4-merge-cancelled.png"), full_page=True)
    assert page.evaluate(title) == before and table_text() == table
    s = rec["session"]
    with s.lock:
        assert [r["id"] for r in s.merges] == rec["merges_before"] and s.current is rec["current_before"]


PLOT = "document.querySelector('#{0} .js-plotly-plot')"
ACC_TITLE = "() => document.querySelector('#acc-plot .js-plotly-plot')?.layout?.title?.text || ''"
CURVE_MARKS = ("() => (document.querySelector('#curve-plot .js-plotly-plot')?.layout?.annotations || [])"
               ".map(a => a.text)")
# every header of the comparison table: its longest word fits the cell's width (a header broken inside a word,
# "fashio n %", does not); the names of the headers that do not fit
HEADERS_BROKEN = """() => { const ctx = document.createElement('canvas').getContext('2d');
    return Array.from(document.querySelectorAll('#cmp-table thead th')).filter(th => {
        const span = th.querySelector('span') || th; const text = span.innerText.trim(); if (!text) return false;
        const st = getComputedStyle(span); ctx.font = st.font;
        const room = span.getBoundingClientRect().width;
        return Math.max(...text.split(/\\s+/).map(w => ctx.measureText(w).width)) > room + 1; })
        .map(th => th.innerText.trim()); }"""
# the accuracy plot's title lies wholly inside the plot (issue 23 item 5: its first line was cut at the top)
TITLE_INSIDE = """() => { const g = document.querySelector('#acc-plot .js-plotly-plot');
    const t = g?.querySelector('.gtitle'); if (!t) return 'no title';
    const tr = t.getBoundingClientRect(), gr = g.getBoundingClientRect();
    return tr.top >= gr.top - 0.5 && tr.height > 0 ? 'ok' : `title top ${tr.top} above the plot's ${gr.top}`; }"""


def test_refused_change_curve_and_routing_noise(app_url, page, tmp_path):
    """Issue 23 items 2–5: a refused parameter set (rank and rank_fraction both set) says why and leaves the
    controls equal to the merge on screen, so α moves merge again; the α curve's marker follows α and the curve is
    cleared, with what to press, when another parameter moves; routing accuracy carries n, 95 % intervals and the
    chance line; the user's own image is on the map and its predicted class is named."""
    from PIL import Image
    shots = _shots(tmp_path)
    page.goto(app_url)
    page.wait_for_function("() => document.querySelector('#pool-summary')?.innerText.includes('parameters')")
    _tab(page, "4 · Merge")
    page.wait_for_function(f"() => ({ACC_TITLE})().includes('α = 0.30')")
    assert page.evaluate(TITLE_INSIDE) == "ok"
    # the empty α curve says what to press
    assert "α curve on validation" in " ".join(page.evaluate(CURVE_MARKS))
    page.locator("#method input").click()
    page.get_by_role("option", name="ESM (esm)").click()
    page.wait_for_function(f"() => ({ACC_TITLE})().includes('ESM (α = 1.00)')")
    page.get_by_role("button", name="α curve on validation").click()
    page.wait_for_function(f"() => ({CURVE_MARKS})().includes('current α = 1.00')")
    curve_title = page.evaluate(f"() => {PLOT.format('curve-plot')}.layout.title.text")
    assert "for default parameters" in curve_title, curve_title
    # α moves: the curve's "current α" marker moves with it (it kept saying the old α)
    page.locator("#ctl-esm-alpha input[type=range]").fill("0.5")
    page.wait_for_function(f"() => ({ACC_TITLE})().includes('ESM (α = 0.50)')")
    page.wait_for_function(f"() => ({CURVE_MARKS})().includes('current α = 0.50')")
    assert page.get_by_role("button", name="use the best α (").is_enabled()
    # another parameter moves: the curve (drawn for the defaults) is cleared, saying for what it was drawn
    page.locator("#ctl-esm-rank input").fill("4")
    page.locator("#ctl-esm-rank input").press("Enter")
    page.wait_for_function(f"() => ({ACC_TITLE})().includes('ESM (α = 0.50)') && "
                           "document.querySelector('#cmp-table').innerText.includes('rank=4')")
    page.wait_for_function(f"() => ({CURVE_MARKS})().join(' ').includes('was drawn for ESM with default parameters')")
    assert "rank=4" in " ".join(page.evaluate(CURVE_MARKS))
    assert page.get_by_role("button", name="use the best α", exact=True).is_disabled()
    page.screenshot(path=str(shots / "4-merge-curve-cleared.png"), full_page=True)
    # rank and rank_fraction both set: refused with the reason; rank_fraction goes back to the merge on screen (0)
    esm_rows = "() => document.querySelector('#cmp-table').innerText.split('ESM').length"
    rows = page.evaluate(esm_rows)
    shown = page.evaluate(ACC_TITLE)
    page.locator("#ctl-esm-rank_fraction input[type=range]").fill("0.25")
    toast = page.locator('[data-testid="toast-text"]').first
    toast.wait_for()
    msg = toast.inner_text()
    assert "Not merged" in msg and "rank_fraction" in msg and "not both" in msg and "set back" in msg, msg
    page.wait_for_function("() => document.querySelector('#ctl-esm-rank_fraction input[type=range]').value === '0'")
    assert page.locator("#ctl-esm-rank input").input_value() == "4"
    assert page.evaluate(ACC_TITLE) == shown
    page.screenshot(path=str(shots / "4-merge-refused.png"), full_page=True)
    # every later change merges again: α first
    page.locator("#ctl-esm-alpha input[type=range]").fill("0.7")
    page.wait_for_function(f"() => ({ACC_TITLE})().includes('ESM (α = 0.70)')")
    page.wait_for_timeout(500)
    # one new row (α = 0.7): setting the control back merged nothing
    assert page.evaluate(esm_rows) == rows + 1
    assert page.evaluate(HEADERS_BROKEN) == []
    assert page.evaluate(TITLE_INSIDE) == "ok"

    # routing: the empty plots say what to press; n, interval, chance line; the user's own image on the map
    _tab(page, "5 · Routing (ESM++)")
    hint = page.evaluate(f"() => {PLOT.format('route-acc')}?.layout?.annotations?.[0]?.text || ''")
    assert "Route!" in hint, hint
    img = tmp_path / "mine.png"
    Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)).save(img)
    page.get_by_label("my image").check()
    page.locator("#route-image input[type=file]").set_input_files(str(img))
    page.wait_for_selector("#route-image img")
    page.get_by_role("button", name="Route!").click()
    page.wait_for_function("() => document.querySelector('#route-note')?.innerText.includes('Your image')")
    note = page.locator("#route-note").inner_text()
    T = int(re.search(r"chance: 1/(\d+) = ", note).group(1))
    assert T == len(page.evaluate(f"() => {PLOT.format('route-oracle')}.data[0].x"))
    assert re.search(r"read with the \S+ head, ESM\+\+ predicts the class \S+", note), note
    acc = page.evaluate(f"""() => {{ const g = {PLOT.format('route-acc')};
        return {{title: g.layout.title.text, err: g.data[0].error_y,
                 shapes: (g.layout.shapes || []).map(s => [s.y0, s.y1, s.line.dash])}}; }}""")
    assert f"n = {6 * T} samples per layer" in acc["title"] and "Wilson" in acc["title"]     # 6 per task
    assert acc["err"].get("visible") is not False and len(acc["err"]["array"]) == len(acc["err"]["arrayminus"]) > 0
    assert [(pytest.approx(100 / T), pytest.approx(100 / T), "dash")] == [tuple(x) for x in acc["shapes"]]  # chance
    oracle = page.evaluate(f"() => {PLOT.format('route-oracle')}.data.map(t => [t.name, (t.error_y || {{}}).array])")
    assert len(oracle) == 3 and all(e and len(e) == T for _, e in oracle), oracle
    assert re.search(r"n = \d+ test samples per task", page.evaluate(f"() => {PLOT.format('route-oracle')}"
                                                                      ".layout.title.text"))
    mine = page.evaluate(f"() => {PLOT.format('route-map')}.data.filter(t => t.name === 'your image')"
                         ".map(t => [t.x.length, t.marker.symbol])")
    assert mine == [[1, "x"]]
    page.screenshot(path=str(shots / "5-routing-own-image.png"), full_page=True)
