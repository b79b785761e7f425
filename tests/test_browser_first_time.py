"""The first-time path in a real browser (issue 12), at 1280x800 and 1920x1080, on a server that
already holds someone else's run:

- two browsers train a run each: each sees its own run in Evaluate and Predict (not the newest
  one on the server, not the other browser's), and someone else's run says so when picked;
- the finish state offers See results, Try it and an export (TorchScript from one, ONNX from the
  other: each file with its own description beside it);
- a Start refused (pretrained weights that are not on this offline machine) says so in the Status
  line, never "Ready", in a toast that closes by itself and does not cover Start or Stop;
- a dataset made in the browser from three classes of uploaded images trains like any other.

Screenshots of each step go to test-artifacts/ (README's images come from there). Needs
/usr/bin/chromium, as tests/test_browser.py (skipped without it, failed under CI).
"""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from core import events as ev
from core.config import RunConfig
from tests.test_browser import ARGS, ARTIFACTS, CHROMIUM, ROOT, _require_browser, open_tab, served_lab
from tests.test_server_files import jpeg

pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]

SIZES = {"1280x800": {"width": 1280, "height": 800}, "1920x1080": {"width": 1920, "height": 1080}}
BUILT_CLASSES = ("cat", "ship", "frog")
TRAIN_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, session_data_dir):
    """The dashboard with one training slot and, already on it, a finished run of another browser."""
    from core.runs import RunHistory

    def older_run(manager) -> dict:
        older = manager.submit(RunConfig.from_dict({"epochs": 1, "device": "cpu", "data": {"num_workers": 0}}),
                               owner="browser:someone-else")
        manager.wait(older.job_id, timeout=180)
        assert older.status == ev.FINISHED, older.message
        return {"older": older.job_id}

    with served_lab(tmp_path_factory.mktemp("first-time-runs"), session_data_dir, prepare=older_run) as lab:
        yield {**lab, "label": lambda run_id: RunHistory(lab["runs_dir"]).label(run_id)}


@pytest.fixture(scope="module")
def browser():
    sync_api = _require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        # Chromium's fake camera (a test pattern) stands in for a webcam; it changes nothing else.
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=ARGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        yield b
        b.close()


def open_page(browser, server, size: str):
    """A new browser profile (its own token) at ``size``, with the page loaded."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=SIZES[size])
    pg = context.new_page()
    pg.lab = {"page_errors": []}
    pg.on("pageerror", lambda e: pg.lab["page_errors"].append(str(e)))
    pg.goto(server["url"])
    expect(pg.locator("#data_info")).to_contain_text("6,000 images", timeout=60_000)
    return pg


def shot(pg, name: str) -> None:
    pg.wait_for_timeout(400)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def shows_run(pg, elem_id: str, label: str) -> None:
    """Wait until the run list ``elem_id`` shows the run labelled ``label`` (the list adds its test
    accuracy after the label). The runs of one test have labels of their own (epochs differ)."""
    from playwright.sync_api import expect

    expect(pg.locator(f"#{elem_id} input")).to_have_value(re.compile("^" + re.escape(label)), timeout=60_000)


def train(pg, epochs: int = 2) -> str:
    """Start a short run on the Train tab and wait for its finish state; the run's id."""
    from playwright.sync_api import expect

    open_tab(pg, "Train")
    box = pg.locator("#epochs input[type=number]")
    box.fill(str(epochs))
    box.press("Enter")
    pg.locator("#start_btn").click()
    status = pg.locator("#train_status textarea")
    expect(status).to_have_value(re.compile(r"^Finished — "), timeout=TRAIN_TIMEOUT_MS)
    return re.search(r"run (\S+):", status.input_value()).group(1)


def export_from_finish_state(pg, kind: str) -> list[str]:
    """Export the finished run from the Train tab's finish row; the names of the files offered."""
    from playwright.sync_api import expect

    pg.locator("#finish_export_kind input").click()
    pg.get_by_role("option", name=re.compile(kind, re.I)).click()
    pg.locator("#finish_export_btn").click()
    files = pg.locator("#finish_export_files")
    expect(files).to_contain_text(".json", timeout=120_000)
    text = files.inner_text().replace("\n.", ".")   # the list shows a name's stem and extension apart
    return re.findall(r"[\w.-]+\.(?:pt|onnx|pth|json|csv)\b", text)


def uncovered(pg, elem_id: str) -> bool:
    """Whether a click at the middle of the element reaches it, and no toast is drawn over it."""
    return pg.evaluate("""(id) => {
        const el = document.getElementById(id); const r = el.getBoundingClientRect();
        const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
        const over = [...document.querySelectorAll('.toast-body')].some(t => {
            const q = t.getBoundingClientRect();
            return q.left < r.right && r.left < q.right && q.top < r.bottom && r.top < q.bottom; });
        return (el === hit || el.contains(hit)) && !over;
    }""", elem_id)


