"""Dashboard handlers and helpers tested as plain functions (no server, no browser).

Covers the config assembly from widgets, the error policy (``ui.common.safe``), the Train tab's
status / progress / log rendering on the events of a real tiny run, and small helpers of the
Data, Model and Predict tabs.
"""
from __future__ import annotations

import inspect
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from PIL import Image  # noqa: E402

from core import events as ev  # noqa: E402
from core.config import RunConfig  # noqa: E402
from core.errors import ConfigError, DataError  # noqa: E402
from core.jobs import Job, JobManager  # noqa: E402
from tests import job_fits  # noqa: E402
from ui import app as ui_app, common, tab_data, tab_model, tab_predict, tab_train  # noqa: E402
from ui.common import AppContext  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ---- a context with the Data, Model and Train tabs' widgets bound to RunConfig fields -------------
@pytest.fixture(scope="module")
def widget_tabs(tmp_path_factory):
    """The Data, Model and Train tabs built on one context: their controllers (``build``'s result)."""
    tmp = tmp_path_factory.mktemp("widgets")
    ctx = AppContext(manager=None, data_dir=tmp / "data", runs_dir=tmp / "runs")
    with gr.Blocks():
        ctx.session = gr.State(dict)
        ctx.browser_id = gr.BrowserState(None)
        return SimpleNamespace(ctx=ctx, data=tab_data.build(ctx), model=tab_model.build(ctx),
                               train=tab_train.build(ctx))


@pytest.fixture(scope="module")
def widget_ctx(widget_tabs):
    return widget_tabs.ctx


def _widget(ctx, field: str):
    matches = [w for w, dotted in ctx.config_fields.items() if dotted == field]
    assert len(matches) == 1, f"{field}: {len(matches)} widgets bound"
    return matches[0]


def _defaults(ctx) -> dict:
    return {w: w.value for w in ctx.config_fields}


def test_every_config_widget_is_bound_once(widget_ctx):
    fields = list(widget_ctx.config_fields.values())
    assert len(fields) == len(set(fields)), "two widgets write the same config field"
    for needed in ("epochs", "data.batch_size", "optim.lr", "optim.optimizer", "model.name", "data.val_fraction",
                   "data.test_fraction", "data.split_seed", "device", "seed", "optim.grad_clip"):
        assert needed in fields


def _choice_values(widget) -> list:
    return [value for _, value in widget.choices]


