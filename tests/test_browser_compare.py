"""Issue 7's "done when", in a real browser against `python launch.py` itself: a comparison of three
zoo models on the embedded sample is started from the Compare tab and ends in a leaderboard; then
the server is stopped and started again on the same runs folder, and the same browser finds the
comparison again (its run history, curves and leaderboard). Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_browser import (ARGS, ARTIFACTS, CHROMIUM, LOCAL, _free_port, _require_browser, _toasts,
                                no_error_toasts, open_tab, shot)

ROOT = Path(__file__).resolve().parent.parent
# Three families that train in seconds on 2 CPU cores (at 32×32 with the small-input stem, per image:
# 0.003, 0.003 and 0.14 GFLOP; ResNet-18 would be 3.3 GFLOP, about 25 s an epoch on the sample).
MODELS = ["tutorial_net", "lenet5", "squeezenet1_1"]
EPOCHS = 2

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]


class Lab:
    """`python launch.py` in a child process, as a user starts it."""

    def __init__(self, runs_dir: Path, data_dir: Path):
        self.runs_dir, self.data_dir = runs_dir, data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = runs_dir.parent / f"launch-{self.port}.log"
        self.proc = None

    def start(self) -> float:
        """Start and wait for the page; returns the seconds until it was served."""
        t0 = time.time()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "launch.py", "--port", str(self.port), "--runs-dir", str(self.runs_dir),
                 "--data-dir", str(self.data_dir), "--max-jobs", "1"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while time.time() - t0 < 90:
            if self.proc.poll() is not None:
                pytest.fail(f"launch.py exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"launch.py did not serve {self.url} within 90 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Ctrl-C, as a user stops it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser_context():
    sync_api = _require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        # One context for both server starts: the browser keeps its localStorage (its browser id),
        # as a student's browser does when the teacher restarts the lab.
        context = browser.new_context(viewport={"width": 1400, "height": 1100})
        yield context
        context.close()
        browser.close()


def _new_page(context):
    pg = context.new_page()
    pg.lab = {"external": [], "console_errors": [], "page_errors": []}
    pg.on("request", lambda r: None if r.url.startswith(LOCAL) else pg.lab["external"].append(r.url))
    pg.on("console", lambda m: pg.lab["console_errors"].append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.lab["page_errors"].append(str(e)))
    return pg


def _leaderboard(pg) -> list[dict[str, str]]:
    """The leaderboard's rows as {column: text} (read from the rendered table)."""
    # Gradio 6 draws the body as "virtual rows" of grid cells (its hidden <tbody> only sizes columns).
    return pg.evaluate("""() => {
        const root = document.querySelector('#cmp_leaderboard');
        const heads = [...root.querySelectorAll('thead th')].map(th => th.getAttribute('title') || th.innerText.trim());
        return [...root.querySelectorAll('.virtual-row[role=row]')].map(row => {
            const cells = [...row.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim());
            return Object.fromEntries(heads.map((h, i) => [h, cells[i] ?? '']));
        });
    }""")


def _curve_names(pg) -> set[str]:
    return set(pg.locator("#cmp_curves .legendtext").all_text_contents())


def _wait_for_board(pg, n: int, timeout_s: float) -> list[dict[str, str]]:
    deadline, rows = time.time() + timeout_s, []
    while time.time() < deadline:
        rows = _leaderboard(pg)
        if len(rows) == n and all(r.get("status") == "finished" and r.get("test acc (%)") for r in rows):
            return rows
        pg.wait_for_timeout(500)
    pytest.fail(f"leaderboard did not show {n} finished runs: {rows}; queue: "
                f"{pg.locator('#cmp_queue textarea').input_value()!r}; toasts {_toasts(pg)}")


