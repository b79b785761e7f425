"""Evaluate and Predict follow this browser's latest run (issue 12, item 1), tested through the
tabs' handlers on real tiny runs of two browsers (no server, no browser).

A page shows its own newest run rather than whatever was newest when it opened; training again
switches the view to the new run; an explicit pick of another run stays until the page trains
again; someone else's run says so in words (never with an id or a token); a change of run or
checkpoint in Predict leaves no description or top-5 of the previous model; the many-images
table shows rounded probabilities. Compare's Run A, Run B and history pick follow the same rule,
and its lists show a run's new name after a rename.
"""
from __future__ import annotations

from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from PIL import Image

from core import events as ev
from core import identity
from core.config import RunConfig
from core.inference import Predictor
from core.jobs import JobManager
from core.runs import RunHistory
from ui import tab_compare, tab_evaluate, tab_predict, tab_train
from ui.common import AppContext

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
SECRET = "f" * 32
RUN = "A trained run"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


class Page:
    """One browser's page: its signed token, its Gradio session and session state."""

    def __init__(self, name: str, ident: str, username: str | None = None):
        self.token = identity.sign(SECRET, ident)
        self.request = type(f"Request{name}", (), {"username": username, "session_hash": f"session-{name}",
                                                   "client": None})()
        self.owner = f"user:{username}" if username else f"browser:{ident}"
        self.session: dict = {}
        self.shown = {"eval": None, "predict": None}   # what each dropdown holds now

    def reload(self):
        """A reloaded page: a fresh session, empty lists; the token stays (localStorage)."""
        self.session, self.shown = {}, {"eval": None, "predict": None}


def lab_context(tmp: Path, *modules) -> tuple:
    """A server's context over a fresh runs folder under ``tmp`` (one training slot, signed browser
    tokens), with the tabs of ``modules`` built in a Blocks: (ctx, blocks, their controllers)."""
    manager = JobManager(runs_dir=tmp / "runs", data_dir=tmp / "data", max_jobs=1)
    ctx = AppContext(manager=manager, data_dir=tmp / "data", runs_dir=tmp / "runs", secret=SECRET)
    ctx.history = RunHistory(ctx.runs_dir).attach(manager)
    with gr.Blocks() as blocks:
        ctx.session = gr.State({})
        ctx.browser_id = gr.BrowserState(None)
        tabs = [module.build(ctx) for module in modules]
    return ctx, blocks, tabs


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ctx, demo, _ = lab_context(tmp_path_factory.mktemp("follow"), tab_evaluate, tab_predict, tab_compare)
    yield ctx, demo
    ctx.manager.shutdown(timeout=10)


def train(ctx, page: Page, folder: Path, seed: int) -> str:
    """A 1-epoch run of ``page``'s browser, followed to its end the way the Train tab's poll does
    (its render is what names the page's last run)."""
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(folder), "batch_size": 16,
                                           "num_workers": 0},
                                  "model": {"name": "tutorial_net"}, "epochs": 1, "device": "cpu", "seed": seed})
    job = ctx.manager.submit(config, owner=page.owner)
    page.session["job_id"] = job.job_id
    ctx.manager.wait(job.job_id, timeout=180)
    assert job.status == ev.FINISHED, job.message
    tab_train._render(ctx, job, page.session)
    return job.job_id


def refresh(ctx, page: Page, view: str) -> str | None:
    """Open the tab (its list is refreshed with the value the dropdown holds) and read the pick."""
    tab = tab_evaluate.EvaluateTab(ctx) if view == "eval" else tab_predict.PredictTab(ctx)
    update = tab.refresh_runs(page.session, page.shown[view], page.token, page.request)
    page.shown[view] = update.value
    return update.value


def pick(page: Page, view: str, run_id: str) -> None:
    page.shown[view] = run_id   # the user chooses a run in the dropdown


def summary(ctx, page: Page, run_id: str) -> str:
    return tab_evaluate.EvaluateTab(ctx).show(run_id, True, page.token, page.request)[0]


def model_changed(ctx, page: Page, run_id, img, source=RUN, uploaded=None):
    return tab_predict.PredictTab(ctx).model_changed(source, run_id, uploaded, img, "none", page.token, page.request)[:4]


@pytest.fixture(scope="module")
def runs(lab, tiny_folder):
    """Browser B trains first; then A's page opens (B's run is the newest) and A trains."""
    ctx, _ = lab
    a, b = Page("A", "a1a1"), Page("B", "b2b2")
    ids = {"b1": train(ctx, b, tiny_folder, seed=1)}
    assert refresh(ctx, a, "eval") == ids["b1"] and refresh(ctx, a, "predict") == ids["b1"]   # A has none yet
    ids["a1"] = train(ctx, a, tiny_folder, seed=2)
    return {"ctx": ctx, "a": a, "b": b, **ids}


