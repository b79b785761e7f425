"""Train tab: hyper-parameters, Start / Stop / Resume, live curves, progress and log.

Training runs in the engine's JobManager; this tab only submits jobs and polls them with a
gr.Timer (every POLL_S seconds), so closing or reloading the page never stops a run and a reloaded
page reconnects to it through the browser id (or the login name with --auth).

``TrainTab`` holds the handlers; ``layout`` lays out the widgets, ``wire`` connects them, and
``on_load`` adds what needs the whole page (the reconnect after a reload, See results / Try it).
"""
from __future__ import annotations

import dataclasses
import functools
import html
import itertools
import json
import re
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from core import cost, events as ev, lrfinder, recipes, rundir, runrecord, stats, trainer
from core.choices import OPTIMIZERS, PRECISIONS
from core.config import SCHEDULERS, OptimConfig, RunConfig
from core.errors import ConfigError, LabError
from core.identity import can_view, require_change
from core.resume import Wording, plan_resume
from ui import plots
from ui.common import (AppContext, Controller, bind, config_from_widgets, fmt_seconds, md_text, none_if_empty,
                       safe, who_is, widget_updates)

POLL_S = 1.0  # the issue asks for plots that update at least every 2 s; the notes advise ≤ 4 Hz
NEXT_STEPS = "Next: see the results on Evaluate, try it on Predict, export it below (or later from Compare → Run history)."
EXPORT_KINDS = [("Checkpoint (.pth)", "checkpoint"), ("TorchScript (.pt)", "torchscript"), ("ONNX (.onnx)", "onnx")]
# ETA (eta_seconds): an image through the model without the backward pass (validation, final
# evaluation) costs roughly a third of a training image; the speed is taken from the recent reports
# and epochs only, so that the ETA follows a real change (another run starts on the same device).
EVAL_COST = 0.35
RECENT_EPOCHS = 5
RECENT_REPORTS = 100   # BatchEnded come at most ~4 a second: about the last half minute of batches
_D, _O = RunConfig(), OptimConfig()
# The learning-rate finder trains in the server process (a few seconds to a minute): a fixed number
# of steps, one finder at a time (concurrency_id "lr_finder"), and the memory check of a run first.
LR_FINDER_STEPS = 100
# From 1e-5, not fastai's 1e-7: the 100 steps then fall on rates a model can learn at (measured on the
# sample, tutorial net, SGD: from 1e-7 the loss stayed flat until the last 20 steps and no rate was
# suggested; from 1e-5 it suggested 0.35, minimum ÷ 10 = 0.035).
LR_FINDER_START = 1e-5
# The finder trains in the server process: it stops after this long whatever the model (a ViT-B/16 at
# 224 px took minutes on a 2-core CPU and could not be cancelled from the page).
LR_FINDER_MAX_S = 60
LR_FINDER_HELP = ("Not sure which learning rate? **Find a learning rate** trains a throw-away copy of the "
                  f"model for about {LR_FINDER_STEPS} batches while the rate rises from 0.00001 to 10, "
                  "and suggests the rate where the loss fell fastest.")
RECIPE_HELP = ("Settings are set from a **recipe** for your data and model when you open this tab after "
               "changing either; change any of them. **Recommended settings** puts the recipe back.")
COST_HELP = ("**Estimate time** times a few real training steps of these settings on this machine (about "
             "3 s) and says how long an epoch and the whole run will take; while the run trains, the "
             "progress line compares its epochs with the estimate.")
# "Train for": the time budget (RunConfig.time_budget_s) as the dashboard offers it
BUDGETS = [("the epochs set", "epochs"), ("1 minute", "60"), ("5 minutes", "300"), ("15 minutes", "900"),
           ("1 hour", "3600")]
RECORD_HELP = ("Once per epoch, the spread of every layer's weights and the size of its gradients, for "
               "the Look inside tab. Costs under 1 % of the training time (measured: 3 ms more on a "
               "0.3 s tutorial-net epoch, 0.2 s more on a 44 s ResNet-18 epoch).")


def _keeps_refusal(verb: str):
    """Decorate a Start/Resume handler: errors become messages as with ``safe`` (API clients still
    get the error), and the message is kept in the session as "<verb>: <message>" for the
    ``.failure`` listener (``show_refusal``) that writes it into the Status line."""
    def decorate(fn):
        guarded = safe(fn)

        @functools.wraps(fn)
        def wrapper(self, values: dict, *args, **kwargs):
            try:
                return guarded(self, values, *args, **kwargs)
            except gr.Error as err:
                values[self.ctx.session]["refusal"] = f"{verb}: {err.message}"
                raise
        wrapper._lab_safe = True
        return wrapper
    return decorate