def test_the_choice_lists_are_the_engines_registries(tmp_path):
    """Optimizers, precisions and sources are listed from core's one registry of each, so a
    name the engine gains shows up on every tab that offers it (adagrad: Memory had it, Train not)."""
    from core import choices, datasets
    from ui import tab_memory

    ctx = AppContext(manager=None, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs")
    with gr.Blocks() as demo:
        ctx.session = gr.State(dict)
        ctx.browser_id = gr.BrowserState(None)
        tab_model.build(ctx)
        tab_train.build(ctx)
        tab_memory.build(ctx)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert _choice_values(_widget(ctx, "optim.optimizer")) == choices.OPTIMIZERS.names()
    assert _choice_values(_widget(ctx, "precision")) == choices.PRECISIONS.names()
    assert _choice_values(by_id["mem_optimizer"]) == choices.OPTIMIZERS.names()
    assert _choice_values(by_id["mem_precision"]) == choices.PRECISIONS.names()
    assert sorted(tab_data.SOURCES.values()) == sorted(datasets.SOURCES.names())   # labels for every source


def test_the_plateau_patience_shows_beside_the_schedule_when_it_is_plateau(widget_ctx):
    patience = _widget(widget_ctx, "optim.plateau_patience")
    assert patience.value == RunConfig().optim.plateau_patience and not patience.visible   # cosine by default
    assert tab_train._plateau_only("plateau")["visible"] is True
    assert tab_train._plateau_only("cosine")["visible"] is False
    values = _defaults(widget_ctx)
    values[_widget(widget_ctx, "optim.scheduler")] = "plateau"
    values[patience] = 4.0
    assert common.config_from_widgets(widget_ctx, values, session={}).optim.plateau_patience == 4


def test_widget_defaults_give_the_default_run_config(widget_ctx):
    """What a user gets by pressing Start without touching anything equals RunConfig()'s defaults."""
    cfg = common.config_from_widgets(widget_ctx, _defaults(widget_ctx), session={})
    assert cfg.to_dict() == RunConfig().to_dict()


def test_config_from_widgets_converts_and_takes_the_dataset_from_the_session(widget_ctx):
    values = _defaults(widget_ctx)
    values[_widget(widget_ctx, "epochs")] = 3.0                 # sliders give floats
    values[_widget(widget_ctx, "data.batch_size")] = "128"      # typed into the dropdown
    values[_widget(widget_ctx, "data.val_fraction")] = 20       # percent → fraction
    values[_widget(widget_ctx, "optim.lr")] = 0.05
    values[_widget(widget_ctx, "optim.grad_clip")] = 0           # 0 = off → None
    values[_widget(widget_ctx, "optim.head_lr")] = 0.5
    values[_widget(widget_ctx, "model.name")] = "resnet18"
    values[_widget(widget_ctx, "optim.class_weights")] = "balanced"
    values[_widget(widget_ctx, "early_stopping_patience")] = 4
    session = {"data_source": {"source": "zip", "location": "/tmp/x.zip"},
               "train_augment": [{"name": "RandomHorizontalFlip", "params": {"p": 0.5}}]}
    cfg = common.config_from_widgets(widget_ctx, values, session)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.data.batch_size == 128 and cfg.data.val_fraction == pytest.approx(0.2)
    assert cfg.optim.lr == 0.05 and cfg.optim.grad_clip is None and cfg.optim.head_lr == 0.5
    assert cfg.optim.class_weights == "balanced" and cfg.early_stopping_patience == 4
    assert cfg.model.name == "resnet18"
    assert (cfg.data.source, cfg.data.location) == ("zip", "/tmp/x.zip")
    assert cfg.data.train_augment == session["train_augment"]


def test_widget_updates_show_a_runs_settings_again(widget_tabs):
    """After a reload the Train tab shows the settings its run was started with: the values
    widget_updates gives turn back into the same configuration."""
    ctx = widget_tabs.ctx
    widgets = widget_tabs.train.settings
    assert _widget(ctx, "epochs") in widgets and _widget(ctx, "model.name") not in widgets   # this tab's only
    values = _defaults(ctx)
    values.update({_widget(ctx, "epochs"): 7, _widget(ctx, "optim.lr"): 0.05, _widget(ctx, "optim.scheduler"): "step",
                   _widget(ctx, "optim.grad_clip"): 2.5, _widget(ctx, "optim.class_weights"): "balanced",
                   _widget(ctx, "early_stopping_patience"): 3, _widget(ctx, "data.batch_size"): "16"})
    config = common.config_from_widgets(ctx, values)
    updates = common.widget_updates(ctx, widgets, config)
    shown = {w: u["value"] for w, u in zip(widgets, updates)}
    assert shown[_widget(ctx, "epochs")] == 7 and shown[_widget(ctx, "optim.class_weights")] == "balanced"
    assert common.config_from_widgets(ctx, {**values, **shown}).to_dict() == config.to_dict()
    # "not set" comes back as the widgets' own way of saying it, and a list of weights is left alone
    plain = common.config_from_widgets(ctx, _defaults(ctx))
    plain.optim.class_weights = [1.0, 2.0]
    shown = dict(zip(widgets, common.widget_updates(ctx, widgets, plain)))
    assert shown[_widget(ctx, "optim.grad_clip")]["value"] == 0
    assert shown[_widget(ctx, "early_stopping_patience")]["value"] == 0
    assert "value" not in shown[_widget(ctx, "optim.class_weights")]


def test_split_sliders_that_a_predefined_split_makes_moot_are_locked(widget_ctx, tiny_folder):
    from core import datasets

    split_sliders = tab_data.DataTab(widget_ctx).split_sliders
    own_test = datasets.load_dataset("folder", tiny_folder)          # train/ and test/ folders
    val, test = split_sliders({"dataset": own_test})
    assert val["interactive"] is True and test["interactive"] is False
    assert "its own test set (30 images)" in test["info"]
    val, test = split_sliders({})                                     # nothing loaded yet
    assert val["interactive"] is True and test["interactive"] is True


def test_config_from_widgets_missing_widgets_keep_defaults(widget_ctx):
    cfg = common.config_from_widgets(widget_ctx, {_widget(widget_ctx, "epochs"): 7})
    assert cfg.epochs == 7 and cfg.optim.lr == RunConfig().optim.lr and cfg.data.source == "sample"


@pytest.mark.parametrize("bad", ["abc", "", 12.5, None])
def test_typed_batch_size_that_is_not_a_number_is_a_user_error(widget_ctx, bad):
    values = _defaults(widget_ctx)
    values[_widget(widget_ctx, "data.batch_size")] = bad
    with pytest.raises(ConfigError, match="Batch size must be a whole number"):
        common.config_from_widgets(widget_ctx, values)


def test_invalid_widget_value_is_a_config_error_naming_the_field(widget_ctx):
    values = _defaults(widget_ctx)
    values[_widget(widget_ctx, "optim.momentum")] = 1.5
    with pytest.raises(ConfigError, match="optim.momentum"):
        common.config_from_widgets(widget_ctx, values)


# ---- the error policy ---------------------------------------------------------------------------
def test_safe_turns_a_lab_error_into_gr_error_with_its_message():
    @common.safe
    def handler(x):
        raise DataError(f"bad.zip is not a zip archive ({x}).")

    with pytest.raises(gr.Error) as info:
        handler(1)
    assert info.value.message == "bad.zip is not a zip archive (1)."
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert info.value.print_exception is False     # Gradio prints no trace in the server console


def test_safe_passes_gr_error_through_unchanged():
    original = gr.Error("Choose a .zip file to upload first.")

    @common.safe
    def handler():
        raise original

    with pytest.raises(gr.Error) as info:
        handler()
    assert info.value is original and original.print_exception is False
    assert original.duration == common.TOAST_S                      # every toast closes after as long


def test_safe_turns_an_unexpected_exception_into_a_short_internal_error(caplog):
    @common.safe
    def compute_things():
        return {}["missing"]

    with caplog.at_level(logging.ERROR, logger="ui.common"):
        with pytest.raises(gr.Error) as info:
            compute_things()
    msg = info.value.message
    assert msg.startswith("Internal error in compute_things: KeyError")
    assert "Traceback" not in msg and 'File "' not in msg and len(msg.splitlines()) == 1
    # ... while the server log keeps the full trace for the teacher
    assert any(r.exc_info and "compute_things" in r.getMessage() and r.name == "ui.common" for r in caplog.records)


def test_safe_wraps_generators_and_keeps_the_signature():
    @common.safe
    def gen(session: dict, request: gr.Request, progress=gr.Progress()):
        yield 1
        raise ConfigError("epochs must be a whole number >= 1, got 0.")

    # Gradio injects gr.Request / gr.Progress by looking at the signature: it must survive the wrapper.
    assert list(inspect.signature(gen).parameters) == ["session", "request", "progress"]
    assert inspect.isgeneratorfunction(gen)
    it = gen({}, None)
    assert next(it) == 1
    with pytest.raises(gr.Error, match="epochs must be a whole number"):
        next(it)


def test_safe_returns_values_unchanged():
    assert common.safe(lambda a, b=2: a + b)(1, b=5) == 6


# ---- small common helpers ------------------------------------------------------------------------
def test_who_is_the_login_then_a_signed_browser_token_then_the_session(tmp_path):
    from core import identity

    class Req:
        username = "ana"
        session_hash = "s1"

    class Anonymous:
        username = None
        session_hash = "s2"

    ctx = AppContext(manager=None, data_dir=tmp_path, runs_dir=tmp_path, secret="k" * 32, teacher=("tea", "pw"),
                     login=True)
    token = identity.sign(ctx.secret, "b1")
    assert common.who_is(ctx, Req(), token) == identity.Who("user:ana")
    assert common.who_is(ctx, Anonymous(), token) == identity.Who("browser:b1")
    # a raw id or a forged signature is only this session (a digest of its hash, never the hash)
    for bad in ("b1", "b1." + "0" * 64, None):
        assert common.who_is(ctx, Anonymous(), bad) == identity.Who(identity.session_owner("s2"))
    assert common.who_is(ctx, None, None).owner == "session:local"
    # the teacher: the --teacher login with --auth; a session signed in on the page without it
    Req.username = "tea"
    assert common.who_is(ctx, Req(), None) == identity.Who("user:tea", teacher=True)
    ctx.login, Req.username = False, "ana"
    ctx.teacher_sessions.add("s2")
    assert common.who_is(ctx, Anonymous(), token) == identity.Who("browser:b1", teacher=True)


def test_formatting_helpers():
    assert common.fmt_seconds(None) == "–"
    assert common.fmt_seconds(75) == "1:15"
    assert common.fmt_seconds(3725) == "1:02:05"
    assert common.none_if_empty(0) is None and common.none_if_empty("") is None
    assert common.none_if_empty(0.3) == 0.3


# ---- Train tab rendering on the events of a real run ----------------------------------------------
@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_folder):
    tmp = tmp_path_factory.mktemp("handler-run")
    manager = JobManager(runs_dir=tmp / "runs", data_dir=tmp / "data", max_jobs=1)
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                                  "model": {"name": "tutorial_net"}, "epochs": 2, "device": "cpu", "seed": 1})
    job = manager.submit(config, owner="browser:test")
    manager.wait(job.job_id, timeout=180)
    assert job.status == ev.FINISHED, job.message
    ctx = AppContext(manager=manager, data_dir=tmp / "data", runs_dir=tmp / "runs")
    yield ctx, job
    manager.shutdown(timeout=10)