def test_three_model_comparison_survives_a_restart(browser_context, tmp_path_factory):
    from playwright.sync_api import expect

    base = tmp_path_factory.mktemp("restart")
    lab = Lab(base / "runs", base / "data")
    first_start = lab.start()
    try:
        pg = _new_page(browser_context)
        pg.goto(lab.url)
        expect(pg.locator("#data_info")).to_contain_text("6,000 images, 10 classes", timeout=60_000)

        # Pick exactly the three models, two epochs each, and train them all.
        open_tab(pg, "Compare")
        boxes = pg.locator("#cmp_models")
        for name in pg.locator("#cmp_models input[type=checkbox]").evaluate_all("els => els.map(e => e.name)"):
            box = boxes.locator(f"input[name='{name}']")
            if box.is_checked() != (name in MODELS):
                box.click()
        for name in MODELS:
            expect(boxes.locator(f"input[name='{name}']")).to_be_checked()
        epochs = pg.locator("#cmp_epochs input[type=number]")
        epochs.fill(str(EPOCHS))
        epochs.press("Enter")
        expect(pg.locator("#cmp_plan")).to_contain_text(f"3 run(s) of {EPOCHS} epoch(s)")
        pg.locator("#cmp_train").click()
        expect(pg.locator("#cmp_queue textarea")).to_have_value(re.compile(r"^Queued 3 run\(s\)"), timeout=20_000)
        shot(pg, "11-compare-queued")

        rows = _wait_for_board(pg, 3, timeout_s=240)
        assert sorted(r["model"] for r in rows) == sorted(MODELS)
        for r in rows:   # every leaderboard column is filled for a finished run
            for col in ("best val acc (%)", "test acc (%)", "macro F1", "params",
                        "trainable params", "train time (s)", "images/s", "file size (MiB)"):
                assert r[col] not in ("", "None", "NaN"), (col, r)
        # the curves of all three runs are overlaid (train and val of each in the legend)
        expect(pg.locator("#cmp_curves .js-plotly-plot")).to_be_visible()
        names = _curve_names(pg)
        assert all(any(m in n for n in names) for m in MODELS), names
        # the side-by-side confusion matrices open with two of them
        expect(pg.locator("#cmp_cm_a .heatmaplayer")).to_have_count(1, timeout=30_000)
        expect(pg.locator("#cmp_cm_b .heatmaplayer")).to_have_count(1, timeout=30_000)
        expect(pg.locator("#cmp_pair_summary")).to_contain_text("accuracy")
        group = pg.locator("#cmp_group input").input_value()
        assert "3 run(s)" in group, group
        board_before = {r["run"]: r["test acc (%)"] for r in rows}
        # Sortable: the header's menu sorts the rows by that column, as numbers (33 before 306).
        header = pg.locator("#cmp_leaderboard thead th[title='images/s']")
        for item, descending in (("Sort ascending", False), ("Sort descending", True)):
            header.hover()
            header.locator("button[aria-label='Open cell menu']").click()
            pg.get_by_role("menuitem", name=item).click()
            pg.wait_for_timeout(500)
            speeds = [float(r["images/s"].replace(",", "")) for r in _leaderboard(pg)]
            assert speeds == sorted(speeds, reverse=descending) and len(set(speeds)) > 1, (item, speeds)
        # The leaderboard as CSV: the download box appears with the file.
        pg.locator("#cmp_csv_btn").click()
        link = pg.locator("#cmp_csv a[href$='.csv']")
        expect(link).to_have_attribute("href", re.compile(r"/leaderboard-\d{8}-\d{6}\.csv$"), timeout=20_000)
        no_error_toasts(pg)
        shot(pg, "12-compare-leaderboard")
        assert pg.lab["external"] == [] and pg.lab["page_errors"] == [], pg.lab
        assert pg.lab["console_errors"] == [], pg.lab["console_errors"]
        pg.close()
    finally:
        lab.stop()
    assert lab.proc.returncode is not None

    # The same browser after a restart of launch.py on the same runs folder.
    second_start = lab.start()
    try:
        pg = _new_page(browser_context)
        pg.goto(lab.url)
        expect(pg.locator("#data_info")).to_contain_text("6,000 images", timeout=60_000)
        open_tab(pg, "Compare")
        expect(pg.locator("#cmp_group input")).to_have_value(group, timeout=30_000)
        rows = _wait_for_board(pg, 3, timeout_s=60)
        assert {r["run"]: r["test acc (%)"] for r in rows} == board_before
        expect(pg.locator("#cmp_curves .legendtext")).not_to_have_count(0, timeout=30_000)
        names = _curve_names(pg)
        assert all(any(m in n for n in names) for m in MODELS), names
        # and the run history lists the three runs as finished
        pg.locator("#cmp_history").get_by_text("Run history").click()
        history = pg.locator("#cmp_hist_table")
        for run_name in board_before:   # the runs' names (the table also has their ids and statuses)
            expect(history).to_contain_text(run_name, timeout=30_000)
        expect(history).to_contain_text("finished")
        no_error_toasts(pg)
        shot(pg, "13-compare-after-restart")
        assert pg.lab["external"] == [] and pg.lab["page_errors"] == [], pg.lab
        assert pg.lab["console_errors"] == [], pg.lab["console_errors"]
        pg.close()
    finally:
        lab.stop()
    print(f"\nlaunch.py served the page {first_start:.1f} s and {second_start:.1f} s after it was started")