class TrainTab(Controller):
    """The Train tab's handlers. ``settings``: the tab's config widgets, in order (a reconnected
    page shows the settings its run was started with)."""

    def __init__(self, ctx: AppContext, settings: list | None = None):
        super().__init__(ctx)
        self.settings = list(settings or [])
        self.recipe_widgets: list = []   # the bound widgets of the recipe's fields (set in on_load: all tabs)

    @_keeps_refusal("Not started")
    def start_run(self, values: dict, request: gr.Request):
        ctx = self.ctx
        session, browser_id = values[ctx.session], values[ctx.browser_id]
        config = page_config(ctx, values)
        owner = who_is(ctx, request, browser_id).owner
        current = _current_job(ctx, session, owner)
        if current is not None and not current.done:
            raise gr.Error("This browser already has a run in progress: stop it first.")
        job = ctx.manager.submit(config, owner=owner)
        return self._follow(job, session)

    @_keeps_refusal("Not resumed")
    def resume_run(self, values: dict, request: gr.Request):
        ctx = self.ctx
        session, browser_id = values[ctx.session], values[ctx.browser_id]
        who = who_is(ctx, request, browser_id)
        current = _current_job(ctx, session, who.owner)
        if current is not None and not current.done:
            raise gr.Error("A run is already in progress: stop it first.")
        last = _last_run(ctx, session, who.owner)
        if last is None:
            raise gr.Error("Nothing to resume: this browser has no run yet. Press Start to train one.")
        run_dir, status, label, run_owner = last
        wanted = config_from_widgets(ctx, values, session).epochs
        plan = plan_resume(run_dir, status=status, epochs=wanted, who=who, run_owner=run_owner,
                           wording=_resume_wording(label))
        job = ctx.manager.submit(plan.config, owner=plan.owner, resume_from=plan.checkpoint)
        return self._follow(job, session)

    def _follow(self, job, session: dict):
        """This page shows ``job`` from now on: its first render, and the timer on."""
        session["job_id"] = job.job_id
        session["seen"] = -1
        return _render(self.ctx, job, session) + (gr.Timer(active=True),)

    @safe
    def stop_run(self, session: dict, browser_id: str | None, request: gr.Request):
        ctx = self.ctx
        who = who_is(ctx, request, browser_id)
        job = _current_job(ctx, session, who.owner)
        if job is None or job.done:
            return "No run in progress."
        require_change(job.owner, who, "stop")
        was_queued = ctx.manager.queue_position(job.job_id) is not None
        ctx.manager.stop(job.job_id)
        if was_queued:
            return "Removed from the queue before it started (nothing to resume)."
        return "Stopping after the current batch (a checkpoint is kept; Resume continues from it)..."

    @safe
    def find_lr(self, values: dict, progress=gr.Progress()):
        # The range test on the page's settings and dataset, as Start would train them (no docstring:
        # it would be the endpoint's API description).
        ctx = self.ctx
        session = values[ctx.session]
        config = page_config(ctx, values)
        # In this process: no loader worker processes forked from the server.
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, num_workers=0))
        progress(0, desc="Checking memory, preparing data and model")
        ctx.manager.check_fits(config, now=True)
        result = lrfinder.find_lr(config, data_dir=ctx.data_dir, steps=LR_FINDER_STEPS, start_lr=LR_FINDER_START,
                                  max_seconds=LR_FINDER_MAX_S,
                                  on_step=lambda done, total: progress((done, total), desc="Range test", unit="steps"))
        suggestion = float(f"{result.suggestion:.3g}") if result.suggestion is not None else None
        session["lr_suggestion"] = suggestion   # what Use puts into the Learning rate box
        return (gr.update(value=plots.lr_finder_curve(result.curve, suggestion), visible=True),
                lr_note(result, suggestion, config, session),
                gr.update(value=f"Use {suggestion:g}" if suggestion is not None else "Use", visible=suggestion is not None))

    @safe
    def recommend(self, values: dict):
        # Recommended settings: the recipe for the page's data and model into the settings it covers.
        return self._recipe_updates(values, force=True)

    @safe
    def recommend_if_changed(self, values: dict):
        # The Train tab opened: the recipe again only when the data or the model changed since the
        # last one this page applied (edits made since then stay). A setting that does not validate
        # leaves everything as it is (Start will say what is wrong).
        try:
            return self._recipe_updates(values, force=False)
        except LabError:
            return (gr.skip(),) * (1 + len(self.recipe_widgets))

    def _recipe_updates(self, values: dict, force: bool) -> tuple:
        ctx = self.ctx
        session = values[ctx.session]
        config = page_config(ctx, values)
        key = _recipe_key(config)
        if not force and session.get("recipe_key") == key:   # decided before any dataset is read
            return (gr.skip(),) * (1 + len(self.recipe_widgets))
        recipe = recipes.for_config(config, ctx.data_dir)
        updates = widget_updates(ctx, self.recipe_widgets, recipes.apply(config, recipe))
        session["recipe_key"] = key
        note = f"**{recipe.describe()}** Change any setting; Recommended settings puts the recipe back."
        return (note, *updates)

    @safe
    def estimate_cost(self, values: dict, progress=gr.Progress()):
        # Cost before Start: a few real steps of the page's settings timed in the server process (one
        # estimate at a time, sharing the LR finder's slot), after the memory check of the run.
        ctx = self.ctx
        session = values[ctx.session]
        config = page_config(ctx, values)
        key = _cost_key(config)
        # In this process: no loader worker processes forked from the server (the run's own may differ).
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, num_workers=0))
        progress(0, desc="Checking memory, preparing data and model, timing a few steps")
        ctx.manager.check_fits(config, now=True)
        est, prepared_s = trainer.estimate_cost(config, ctx.data_dir)
        session["cost"] = {"key": key, "train_seconds": est.train_seconds}
        if config.time_budget_s:
            epochs = cost.plan_epochs(est, config.time_budget_s, prepared_s + est.measure_seconds)
            plan = f" With the time budget the run plans **{epochs} epoch{'s' * (epochs != 1)}**."
        else:
            epochs, plan = config.epochs, ""
        return (f"**Time:** {est.describe(epochs)}; preparing the data took {prepared_s:.1f} s.{plan} Of an epoch, "
                f"training takes ≈ {cost.duration(est.train_seconds)}: the progress line compares the run's epochs "
                f"with that (within ±{cost.STATED_ERROR:.0%} from the second epoch on an otherwise idle machine).")

    @safe
    def use_lr(self, session: dict):
        """The learning rate the finder suggested on this page, into the Learning rate box."""
        suggestion = (session or {}).get("lr_suggestion")
        if suggestion is None:
            raise ConfigError("No suggested learning rate yet: press Find a learning rate first.")
        return suggestion

    @safe
    def poll(self, session: dict, browser_id: str | None, request: gr.Request):
        ctx = self.ctx
        who = who_is(ctx, request, browser_id)
        job = _current_job(ctx, session, who.owner)
        if job is None or not can_view(job.owner, who, ctx.private_runs):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        # Nothing new since the last render: a counter (and, while queued, the place in the queue,
        # which other jobs move) read, no snapshot, no plot: 30 open pages poll every second.
        place = ctx.manager.queue_position(job.job_id) if job.status == ev.QUEUED else None
        if session.get("seen") == job.changes and session.get("seen_place") == place:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), (gr.Timer(active=False) if job.done else gr.skip())
        done = job.done  # read before rendering: a run that ends meanwhile is shown by the next tick
        rendered = _render(ctx, job, session)
        session["seen_place"] = place
        return rendered + (gr.Timer(active=not done),)

    @safe
    def reconnect(self, session: dict, browser_id: str | None, request: gr.Request):
        """After a reload: this browser's latest job, polled again, with the settings it was started
        with; after a server restart, the run that was cut short is offered instead."""
        ctx = self.ctx
        owner = who_is(ctx, request, browser_id).owner
        job = _current_job(ctx, session, owner)
        if job is None:
            text = _resumable_note(ctx, session, owner)
            return ((gr.skip() if text is None else text, gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False))
                    + (gr.skip(),) * len(self.settings))
        session["seen"] = -1
        session["recipe_key"] = _recipe_key(job.config)   # the settings shown are the run's: no recipe over them
        done = job.done  # before rendering (see poll)
        return (_render(ctx, job, session) + (gr.Timer(active=not done),)
                + tuple(widget_updates(ctx, self.settings, job.config)))

    @safe
    def show_refusal(self, session: dict):
        """The Status line after a refused Start / Resume: the refusal, which the toast also shows."""
        return session.pop("refusal", None) or "The last request was refused: the message at the top right says why."

    @safe
    def show_next_steps(self, session: dict):
        """The See results / Try it / Export row shows while the tab shows a finished run."""
        job = self.ctx.manager.find(session.get("job_id") or "")
        return gr.update(visible=job is not None and job.status == ev.FINISHED)

    @safe
    def export_finished(self, kind_value: str, session: dict, browser_id, request: gr.Request):
        # Export from the finish state (as from Compare → Run history): the run this tab shows,
        # when it finished, for its owner or the teacher (tab_compare.export_files checks). No
        # docstring: it would be the endpoint's API description.
        from ui.tab_compare import export_files
        job = self.ctx.manager.find((session or {}).get("job_id") or "")
        if job is None or job.status != ev.FINISHED:
            raise ConfigError("Export needs a finished run on this tab: train one first, or export an older run "
                              "from Compare → Run history.")
        return export_files(self.ctx, job.job_id, kind_value, who_is(self.ctx, request, browser_id))


