"""The page in a real browser: Debian's Chromium driven by Playwright (installed by .ci/run)."""

from __future__ import annotations

import os
import shutil

import pytest

import app
from core.runner import Runner
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
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, theme=app.THEME, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def visible_plots(page) -> int:
    return page.locator(".js-plotly-plot:visible").count()


def test_page_loads_with_results_then_every_tab_runs_an_example(browser, page_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_url, wait_until="networkidle")

    # first load: the Eiffel Tower results are already there, no click
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 5", timeout=60_000)
    assert "Logit lens: top-1 prediction" in page.content()
    assert visible_plots(page) == 5  # logit lens x2, DLA x2, attention
    assert page.get_by_text("This is the small demo model bundled with CircuitBreaker").is_visible()  # one short line
    assert not page.get_by_text("Test notice: gpt2 could not be loaded.").is_visible()  # the reason is folded away

    # Contrast Pairs: click the second example and wait for exact and approximate patching side by side
    page.get_by_role("tab", name="Contrast Pairs").click()
    page.get_by_text("IOI seed names (ABBA)").click()
    page.wait_for_selector("text=top-10 overlap", timeout=120_000)
    page.wait_for_function(
        "[...document.querySelectorAll('.js-plotly-plot')].filter(e => e.offsetParent !== null).length >= 11",
        timeout=60_000,
    )
    content = page.content()
    assert "Activation patching (exact), Head output" in content
    assert "APPROXIMATE (attribution patching), Head output" in content

    # Circuit Map: click the example and wait for the five figures
    page.get_by_role("tab", name="Circuit Map").click()
    page.get_by_text("Short sequences, another seed").click()
    page.wait_for_function(
        "[...document.querySelectorAll('.js-plotly-plot')].filter(e => e.offsetParent !== null).length >= 5",
        timeout=120_000,
    )
    assert "Loss by position on the repeated random sequence" in page.content()

    # back to the explorer: a new prompt with an unknown-length target shows the error, not a traceback
    page.get_by_role("tab", name="Prompt Explorer").click()
    page.get_by_label("Target token (empty: the model's top prediction)").fill("Berlin")
    page.get_by_role("button", name="Run").click()
    page.wait_for_selector("text=did you mean ' Berlin'?", timeout=60_000)

    page.screenshot(path=os.path.join(os.environ.get("BROWSER_SHOTS", "/tmp"), "circuitbreaker-explorer.png"), full_page=True)
    assert errors == [], errors
