"""The page in a real browser: Debian's Chromium driven by Playwright (installed by .ci/run)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

import app
from core.registry import techniques
from serving.runner import Runner
from tests.conftest import IOI_CLEAN
from tests.test_app import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = pytest.mark.browser

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page_url(demo_model, tmp_path_factory):
    demo = app.build_demo(notice="Test notice: gpt2 could not be loaded.", runner=Runner(demo_model, cache_dir=tmp_path_factory.mktemp("browser-cache")))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, **app.launch_options(), quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


SHOTS = os.environ.get("BROWSER_SHOTS", "/tmp")
VISIBLE_PLOTS = "[...document.querySelectorAll('.js-plotly-plot')].filter(e => e.offsetParent !== null)"


def visible_plots(page) -> int:
    return page.evaluate(f"{VISIBLE_PLOTS}.length")


def titles(page) -> list[str]:
    """The visible figures' titles as one line each (the detail's wrapped lines joined)."""
    raw = page.evaluate(f"{VISIBLE_PLOTS}.map(p => p.layout.title.text || '')")
    return [" ".join(re.sub(r"<br>|</?sup>", " ", title).split()) for title in raw]


def clipped_titles(page) -> list[str]:
    """Titles of visible figures that stick out of their figure (left of it, or wider than it)."""
    return page.evaluate(
        f"""{VISIBLE_PLOTS}.flatMap(plot => {{
            const box = plot.getBoundingClientRect();
            return [...plot.querySelectorAll('.gtitle')].filter(t => {{
                const r = t.getBoundingClientRect();
                return r.left < box.left - 1 || r.right > box.right + 1;
            }}).map(t => t.textContent);
        }})"""
    )


def shoot(page, name: str) -> None:
    page.wait_for_timeout(500)  # let plotly finish drawing
    page.screenshot(path=os.path.join(SHOTS, f"circuitbreaker-{name}.png"), full_page=True)


def open_page(browser, url, width: int, errors: list[str]):
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, wait_until="networkidle")
    page.wait_for_function(f"{VISIBLE_PLOTS}.length >= 7", timeout=60_000)
    return page


@pytest.mark.parametrize("width", [1400, 390])
def test_every_tab_opens_with_results_and_readable_figures(browser, page_url, width):
    errors: list[str] = []
    page = open_page(browser, page_url, width, errors)
    tabs = page.get_by_role("tab")
    names = [*app.TABS, *(["More"] if any(t.tab is None for t in techniques().values()) else [])]
    for name in names:  # a phone shows every tab's name too
        assert page.get_by_role("tab", name=name).is_visible(), name
    assert not page.get_by_label("More tabs").is_visible()
    assert tabs.count() >= 3

    # the explorer: the Eiffel Tower results without a click; top predictions, lens, DLA, attention (one head large)
    assert visible_plots(page) == 7
    content = page.content()
    assert "Logit lens: top-1 prediction" in content and "Top predictions" in content
    assert page.get_by_text("This is the small demo model bundled with CircuitBreaker").is_visible()  # one short line
    assert not page.get_by_text("Test notice: gpt2 could not be loaded.").is_visible()  # the reason is folded away
    head = page.evaluate(f"{VISIBLE_PLOTS}.find(p => p.layout.title.text.startsWith('Attention, layer')).layout")
    assert "␣Eiffel" in " ".join(head["yaxis"]["ticktext"] if "ticktext" in head["yaxis"] else page.evaluate(
        f"{VISIBLE_PLOTS}.find(p => p.layout.title.text.startsWith('Attention, layer')).data[0].y"))
    assert clipped_titles(page) == []
    shoot(page, f"explorer-{width}")

    # Contrast Pairs opens with the first example's exact and approximate patching, and its status
    page.get_by_role("tab", name="Contrast Pairs").click()
    page.wait_for_function(f"{VISIBLE_PLOTS}.length >= 5", timeout=30_000)
    assert page.get_by_text("Done:").is_visible()
    assert "Activation patching (exact)" in page.content() and "APPROXIMATE (attribution patching)" in page.content()
    assert clipped_titles(page) == []
    shoot(page, f"contrast-{width}")

    # Circuit Map opens with its five figures; head scores live in [0, 1] and are drawn on a fixed 0-1 scale
    page.get_by_role("tab", name="Circuit Map").click()
    page.wait_for_function(f"{VISIBLE_PLOTS}.length >= 5", timeout=30_000)
    assert "Loss by position on the repeated random sequence" in page.content()
    scales = page.evaluate(
        f"{VISIBLE_PLOTS}.filter(p => p.layout.coloraxis).map(p => [p.layout.coloraxis.cmin, p.layout.coloraxis.cmax])"
    )
    assert scales == [[0, 1]] * 3, scales  # induction, previous-token, duplicate-token
    assert clipped_titles(page) == []
    shoot(page, f"circuit-map-{width}")
    assert errors == [], errors


def test_preview_stays_visible_and_bad_input_keeps_the_results(browser, page_url):
    errors: list[str] = []
    page = open_page(browser, page_url, 1400, errors)

    # a bad target: the message sits on its field, and every result on the page stays as it was
    before = page.evaluate(f"{VISIBLE_PLOTS}.map(p => p.layout.title.text)")
    page.get_by_label("Target token (empty: the model's top prediction)").fill("Berlin")
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_selector("text=did you mean ' Berlin'?", timeout=60_000)
    assert page.get_by_text("did you mean ' Berlin'?").count() == 1  # said once, not over every panel
    assert page.locator(".error").filter(has_text="Error").count() == 0
    assert page.evaluate(f"{VISIBLE_PLOTS}.map(p => p.layout.title.text)") == before

    # Enter in the prompt runs it (a one-line box that grows with its text; Shift+Enter would add a line)
    page.get_by_label("Target token (empty: the model's top prediction)").fill("")
    prompt = page.get_by_label("Prompt").first
    prompt.fill(IOI_CLEAN.replace(" store", " park"))
    prompt.press("Enter")
    page.wait_for_function(f"{VISIBLE_PLOTS}.some(p => JSON.stringify(p.data[0].x || []).includes('park'))", timeout=60_000)
    assert prompt.input_value() == IOI_CLEAN.replace(" store", " park")  # no new line typed into it

    # Contrast Pairs: run another example; while exact patching runs, no figure is covered by the progress overlay
    page.get_by_role("tab", name="Contrast Pairs").click()
    page.wait_for_function(f"{VISIBLE_PLOTS}.length >= 5", timeout=30_000)
    page.get_by_label("Prompt B (corrupted: same number of tokens)").fill(
        IOI_CLEAN.replace(" store", " park")
    )
    page.get_by_role("button", name="Run patching").click()
    covered = page.evaluate_handle(
        """() => { window.covered = 0; window.timer = setInterval(() => {
            document.querySelectorAll('.js-plotly-plot').forEach(p => {
                const block = p.closest('.block');
                if (block && block.querySelector('.wrap.default:not(.hide), .eta-bar')) window.covered += 1;
            }); }, 20); }"""
    )
    del covered
    page.wait_for_selector("text=Small swing", timeout=120_000)  # the warning a tiny swing earns
    page.wait_for_selector("text=Done:", timeout=120_000)
    assert page.evaluate("clearInterval(window.timer) || window.covered") == 0
    assert "less than 1 logit" in page.content()

    # examples still run with a click (their own event, in the tab's lane): the second Circuit Map example
    page.get_by_role("tab", name="Circuit Map").click()
    page.get_by_text("Short sequences, another seed").click()
    page.wait_for_selector("text=20 random tokens repeated twice, batch 20, seed 1", timeout=120_000)
    validation = "status of 422"  # how Gradio answers a request its validator turned away (the browser logs it)
    assert [e for e in errors if validation not in e] == [], errors


def test_a_task_and_where_its_heads_send_their_effect(browser, page_url, tmp_path):
    errors: list[str] = []
    page = open_page(browser, page_url, 1400, errors)
    page.get_by_role("tab", name="Contrast Pairs").click()
    page.wait_for_function(f"{VISIBLE_PLOTS}.length >= 5", timeout=30_000)

    # path patching on the example pair, from the heads patching ranked first (L4H0 on the demo model's IOI)
    senders = page.locator("#path-senders")
    assert "L4H0" in senders.inner_text()
    page.get_by_role("button", name="Trace paths").click()
    page.wait_for_selector("text=Path patching: L4H0", timeout=120_000)
    assert "fraction of the pair's logit difference restored" in " ".join(titles(page))
    page.get_by_role("tab", name="→ logits").click()
    page.wait_for_selector("text=Direct path to the logits", timeout=30_000)
    shoot(page, "path-pair")
    figures = page.evaluate(f"{VISIBLE_PLOTS}.length")
    while senders.locator(".token .token-remove").count():  # no sender left: said on the list, in its words, before any run
        senders.locator(".token .token-remove").first.click()
    page.get_by_role("button", name="Trace paths").click()
    page.wait_for_selector("text=Choose at least one sender in the list", timeout=30_000)
    assert page.locator(".toast-body").count() == 0 and page.evaluate(f"{VISIBLE_PLOTS}.length") == figures  # the paths shown stay

    # a task: the pair's inputs give way to the task's; the task's means, then paths over the task
    page.get_by_label("A task").check()
    page.get_by_label("Prompt A (clean)").wait_for(state="hidden", timeout=30_000)
    page.get_by_role("button", name="Trace paths").click()  # no task run yet: said on the list, before any run
    page.wait_for_selector("text=Run patching (or task patching) first", timeout=30_000)
    assert page.locator(".toast-body").count() == 0
    page.get_by_label("Task", exact=True).click()
    page.get_by_role("option", name="induction").click()
    page.get_by_label("Pairs n (1-64)").fill("8")
    page.get_by_role("button", name="Run task patching").click()
    page.wait_for_selector("text=Task patching: induction", timeout=120_000)
    assert "8 pairs" in page.locator("#task-summary").inner_text()
    assert "± " in page.locator("#task-summary").inner_text()  # means with their standard errors
    assert clipped_titles(page) == []
    page.wait_for_function(f"!{VISIBLE_PLOTS}.some(p => (p.layout.title.text || '').startsWith('Direct path'))", timeout=30_000)  # the pair's paths are gone
    shoot(page, "task")
    page.get_by_role("button", name="Trace paths").click()
    one_line = "(p.layout.title.text || '').replace(/<br><sup>|<\\/sup>/g, ' ').replace(/\\s+/g, ' ')"
    page.wait_for_function(f"{VISIBLE_PLOTS}.some(p => {one_line}.includes('induction: mean over 8 pairs'))", timeout=120_000)

    # your own pairs, uploaded as JSONL: the box fills, the task becomes custom, a bad line is named
    upload = tmp_path / "pairs.jsonl"
    upload.write_text(
        '{"clean": "When John and Mary went to the store, John gave a drink to", '
        '"corrupted": "When John and Mary went to the store, Mary gave a drink to", "answer": " Mary", "wrong": " John"}\n'
        '{"clean": "When Tom and Sarah went to the park, Tom gave a ball to", "corrupted": "x"}\n'
    )
    page.locator("input[type=file]").set_input_files(str(upload))
    page.wait_for_function("[...document.querySelectorAll('textarea')].some(t => t.value.includes('Sarah'))", timeout=30_000)
    page.get_by_role("button", name="Run task patching").click()
    page.wait_for_selector("text=Line 2: expected an object", timeout=60_000)  # on the pairs' field, before any run

    # a built-in task again (the uploaded pairs wait in the box for custom): a bad number is said on its field, not in
    # a toast; pairs of several token lengths open on head_out, the one sweep computed, and the others say why they are empty
    page.get_by_label("Task", exact=True).click()
    page.get_by_role("option", name="ioi", exact=True).click()
    page.get_by_label("Pairs n (1-64)").first.fill("0")
    page.get_by_role("button", name="Run task patching").click()
    page.wait_for_selector("text=n must be between 1 and 64, got 0.", timeout=60_000)
    assert page.locator(".toast-body").count() == 0
    page.get_by_label("Pairs n (1-64)").first.fill("8")
    page.get_by_role("button", name="Run task patching").click()
    page.wait_for_function("document.querySelector('#task-summary').innerText.includes('ioi (s2), 8 pairs')", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#task-sweeps [role=tab][aria-selected=true]')].some(t => t.innerText.trim() == 'head_out')",
                           timeout=30_000)
    shoot(page, "task-several-lengths")
    page.get_by_role("tab", name="resid_pre").last.click()
    page.wait_for_selector("text=so positions do not line up", timeout=30_000)

    # pairs typed into the box are for the custom task: it is chosen as they are typed
    page.get_by_label("Your pairs (task custom)", exact=False).first.fill("When John and Mary went to the store, John gave a drink to | x | Mary | John")
    page.wait_for_function("[...document.querySelectorAll('input')].some(i => i.value == 'custom')", timeout=30_000)
    assert [e for e in errors if "status of 422" not in e] == [], errors


def test_a_task_circuit_on_the_circuit_map(browser, page_url):
    """Circuit Map's task view: find a 6-edge circuit on 8 IOI pairs; the graph (with its band slider),
    the curve and the checks are drawn, titles fit, the table lists the circuit's edges; moving the slider
    to its last band hides the weaker edges."""
    errors: list[str] = []
    page = open_page(browser, page_url, 1400, errors)
    page.get_by_role("tab", name="Circuit Map").click()
    page.wait_for_function(f"{VISIBLE_PLOTS}.length >= 5", timeout=30_000)
    page.locator("#circuit-heading").scroll_into_view_if_needed()
    page.get_by_label("Pairs n (1-64)").last.fill("8")
    page.get_by_label("Edges k (1-761)").fill("6")
    page.get_by_role("button", name="Find the circuit").click()
    page.wait_for_selector("text=Circuit: 6 edges", timeout=120_000)
    page.wait_for_function(f"{VISIBLE_PLOTS}.some(p => (p.layout.title.text || '').startsWith('Faithfulness by circuit size'))", timeout=30_000)
    summary = page.locator("#circuit-summary").inner_text()
    assert "8 pairs" in summary and "Faithfulness" in summary and "Pearson r" in summary
    graph = f"{VISIBLE_PLOTS}.find(p => (p.layout.title.text || '').startsWith('Circuit: 6 edges'))"
    assert page.evaluate(f"{graph}.layout.sliders[0].steps.length") == 6
    shown = "(g => g._fullData.filter(t => t.mode === 'lines' && t.visible === true).length)"
    before = page.evaluate(f"{shown}({graph})")
    page.locator(".slider-rail-rect").first.scroll_into_view_if_needed()  # the only slider on the page: the graph's
    rail = page.locator(".slider-rail-rect").first.bounding_box()
    grip = page.locator(".slider-grip-rect").first.bounding_box()
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)  # drag it to its last step: the strongest band only
    page.mouse.down()
    page.mouse.move(rail["x"] + rail["width"], grip["y"] + grip["height"] / 2, steps=10)
    page.mouse.up()
    page.wait_for_function(f"{shown}({graph}) < {before}", timeout=10_000)
    shoot(page, "task-circuit-strongest")
    assert "L4H0" in page.locator("#circuit-table").inner_text()
    assert clipped_titles(page) == []
    shoot(page, "task-circuit")
    assert errors == [], errors


def test_a_first_start_page_fills_the_explorer_when_it_loads_and_never_over_a_visitors_run(browser, demo_model, tmp_path):
    """A first start's page is built before any example is computed (warm="background", empty cache): the
    Explorer's figures say the results are on their way, and the page fills its first example when it loads.
    A visitor who runs a prompt of their own before the fill has answered (here the model is kept busy meanwhile)
    sees their own results, never covered by the example. A visitor whose first run is refused (an empty
    prompt) gets the example, not figures left waiting for nothing."""
    runner = Runner(demo_model, cache_dir=tmp_path)
    demo = app.build_demo(runner=runner, warm="background")
    assert runner.computed == 0  # nothing computed for the page
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, **app.launch_options(), quiet=True)
    tops = f"{VISIBLE_PLOTS}.map(p => (p.layout.title || {{}}).text || '').filter(t => t.startsWith('Top predictions'))"  # a waiting figure has no title
    try:
        errors: list[str] = []
        runner.lock.acquire()  # the model busy (as with a heavy request): the page's fill waits for it
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("text=on their way", timeout=60_000)
            assert page.evaluate(f"{tops}.length") == 0
            shoot(page, "first-start-waiting")  # Gradio's progress over the figures meanwhile
            page.wait_for_timeout(1000)  # the fill is queued, waiting for the model
            page.get_by_label("Prompt").first.fill(IOI_CLEAN)
            page.get_by_role("button", name="Run", exact=True).click()
            refused = browser.new_page(viewport={"width": 1400, "height": 1000})  # a second visitor, whose run is refused
            refused.on("pageerror", lambda error: errors.append(str(error)))
            refused.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            refused.wait_for_selector("text=on their way", timeout=60_000)
            refused.get_by_label("Prompt").first.fill("")
            refused.get_by_role("button", name="Run", exact=True).click()
            refused.wait_for_selector("text=The prompt is empty", timeout=30_000)  # told at once, on the field, while the model is busy
            page.wait_for_timeout(1000)
        finally:
            runner.lock.release()
        page.wait_for_function(f"{tops}.length == 1", timeout=60_000)
        page.wait_for_timeout(3000)  # time for a fill that was not held back to arrive and cover the run
        lens = page.evaluate(f"{VISIBLE_PLOTS}.find(p => ((p.layout.title || {{}}).text || '').startsWith('Logit lens: top-1')).data[0].x")
        assert any("John" in str(token) for token in lens), lens  # the visitor's prompt, not the example's
        shoot(page, "first-start-visitor-run")
        refused.wait_for_function(f"{tops}.length == 1", timeout=60_000)
        lens = refused.evaluate(f"{VISIBLE_PLOTS}.find(p => ((p.layout.title || {{}}).text || '').startsWith('Logit lens: top-1')).data[0].x")
        assert any("Eiffel" in str(token) for token in lens), lens  # the example, drawn where nothing else came
        assert not refused.get_by_text("on their way").first.is_visible()
        shoot(refused, "first-start-refused-run")

        fresh = browser.new_page(viewport={"width": 1400, "height": 1000})  # the next visitor: the fill, from the cache now
        fresh.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        fresh.wait_for_function(f"{VISIBLE_PLOTS}.length >= 7 && {tops}.length == 1", timeout=60_000)
        lens = fresh.evaluate(f"{VISIBLE_PLOTS}.find(p => ((p.layout.title || {{}}).text || '').startsWith('Logit lens: top-1')).data[0].x")
        assert any("Eiffel" in str(token) for token in lens), lens
        assert not fresh.get_by_text("on their way").first.is_visible()
        shoot(fresh, "first-start-filled")
        assert errors == [], errors
    finally:
        demo.close()