@safe
def _plateau_only(scheduler: str):
    """The plateau schedule's patience is shown with that schedule only."""
    return gr.update(visible=scheduler == "plateau")


def _open_tab(tab_id: str, refresh_runs=None):
    """The handler that selects the tab ``tab_id``; with ``refresh_runs`` (a tab's run-list
    refresher), it also returns that tab's refreshed run list."""
    if refresh_runs is None:
        def open_tab():
            return gr.Tabs(selected=tab_id)
    else:
        def open_tab(session, current, browser_id, request: gr.Request):
            return gr.Tabs(selected=tab_id), refresh_runs(session, current, browser_id, request)
    open_tab.__name__ = open_tab.__qualname__ = f"open_{tab_id}"
    return safe(open_tab)


# ---- layout --------------------------------------------------------------------------------
def layout(ctx: AppContext) -> SimpleNamespace:
    """The tab's widgets; ``settings``: the config widgets it binds, in order."""
    w = SimpleNamespace()
    bound_before = set(ctx.config_fields)
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            gr.Markdown("### Hyper-parameters")
            _main_settings(ctx, w)
            with gr.Accordion("More settings", open=False):
                _more_settings(ctx)
        with gr.Column(scale=2):
            _run_view(w)
    w.settings = [x for x in ctx.config_fields if x not in bound_before]
    w.timer = gr.Timer(POLL_S, active=False)
    return w


def _budget_seconds(value) -> float | None:
    return None if value in (None, "", "epochs") else float(value)


def _budget_choice(seconds):
    if seconds is None:
        return "epochs"
    text = f"{seconds:g}"
    return text if text in dict((v, k) for k, v in BUDGETS) else gr.skip()


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _main_settings(ctx: AppContext, w: SimpleNamespace) -> None:
    w.recipe_note = gr.Markdown(RECIPE_HELP, elem_id="recipe_note")
    w.recipe_btn = gr.Button("Recommended settings", size="sm", elem_id="recipe_btn")
    with gr.Row():
        bind(ctx, gr.Slider(1, 200, value=_D.epochs, step=1, label="Epochs", elem_id="epochs"), "epochs")
        bind(ctx, gr.Dropdown(BUDGETS, value="epochs", label="Train for", elem_id="time_budget",
                              info="a time budget plans the epochs (and the schedule) from this machine's speed"),
             "time_budget_s", _budget_seconds, restore=_budget_choice)
    with gr.Row():
        bind(ctx, gr.Dropdown([4, 8, 16, 32, 64, 128, 256, 512], value=_D.data.batch_size,
                              label="Batch size", allow_custom_value=True, elem_id="batch_size"),
             "data.batch_size", _whole_batch_size)
        bind(ctx, gr.Dropdown(OPTIMIZERS.names(), value=_O.optimizer, label="Optimizer",
                              elem_id="optimizer"), "optim.optimizer")
        w.lr = bind(ctx, gr.Number(_O.lr, label="Learning rate", minimum=0, elem_id="lr"), "optim.lr")
    _lr_finder(w)
    with gr.Row():
        w.scheduler = bind(ctx, gr.Dropdown(list(SCHEDULERS), value=_O.scheduler, label="LR schedule",
                                            elem_id="scheduler"), "optim.scheduler")
        bind(ctx, gr.Number(_O.warmup_epochs, label="Warm-up epochs", precision=0, minimum=0),
             "optim.warmup_epochs", int)
        w.patience = bind(ctx, gr.Number(_O.plateau_patience, label="Plateau patience (epochs)", precision=0,
                                         minimum=0, visible=_O.scheduler == "plateau",
                                         elem_id="plateau_patience"), "optim.plateau_patience", int)


