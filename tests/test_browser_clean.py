"""Issue 15's browser walk of the cleaning loop, in Chromium against the served dashboard: upload a
small zip on the Data tab, open Clean data, run the label-error finder (2 folds), relabel one
suspect and remove the next, retrain (1 epoch, set on the Train tab first) and see the comparison
on Compare: two runs in the leaderboard and the image diff galleries with their counts. The finder runs
as in the app (no test-only settings).
Screenshots go to test-artifacts/clean-*.png."""
from __future__ import annotations

import re

import pytest

from core import revisions
from tests.test_browser import ARGS, ARTIFACTS, CHROMIUM, LOCAL, _require_browser, no_error_toasts, open_tab, served_lab, shot

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]

WAIT_MS = 60_000
TRAIN_MS = 240_000
FIND_MS = 300_000   # the real finder (the recipe's epochs for 120 images, 2 folds) on a shared 2-core machine


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-clean")
    with served_lab(root / "runs", root / "data") as served:
        yield served


@pytest.fixture(scope="module")
def page(lab):
    sync_api = _require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        pg = context.new_page()
        pg.lab = {"external": []}
        pg.on("request", lambda r: None if r.url.startswith(LOCAL) else pg.lab["external"].append(r.url))
        pg.goto(lab["url"])
        yield pg
        context.close()
        browser.close()


def _load_zip(pg, zip_path) -> None:
    from playwright.sync_api import expect

    open_tab(pg, "Data")
    expect(pg.locator("#data_info")).to_contain_text("CIFAR-10", timeout=WAIT_MS)   # the sample, on opening
    pg.locator("#data_source").get_by_text("Upload a .zip").click()
    pg.locator("#zip_in input[type=file]").set_input_files(str(zip_path))
    expect(pg.locator("#data_info")).to_contain_text("150 images, 3 classes", timeout=WAIT_MS)


def _find_and_decide(pg) -> None:
    from playwright.sync_api import expect

    open_tab(pg, "Clean data")
    expect(pg.locator("#clean_revision input")).to_have_value("Original labels", timeout=WAIT_MS)
    folds = pg.locator("#clean_folds input[type=number]")
    folds.fill("2")
    folds.press("Enter")
    pg.locator("#clean_find_btn").click()
    note = pg.locator("#clean_find_note")
    expect(note).to_contain_text(re.compile(r"\d+ of 120 images look mislabelled"), timeout=FIND_MS)
    expect(note).to_contain_text("2-fold cross-validation")
    expect(pg.locator("#clean_page")).to_contain_text(re.compile(r"Page 1 of \d+"))
    shot(pg, "clean-found")
    # the first suspect is under review; a click on the second thumbnail shows that one instead
    pg.locator("#clean_review .thumbnail-item").nth(1).click()
    detail = pg.locator("#clean_detail_text")
    expect(detail).to_contain_text("Given label", timeout=WAIT_MS)
    expect(pg.locator("#clean_detail_img img").first).to_be_visible(timeout=WAIT_MS)
    shot(pg, "clean-review")
    reviewed = detail.inner_text()
    pg.locator("#clean_relabel").click()   # to the suggested class (the dropdown's default)
    expect(pg.locator("#clean_revision_note")).to_contain_text("Started revision cleaned 1", timeout=WAIT_MS)
    expect(pg.locator("#clean_revision input")).to_have_value("cleaned 1 @1: 1 relabelled, 0 removed; "
                                                               "test images unchanged")
    expect(detail).not_to_have_text(reviewed)   # the next suspect is under review
    pg.locator("#clean_remove").click()
    expect(pg.locator("#clean_revision input")).to_have_value("cleaned 1 @2: 1 relabelled, 1 removed; "
                                                               "test images unchanged", timeout=WAIT_MS)
    expect(pg.locator("#clean_review")).to_contain_text("✗ removed")
    no_error_toasts(pg)
    shot(pg, "clean-decided")


def _retrain_and_compare(pg) -> None:
    from playwright.sync_api import expect

    open_tab(pg, "Train")
    epochs = pg.locator("#epochs input[type=number]")
    epochs.fill("1")
    epochs.press("Enter")
    expect(pg.locator("#epochs input[type=range]")).to_have_value("1")
    open_tab(pg, "Clean data")
    pg.locator("#clean_retrain").click()
    # Compare opens with the new comparison: both runs train, then the side-by-side view fills in
    board = pg.locator("#cmp_leaderboard")
    expect(board).to_contain_text("original labels", timeout=WAIT_MS)
    expect(board).to_contain_text("cleaned 1 @2")
    queue = pg.locator("#cmp_queue textarea")
    expect(queue).to_have_value(re.compile(r"original labels: finished.*\n.*cleaned 1 @2: finished"),
                                timeout=TRAIN_MS)
    expect(pg.locator("#cmp_diff_note")).to_contain_text("Image by image", timeout=WAIT_MS)
    expect(pg.locator("#cmp_diff_note")).to_contain_text(re.compile(r"\(of 30\b"))
    expect(pg.locator("#cmp_diff_a")).to_contain_text(re.compile(r"A right, B wrong \(\d+\)"))
    expect(pg.locator("#cmp_diff_b")).to_contain_text(re.compile(r"B right, A wrong \(\d+\)"))
    expect(pg.locator("#cmp_mcnemar")).to_contain_text("Paired test")
    no_error_toasts(pg)
    pg.locator("#cmp_diff_note").scroll_into_view_if_needed()
    shot(pg, "clean-compare")


def test_the_cleaning_loop_in_a_browser(lab, page, tiny_zip):
    _load_zip(page, tiny_zip)
    _find_and_decide(page)
    _retrain_and_compare(page)
    revs = revisions.list_revisions(lab["runs_dir"].parent / "data")
    assert len(revs) == 1 and revs[0].summary() == {"relabelled": 1, "removed": 1, "kept": 0, "test_edits": 0}
    assert page.lab["external"] == []   # nothing left the machine
