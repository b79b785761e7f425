"""Image-level difference of two runs on the same test images (core.compare.image_diff) and its
galleries on Compare: the counts agree with the runs' own predictions, the images are the right
ones, and runs tested on other images are refused with the reason."""
from __future__ import annotations

import numpy as np
import pytest

from core import compare, rundir
from core.errors import DataError
from tests.test_follow_run import Page, lab_context, train
from ui import tab_compare


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_folder):
    ctx, _demo, _tabs = lab_context(tmp_path_factory.mktemp("diff"), tab_compare)
    page = Page("a", "e5e5")
    ids = [train(ctx, page, tiny_folder, seed) for seed in (1, 2)]
    yield ctx, page, ids
    ctx.manager.shutdown(timeout=10)


def _correct(run_dir):
    p = rundir.read_predictions(run_dir)
    order = np.argsort(p["index"])
    return np.asarray(p["index"])[order], (np.asarray(p["predicted"]) == np.asarray(p["target"]))[order]


def test_counts_and_images_match_the_runs_predictions(two_runs):
    ctx, _page, (a, b) = two_runs
    da, db = ctx.history.run_dir(a), ctx.history.run_dir(b)
    diff = compare.image_diff(da, db, limit=5)
    idx, ca = _correct(da)
    _, cb = _correct(db)
    assert diff.n == len(idx) == diff.a_only_count + diff.b_only_count + diff.both_right + diff.both_wrong
    assert diff.a_only_count == int((ca & ~cb).sum()) and diff.b_only_count == int((cb & ~ca).sum())
    assert diff.both_right == int((ca & cb).sum())
    a_only = set(idx[ca & ~cb].tolist())
    assert {i["index"] for i in diff.a_only} <= a_only and len(diff.a_only) == min(5, len(a_only))
    assert all(i["true"] != i["predicted"] for i in diff.a_only + diff.b_only)
    conf = [i["confidence"] for i in diff.b_only]
    assert conf == sorted(conf, reverse=True)
    assert f"{diff.a_only_count} image(s) right" in diff.sentence
    assert diff.a_only_count + diff.b_only_count > 0, "two seeds of a 1-epoch net should disagree somewhere"
    same = compare.image_diff(da, da)
    assert same.a_only_count == same.b_only_count == 0 and same.a_only == []


def test_other_test_images_are_refused(two_runs, tmp_path):
    ctx, _page, (a, b) = two_runs
    other = tmp_path / "other"
    other.mkdir()
    p = rundir.read_predictions(ctx.history.run_dir(a))
    p = {**p, "index": [i + 10_000 for i in p["index"]]}
    (other / rundir.PREDICTIONS_FILE).write_text(__import__("json").dumps(p))
    with pytest.raises(DataError, match="tested on different images"):
        compare.image_diff(ctx.history.run_dir(b), other)


def test_compare_tab_shows_both_galleries_with_counts(two_runs):
    ctx, page, (a, b) = two_runs
    note, ga, gb = tab_compare.CompareTab(ctx).show_image_diff(a, b, page.token, page.request)
    diff = compare.image_diff(ctx.history.run_dir(a), ctx.history.run_dir(b))
    assert "Image by image" in note and f"({diff.a_only_count})" in ga["label"] and f"({diff.b_only_count})" in gb["label"]
    assert len(ga["value"]) == min(24, diff.a_only_count)
    assert all("/" not in caption.split(":")[0] for _img, caption in ga["value"] + gb["value"])  # no server paths
    assert tab_compare.CompareTab(ctx).show_image_diff(a, a, page.token, page.request)[0] == ""