def _lr_finder(w: SimpleNamespace) -> None:
    """Find a learning rate / Use …, the finder's note (where its progress shows) and its plot."""
    with gr.Row():
        w.lr_find_btn = gr.Button("Find a learning rate", size="sm", elem_id="lr_find_btn")
        w.lr_use_btn = gr.Button("Use", size="sm", variant="primary", visible=False, elem_id="lr_use_btn")
    w.lr_find_note = gr.Markdown(LR_FINDER_HELP, elem_id="lr_find_note")
    w.lr_find_plot = gr.Plot(None, label="Learning-rate finder: loss against learning rate", visible=False,
                             elem_id="lr_find_plot")


def _more_settings(ctx: AppContext) -> None:
    with gr.Row():
        bind(ctx, gr.Number(_O.momentum, label="Momentum", minimum=0, maximum=0.999), "optim.momentum")
        bind(ctx, gr.Checkbox(_O.nesterov, label="Nesterov"), "optim.nesterov")
    with gr.Row():
        bind(ctx, gr.Number(_O.weight_decay, label="Weight decay", minimum=0), "optim.weight_decay")
        bind(ctx, gr.Number(_O.label_smoothing, label="Label smoothing", minimum=0, maximum=0.99),
             "optim.label_smoothing")
    with gr.Row():
        bind(ctx, gr.Number(_O.accumulation_steps, label="Gradient accumulation (batches)",
                            precision=0, minimum=1), "optim.accumulation_steps", int)
        bind(ctx, gr.Number(0, label="Gradient clipping (max norm, 0 = off)", minimum=0),
             "optim.grad_clip", none_if_empty, restore=lambda v: v or 0)
    with gr.Row():
        bind(ctx, gr.Dropdown(["none", "balanced"], value="none", label="Class weights"),
             "optim.class_weights", lambda v: None if v == "none" else v,
             restore=lambda v: "none" if v is None else v if v == "balanced" else gr.skip())
        bind(ctx, gr.Number(0, label="Early stopping patience (0 = off)", precision=0, minimum=0),
             "early_stopping_patience", lambda v: none_if_empty(int(v or 0)), restore=lambda v: v or 0)
    with gr.Row():
        bind(ctx, gr.Dropdown(["auto", "cpu", "cuda", "mps"], value=_D.device, label="Device",
                              allow_custom_value=True, elem_id="device"), "device")
        bind(ctx, gr.Dropdown(PRECISIONS.names(), value=_D.precision, label="Precision"), "precision")
    with gr.Row():
        bind(ctx, gr.Number(_D.seed, label="Seed", precision=0), "seed", int)
        bind(ctx, gr.Checkbox(_D.deterministic, label="Deterministic"), "deterministic")
    gpus = _gpu_count() if getattr(ctx.manager, "multi_gpu_jobs", False) else 0   # off on a class's server
    bind(ctx, gr.Checkbox(_D.multi_gpu, label=f"Use all {gpus} GPUs (torchrun: one process per GPU)", visible=gpus > 1,
                          info="data-parallel training; the batch size is the global batch over all GPUs",
                          elem_id="multi_gpu"), "multi_gpu")
    bind(ctx, gr.Checkbox(_D.compile, label="Compile the model (torch.compile)",
                          info="10–70 s of compiling first; pays for long runs of bigger models only"), "compile")
    bind(ctx, gr.Radio(["auto", "on", "off"], value=_D.data.in_memory,
                       label="Hold small datasets in memory (faster on CPU)"), "data.in_memory")
    bind(ctx, gr.Checkbox(_D.tensorboard, label="TensorBoard log",
                          info="also write a TensorBoard log in the run folder "
                               "(then: tensorboard --logdir runs/)"), "tensorboard")
    bind(ctx, gr.Checkbox(_D.record_distributions, label="Record weight and gradient distributions (for Look inside)",
                          info=RECORD_HELP, elem_id="record_distributions"), "record_distributions")


def _run_view(w: SimpleNamespace) -> None:
    """Start / Stop / Resume, the Status line, the finish row, progress, curves and log."""
    with gr.Row():
        w.start = gr.Button("Start training", variant="primary", elem_id="start_btn")
        w.stop = gr.Button("Stop", variant="stop", elem_id="stop_btn")
        w.resume = gr.Button("Resume last run", elem_id="resume_btn")
    with gr.Row():
        w.cost_note = gr.Markdown(COST_HELP, elem_id="cost_note")
        w.cost_btn = gr.Button("Estimate time", size="sm", scale=0, min_width=150, elem_id="cost_btn")
    w.status = gr.Textbox(label="Status", interactive=False, elem_id="train_status",
                          elem_classes="lab-status", value="Ready. Press Start to train.")
    with gr.Row(visible=False, elem_id="train_next") as w.next_row:
        w.see_results = gr.Button("See results", size="sm", elem_id="see_results_btn")
        w.try_it = gr.Button("Try it", size="sm", elem_id="try_it_btn")
        w.look_inside = gr.Button("Look inside", size="sm", elem_id="look_inside_btn")
        w.export_kind = gr.Dropdown(EXPORT_KINDS, value="checkpoint", show_label=False, container=False,
                                    elem_id="finish_export_kind")
        w.export_btn = gr.Button("Export", size="sm", elem_id="finish_export_btn")
        w.export_out = gr.File(label="Exported files", file_count="multiple", interactive=False,
                               elem_id="finish_export_files", height=140)   # a model and its .json
    w.progress = gr.HTML(_progress_html(None), elem_id="train_progress")
    w.curves = gr.Plot(None, label="Loss and accuracy", elem_id="train_curves")
    w.log = gr.Textbox(label="Log (newest first)", lines=10, max_lines=14, interactive=False,
                       elem_id="train_log", elem_classes="lab-log")