def drop_image(pg, path: Path) -> None:
    data = base64.b64encode(path.read_bytes()).decode()
    pg.evaluate("""async ([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/jpeg'}));
        const target = document.querySelector('#predict_image .wrap') || document.querySelector('#predict_image');
        for (const type of ['dragenter', 'dragover', 'drop'])
            target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
    }""", [data, path.name])


def test_two_browsers_each_see_their_own_run_and_export_from_the_finish_state(server, browser):
    from playwright.sync_api import expect

    label = server["label"]
    a, b = open_page(browser, server, "1280x800"), open_page(browser, server, "1920x1080")
    run_a = train(a)
    for elem_id in ("see_results_btn", "try_it_btn", "finish_export_btn"):
        expect(a.locator(f"#{elem_id}")).to_be_visible()
    ts_files = export_from_finish_state(a, "TorchScript")
    assert f"{run_a}.pt" in ts_files and f"{run_a}.pt.json" in ts_files, ts_files
    shot(a, "first-time-finish-1280x800")
    run_b = train(b, epochs=3)   # B's run is now the newest on the server (and "3 epochs" tells it apart)
    onnx_files = export_from_finish_state(b, "ONNX")
    assert f"{run_b}.onnx" in onnx_files and f"{run_b}.onnx.json" in onnx_files, onnx_files
    shot(b, "first-time-finish-1920x1080")

    # A: See results opens Evaluate on A's run (not B's newer one, not the older run of a third)
    a.locator("#see_results_btn").click()
    shows_run(a, "eval_run", label(run_a))
    expect(a.locator("#eval_summary")).to_contain_text(label(run_a), timeout=60_000)
    expect(a.locator("#eval_summary")).to_contain_text("test images: accuracy")
    expect(a.locator("#eval_summary")).not_to_contain_text("trained by")
    shot(a, "first-time-evaluate-1280x800")
    open_tab(a, "Train")
    a.locator("#try_it_btn").click()
    shows_run(a, "predict_run", label(run_a))
    expect(a.locator("#predict_info")).to_contain_text("10 classes", timeout=60_000)
    expect(a.locator("#predict_info")).not_to_contain_text("trained by")
    drop_image(a, ROOT / "assets" / "examples" / "cat.jpg")
    expect(a.locator("#predict_top5")).to_contain_text("%", timeout=60_000)

    # B: the tabs opened by hand show B's run
    for tab, elem_id, ready in (("Evaluate", "eval_run", "#eval_summary"), ("Predict", "predict_run", "#predict_info")):
        open_tab(b, tab)
        shows_run(b, elem_id, label(run_b))
        expect(b.locator(ready)).to_contain_text(re.compile("accuracy|classes"), timeout=60_000)
        expect(b.locator(ready)).not_to_contain_text("trained by")
    shot(b, "first-time-predict-1920x1080")

    # A looks at B's run on purpose: the page says whose it is (in words, not B's token)
    open_tab(a, "Evaluate")
    a.locator("#eval_run input").click()
    a.get_by_role("option", name=re.compile("^" + re.escape(label(run_b)))).click()
    expect(a.locator("#eval_summary")).to_contain_text("This run was trained by another browser", timeout=60_000)
    # and reopening Compare shows A's run as Run A, B's pick aside
    open_tab(a, "Compare")
    shows_run(a, "cmp_run_a", label(run_a))
    for pg in (a, b):
        assert pg.lab["page_errors"] == [], pg.lab["page_errors"]
        pg.context.close()


@pytest.mark.parametrize("size", list(SIZES))
def test_a_refused_start_says_why_in_the_status_line(server, browser, size):
    from playwright.sync_api import expect

    pg = open_page(browser, server, size)
    open_tab(pg, "Model")
    pg.locator("#model_name input").click()
    pg.get_by_role("option", name=re.compile(r"^resnet18\b")).click()
    expect(pg.locator("#model_about")).to_contain_text("resnet18", timeout=30_000)
    pg.locator("#model_pretrained input").check()
    open_tab(pg, "Train")
    status = pg.locator("#train_status textarea")
    expect(status).to_have_value(re.compile("^Ready"))
    pg.locator("#start_btn").click()
    expect(status).to_have_value(re.compile(r"^Not started: .*resnet18", re.S), timeout=60_000)
    text = status.input_value()
    assert "Ready" not in text and ".pth" in text, text   # it names the weights file to place
    toast = pg.locator(".toast-body")
    expect(toast.first).to_be_visible(timeout=10_000)
    assert uncovered(pg, "start_btn") and uncovered(pg, "stop_btn") and uncovered(pg, "resume_btn")
    shot(pg, f"first-time-refused-{size}")
    expect(toast).to_have_count(0, timeout=20_000)        # it closes by itself
    assert status.input_value() == text                  # the Status line keeps the reason
    assert pg.lab["page_errors"] == []
    pg.context.close()


