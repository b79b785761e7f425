"""The Clean data tab's handlers on real images: find likely label errors, decide (relabel, remove,
undo) into a revision that the Train tab's config picks up, health fixes, a stranger's revision
refused, and the retrain loop queueing the original and the cleaned run as one comparison."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from core import compare, datasets, revisions
from tests.test_follow_run import Page, lab_context
from ui import tab_clean
from ui.common import config_from_widgets


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ctx, demo, (tab,) = lab_context(tmp_path_factory.mktemp("clean"), tab_clean)
    yield ctx, tab
    ctx.manager.shutdown(timeout=10)


def _open(page: Page, folder: Path):
    ds = datasets.load_dataset("folder", str(folder))
    page.session.update(dataset=ds, split=datasets.split_dataset(ds, 0.1, 0.1, 0),
                        data_source={"source": "folder", "location": str(folder)})
    return ds


def _shown_file(page: Page) -> str:
    rows = page.session["clean_issues"].ranking
    rows = rows[rows["flagged"]].reset_index(drop=True) if page.session["clean_filter"] == tab_clean.FILTERS[0] else rows
    return rows.iloc[page.session["clean_pos"]]["file"]


def test_find_decide_undo_and_train_on_the_revision(lab, tiny_folder):
    ctx, tab = lab
    page = Page("a", "a1a1")
    ds = _open(page, tiny_folder)
    note, _flt, gallery, page_text, _img, _detail, _drop = tab.find(page.session, 2, "cnn", progress=lambda *a, **k: None)
    issues = page.session["clean_issues"]
    assert "look mislabelled" in note and len(issues.ranking) == len(page.session["split"].train) + len(page.session["split"].val)
    assert 0 < len(gallery) <= tab_clean.PAGE or issues.ranking["flagged"].sum() == 0
    tab.set_filter(page.session, tab_clean.FILTERS[1])            # all ranked: never empty
    out = tab.select(page.session, SimpleNamespace(index=1))
    assert out[2] is not None and "suspect 2 of" in out[3]
    first = _shown_file(page)
    given = issues.ranking.set_index("file").loc[first, "given"]
    other = next(c for c in ds.classes if c != given)
    bar = tab.relabel(page.session, other, page.token, page.request)
    assert "Started revision" in bar[1]
    ref = page.session["data_source"]["revision"]
    rev, version = revisions.load_revision(ref, ctx.data_dir)
    assert rev.owner == page.owner and rev.decisions(version)[first]["label"] == other
    second = _shown_file(page)                                    # moved on to the next one
    assert second != first
    tab.remove(page.session, page.token, page.request)
    rev, version = revisions.load_revision(page.session["data_source"]["revision"], ctx.data_dir)
    assert set(rev.decisions(version)) == {first, second}
    tab.undo(page.session, page.token, page.request)
    rev, version = revisions.load_revision(page.session["data_source"]["revision"], ctx.data_dir)
    assert set(rev.decisions(version)) == {first}
    config = config_from_widgets(ctx, {}, page.session)           # what Train's Start would build
    assert config.data.revision == rev.ref(version)
    # back to the original labels, then to the revision again by the dropdown
    tab.pick(page.session, "", page.token, page.request)
    assert "revision" not in page.session["data_source"]
    choices, _ = tab.pick(page.session, rev.id, page.token, page.request)[:2]
    assert page.session["data_source"]["revision"] == rev.ref(version)
    assert any(v == rev.id for _, v in choices["choices"])


def test_a_stranger_can_neither_pick_nor_change_my_revision(lab, tiny_folder):
    ctx, tab = lab
    mine, theirs = Page("m", "b2b2"), Page("t", "c3c3")
    ds = _open(mine, tiny_folder)
    _open(theirs, tiny_folder)
    rev = revisions.create_revision(ds, ctx.data_dir, owner=mine.owner)
    with pytest.raises(gr.Error, match="No such revision"):
        tab.pick(theirs.session, rev.id, theirs.token, theirs.request)
    theirs.session["data_source"]["revision"] = rev.ref()          # as if forged into the session
    with pytest.raises(gr.Error, match="belongs to someone else"):
        tab.undo(theirs.session, theirs.token, theirs.request)
    with pytest.raises(gr.Error, match="Load a dataset"):
        tab.find({}, 2, "cnn", progress=lambda *a, **k: None)


def test_health_fix_and_retrain_queue_the_pair(lab, tiny_folder):
    ctx, tab = lab
    page = Page("r", "d4d4")
    ds = _open(page, tiny_folder)
    out = tab.check_health(page.session, progress=lambda *a, **k: None)
    assert "image" in out[0] and len(out) == 7
    with pytest.raises(gr.Error, match="Relabel or remove at least one"):
        tab.retrain({ctx.session: page.session, ctx.browser_id: page.token}, page.request)
    split = page.session["split"]
    rev = revisions.create_revision(ds, ctx.data_dir, owner=page.owner)
    rev.remove(ds, split.train[0], split="train")
    rev.save(ctx.data_dir)
    tab.pick(page.session, rev.id, page.token, page.request)
    _tabs, note = tab.retrain({ctx.session: page.session, ctx.browser_id: page.token}, page.request)
    assert "Queued **2 runs**" in note
    run_ids = compare.group_run_ids(page.session["cmp_group"], ctx.history)
    jobs = [ctx.manager.find(r) for r in run_ids]
    for run_id in run_ids:
        ctx.manager.stop(run_id)
    assert sorted(str(j.config.data.revision) for j in jobs) == sorted(["None", rev.ref()])
    assert len({j.config.seed for j in jobs}) == 1 and len({j.config.data.split_seed for j in jobs}) == 1