def test_each_browser_lists_its_own_latest_run(runs):
    ctx, a, b = runs["ctx"], runs["a"], runs["b"]
    for view in ("eval", "predict"):
        # A's lists held B's run (the newest when the page opened): A's new run replaces it
        assert refresh(ctx, a, view) == runs["a1"], view
        # B's page still shows B's run, although A's is the newest on the server now...
        assert refresh(ctx, b, view) == runs["b1"], view
    b.reload()   # ...and so does B's reloaded page, before the Train tab has named any run
    for view in ("eval", "predict"):
        assert refresh(ctx, b, view) == runs["b1"], view
    # once the Train tab reconnects and names that run, a refresh keeps it (nothing new to follow)
    tab_train._render(ctx, ctx.manager.find(runs["b1"]), b.session)
    assert refresh(ctx, b, "eval") == runs["b1"]


def test_a_new_tab_shows_its_browsers_run_once_the_page_has_its_token(runs):
    ctx = runs["ctx"]
    tab = Page("B-tab", "b2b2")          # B's browser, a second tab: the same token, a new session
    token = tab.token
    for view in ("eval", "predict"):
        tab.token = None                 # the page-load refresh runs before the token is restored
        assert refresh(ctx, tab, view) == runs["a1"]   # the newest run (A's): only a default...
        tab.token = token                # ...replaced when the token arrives (browser_id.change)
        assert refresh(ctx, tab, view) == runs["b1"], view


def test_training_again_switches_and_an_explicit_pick_stays_until_then(runs, tiny_folder):
    ctx, a = runs["ctx"], runs["a"]
    for view in ("eval", "predict"):
        refresh(ctx, a, view)
        pick(a, view, runs["b1"])                    # A looks at B's run on purpose
        assert refresh(ctx, a, view) == runs["b1"]   # reopening the tab keeps it
        assert refresh(ctx, a, view) == runs["b1"]
    a2 = train(ctx, a, tiny_folder, seed=3)
    for view in ("eval", "predict"):
        assert refresh(ctx, a, view) == a2, view     # the new run, not the old pick
        pick(a, view, runs["a1"])                    # and a pick after that stays again
        assert refresh(ctx, a, view) == runs["a1"], view
    runs["a2"] = a2


def test_someone_elses_run_says_so_in_words(runs):
    ctx, a, b = runs["ctx"], runs["a"], runs["b"]
    theirs, mine = summary(ctx, a, runs["b1"]), summary(ctx, a, runs["a1"])
    assert "This run was trained by another browser" in theirs and "accuracy" in theirs
    assert "trained by" not in mine and "accuracy" in mine
    assert "trained by" not in summary(ctx, b, runs["b1"])
    describe = tab_predict.PredictTab(ctx).describe
    assert "This run was trained by another browser" in describe(RUN, runs["b1"], None, a.token, a.request)
    assert "trained by" not in describe(RUN, runs["a1"], None, a.token, a.request)
    for text in (theirs, describe(RUN, runs["b1"], None, a.token, a.request)):
        for secret in (b.token, b.owner, b.owner.split(":")[1], b.token.split(".")[1]):
            assert secret not in text


def test_whose_run_names_a_login_and_nothing_else():
    ben = identity.Who("user:ben")
    assert tab_evaluate.whose_run("user:ana", ben) == "This run was trained by ana, not by you."
    assert tab_evaluate.whose_run("user:ben", ben) is None
    assert tab_evaluate.whose_run("user:a_*b*", ben) == r"This run was trained by a\_\*b\*, not by you."
    other = tab_evaluate.whose_run("browser:0123abcd", ben)
    assert other == "This run was trained by another browser, not this one." and "0123abcd" not in other
    assert "command line" in tab_evaluate.whose_run(None, identity.Who("browser:1"))
    assert "another browser" in tab_evaluate.whose_run("session:9f9f", identity.Who("session:0a0a"))


def test_predict_follows_a_change_of_run_or_checkpoint(runs):
    ctx, a = runs["ctx"], runs["a"]
    img = Image.open(EXAMPLES / "cat.jpg").convert("RGB")
    text_a, top_a, table_a, csv_a = model_changed(ctx, a, runs["a1"], img)
    text_b, top_b, table_b, csv_b = model_changed(ctx, a, runs["b1"], img)
    expected = {key: dict(Predictor(ctx.runs_dir / runs[key] / "best.pth").predict(img, topk=5))
                for key in ("a1", "b1")}
    assert top_a == pytest.approx(expected["a1"]) and top_b == pytest.approx(expected["b1"])
    assert top_a != top_b                                   # two models (two seeds), two answers
    assert "trained by another browser" in text_b and "trained by" not in text_a
    for table, csv in ((table_a, csv_a), (table_b, csv_b)):  # the previous model's table is emptied
        assert table.empty and csv is None
    # another checkpoint file (a run's last.pth instead of its best one): its own description
    text_file, top_file, _, _ = model_changed(ctx, a, None, img, "A checkpoint file (.pth)",
                                              str(ctx.runs_dir / runs["b1"] / "last.pth"))
    assert "latest weights" in text_file and "trained by" not in text_file and top_file == pytest.approx(top_b)
    # no image yet: a description and an empty top-5; no model at all: nothing of the previous one
    assert model_changed(ctx, a, runs["a1"], None)[1] == {}
    assert model_changed(ctx, a, None, img, "A checkpoint file (.pth)", None)[:2] == ("", {})
    text_none, top_none, _, _ = model_changed(ctx, a, "no-such-run", img)
    assert text_none.startswith("⚠️") and top_none == {}


