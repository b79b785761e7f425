"""Projector mode in a real browser (issue 12, item 5): at 1920x1080 the toggle gives the full
width and larger, darker text, and a reload keeps it (it is remembered in this browser); at
1280x800 the page still fits. Before/after screenshots go to test-artifacts/.

Needs /usr/bin/chromium, as tests/test_browser.py (skipped without it, failed under CI).
"""
from __future__ import annotations

import pytest

from tests.test_browser import ARGS, ARTIFACTS, CHROMIUM, _require_browser, lab_url  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]


def _measure(pg) -> dict:
    return pg.evaluate("""() => {
        const c = document.querySelector('.gradio-container');
        const label = document.querySelector('#projector_toggle label span, #projector_toggle span');
        const header = document.querySelector('#lab-header p');
        return {on: document.body.classList.contains('lab-projector'), width: c.getBoundingClientRect().width,
                label: parseFloat(getComputedStyle(label).fontSize),
                header: parseFloat(getComputedStyle(header).fontSize),
                overflow: document.documentElement.scrollWidth - window.innerWidth};
    }""")


def _toggle(pg):
    return pg.locator("#projector_toggle input[type=checkbox]")


def test_projector_mode_fills_a_1920_screen_with_larger_text_and_is_remembered(lab_url):  # noqa: F811
    sync_api = _require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1920, "height": 1080})
        pg = context.new_page()
        pg.goto(lab_url)
        _toggle(pg).wait_for(timeout=60_000)
        pg.wait_for_timeout(500)
        before = _measure(pg)
        pg.screenshot(path=str(ARTIFACTS / "projector-before-1920.png"))
        _toggle(pg).check()
        pg.wait_for_function("document.body.classList.contains('lab-projector')", timeout=10_000)
        pg.wait_for_timeout(300)
        after = _measure(pg)
        pg.screenshot(path=str(ARTIFACTS / "projector-after-1920.png"))
        assert not before["on"] and before["width"] <= 1400
        assert after["on"] and after["width"] >= 1800, after           # the full width, not a 1400-px column
        assert after["label"] > before["label"] and after["header"] > before["header"], (before, after)
        assert after["overflow"] <= 0, after                           # nothing wider than the screen
        pg.reload()
        _toggle(pg).wait_for(timeout=60_000)
        pg.wait_for_function("document.body.classList.contains('lab-projector')", timeout=10_000)
        assert _toggle(pg).is_checked()                                # remembered in this browser
        _toggle(pg).uncheck()
        pg.wait_for_function("!document.body.classList.contains('lab-projector')", timeout=10_000)
        context.close()
        small = browser.new_context(viewport={"width": 1280, "height": 800})
        pg = small.new_page()
        pg.goto(lab_url)
        _toggle(pg).wait_for(timeout=60_000)
        pg.wait_for_timeout(500)
        assert not _measure(pg)["on"]       # a new browser profile starts without it
        _toggle(pg).check()
        pg.wait_for_function("document.body.classList.contains('lab-projector')", timeout=10_000)
        assert _measure(pg)["overflow"] <= 0
        pg.screenshot(path=str(ARTIFACTS / "projector-after-1280.png"))
        small.close()
        browser.close()
