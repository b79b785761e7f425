"""The Train tab's recipe, time budget and cost before Start (issue 16), through its handlers."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from core import recipes
from core.config import RunConfig
from core.jobs import JobManager
from ui import tab_data, tab_model, tab_train
from ui.common import AppContext, config_from_widgets


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe-ui")
    manager = JobManager(runs_dir=tmp / "runs", data_dir=tmp / "data", max_jobs=1)
    ctx = AppContext(manager=manager, data_dir=tmp / "data", runs_dir=tmp / "runs")
    with gr.Blocks():
        ctx.session = gr.State(dict)
        ctx.browser_id = gr.BrowserState(None)
        tab_data.build(ctx)
        tab_model.build(ctx)
        train = tab_train.build(ctx)
    train.recipe_widgets = [w for w, dotted in ctx.config_fields.items() if dotted in recipes.FIELDS]
    yield SimpleNamespace(ctx=ctx, train=train)
    manager.shutdown(timeout=10)


def _values(ctx, session: dict, **fields) -> dict:
    values = {w: w.value for w in ctx.config_fields}
    for w, dotted in ctx.config_fields.items():
        if dotted in fields:
            values[w] = fields[dotted]
    values[ctx.session] = session
    return values


def _applied(ctx, train, out) -> dict:
    """{dotted field: value} of the recipe's widget updates."""
    return {ctx.config_fields[w]: u["value"] for w, u in zip(train.recipe_widgets, out[1:]) if isinstance(u, dict)}


def test_the_recipe_fills_the_settings_and_says_which(page):
    ctx, train = page.ctx, page.train
    out = train.recommend(_values(ctx, {}))
    assert out[0].startswith("**Recipe for training from scratch on small images (4,400 training images)")
    got = _applied(ctx, train, out)
    assert got["data.batch_size"] == 128 and got["epochs"] == 40 and got["optim.scheduler"] == "onecycle"
    assert got["optim.lr"] == 0.05 and got["optim.nesterov"] is True and got["optim.label_smoothing"] == 0.1


def test_opening_the_tab_applies_it_only_after_the_data_or_model_changed(page):
    ctx, train = page.ctx, page.train
    session: dict = {}
    first = train.recommend_if_changed(_values(ctx, session))
    assert isinstance(first[0], str) and _applied(ctx, train, first)["epochs"] == 40
    again = train.recommend_if_changed(_values(ctx, session, **{"optim.lr": 0.003}))   # the user's edit stays
    assert all(isinstance(u, dict) and "value" not in u for u in again)    # gr.skip(): nothing changes
    other = train.recommend_if_changed(_values(ctx, session, **{"model.name": "resnet18"}))
    assert isinstance(other[0], str) and _applied(ctx, train, other)["optim.lr"] == 0.05
    broken = train.recommend_if_changed(_values(ctx, {}, **{"optim.lr": -1}))   # Start will say what is wrong
    assert all(isinstance(u, dict) and "value" not in u for u in broken)


def test_estimate_time_then_the_run_is_compared_with_it(page, tiny_folder):
    ctx, train = page.ctx, page.train
    session = {"data_source": {"source": "folder", "location": str(tiny_folder)}}
    values = _values(ctx, session, **{"data.batch_size": 16, "epochs": 3})
    text = train.estimate_cost(values)
    assert text.startswith("**Time:** ≈ ") and "for 3 epochs" in text and "training takes ≈ " in text
    predicted = session["cost"]["train_seconds"]
    assert predicted > 0
    config = config_from_widgets(ctx, values, session)
    job = SimpleNamespace(config=config)
    epochs = [SimpleNamespace(seconds=predicted * 2), SimpleNamespace(seconds=predicted * 1.1)]
    line = tab_train._cost_comparison(session, job, {"epochs": epochs})
    assert line.startswith("epoch training time ") and "(+10%)" in line   # the first epoch left out
    other = SimpleNamespace(config=RunConfig())                         # other settings: no comparison
    assert tab_train._cost_comparison(session, other, {"epochs": epochs}) == ""
    budget = train.estimate_cost(_values(ctx, session, **{"data.batch_size": 16, "time_budget_s": "60"}))
    assert "With the time budget the run plans **" in budget


def test_the_time_budget_choice_round_trips():
    assert tab_train._budget_seconds("epochs") is None and tab_train._budget_seconds("300") == 300.0
    assert tab_train._budget_choice(None) == "epochs" and tab_train._budget_choice(300.0) == "300"