def test_every_change_of_model_updates_the_description_and_the_top5(lab):
    _, demo = lab
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    wanted = {by_id[e]._id for e in ("predict_info", "predict_top5", "predict_table")}
    for elem_id in ("predict_source", "predict_run", "predict_ckpt"):
        fns = [fn for fn in demo.fns.values() if (by_id[elem_id]._id, "change") in [tuple(t) for t in fn.targets]]
        assert any(wanted <= {o._id for o in fn.outputs} for fn in fns), elem_id


def test_many_images_table_shows_rounded_probabilities(runs):
    ctx, a = runs["ctx"], runs["a"]
    files = [str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "ship.jpg")]
    shown, csv = tab_predict.PredictTab(ctx).predict_files(files, RUN, runs["a1"], None, "none", a.token, a.request)
    value = gr.Dataframe(interactive=False).postprocess(shown)
    probabilities = [row[2] for row in value.data]
    assert all(isinstance(p, float) and 0 < p <= 1 for p in probabilities)     # numbers, for sorting
    display = [row[2] for row in value.metadata["display_value"]]
    assert all(len(d) <= 6 and d.endswith("%") for d in display), display     # "36.3%", not 0.3625945…
    assert display == [f"{p:.1%}" for p in probabilities]
    assert Path(csv).read_text().count(".") > 4                                # the CSV keeps every digit


def compare_picks(ctx, page: Page, a=None, b=None, hist=None) -> tuple:
    """Open the Compare tab: (Run A, Run B, the history's selected run) after its lists refresh."""
    _, ua, ub, uh = tab_compare.CompareTab(ctx).refresh_choices([], a, b, hist, page.session, page.token,
                                                                page.request)
    return ua["value"], ub["value"], uh["value"]


def test_compare_defaults_follow_this_browsers_runs(runs):
    ctx, a, b = runs["ctx"], runs["a"], runs["b"]
    # B has one run: A is it, B stays empty (never someone else's run by default)
    assert compare_picks(ctx, b) == (runs["b1"], None, runs["b1"])
    # A has trained twice: its newest run against the one before
    newest = runs.get("a2", runs["a1"])
    picks = compare_picks(ctx, a)
    assert picks[0] == newest and picks[2] == newest
    assert picks[1] == (runs["a1"] if "a2" in runs else None)
    # a pick of someone else's run stays, and the pair's summary says whose it is
    assert compare_picks(ctx, a, a=newest, b=runs["b1"])[:2] == (newest, runs["b1"])
    text = tab_compare.CompareTab(ctx).show_pair(newest, runs["b1"], True, a.token, a.request)[2]
    assert "Run B: This run was trained by another browser" in text and "Run A:" not in text
    for secret in (b.token, b.owner):
        assert secret not in text
    # a made-up id is not kept: the pick falls back to this browser's run
    assert compare_picks(ctx, a, a="no-such-run")[0] == newest


def test_a_renamed_run_shows_its_new_name_in_the_lists(runs):
    ctx, a = runs["ctx"], runs["a"]
    h = ctx.shared["compare"]   # the controller the built tab is wired to
    h.rename(runs["a1"], "my first cat model", "", "(all)", a.token, a.request)
    try:
        lists = h.refresh_choices([runs["a1"]], runs["a1"], None, runs["a1"], a.session, a.token, a.request)
        for update in lists:
            labels = dict((v, k) for k, v in update["choices"])
            assert "my first cat model" in labels[runs["a1"]], labels
        refreshed = tab_evaluate.EvaluateTab(ctx).refresh_runs(a.session, runs["a1"], a.token, a.request)
        assert "my first cat model" in dict((v, k) for k, v in refreshed.choices)[runs["a1"]]
        assert "my first cat model" in summary(ctx, a, runs["a1"])   # the Evaluate summary too
    finally:
        h.rename(runs["a1"], "", "", "(all)", a.token, a.request)


def test_rename_is_followed_by_a_refresh_of_the_run_lists(lab):
    _, demo = lab
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    lists = {by_id[e]._id for e in ("cmp_runs", "cmp_run_a", "cmp_run_b", "cmp_hist_run")}
    rename = [fn for fn in demo.fns.values() if (by_id["cmp_rename"]._id, "click") in [tuple(t) for t in fn.targets]]
    assert len(rename) == 1
    chained = [fn for fn in demo.fns.values() if fn.trigger_after == rename[0]._id and fn.trigger_only_on_success]
    assert any(lists <= {o._id for o in fn.outputs} for fn in chained)


def test_a_browsers_own_runs_are_marked_yours_in_the_lists(runs):
    ctx, a = runs["ctx"], runs["a"]
    update = tab_evaluate.EvaluateTab(ctx).refresh_runs(a.session, None, a.token, a.request)
    labels = {v: k for k, v in update.choices}
    assert " · yours" in labels[runs["a1"]] and " · yours" not in labels[runs["b1"]], labels