# ---- wiring --------------------------------------------------------------------------------
def build(ctx: AppContext) -> TrainTab:
    w = layout(ctx)
    tab = TrainTab(ctx, w.settings)
    tab.w = w
    wire(ctx, tab, w)
    ctx.shared["train"] = tab   # on_load wires it to the page and to the Evaluate and Predict tabs
    return tab


def wire(ctx: AppContext, tab: TrainTab, w: SimpleNamespace) -> None:
    quiet = {"show_progress": "hidden", "api_visibility": "private", "queue": False}
    w.scheduler.change(_plateau_only, w.scheduler, w.patience, **quiet)
    outputs = run_outputs(w)
    w.export_btn.click(tab.export_finished, [w.export_kind, ctx.session, ctx.browser_id], w.export_out,
                       api_name="export_finished_run", concurrency_limit=2)
    inputs = ctx.field_widgets() | {ctx.session, ctx.browser_id}
    started = w.start.click(tab.start_run, inputs=inputs, outputs=outputs, api_name="start_training",
                            show_progress="hidden", concurrency_limit=None)
    resumed = w.resume.click(tab.resume_run, inputs=inputs, outputs=outputs, api_name="resume_training",
                             show_progress="hidden", concurrency_limit=None)
    # A refused Start / Resume writes its refusal into the Status line; a new Status line shows or
    # hides the finish row.
    for press in (started, resumed):
        press.failure(tab.show_refusal, ctx.session, w.status, **quiet)
    w.status.change(tab.show_next_steps, ctx.session, w.next_row, **quiet)
    # The finder trains in the server process: one at a time, the others wait in the queue (their
    # place shows in the note).
    w.lr_find_btn.click(tab.find_lr, inputs=ctx.field_widgets() | {ctx.session},
                        outputs=[w.lr_find_plot, w.lr_find_note, w.lr_use_btn], api_name="find_learning_rate",
                        concurrency_limit=1, concurrency_id="lr_finder", show_progress_on=w.lr_find_note)
    w.lr_use_btn.click(tab.use_lr, ctx.session, w.lr, api_visibility="private", show_progress="hidden",
                       concurrency_limit=None)
    w.cost_btn.click(tab.estimate_cost, inputs=ctx.field_widgets() | {ctx.session}, outputs=w.cost_note,
                     api_name="estimate_time", concurrency_limit=1, concurrency_id="lr_finder",
                     show_progress_on=w.cost_note)
    w.stop.click(tab.stop_run, [ctx.session, ctx.browser_id], w.status, api_name="stop_training",
                 show_progress="hidden", concurrency_limit=None)
    w.timer.tick(tab.poll, [ctx.session, ctx.browser_id], outputs, api_name="poll_training",
                 show_progress="hidden", queue=False)


def run_outputs(w: SimpleNamespace) -> list:
    """What a render of the run updates: Status, progress, curves, log and the poll timer."""
    return [w.status, w.progress, w.curves, w.log, w.timer]


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    """After a reload: find this browser's latest job and start polling it again; and See results /
    Try it open the Evaluate / Predict tab."""
    tab = ctx.shared["train"]
    fields = set(recipes.FIELDS)
    tab.recipe_widgets = [widget for widget, dotted in ctx.config_fields.items() if dotted in fields]
    recipe_io = {"inputs": ctx.field_widgets() | {ctx.session}, "outputs": [tab.w.recipe_note, *tab.recipe_widgets],
                 "show_progress": "hidden", "concurrency_limit": 4, "concurrency_id": "recipe"}
    tab.w.recipe_btn.click(tab.recommend, api_name="recommended_settings", **recipe_io)
    opened = ctx.shared.get("tab", {}).get("Train")   # the page's Train tab (a test may build the tab alone)
    if opened is not None:
        opened.select(tab.recommend_if_changed, api_visibility="private", **recipe_io)
    # Runs after the browser id is known (BrowserState is restored on load).
    ctx.browser_id.change(tab.reconnect, [ctx.session, ctx.browser_id], run_outputs(tab.w) + tab.settings,
                          api_visibility="private", show_progress="hidden")
    _wire_next_steps(ctx, tab.w)


def _wire_next_steps(ctx: AppContext, w: SimpleNamespace) -> None:
    """See results / Try it / Look inside open the Evaluate / Predict / Look inside tab (ids from
    ui/app.py) and refresh its run list: a tab selected by the server gets no select event, which is
    what refreshes it on a click."""
    tabs = ctx.shared.get("tabs")
    if tabs is None:
        return
    links = ((w.see_results, "evaluate", "evaluate"), (w.try_it, "predict", "predict"),
             (w.look_inside, "look-inside", "inside"))
    for button, tab_id, key in links:
        other = ctx.shared.get(key)   # the EvaluateTab / PredictTab / InsideTab, when the app has it
        if other is not None:
            # One event selects the tab and sets its run list: a list refreshed by a second event
            # while the tab was being shown kept the value it had before (seen in Chromium).
            button.click(_open_tab(tab_id, other.refresh_runs), [ctx.session, other.w.run, ctx.browser_id],
                         [tabs, other.w.run], api_visibility="private", show_progress="hidden")
        else:
            button.click(_open_tab(tab_id), None, tabs, api_visibility="private", show_progress="hidden", queue=False)


# ---- helpers -------------------------------------------------------------------------------
def page_config(ctx: AppContext, values: dict) -> RunConfig:
    """The RunConfig of the page's settings (``values``: set-style inputs with the session), as Start
    trains it: on the dataset the Data tab loaded, the embedded sample when none was."""
    session = values[ctx.session]
    if not session.get("data_source"):
        session["data_source"] = {"source": "sample", "location": None}
    return config_from_widgets(ctx, values, session)


