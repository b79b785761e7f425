"""The Clean data loop in a real browser (issue 15), on the embedded sample at 1920x1080: check the
data's health, find likely label errors, relabel one, remove one, retrain the Train tab's settings on
the original and on the cleaned labels, and see on Compare what changed, image by image.

Screenshots go to test-artifacts/clean-*.png. Needs /usr/bin/chromium, as tests/test_browser.py."""
from __future__ import annotations

import re

import pytest

from tests.test_browser import ARGS, ARTIFACTS, CHROMIUM, open_tab, served_lab

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]

SIZE = {"width": 1920, "height": 1080}
WAIT_MS = 60_000
FIND_MS = 400_000        # 2 folds of the quick CNN on 2,000 images, on a busy 2-core machine
TRAIN_MS = 400_000


@pytest.fixture(scope="module")
def pg(tmp_path_factory, session_data_dir):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with served_lab(tmp_path_factory.mktemp("clean-runs"), session_data_dir) as lab, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport=SIZE)
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(lab["url"])
        expect(page.locator("#data_info")).to_contain_text("2,500 images", timeout=WAIT_MS)
        yield page
        browser.close()


def shot(pg, name: str) -> None:
    pg.wait_for_timeout(500)
    pg.screenshot(path=str(ARTIFACTS / f"clean-{name}.png"), full_page=True)


def test_find_relabel_remove_retrain_and_compare(pg):
    from playwright.sync_api import expect

    open_tab(pg, "Train")
    box = pg.locator("#epochs input[type=number]")
    box.fill("1")
    box.press("Enter")
    open_tab(pg, "Clean data")
    pg.locator("#clean_health_btn").click()
    expect(pg.locator("#clean_health_summary")).to_contain_text("image", timeout=WAIT_MS)
    folds = pg.locator("#clean_folds input[type=number]")
    folds.fill("2")
    folds.press("Enter")
    pg.locator("#clean_find_btn").click()
    expect(pg.locator("#clean_find_note")).to_contain_text("look mislabelled", timeout=FIND_MS)
    expect(pg.locator("#clean_page")).to_contain_text("Page 1 of", timeout=WAIT_MS)
    pg.locator("#clean_review .thumbnail-item").first.click()
    detail = pg.locator("#clean_detail_text")
    expect(detail).to_contain_text("suspect 1 of", timeout=WAIT_MS)
    shot(pg, "review")
    given = re.search(r"Given label: (\S+)", detail.inner_text()).group(1)
    pg.locator("#clean_relabel_to input").click()
    pg.get_by_role("option").filter(has_not_text=re.compile(f"^{re.escape(given)}$")).first.click()
    pg.locator("#clean_relabel").click()
    note = pg.locator("#clean_revision_note")
    expect(note).to_contain_text("1 relabelled", timeout=WAIT_MS)
    expect(detail).to_contain_text("suspect 2 of", timeout=WAIT_MS)     # on to the next suspect
    pg.locator("#clean_remove").click()
    expect(note).to_contain_text("1 removed", timeout=WAIT_MS)
    expect(pg.locator("#clean_revision input")).to_have_value(re.compile(r"1 relabelled, 1 removed"))
    shot(pg, "decided")
    pg.locator("#clean_retrain").click()
    expect(pg.get_by_role("tab", name="Compare", exact=True)).to_have_attribute("aria-selected", "true",
                                                                                timeout=WAIT_MS)
    diff = pg.locator("#cmp_diff_note")
    expect(diff).to_contain_text("Image by image", timeout=TRAIN_MS)
    expect(diff).to_contain_text("of 500 test images")
    expect(pg.locator("#cmp_mcnemar")).to_contain_text("McNemar")
    shot(pg, "compare")
    assert pg.errors == [], pg.errors