def test_a_resumed_run_keeps_its_earlier_curves_and_says_where_it_resumed(tmp_path, tiny_folder, monkeypatch):
    """Stopped in the middle of epoch 2, resumed: the curves still start at epoch 1 and the log says
    where the run went on from."""
    from core.trainer import fit

    monkeypatch.setattr("core.trainer.REPORT_EVERY_S", 0.0)   # a BatchEnded for every batch

    runs_dir = tmp_path / "runs"
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16,
                                           "num_workers": 0},
                                  "model": {"name": "tutorial_net"}, "epochs": 3, "device": "cpu", "seed": 1})
    batches = []
    first = fit(config, runs_dir=runs_dir, data_dir=tmp_path / "data",
                on_event=lambda e: batches.append(e) if isinstance(e, ev.BatchEnded) else None,
                should_stop=lambda: any(b.epoch == 2 and b.batch >= 3 for b in batches))
    assert first.status == ev.STOPPED
    manager = JobManager(runs_dir=runs_dir, data_dir=tmp_path / "data", max_jobs=1)
    job = manager.submit(config, owner="browser:test", resume_from=first.run_dir / "last.pth")
    manager.wait(job.job_id, timeout=180)
    assert job.status == ev.FINISHED, job.message
    ctx = AppContext(manager=manager, data_dir=tmp_path / "data", runs_dir=runs_dir)
    status, progress, fig, log = tab_train._render(ctx, job, {})
    per_epoch = [t for t in fig.data if "(per epoch)" in (t.name or "") and t.name.startswith("train")]
    assert per_epoch and sorted(set(per_epoch[0].x)) == [1, 2, 3]          # epoch 1 came from before the stop
    per_step = [t for t in fig.data if "per step" in (t.name or "")]
    steps = np.concatenate([np.asarray(t.x, dtype=float) for t in per_step])
    assert steps.min() < 1.0                                               # steps of epoch 1 are drawn too
    assert "note: resumed from last.pth: 1 epoch(s) done and 3 batch(es) of epoch 2" in log
    manager.shutdown(timeout=10)