def lr_note(result: lrfinder.LRFinderResult, suggestion: float | None, config: RunConfig, session: dict) -> str:
    """The finder's result in words: the suggestion and its method, how the test ended, its caveat,
    and what was trained (a throw-away model)."""
    curve = result.curve
    if suggestion is None:
        head = ("**No suggestion**: the loss did not fall clearly during the test, so no rate can be read "
                "off it (this model may need more than these steps to start learning). Keep the current "
                "rate, or check the data (Data tab) and try a smaller batch size; the plot shows what happened.")
    else:
        other = (f" The other common rule (the rate at the lowest loss ÷ 10) gives {result.min_over_10:.3g}."
                 if result.min_over_10 and result.min_over_10 != result.suggestion else "")
        head = (f"**Suggested learning rate: {suggestion:g}** — the {result.method} (the dashed line).{other} "
                f"**Use {suggestion:g}** puts it into the Learning rate box.")
    last = f"{curve['lr'].iloc[-1]:.3g}" if not curve.empty else "the first step"
    ending = (f"It stopped early at rate {last}: the loss blew up (diverged), as expected once the rate is too high."
              if result.stopped_early else f"It ran all {len(curve)} steps, up to rate {last}, without diverging.")
    if result.timed_out:
        ending = (f"It stopped after {LR_FINDER_MAX_S} s, at rate {last} (step {len(curve)} of {LR_FINDER_STEPS}): "
                  "this model is slow on this server. A smaller batch or model finishes the test.")
    source = (session.get("data_source") or {}).get("source")
    data = ("the embedded CIFAR-10 sample (no other dataset was loaded on the Data tab)" if source == "sample"
            else "the dataset loaded on the Data tab")
    kept = (f"It trained a fresh copy of {md_text(config.model.name)} on {data} and threw it away: "
            "nothing of it is kept, and Start still trains from the beginning.")
    return "\n\n".join([head, ending] + ([result.caveat] if suggestion is not None else []) + [kept])


def accuracy_interval(evaluated: ev.Evaluated | None) -> str:
    """' (95 % CI 36.7–45.4 %, 500 images)': the Wilson interval of a final evaluation's accuracy;
    '' when the event does not carry its image count."""
    iv = stats.accuracy_interval(evaluated.accuracy, evaluated.num_samples) if evaluated is not None else None
    return f" (95 % CI {iv.span()}, {iv.n:,} images)" if iv is not None else ""


_ACCURACY_IN_MESSAGE = re.compile(r"test accuracy \d+(\.\d+)?\s?%")   # the trainer's finish message


def _with_interval(message: str, evaluated: ev.Evaluated | None) -> str:
    """``message`` ("finished 2 epoch(s); test accuracy 41.0%") with the accuracy's interval after it."""
    found = _ACCURACY_IN_MESSAGE.search(message or "")
    interval = accuracy_interval(evaluated)
    if found is None or not interval:
        return message
    return message[:found.end()] + interval + message[found.end():]


def _whole_batch_size(value) -> int:
    """The batch-size box accepts typed values: 'abc' must read as a user error, not an internal one."""
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise ConfigError(f"Batch size must be a whole number such as 64, got {value!r}.")
    return int(number)


def _current_job(ctx: AppContext, session: dict, owner: str):
    """This session's run, else (after a reload) this owner's newest run started here on the Train
    tab: the runs of a comparison belong to the Compare tab, which reconnects to them itself."""
    job = ctx.manager.find(session.get("job_id", "")) if session.get("job_id") else None
    if job is None:
        candidates = [j for j in ctx.manager.jobs(owner) if not _in_comparison(ctx, j.job_id)]
        job = max(candidates, key=lambda j: j.created) if candidates else None
        if job is not None:
            session["job_id"] = job.job_id
    return job


def _in_comparison(ctx: AppContext, run_id: str) -> bool:
    if ctx.history is None:
        return False
    try:
        return bool(ctx.history.get(run_id, refresh=False).get("group_id"))
    except LabError:
        return False


def _resumable_note(ctx: AppContext, session: dict, owner: str) -> str | None:
    """The status line for a page whose last run was interrupted (the server stopped) or stopped
    and can go on from its checkpoint; None when there is no such run."""
    last = _last_run(ctx, session, owner)
    if last is None:
        return None
    run_dir, status, label, _ = last
    how = {ev.INTERRUPTED: "was interrupted (the server stopped while it was training)",
           ev.STOPPED: "was stopped"}.get(status)
    if how is None or not (run_dir / rundir.LAST_CKPT).is_file():
        return None
    return (f"Your last run ({label}) {how}. Press Resume last run to continue it from its last "
            "checkpoint, or Start for a new run.")


def _resume_wording(label: str) -> Wording:
    """The refusals of Resume last run, in this tab's words (its buttons, its Epochs slider)."""
    return Wording(subject=f"Your last run ({label})", restart="Press Start to train it again.",
                   more_epochs="set Epochs above {done} and press Resume again; or press Start for a new run.")


def _last_run(ctx: AppContext, session: dict, owner: str) -> tuple[Path, str, str, str | None] | None:
    """(folder, status, label, owner) of the Train-tab run this browser used last, if it is not
    training: the one the tab shows, else (after a restart) the owner's run with the latest
    status change. The status is the folder's, which is what a resume continues from."""
    job = _current_job(ctx, session, owner)
    if job is not None and not job.done:
        return None
    if job is not None:
        run_dir = ctx.history.run_dir(job.job_id) if ctx.history is not None else ctx.runs_dir / job.job_id
    elif ctx.history is not None:
        row = ctx.history.last_run(owner, exclude_groups=True)
        if row is None:
            return None
        run_dir = Path(row["run_dir"])
    else:
        return None
    status = rundir.read_status(run_dir)[0] if run_dir.is_dir() else job.status
    name = job.config.name if job is not None else None
    label = f"{name}, {run_dir.name}" if name else run_dir.name
    return run_dir, status, label, (job.owner if job is not None else row.get("owner"))