@pytest.mark.parametrize("size", list(SIZES))
def test_a_dataset_made_in_the_browser_trains(server, browser, size, tmp_path):
    from playwright.sync_api import expect

    pg = open_page(browser, server, size)
    pg.locator("#builder").get_by_text("Make your own dataset").click()
    counts = pg.locator("#builder_counts")
    for cls in BUILT_CLASSES:
        pg.locator("#builder_name").locator("input, textarea").fill(cls)
        pg.locator("#builder_add").click()
        expect(pg.locator("#builder_note")).to_contain_text(f"Added class {cls}", timeout=30_000)
        expect(pg.locator("#builder_class input")).to_have_value(cls)
        files = []
        for i in range(10):
            path = tmp_path / cls / f"{cls}-{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(cls, i))
            files.append(str(path))
        pg.locator("#builder_files input[type=file]").set_input_files(files)
        expect(pg.locator("#builder_note")).to_contain_text(f"Added 10 image(s) to {cls}", timeout=60_000)
        expect(counts).to_contain_text(re.compile(rf"{cls}\s+10\b"), timeout=30_000)
    cells = counts.inner_text().split()
    assert [cells[cells.index(c) + 1] for c in BUILT_CLASSES] == ["10"] * 3, cells   # the counts per class
    pg.locator("#builder").screenshot(path=str(ARTIFACTS / f"first-time-builder-{size}.png"))
    pg.locator("#builder_use").click()
    expect(pg.locator("#data_info")).to_contain_text("my-dataset — 30 images, 3 classes", timeout=60_000)
    run_id = train(pg, epochs=2)
    pg.locator("#see_results_btn").click()
    shows_run(pg, "eval_run", server["label"](run_id))
    expect(pg.locator("#eval_summary")).to_contain_text("test images: accuracy", timeout=60_000)
    expect(pg.locator("#eval_confusion .heatmaplayer")).to_have_count(1, timeout=60_000)
    # the matrix drawn on opening (another run's, 10 classes) is replaced by this run's
    expect(pg.locator("#eval_confusion .xtick text")).to_have_count(len(BUILT_CLASSES), timeout=60_000)
    ticks = set(pg.locator("#eval_confusion .xtick text").all_text_contents())
    assert ticks == set(BUILT_CLASSES), ticks
    shot(pg, f"first-time-builder-evaluate-{size}")
    assert pg.lab["page_errors"] == []
    pg.context.close()


def test_a_webcam_shot_goes_into_the_chosen_class(server, browser):
    """The webcam shot is taken in the page (Chromium's fake camera), added to the chosen class, and
    counted."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=SIZES["1280x800"], permissions=["camera"])
    pg = context.new_page()
    pg.goto(server["url"])
    expect(pg.locator("#data_info")).to_contain_text("6,000 images", timeout=60_000)
    pg.locator("#builder").get_by_text("Make your own dataset").click()
    for cls in ("me", "not me"):
        pg.locator("#builder_name").locator("input, textarea").fill(cls)
        pg.locator("#builder_add").click()
        expect(pg.locator("#builder_note")).to_contain_text(f"Added class {cls}", timeout=30_000)
    expect(pg.locator("#builder_class input")).to_have_value("not me")
    webcam = pg.locator("#builder_shot")
    webcam.locator("[title='grant webcam access'] button").click()
    # the fake camera's stream plays before a shot is taken (a shot of no frame is no image)
    pg.wait_for_function("() => { const v = document.querySelector('#builder_shot video');"
                         " return v && v.readyState >= 2 && v.videoWidth > 0; }", timeout=30_000)
    webcam.locator("button[aria-label='capture photo']").click(timeout=30_000)
    # the shot is shown (and uploaded) before it can be added
    expect(webcam.locator("img[src]:not(.hide)").first).to_be_visible(timeout=30_000)
    pg.wait_for_timeout(500)
    pg.locator("#builder_add_shot").click()
    note = pg.locator("#builder_note")
    try:
        expect(note).to_contain_text("Added 1 image(s) to not me", timeout=60_000)
    except AssertionError:
        raise AssertionError(f"{note.inner_text()!r}; toasts: {pg.locator('.toast-body').all_inner_texts()}") from None
    expect(pg.locator("#builder_counts")).to_contain_text(re.compile(r"not me\s+1\b"))
    shot(pg, "first-time-webcam-1280x800")
    context.close()