def _partial_snapshot(job, upto: int, status=ev.RUNNING) -> dict:
    """The snapshot the UI would have polled after the first ``upto`` events of ``job``."""
    events = list(job.events[:upto])
    message = [e.message for e in events if isinstance(e, ev.StatusChanged)][-1]
    partial = Job(job_id=job.job_id, config=job.config, owner=job.owner, status=status, message=message,
                  events=events)
    return partial.snapshot()


def test_progress_html_before_any_run():
    html = tab_train._progress_html(None)
    assert 'style="width:0%"' in html and "No run yet." in html


def test_progress_html_mid_run_and_finished(finished_job):
    ctx, job = finished_job
    batch_idx = [i for i, e in enumerate(job.events) if isinstance(e, ev.BatchEnded)]
    assert batch_idx, "the run reported no batches"
    mid = _partial_snapshot(job, batch_idx[0] + 1)
    html = tab_train._progress_html(mid)
    first = job.events[batch_idx[0]]
    pct = float(re.search(r"width:([\d.]+)%", html).group(1))
    assert 0 < pct < 100
    assert f"epoch {first.epoch}/2" in html and f"batch {first.batch}/{first.batches}" in html
    assert "ETA" in html and "images/s" in html

    done = tab_train._progress_html(job.snapshot())
    assert "width:100.0%" in done and "100% — epoch 2/2" in done and "finished" in done
    assert "ETA" not in done

    queued = _partial_snapshot(job, 1, status=ev.QUEUED)  # only the StatusChanged(queued) event
    assert "No run yet." in tab_train._progress_html(queued)


def test_log_text_tells_the_story_of_the_run(finished_job):
    _, job = finished_job
    log = tab_train._log_text(list(job.events))
    lines = log.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d  ", line) for line in lines)
    text = "\n".join(lines)
    assert "queued: waiting for a free training slot" in text
    assert re.search(r"started on cpu: \d+ train / \d+ val / 30 test images, input 3×32×32", text)
    assert re.search(r"epoch 1/2: train loss \d\.\d{3}, train acc [\d.]+%, val loss", text)
    assert "epoch 2/2" in text and re.search(r"test accuracy [\d.]+% \(95 % CI [\d.]+–[\d.]+ %, 30 images\), macro F1", text)
    assert lines[0].split("  ", 1)[1].startswith("finished:")       # newest first
    assert lines[-1].split("  ", 1)[1].startswith("queued:")
    # BatchEnded events are not logged line by line (the plot shows them)
    assert not any(re.search(r"\bbatch \d+/\d+|BatchEnded", line) for line in lines)
    assert len(lines) == sum(1 for e in job.events if not isinstance(e, ev.BatchEnded)) + sum(
        len(e.notes) for e in job.events if isinstance(e, ev.RunStarted))


def test_status_text_finished_queued_and_starting(finished_job):
    ctx, job = finished_job
    text = tab_train._status_text(ctx, job, job.snapshot())
    assert text.startswith(f"Finished — tutorial_net — run {job.job_id}: finished 2 epoch(s)")
    # a job taken from the queue whose thread has not reported yet must not read "position None"
    starting = Job(job_id="j-start", config=job.config, owner="x")
    text = tab_train._status_text(ctx, starting, starting.snapshot())
    assert text.startswith("Starting — tutorial_net — run j-start") and "None" not in text


def test_status_text_while_training_says_where_the_run_is(finished_job):
    ctx, job = finished_job
    first_batch = next(i for i, e in enumerate(job.events) if isinstance(e, ev.BatchEnded))
    mid = _partial_snapshot(job, first_batch + 1)
    assert mid["message"] == "preparing data and model"  # the trainer's last status message ...
    text = tab_train._status_text(ctx, job, mid)
    assert text == f"Training — tutorial_net — run {job.job_id}: epoch 1/2"  # ... is not what we show
    last_epoch = max(i for i, e in enumerate(job.events) if isinstance(e, ev.EpochEnded))
    testing = tab_train._status_text(ctx, job, _partial_snapshot(job, last_epoch + 1))
    assert testing.endswith(": final evaluation of the best weights")