EPOCH_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
STEP_COLUMNS = ["step", "epoch", "loss"]


def _earlier_history(ctx: AppContext, job, session: dict, started) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The epochs and steps a resumed run had trained before this job, from its run folder (read
    once per job and kept in the session): the curves go on from there instead of starting again."""
    cached = session.get("earlier")
    if cached and cached[0] == job.job_id:
        return cached[1], cached[2]
    try:
        record = runrecord.load_run(ctx.runs_dir / job.job_id)
        epochs = record.epochs.reindex(columns=EPOCH_COLUMNS)
        epochs = epochs[epochs["epoch"] <= started.start_epoch]
        last_step = started.start_epoch * started.batches_per_epoch + started.start_batch
        steps = record.steps.reindex(columns=STEP_COLUMNS)
        steps = steps[steps["step"] <= last_step] if not steps.empty else steps
    except Exception:   # an unreadable history only costs the earlier part of the curves
        epochs, steps = pd.DataFrame(columns=EPOCH_COLUMNS), pd.DataFrame(columns=STEP_COLUMNS)
    session["earlier"] = (job.job_id, epochs, steps)
    return epochs, steps


def _render(ctx: AppContext, job, session: dict):
    snap = job.snapshot()
    session["seen"] = snap["changes"]
    session["last_run_id"] = job.job_id   # the Evaluate and Predict lists pick it
    events = list(job.events)
    steps = [e for e in events if isinstance(e, ev.BatchEnded)]
    step_df = pd.DataFrame([{"step": e.step, "epoch": e.epoch - 1 + e.batch / e.batches, "loss": e.loss}
                            for e in steps], columns=STEP_COLUMNS)
    epoch_df = pd.DataFrame([{"epoch": e.epoch, "train_loss": e.train_loss, "train_accuracy": e.train_accuracy,
                              "val_loss": e.val_loss, "val_accuracy": e.val_accuracy} for e in snap["epochs"]],
                            columns=EPOCH_COLUMNS)
    started = snap.get("started")
    if job.resume_from and started is not None and (started.start_epoch or started.start_batch):
        earlier_epochs, earlier_steps = _earlier_history(ctx, job, session, started)
        epoch_df = pd.concat([earlier_epochs, epoch_df], ignore_index=True) if not earlier_epochs.empty else epoch_df
        step_df = pd.concat([earlier_steps, step_df], ignore_index=True) if not earlier_steps.empty else step_df
    return (_status_text(ctx, job, snap, _final_evaluation(events)),
            _progress_html(snap, steps, _cost_comparison(session, job, snap)),
            plots.live_curves(step_df, epoch_df), _log_text(events))


def _status_text(ctx: AppContext, job, snap: dict, evaluated: ev.Evaluated | None = None) -> str:
    status = snap["status"]
    if status == ev.QUEUED:
        pos = ctx.manager.queue_position(job.job_id)
        if pos is None:  # already taken from the queue; its thread has not reported "running" yet
            return f"Starting — {snap['model']} — run {job.job_id}: preparing data and model"
        running = len(ctx.manager.running())
        return (f"Queued: position {pos} — {running} run(s) training on this server "
                f"(at most {ctx.manager.max_jobs} at a time). You can keep using the other tabs.")
    label = {ev.RUNNING: "Training", ev.STOPPING: "Stopping", ev.FINISHED: "Finished", ev.STOPPED: "Stopped",
             ev.FAILED: "Failed", ev.INTERRUPTED: "Interrupted"}.get(status, status)
    message = snap["message"]
    started, last = snap.get("started"), snap.get("last_batch")
    # The trainer's last status message is "preparing data and model" for the whole run: once
    # batches come in, say where the run is instead.
    if status == ev.RUNNING and started is not None and last is not None and not message.startswith("early"):
        message = ("final evaluation of the best weights" if len(snap["epochs"]) >= started.epochs
                   else f"epoch {last.epoch}/{started.epochs}")
    text = f"{label} — {snap['model']} — run {job.job_id}: {_with_interval(message, evaluated)}"
    return f"{text}\n{NEXT_STEPS}" if status == ev.FINISHED else text


def _recipe_key(config: RunConfig) -> list:
    """What a recipe is chosen for: the data and the model (not the split or other settings, whose
    edits stay when the Train tab opens again)."""
    d, m = config.data, config.model
    return [d.source, d.location, m.name, m.pretrained, m.weights_path]


def _cost_key(config: RunConfig) -> str:
    """What the speed of a run depends on: its configuration less the length, budget and name."""
    raw = config.to_dict()
    for name in ("epochs", "time_budget_s", "name", "early_stopping_patience", "tensorboard"):
        raw.pop(name, None)
    return json.dumps(raw, sort_keys=True)


def _cost_comparison(session: dict, job, snap: dict) -> str:
    """'epoch training time 0.31 s, predicted 0.30 s (+3 %)': the run's epochs after the first (or
    the first, alone) against the page's Estimate time for the same settings; '' without one."""
    predicted = (session or {}).get("cost") or {}
    epochs = snap.get("epochs") or []
    if not epochs or predicted.get("key") != _cost_key(job.config):
        return ""
    later = [e.seconds for e in epochs[1:]] or [epochs[0].seconds]
    return "epoch training time " + cost.compare(predicted["train_seconds"], statistics.median(later))


