"""Evaluate tab, "see inside the model" (issue 14): the summary's 95 % intervals, heat-maps on the
mistakes, a click on a mistake, and the images behind a square of the confusion matrix. Tested
through the tab's handlers on real tiny runs of two browsers (no server); one browser test, marked
slow, clicks a square of a real matrix in Chromium."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from core import events as ev
from core import explain, rundir, runrecord, stats
from core.config import RunConfig
from core.inference import Predictor
from core.jobs import JobManager
from tests.test_follow_run import Page, lab_context
from ui import tab_evaluate
from ui.tab_evaluate import HEAT_PRED, HEAT_TRUE, NO_HEATMAP, OWNER_ONLY


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")



@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_folder, tiny_zip):
    """Browser A's two finished runs: one on a folder of the server, one on A's uploaded zip."""
    ctx, demo, (tab,) = lab_context(tmp_path_factory.mktemp("eval-inside"), tab_evaluate)
    manager = ctx.manager
    a, b = Page("A", "a1a1"), Page("B", "b2b2")
    ids = {}
    for key, source, location in (("folder", "folder", tiny_folder), ("zip", "zip", tiny_zip)):
        config = RunConfig.from_dict({"data": {"source": source, "location": str(location), "batch_size": 16,
                                               "num_workers": 0},
                                      "model": {"name": "tutorial_net"}, "epochs": 1, "device": "cpu", "seed": 3})
        job = manager.submit(config, owner=a.owner)
        manager.wait(job.job_id, timeout=180)
        assert job.status == ev.FINISHED, job.message
        ids[key] = job.job_id
    yield {"ctx": ctx, "demo": demo, "tab": tab, "a": a, "b": b, **ids}
    manager.shutdown(timeout=10)


def _record(lab, key="folder"):
    return runrecord.load_run(lab["ctx"].runs_dir / lab[key])


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_the_summary_carries_the_wilson_and_bootstrap_intervals(lab):
    tab, a = lab["tab"], lab["a"]
    text = tab.show(lab["folder"], True, a.token, a.request)[0]
    record = _record(lab)
    confusion = np.asarray(record.eval["confusion"])
    n, correct = int(confusion.sum()), int(np.trace(confusion))
    iv = stats.wilson_interval(correct, n)
    assert (f"{n} test images: accuracy **{correct / n:.1%}** (95 % CI {iv.span()}, "
            f"±{100 * iv.half_width:.1f} points)") in text
    assert text.count(f"{correct / n:.1%}") == 1     # said once, with its interval
    assert "The test split is small" in text        # 30 images: ± many points, and the page says so
    assert "top-3" not in text                      # 3 classes: top-3 is always 100 %
    f1 = stats.run_macro_f1_interval(record.run_dir)
    assert f"macro F1 **{record.report().macro_f1:.3f}** (95 % CI {f1.span(percent=False)})" in text
    assert f1.low <= record.report().macro_f1 <= f1.high


def test_a_run_from_before_per_image_predictions_keeps_its_wilson_interval(lab, tmp_path):
    old = tmp_path / lab["folder"]
    shutil.copytree(_record(lab).run_dir, old)
    (old / rundir.PREDICTIONS_FILE).unlink()
    record = runrecord.load_run(old)
    text = tab_evaluate.summary_text(record, record.report(), "old run")
    assert "no interval: this run was tested before per-image predictions were saved" in text
    assert stats.small_split_warning(stats.run_accuracy_interval(old)) in text
    assert f"(95 % CI {stats.run_accuracy_interval(old).span()}" in text


def test_the_overlay_choice_redraws_the_mistakes_with_heat_maps(lab):
    tab, a = lab["tab"], lab["a"]
    plain = tab.errors_gallery(lab["folder"], NO_HEATMAP, a.token, a.request)
    shown = tab.show(lab["folder"], True, a.token, a.request)[3]
    assert len(plain) >= 3 and [c for _, c in plain] == [c for _, c in shown]
    items = runrecord.misclassified_items(_record(lab), tab_evaluate.GALLERY_LIMIT, data_dir=lab["ctx"].data_dir)
    predictor = Predictor(lab["ctx"].runs_dir / lab["folder"] / "best.pth")
    for mode, key in ((HEAT_PRED, "predicted"), (HEAT_TRUE, "true")):
        heat = tab.errors_gallery(lab["folder"], mode, a.token, a.request)
        assert len(heat) == len(plain) and [c for _, c in heat] == [c for _, c in plain]
        changed = [not np.array_equal(_pixels(h), _pixels(p)) for (h, _), (p, _) in zip(heat, plain)]
        assert sum(changed) > len(changed) / 2, mode   # (a class nothing in the image raised stays 0)
        for (h, _), item in zip(heat, items):   # each picture: the heat-map of that mistake's class
            want = explain.explain_image(predictor, item["image"], item[key])["overlay"]
            assert np.array_equal(_pixels(h), _pixels(want))
    pred, true = (tab.errors_gallery(lab["folder"], m, a.token, a.request) for m in (HEAT_PRED, HEAT_TRUE))
    assert any(not np.array_equal(_pixels(x), _pixels(y)) for (x, _), (y, _) in zip(pred, true))
    with pytest.raises(gr.Error, match="Choose one of"):
        tab.errors_gallery(lab["folder"], "<b>rainbow</b>", a.token, a.request)


def test_a_clicked_mistake_shows_the_heat_maps_of_its_two_classes(lab):
    tab, a = lab["tab"], lab["a"]
    items = runrecord.misclassified_items(_record(lab), tab_evaluate.GALLERY_LIMIT, data_dir=lab["ctx"].data_dir)
    i = 1
    item = items[i]
    image, cam_pred, cam_true, note = tab.error_detail(lab["folder"], a.token, gr.SelectData(None, {"index": i,
                                                                                                    "value": None}),
                                                       a.request)
    predictor = Predictor(lab["ctx"].runs_dir / lab["folder"] / "best.pth")
    want_pred = explain.explain_image(predictor, item["image"], item["predicted"])
    want_true = explain.explain_image(predictor, item["image"], item["true"])
    assert np.array_equal(_pixels(image["value"]), _pixels(want_pred["image"]))
    assert np.array_equal(_pixels(cam_pred["value"]), _pixels(want_pred["overlay"]))
    assert np.array_equal(_pixels(cam_true["value"]), _pixels(want_true["overlay"]))
    assert not np.array_equal(_pixels(cam_pred["value"]), _pixels(cam_true["value"]))
    assert cam_pred["label"] == f"Why '{item['predicted']}' (predicted, {want_pred['probability']:.0%})"
    assert cam_true["label"] == f"Where it saw '{item['true']}' (true class, {want_true['probability']:.0%})"
    assert Path(item["file"]).name in note and f"**{item['true']}**" in note and f"**{item['predicted']}**" in note
    with pytest.raises(gr.Error, match="Click one of the mistakes"):
        tab.error_detail(lab["folder"], a.token, gr.SelectData(None, {"index": 999, "value": None}), a.request)


def _expected_cell(record, t: int, p: int) -> list[str]:
    preds = rundir.read_predictions(record.run_dir)
    rows = [(-c, i) for i, tt, pp, c in zip(preds["index"], preds["target"], preds["predicted"], preds["confidence"])
            if (tt, pp) == (t, p)]
    return [Path(record.eval["files"][str(i)]).name for _, i in sorted(rows)]


def test_a_chosen_square_gives_exactly_its_images_most_confident_first(lab):
    tab, a = lab["tab"], lab["a"]
    record = _record(lab)
    names, confusion = record.eval["class_names"], np.asarray(record.eval["confusion"])
    off = confusion - np.diag(np.diag(confusion))
    t, p = (int(x) for x in np.unravel_index(np.argmax(off), off.shape))
    gallery, note = tab.show_cell(lab["folder"], names[t], names[p], NO_HEATMAP, a.token, a.request)
    expected = _expected_cell(record, t, p)
    assert len(gallery) == confusion[t, p] == len(expected) > 0
    assert [c.split(" · ")[0] for _, c in gallery] == expected
    assert note.startswith(f"{confusion[t, p]} test image") and f"**{names[t]}**" in note
    assert "predicted" in note and "most confident first" in note
    # the diagonal: the correct ones
    d = int(np.argmax(np.diag(confusion)))
    gallery, note = tab.show_cell(lab["folder"], names[d], names[d], NO_HEATMAP, a.token, a.request)
    assert [c.split(" · ")[0] for _, c in gallery] == _expected_cell(record, d, d) and "(correct)" in note
    # a click on the matrix (the page's script writes row, column and a time) picks the same square
    true_dd, pred_dd, clicked, clicked_note = tab.pick_cell(lab["folder"], f"{t}\t{p}\t1712", NO_HEATMAP,
                                                            a.token, a.request)
    assert (true_dd["value"], pred_dd["value"]) == (names[t], names[p])
    assert [c for _, c in clicked] == [c for _, c in tab.show_cell(lab["folder"], names[t], names[p], NO_HEATMAP,
                                                                   a.token, a.request)[0]]
    # with heat-maps on: as many pictures, each a heat-map
    heat, _ = tab.show_cell(lab["folder"], names[t], names[p], HEAT_PRED, a.token, a.request)
    assert len(heat) == len(expected)


def test_an_empty_square_says_so(lab):
    tab, a = lab["tab"], lab["a"]
    record = _record(lab)
    names, confusion = record.eval["class_names"], np.asarray(record.eval["confusion"])
    empty = np.argwhere(confusion == 0)
    if not len(empty):
        pytest.skip("every square of this run's matrix holds an image")
    t, p = (int(x) for x in empty[0])
    gallery, note = tab.show_cell(lab["folder"], names[t], names[p], NO_HEATMAP, a.token, a.request)
    assert gallery == [] and note.startswith("No test image")


def test_a_class_that_is_not_in_the_run_is_refused_clearly(lab):
    tab, a = lab["tab"], lab["a"]
    with pytest.raises(gr.Error, match="The true class 'dog' is not one of this run's classes: airplane, cat, ship"):
        tab.show_cell(lab["folder"], "dog", "cat", NO_HEATMAP, a.token, a.request)
    with pytest.raises(gr.Error, match="predicted class 7 is not one of this run's classes"):
        tab.pick_cell(lab["folder"], "0\t7\t1", NO_HEATMAP, a.token, a.request)
    with pytest.raises(gr.Error, match="did not land on a square"):
        tab.pick_cell(lab["folder"], "", NO_HEATMAP, a.token, a.request)
    with pytest.raises(gr.Error, match="Choose a true class and a predicted class first"):
        tab.show_cell(lab["folder"], None, "cat", NO_HEATMAP, a.token, a.request)


def test_a_run_on_someones_upload_shows_its_images_to_its_owner_only(lab):
    tab, a, b = lab["tab"], lab["a"], lab["b"]
    record = _record(lab, "zip")
    names = record.eval["class_names"]
    t, p = (int(x) for x in np.argwhere(np.asarray(record.eval["confusion"]) > 0)[0])   # a square with images
    mine, _ = tab.show_cell(lab["zip"], names[t], names[p], NO_HEATMAP, a.token, a.request)
    theirs, note = tab.show_cell(lab["zip"], names[t], names[p], NO_HEATMAP, b.token, b.request)
    assert mine and theirs == [] and OWNER_ONLY in note and "most confident first" not in note
    assert tab.errors_gallery(lab["zip"], HEAT_PRED, a.token, a.request)
    assert tab.errors_gallery(lab["zip"], HEAT_PRED, b.token, b.request) == []
    assert tab.pick_cell(lab["zip"], "0\t1\t5", NO_HEATMAP, b.token, b.request)[2] == []
    with pytest.raises(gr.Error, match="only to the run's owner"):
        tab.error_detail(lab["zip"], b.token, gr.SelectData(None, {"index": 0, "value": None}), b.request)
    # a run on a folder of the server shows its images to everyone who may see the run
    record = _record(lab)
    t, p = (int(x) for x in np.argwhere(np.asarray(record.eval["confusion"]) > 0)[0])
    names = record.eval["class_names"]
    assert tab.show_cell(lab["folder"], names[t], names[p], NO_HEATMAP, b.token, b.request)[0]


def test_showing_a_run_fills_the_square_picker_and_clears_the_details(lab):
    tab, a = lab["tab"], lab["a"]
    out = tab.run_details(lab["folder"], a.token, a.request)
    assert out[0].choices == out[1].choices == [(c, c) for c in _record(lab).eval["class_names"]]
    assert out[2] == [] and "Click a square" in out[3] and out[4]["value"] is None


def test_heat_map_events_are_limited_to_two_at_a_time(lab):
    demo, tab = lab["demo"], lab["tab"]
    heavy = {tab.errors_gallery, tab.errors_gallery_if_overlay, tab.error_detail, tab.show_cell, tab.refresh_cell,
             tab.pick_cell}
    fns = [fn for fn in demo.fns.values() if fn.fn in heavy]
    assert {fn.fn for fn in fns} == heavy
    assert all(fn.concurrency_limit == 2 and fn.concurrency_id == "eval_heatmaps" for fn in fns)


@pytest.mark.slow
@pytest.mark.browser
def test_a_click_on_a_square_of_the_matrix_shows_its_images_in_chromium(tmp_path, tiny_folder):
    """The page's script turns a click on the plotly matrix into the square's images (Chromium)."""
    import os
    import socket

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (never `playwright install`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from ui.app import build_app, launch_kwargs

    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1)
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16,
                                           "num_workers": 0},
                                  "model": {"name": "tutorial_net"}, "epochs": 1, "device": "cpu", "seed": 3})
    job = manager.submit(config, owner=None)
    manager.wait(job.job_id, timeout=180)
    confusion = np.asarray(runrecord.load_run(tmp_path / "runs" / job.job_id).eval["confusion"])
    t, p = (int(x) for x in np.argwhere(confusion > 0)[-1])   # a square with images (row t, column p)
    demo = build_app(manager, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", server_port=port,
                            **launch_kwargs(tmp_path / "data", tmp_path / "runs"))
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox",
                                                                              "--disable-gpu"])
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.goto(url)
            pg.get_by_role("tab", name="Evaluate").click()
            sync_api.expect(pg.locator("#eval_confusion .heatmaplayer")).to_have_count(1, timeout=60_000)
            assert not pg.locator("#eval_cell_pick").is_visible()
            box = pg.locator("#eval_confusion .nsewdrag").first.bounding_box()
            k = confusion.shape[0]
            pg.mouse.click(box["x"] + (p + 0.5) * box["width"] / k, box["y"] + (t + 0.5) * box["height"] / k)
            names = runrecord.load_run(tmp_path / "runs" / job.job_id).eval["class_names"]
            sync_api.expect(pg.locator("#eval_cell_note")).to_contain_text(f"{confusion[t, p]} test image",
                                                                          timeout=30_000)
            sync_api.expect(pg.locator("#eval_cell_gallery img")).to_have_count(int(min(confusion[t, p], 24)),
                                                                                timeout=30_000)
            assert pg.locator("#eval_cell_true input").input_value() == names[t]
            assert pg.locator("#eval_cell_pred input").input_value() == names[p]
            pg.screenshot(path=str(tmp_path / "eval-cell.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
        manager.shutdown(timeout=20)