def test_status_text_of_a_crashed_training_process_gives_the_reason(tmp_path):
    """A run whose process dies (here a segfault) shows the reason in words on the Train tab."""
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1,
                         fit=job_fits.segfault_fit)
    ctx = AppContext(manager=manager, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs")
    job = manager.wait(manager.submit(RunConfig(), owner="a").job_id, timeout=60)
    text = tab_train._status_text(ctx, job, job.snapshot())
    assert text.startswith(f"Failed — tutorial_net — run {job.job_id}: The training process crashed "
                           "(segmentation fault, signal 11, SIGSEGV)"), text


def test_status_text_shows_the_queue_position(tiny_folder, tmp_path):
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1,
                         fit=job_fits.fit_until_released)
    ctx = AppContext(manager=manager, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs")
    try:
        first = manager.submit(RunConfig(), owner="a")
        deadline = time.time() + 10
        while first.status != ev.RUNNING and time.time() < deadline:
            time.sleep(0.02)
        second = manager.submit(RunConfig(), owner="b")
        third = manager.submit(RunConfig(), owner="c")
        assert tab_train._status_text(ctx, second, second.snapshot()).startswith(
            "Queued: position 1 — 1 run(s) training on this server (at most 1 at a time)")
        assert tab_train._status_text(ctx, third, third.snapshot()).startswith("Queued: position 2")
        assert tab_train._status_text(ctx, first, first.snapshot()).startswith("Training — tutorial_net")
    finally:
        job_fits.release(tmp_path / "runs")
        manager.shutdown(timeout=10)


def _train_tab(tmp_path, fit):
    """A Train tab over a job manager that runs ``fit`` (tests/job_fits.py): (manager, ctx, poll)."""
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1, fit=fit)
    ctx = AppContext(manager=manager, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", secret="k" * 32)
    with gr.Blocks():
        ctx.session = gr.State({})
        ctx.browser_id = gr.BrowserState(None)
        tab = tab_train.build(ctx)
    return manager, ctx, tab.poll


def test_a_queued_page_renders_only_when_its_place_in_the_queue_moves(tmp_path, monkeypatch):
    """30 students with queued runs poll every second: a queued page is redrawn when its place
    changes, not at every tick."""
    from core import identity
    manager, ctx, poll = _train_tab(tmp_path, job_fits.fit_until_released)
    try:
        first = manager.submit(RunConfig(), owner="browser:a")
        second = manager.submit(RunConfig(), owner="browser:b")
        mine = manager.submit(RunConfig(), owner="browser:c")
        token, session = identity.sign(ctx.secret, "c"), {}
        assert poll(session, token, None)[0].startswith("Queued: position 2")

        def no_snapshot():
            raise AssertionError("a poll with nothing new built a snapshot")

        monkeypatch.setattr(mine, "snapshot", no_snapshot)
        assert poll(session, token, None)[:4] == (gr.skip(),) * 4
        monkeypatch.undo()
        manager.stop(second.job_id)   # the run ahead leaves the queue: this page moves up
        assert poll(session, token, None)[0].startswith("Queued: position 1")
        assert first.status in (ev.QUEUED, ev.RUNNING)
    finally:
        job_fits.release(tmp_path / "runs")
        manager.shutdown(timeout=10)


def test_poll_keeps_polling_when_the_run_ends_while_it_renders(tmp_path, monkeypatch):
    """Regression: the timer was switched off from job.done read *after* rendering, so a run that
    ended during a render left the page on "Training … final evaluation" for good."""
    manager, ctx, poll = _train_tab(tmp_path, job_fits.fit_until_released)
    from core import identity
    b1 = identity.sign(ctx.secret, "b1")   # the page's token for browser id b1
    try:
        job = manager.submit(RunConfig(), owner="browser:b1")
        deadline = time.time() + 10
        while job.status != ev.RUNNING and time.time() < deadline:
            time.sleep(0.02)
        session = {}
        real_plot = tab_train.plots.live_curves

        def plot_while_the_run_ends(*args, **kwargs):
            job_fits.release(tmp_path / "runs")
            manager.wait(job.job_id, timeout=10)
            return real_plot(*args, **kwargs)

        monkeypatch.setattr(tab_train.plots, "live_curves", plot_while_the_run_ends)
        status, _, _, _, timer = poll(session, b1, None)
        assert status.startswith("Training") and job.done
        assert timer.active is True, "the timer stopped although the page still shows a running job"
        monkeypatch.setattr(tab_train.plots, "live_curves", real_plot)
        status, progress, _, log, timer = poll(session, b1, None)
        assert status.startswith("Finished — tutorial_net") and timer.active is False
        assert "finished: finished 1 epoch(s)" in log
        *_, timer = poll(session, b1, None)  # nothing new: no redraw, timer stays off
        assert timer.active is False
    finally:
        job_fits.release(tmp_path / "runs")
        manager.shutdown(timeout=10)


def test_a_poll_with_nothing_new_reads_one_counter_and_renders_nothing(tmp_path, monkeypatch):
    """30 open pages poll every second: while a run has no news a poll must not build a snapshot,
    a plot or a log, yet keep the timer on; a stop request is news and is shown."""
    manager, ctx, poll = _train_tab(tmp_path, job_fits.stubborn_fit)   # ignores the stop: the page stays on Stopping
    from core import identity
    b1 = identity.sign(ctx.secret, "b1")   # the page's token for browser id b1
    try:
        job = manager.submit(RunConfig(), owner="browser:b1")
        while job.status != ev.RUNNING:
            assert not job.done, job.message
            time.sleep(0.02)
        session = {}
        status, *_ = poll(session, b1, None)
        assert status.startswith("Training — tutorial_net")

        def no_snapshot():
            raise AssertionError("a poll with nothing new built a snapshot")

        monkeypatch.setattr(job, "snapshot", no_snapshot)
        assert poll(session, b1, None) == (gr.skip(),) * 5   # the timer output skipped too: it stays on
        monkeypatch.undo()
        job.request_stop()
        status, *_, timer = poll(session, b1, None)
        assert status.startswith("Stopping — tutorial_net") and timer.active is True
    finally:
        job_fits.release(tmp_path / "runs")
        manager.shutdown(timeout=10)


def test_render_gives_status_progress_plot_and_log(finished_job):
    ctx, job = finished_job
    session = {}
    status, progress, fig, log = tab_train._render(ctx, job, session)
    assert status.startswith("Finished") and "100%" in progress and "epoch 2/2" in log
    names = {t.name for t in fig.data}
    assert fig.data and any("train" in (n or "") for n in names)


def test_current_job_finds_the_owner_latest_run(finished_job):
    ctx, job = finished_job
    session = {}
    assert tab_train._current_job(ctx, session, "browser:test") is job
    assert session["job_id"] == job.job_id
    assert tab_train._current_job(ctx, {}, "browser:someone-else") is None


@pytest.mark.parametrize("value,expected", [(64, 64), ("32", 32), (" 256 ", 256), (128.0, 128)])
def test_whole_batch_size_accepts_typed_numbers(value, expected):
    assert tab_train._whole_batch_size(value) == expected


# ---- Data, Model and Predict helpers -------------------------------------------------------------
def test_thumb_scales_small_images_up_with_visible_pixels():
    img = Image.new("RGB", (32, 32))
    img.putpixel((0, 0), (255, 0, 0))
    img.putpixel((31, 31), (0, 0, 255))
    big = tab_data._thumb(img)
    assert big.size == (96, 96)
    # NEAREST: each source pixel becomes a crisp 3×3 block, no blur
    assert {big.getpixel((x, y)) for x in range(3) for y in range(3)} == {(255, 0, 0)}
    assert big.getpixel((3, 3)) == (0, 0, 0) and big.getpixel((95, 95)) == (0, 0, 255)


def test_thumb_keeps_large_images_and_aspect_ratio():
    large = Image.new("RGB", (200, 100))
    assert tab_data._thumb(large) is large
    odd = tab_data._thumb(Image.new("L", (30, 50)))
    assert odd.size == (120, 200) and odd.mode == "L"


def test_steps_table():
    df = tab_data._steps_table([{"name": "RandomCrop", "params": {"size": 32, "padding": 4}},
                                {"name": "RandomHorizontalFlip"}])
    assert list(df.columns) == tab_data.STEP_COLUMNS
    assert df.values.tolist() == [[1, "RandomCrop", '{"size": 32, "padding": 4}'], [2, "RandomHorizontalFlip", "{}"]]
    assert tab_data._steps_table(None).empty


def test_model_shape_follows_the_loaded_dataset(tiny_folder, session_data_dir):
    from core import datasets

    assert tab_model.model_shape({}, "tutorial_net", True) == (10, 3, (32, 32))
    ds = datasets.load_dataset("folder", str(tiny_folder), data_dir=session_data_dir)
    classes, channels, size = tab_model.model_shape({"dataset": ds}, "tutorial_net", True)
    assert (classes, channels, tuple(size)) == (3, 3, (32, 32))


def test_predict_image_input_reports_an_unreadable_upload_plainly(tmp_path):
    from gradio.data_classes import ImageData

    bad = tmp_path / "holiday.jpg"
    bad.write_text("this is not a picture")
    comp = tab_predict.friendly_image_errors(gr.Image(type="pil", render=False))
    assert type(comp) is gr.Image  # a plain gr.Image: no component subclass (Gradio would write a .pyi)
    assert not list((ROOT / "ui").glob("*.pyi"))
    with pytest.raises(gr.Error) as info:
        comp.preprocess(ImageData(path=str(bad), orig_name="holiday.jpg"))
    assert info.value.message.startswith("holiday.jpg cannot be read as an image")
    assert "Traceback" not in info.value.message and "component" not in info.value.message
    good = comp.preprocess(ImageData(path=str(ROOT / "assets" / "examples" / "cat.jpg"), orig_name="cat.jpg"))
    assert isinstance(good, Image.Image) and good.mode == "RGB"
    assert comp.preprocess(None) is None
    # A session that gets a new value (an Examples click) holds a fresh instance built from the
    # component's properties: it must give the same plain message.
    rebuilt = gr.Image(**{**comp.constructor_args, "elem_classes": comp.elem_classes, "render": False})
    with pytest.raises(gr.Error) as again:
        rebuilt.preprocess(ImageData(path=str(bad), orig_name="holiday.jpg"))
    assert again.value.message.startswith("holiday.jpg cannot be read as an image")
    # an image input without the marker keeps Gradio's own behaviour
    with pytest.raises(Exception) as plain:
        gr.Image(type="pil", render=False).preprocess(ImageData(path=str(bad), orig_name="holiday.jpg"))
    assert not isinstance(plain.value, gr.Error)


def test_predict_examples_exist():
    assert len(tab_predict.EXAMPLES) == 10
    assert all(Path(p).is_file() for p in tab_predict.EXAMPLES)


# ---- app assembly and launch options --------------------------------------------------------------
def test_launch_kwargs_are_offline_and_private(tmp_path):
    kw = ui_app.launch_kwargs(tmp_path / "data", tmp_path / "runs")
    assert kw["enable_monitoring"] is False and kw["run_history"] is False
    assert kw["footer_links"] == ["settings"]
    # nothing served by path: the data and runs folders are not allowed but blocked
    assert kw["allowed_paths"] == []
    assert kw["blocked_paths"] == [str(tmp_path / "data"), str(tmp_path / "runs")]   # as given: Gradio quotes them
    # ...unless a folder holds Gradio's own cache (a runs folder of /tmp would block every upload)
    import tempfile
    assert ui_app.launch_kwargs(tempfile.gettempdir(), tmp_path / "runs")["blocked_paths"] == [str(tmp_path / "runs")]


def test_build_app_wires_the_named_endpoints_and_ids(tmp_path):
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1)
    demo = ui_app.build_app(manager, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs")
    api_names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    for name in ("load_data", "load_zip", "reshuffle", "split", "aug_add", "describe_model", "layer_table",
                 "memory", "start_training", "stop_training", "resume_training", "poll_training", "eval_runs",
                 "evaluate_run", "predict", "predict_many", "predict_runs"):
        assert name in api_names
    # gr.State(dict) would add a public "/dict" page-load endpoint that resets the session (a race)
    assert "dict" not in api_names
    ids = {b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for elem_id in ("data_gallery", "start_btn", "stop_btn", "train_status", "train_curves", "train_progress",
                    "eval_confusion", "predict_image", "predict_top5", "epochs", "batch_size"):
        assert elem_id in ids


def test_browser_ids_outlive_a_server_restart_and_page_loads_run_side_by_side(tmp_path):
    """Browser tokens are signed with a secret kept in the runs folder (not a new one per start) that
    the page never gets (Gradio publishes a BrowserState's secret: it gets a key derived from it),
    and events without their own limit are not queued one at a time app-wide (Gradio's default)."""
    runs = tmp_path / "runs"
    apps = []
    for _ in range(2):   # two server starts on the same runs folder
        manager = JobManager(runs_dir=runs, data_dir=tmp_path / "data", max_jobs=1)
        apps.append(ui_app.build_app(manager, data_dir=tmp_path / "data", runs_dir=runs))
    from core import identity
    keys = [next(b.secret for b in demo.blocks.values() if isinstance(b, gr.BrowserState)) for demo in apps]
    assert keys[0] == keys[1] and len(keys[0]) >= 16
    secret_file = runs / ui_app.SECRET_FILE
    secret = secret_file.read_text()
    assert len(secret) >= 16 and secret_file.stat().st_mode & 0o077 == 0  # owner only
    assert keys[0] == identity.storage_key(secret) and secret not in keys[0]
    config = str(apps[0].get_config_file())
    assert secret not in config                                           # the page never sees the signing key
    assert "AppContext(" not in config and "RunHistory" not in config     # nor the server's objects
    other = ui_app.build_app(JobManager(runs_dir=tmp_path / "other", max_jobs=1), runs_dir=tmp_path / "other")
    assert other.blocks is not None and (tmp_path / "other" / ui_app.SECRET_FILE).read_text() != secret
    assert apps[0]._queue.default_concurrency_limit == ui_app.DEFAULT_CONCURRENCY > 1


def test_launch_main_rejects_bad_arguments_with_a_message(capsys):
    import launch

    assert launch.main(["--auth", "teacher"]) == 2
    assert "USER:PASS" in capsys.readouterr().err
    assert launch.main(["--max-jobs", "0"]) == 2
    assert "--max-jobs must be at least 1" in capsys.readouterr().err
    assert launch.main(["--teacher", "tea"]) == 2
    assert "--teacher needs USER:PASS" in capsys.readouterr().err
    assert launch.main(["--auth", "tea:a", "--teacher", "tea:b"]) == 2
    assert "both name the user 'tea'" in capsys.readouterr().err
    assert launch.main(["--auth", "ana:1", "--auth", "ana:2"]) == 2
    assert "names the user 'ana' twice" in capsys.readouterr().err
    logins = launch.parse_args(["--auth", "ana:1", "--auth", "ben:2:x", "--teacher", "tea:3"])
    assert launch.parse_logins(logins) == ([("ana", "1"), ("ben", "2:x"), ("tea", "3")], ("tea", "3"))
    assert launch.parse_logins(launch.parse_args(["--teacher", "tea:3"])) == (None, ("tea", "3"))
    assert launch.main(["--train-threads", "0"]) == 2
    assert "--train-threads must be at least 1" in capsys.readouterr().err
    assert launch.default_train_threads("127.0.0.1", 1, cores=2) is None   # a laptop: every core trains
    assert launch.default_train_threads("0.0.0.0", 1, cores=2) == 1        # a class: a core for the pages
    assert launch.default_train_threads("0.0.0.0", 2, cores=9) == 4
    assert launch.default_train_threads("0.0.0.0", 4, cores=2) == 1
    args = launch.parse_args([])
    assert (args.host, args.port, args.share, args.private_runs, args.teacher) == ("127.0.0.1", 7860, False, False, None)
    assert launch.parse_args(["--private-runs", "--teacher", "t:p"]).private_runs is True


def test_after_a_restart_the_train_tab_offers_the_interrupted_run(finished_job, tmp_path):
    """The server died while a run trained: a new server on the same runs folder says so and offers
    Resume on the page of the browser that owned it, instead of 'Ready'; other browsers see nothing."""
    import json
    import shutil

    from core import identity
    from core.runs import RunHistory

    _, job = finished_job
    runs_dir = tmp_path / "runs"
    run_dir = runs_dir / job.job_id
    shutil.copytree(finished_job[0].runs_dir / job.job_id, run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    status.update(status="running", pid=2 ** 22 + 1)   # no such process: the writer is gone
    (run_dir / "status.json").write_text(json.dumps(status))
    meta = run_dir / "meta.json"   # the owner, as the first server's history recorded it
    meta.write_text(json.dumps({**(json.loads(meta.read_text()) if meta.exists() else {}), "owner": "browser:7e57"}))
    manager = JobManager(runs_dir=runs_dir, data_dir=tmp_path / "data", max_jobs=1)   # the restarted server
    ctx = AppContext(manager=manager, data_dir=tmp_path / "data", runs_dir=runs_dir, secret="k" * 32)
    ctx.history = RunHistory(runs_dir).attach(manager)
    with gr.Blocks() as demo:
        ctx.session = gr.State({})
        ctx.browser_id = gr.BrowserState(None)
        tab = tab_train.build(ctx)
        ctx.shared["tab"] = {}
        tab_train.on_load(ctx, demo)
    reconnect = tab.reconnect
    try:
        text, *_ = reconnect({}, identity.sign(ctx.secret, "7e57"), None)   # the page of browser 7e57
        assert text.startswith("Your last run (") and job.job_id in text
        assert "was interrupted (the server stopped while it was training)" in text and "Resume last run" in text
        other, *_ = reconnect({}, identity.sign(ctx.secret, "beef"), None)
        assert not isinstance(other, str)                                  # nothing offered to another browser
        forged, *_ = reconnect({}, "7e57", None)                           # nor to a raw, unsigned id
        assert not isinstance(forged, str)
    finally:
        manager.shutdown(timeout=10)


def test_a_refusal_toast_closes_by_itself():
    """Issue 12: toasts left open covered Stop, Resume and Compute; a refusal or an internal error
    is shown for common.TOAST_S seconds (the Train tab's Status keeps its refusals)."""
    from ui import common

    @common.safe
    def refuses():
        raise ConfigError("Batch size must be a whole number such as 64, got 'abc'.")

    @common.safe
    def breaks():
        raise RuntimeError("boom")

    for handler in (refuses, breaks):
        with pytest.raises(gr.Error) as err:
            handler()
        assert err.value.duration == common.TOAST_S and 0 < common.TOAST_S <= 15


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_a_finished_run_exports_from_the_train_tab_for_its_owner_only(finished_job, monkeypatch):
    """Issue 12: export from the finish state, not only from Compare → Run history."""
    from core import identity
    done, job = finished_job
    monkeypatch.setattr(job, "owner", "browser:7e57")   # a browser id a signed token can carry
    from core.runs import RunHistory
    ctx = AppContext(manager=done.manager, data_dir=done.data_dir, runs_dir=done.runs_dir, secret="k" * 32)
    ctx.history = RunHistory(ctx.runs_dir).attach(done.manager)   # as build_app does: it knows the owner
    with gr.Blocks():
        ctx.session = gr.State({})
        ctx.browser_id = gr.BrowserState(None)
        tab = tab_train.build(ctx)
    export = tab.export_finished
    mine, session = identity.sign(ctx.secret, "7e57"), {"job_id": job.job_id}
    (pth,) = map(Path, export("checkpoint", session, mine, None))
    assert pth.name == f"{job.job_id}-best.pth" and pth.is_file()
    assert [Path(f).name for f in export("torchscript", session, mine, None)] == [f"{job.job_id}.pt",
                                                                                   f"{job.job_id}.pt.json"]
    with pytest.raises(gr.Error, match="only its owner or the teacher can export it"):
        export("checkpoint", session, identity.sign(ctx.secret, "beef"), None)
    with pytest.raises(gr.Error, match="Export needs a finished run on this tab"):
        export("checkpoint", {}, mine, None)


def test_every_handler_is_safe_and_gets_its_request(tmp_path):
    """Every handler the app wires, the timer's poll and the page-load reconnect included, is under
    ui.common.safe (an exception becomes a message, the trace goes to the log); and Gradio still
    sees the gr.Request parameter of the handlers, bound methods now (it reads their type hints:
    one hint it cannot resolve would lose them all, and the handler would get no request)."""
    from gradio import utils
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1)
    demo = ui_app.build_app(manager, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", teacher=("t", "p"))
    fns = [f for f in demo.fns.values() if f.fn is not None]
    unsafe = {f.name for f in fns if not getattr(f.fn, "_lab_safe", False)
              and f.fn.__module__ != "gradio.helpers"}   # gr.Examples' own loader
    assert unsafe == set()
    assert "poll_training" in {f.api_name for f in fns}
    lost = {f.name for f in fns if "request" in inspect.signature(f.fn).parameters
            and not utils.is_special_typed_parameter("request", utils.get_type_hints(f.fn))}
    assert lost == set()
    config = str(demo.get_config_file())
    assert "AppContext(" not in config and "of <PageHandlers>>" in config   # a bound method: its class only


@pytest.mark.parametrize("package, module", [("ui", "tab_compare"), ("core", "runs")])
def test_a_broken_module_stops_the_app_instead_of_removing_its_tab(package, module, monkeypatch, tmp_path):
    """ui/app.py imported the Compare tab and the run history inside ``except ImportError``: a bug
    there silently removed the Compare tab (and the history). A broken import now stops the app."""
    import importlib
    import sys
    import ui

    monkeypatch.setattr(ui, "app", ui_app)               # a re-import would rebind it
    monkeypatch.delitem(sys.modules, "ui.app")
    monkeypatch.delattr(importlib.import_module(package), module)
    monkeypatch.setitem(sys.modules, f"{package}.{module}", None)   # importing it raises ImportError
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1)
    with pytest.raises(ImportError):
        app = importlib.import_module("ui.app")
        demo = app.build_app(manager, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs")
        tabs = {b.id for b in demo.blocks.values() if isinstance(b, gr.Tab)}
        pytest.fail(f"built without {package}.{module}: tabs {sorted(tabs)}")