def _progress_html(snap: dict | None, batches: list | None = None, compared: str = "") -> str:
    """The progress bar and its line; ``batches``: the run's BatchEnded events so far (they smooth
    the ETA of the first epoch; without them it uses the last report's speed)."""
    if not snap or snap.get("started") is None:
        return '<div class="lab-progress"><div style="width:0%"></div></div><p>No run yet.</p>'
    started, last = snap["started"], snap["last_batch"]
    total = started.epochs * started.batches_per_epoch
    done = (last.step if last else started.start_epoch * started.batches_per_epoch)
    if snap["status"] == ev.FINISHED:
        done = total
    frac = min(1.0, done / max(total, 1))
    eta = eta_seconds(snap, batches)
    parts = [f"epoch {last.epoch if last else started.start_epoch}/{started.epochs}"]
    if last:
        parts += [f"batch {last.batch}/{last.batches}", f"{last.images_per_sec:,.0f} images/s"]
    parts.append(f"ETA {fmt_seconds(eta)}" if snap["status"] in (ev.RUNNING, ev.STOPPING) else snap["status"])
    extra = f'<p id="train_cost_compare">{html.escape(compared)}</p>' if compared else ""
    return (f'<div class="lab-progress"><div style="width:{frac * 100:.1f}%"></div></div>'
            f'<p id="train_progress_text">{frac:.0%} — {" · ".join(parts)}</p>{extra}')


def eta_seconds(snap: dict, batches: list | None = None) -> float | None:
    """Seconds left in the run of ``snap`` (a Job snapshot; ``batches``: its BatchEnded events).

    An epoch is its batches at the median time per batch of the recent progress reports (one slow
    batch, a loader stall or the first epoch's warm-up does not move it) plus what the completed
    epochs took after their last batch (validation, checkpoint: from the EpochEnded events' times);
    before the first epoch ends, that part and the final evaluation are estimated from the split
    sizes. None before there is any speed to go by."""
    started, last, epochs = snap["started"], snap["last_batch"], snap["epochs"]
    batches = batches or []
    per_batch = _seconds_per_batch(started, last, batches)
    if per_batch is None:
        return None
    sizes = started.split_sizes
    training = per_batch * started.batches_per_epoch
    per_image = training / max(sizes.get("train", 0), 1)
    after_training = _seconds_after_training(epochs, batches)
    if after_training is None:
        after_training = EVAL_COST * sizes.get("val", 0) * per_image
    done = started.start_epoch + len(epochs)
    if last is not None and last.epoch > done:
        in_epoch = last.batch / max(last.batches, 1)
    else:   # between epochs, or resumed in the middle of one and no batch reported yet
        in_epoch = started.start_batch / max(started.batches_per_epoch, 1) if done == started.start_epoch else 0.0
    left = started.epochs - done   # the epoch in progress included
    remaining = max(left * (training + after_training) - in_epoch * training, 0.0) if left > 0 else 0.0
    return remaining + EVAL_COST * (sizes.get("test") or sizes.get("val", 0)) * per_image


def _seconds_per_batch(started, last, batches: list) -> float | None:
    """The median time per batch between the recent progress reports of the same epoch; the last
    report's speed when there is no such pair yet."""
    recent = batches[-RECENT_REPORTS - 1:]
    rates = [(b.time - a.time) / (b.step - a.step) for a, b in itertools.pairwise(recent)
             if b.epoch == a.epoch and b.step > a.step and b.time > a.time]
    if rates:
        return statistics.median(rates)
    if last is not None and last.images_per_sec > 0:
        images_per_batch = started.split_sizes["train"] / max(started.batches_per_epoch, 1)
        return images_per_batch / last.images_per_sec
    return None


def _seconds_after_training(epochs: list, batches: list) -> float | None:
    """Mean time from the last batch of each of the last RECENT_EPOCHS epochs to its EpochEnded
    (validation and checkpoint); None when no completed epoch has its last batch reported."""
    last_batch_time = {b.epoch: b.time for b in batches if b.batch == b.batches}
    gaps = [e.time - last_batch_time[e.epoch] for e in epochs[-RECENT_EPOCHS:] if e.epoch in last_batch_time]
    return sum(gaps) / len(gaps) if gaps else None


def _log_text(events: list) -> str:
    lines = []
    evaluated = _final_evaluation(events)
    for e in events:
        t = time.strftime("%H:%M:%S", time.localtime(e.time))
        if isinstance(e, ev.StatusChanged):
            lines.append(f"{t}  {e.status}: {_with_interval(e.message, evaluated)}")
        elif isinstance(e, ev.RunStarted):
            lines.append(f"{t}  started on {e.device}: {e.split_sizes['train']} train / {e.split_sizes['val']} val / "
                         f"{e.split_sizes['test']} test images, input {'×'.join(map(str, e.input_shape))}, "
                         f"{e.params_trainable:,} of {e.params_total:,} parameters trainable")
            lines += [f"{t}  note: {n}" for n in e.notes]
        elif isinstance(e, ev.EpochEnded):
            val = (f", val loss {e.val_loss:.3f}, val acc {e.val_accuracy:.1%}" if e.val_loss is not None else "")
            lines.append(f"{t}  epoch {e.epoch}/{e.epochs}: train loss {e.train_loss:.3f}, train acc "
                         f"{e.train_accuracy:.1%}{val} ({e.seconds:.1f} s){'  ★ best' if e.is_best else ''}")
        elif isinstance(e, ev.Evaluated):
            lines.append(f"{t}  {e.split} accuracy {e.accuracy:.1%}{accuracy_interval(e)}, macro F1 {e.macro_f1:.3f}"
                         + (f", top-5 {e.top5_accuracy:.1%}" if e.top5_accuracy is not None else ""))
        elif isinstance(e, ev.RunFinished):
            lines.append(f"{t}  {e.status}: {_with_interval(e.message, evaluated)}")
    return "\n".join(reversed(lines))  # newest first: the box shows its top, not its end


def _final_evaluation(events: list) -> ev.Evaluated | None:
    """The run's final evaluation (the last Evaluated event), if it has one yet."""
    return next((e for e in reversed(events) if isinstance(e, ev.Evaluated)), None)
