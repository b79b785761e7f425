"""What every tab shares: the app context, per-browser session state, config assembly from widgets,
and the error policy (a LabError becomes a readable message; nothing reaches the user as a trace).
"""
from __future__ import annotations

import functools
import html
import inspect
import re
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import gradio as gr

from core import identity, paths
from core.config import RunConfig
from core.errors import ConfigError, LabError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"


@dataclass
class AppContext:
    """Built once per server; handed to every tab's ``build``."""
    manager: Any                    # core.jobs.JobManager
    data_dir: Path
    runs_dir: Path
    session: Any = None             # gr.State(dict): this browser tab's dataset, split, model choices
    browser_id: Any = None          # gr.BrowserState: the server-signed browser token (core.identity)
    config_fields: dict = field(default_factory=dict)  # widget → dotted RunConfig field
    # What one tab's wiring needs of another's, filled by the build: "tab" (label → gr.Tab), "tabs"
    # (the gr.Tabs) and each tab's Controller by name ("data", "model", "train", ...), which on_load
    # and the other tabs read (the Memory tab reads the Model tab's widgets, Train links to Evaluate).
    shared: dict = field(default_factory=dict)
    history: Any = None             # core.runs.RunHistory (build_app makes it; run_history() for a bare context)
    # signs browser tokens; None: every caller is only its session. Never in a repr (a repr can
    # end up in the page's config, as a gr.State's delete_callback did).
    secret: str | None = field(default=None, repr=False)
    teacher: tuple[str, str] | None = None   # --teacher (login name, password)
    login: bool = False             # --auth: the login name is the identity
    private_runs: bool = False      # --private-runs: nobody sees others' runs but the teacher
    teacher_sessions: set = field(default_factory=set)  # Gradio sessions signed in as the teacher
    # The folders a page may load datasets from (launch.py --data-root), as the teacher wrote them:
    # messages name them so. None: the data folder and assets/ (core.paths.default_roots).
    data_roots: list | None = None

    def __post_init__(self):
        if self.data_roots is None:
            self.data_roots = paths.default_roots(self.data_dir)

    def field_widgets(self) -> set:
        return set(self.config_fields)


def config_from_widgets(ctx: AppContext, values: dict, session: dict | None = None) -> RunConfig:
    """Turn ``{widget: value}`` (Gradio set-style inputs) into a validated RunConfig.

    Widgets are matched to fields through ``ctx.config_fields`` — never by position. The dataset
    choice comes from the session (what the Data tab loaded)."""
    raw = RunConfig().to_dict()
    if session and session.get("data_source"):
        raw["data"].update(session["data_source"])
    if session and session.get("train_augment") is not None:
        raw["data"]["train_augment"] = session["train_augment"]
    for widget, dotted in ctx.config_fields.items():
        if widget not in values:
            continue
        value = values[widget]
        convert = getattr(widget, "_lab_convert", None)
        if convert is not None:
            value = convert(value)
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    _uploaded_weights(raw["model"], session)
    return RunConfig.from_dict(raw)


def _uploaded_weights(model: dict, session: dict | None) -> None:
    """The model's own weights file: one this page uploaded (Model → Your own weights), by the name
    the page shows, replaced by where the server keeps it. Anything else, a server path typed
    through the API included, is refused without looking at the disk."""
    shown = model.get("weights_path")
    if not shown:
        return
    files = (session or {}).get("weights_files", {})
    real = files.get(shown) or (shown if shown in files.values() else None)
    if real is None:
        name = Path(str(shown)).name[:80]
        raise ConfigError(f"The weights file {name!r} was not uploaded on this page. Upload it under Model → "
                          "Your own weights (.pth), then start again.")
    model["weights_path"] = real


def bind(ctx: AppContext, widget, dotted: str, convert: Callable | None = None, restore: Callable | None = None):
    """Declare that ``widget`` sets config field ``dotted`` (optionally through ``convert``);
    ``restore`` turns the field's value back into the widget's (``widget_updates``)."""
    ctx.config_fields[widget] = dotted
    if convert is not None:
        widget._lab_convert = convert
    if restore is not None:
        widget._lab_restore = restore
    return widget


def widget_updates(ctx: AppContext, widgets, config: RunConfig) -> list:
    """The values ``config`` gives ``widgets`` (bound with ``bind``), as Gradio updates: what the
    form showed when the run was started, e.g. after a page reload reconnects to it. A value the
    widget cannot show (``restore`` returns ``gr.skip()``) leaves it as it is."""
    raw = config.to_dict()
    out = []
    for widget in widgets:
        node = raw
        for part in ctx.config_fields[widget].split("."):
            node = node[part]
        restore = getattr(widget, "_lab_restore", None)
        value = restore(node) if restore is not None else node
        out.append(value if isinstance(value, dict) and value.get("__type__") == "update" else gr.update(value=value))
    return out


def none_if_empty(value):
    """Number/Textbox widgets give 0 or '' for 'not set'; the config wants None."""
    return None if value in ("", None, 0, 0.0) else value


# Every toast of the lab closes by itself after this long: one left open covered Stop, Resume and
# Compute (the Train tab's Status line keeps its refusals for longer).
TOAST_S = 12


def safe(fn: Callable) -> Callable:
    """Wrap a handler: LabError → gr.Error with its message; anything else → a short
    'internal error' message and a log entry with the trace (never a stack trace in the page).
    Every error leaves as a toast that closes after TOAST_S seconds."""

    def convert(err: Exception):
        # A user's mistake is one line in the server console, not a Gradio stack trace (Gradio
        # prints one for every gr.Error unless print_exception is off); a bug keeps its trace.
        if isinstance(err, gr.Error):
            log.info("%s: %s", fn.__name__, err.message)
            err.print_exception = False
            err.duration = TOAST_S
            return err
        if isinstance(err, LabError):
            log.info("%s: %s", fn.__name__, err)
            return gr.Error(str(err), duration=TOAST_S, print_exception=False)
        log.exception("internal error in %s", fn.__name__)
        return gr.Error(f"Internal error in {fn.__name__}: {type(err).__name__}: {err}. "
                        "The server log has the details; nothing you saved was lost.", duration=TOAST_S,
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise convert(err) from None
        gen_wrapper._lab_safe = True
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise convert(err) from None
    wrapper._lab_safe = True   # tests check that every handler the app wires is wrapped
    return wrapper


def who_is(ctx: AppContext, request: gr.Request | None, token) -> identity.Who:
    """Who sends this event: with --auth the login name; else the browser the server-signed
    ``token`` names, and for any other token (a raw id, a forgery, none) only this Gradio session.
    The teacher is the --teacher login, or (without --auth) a session signed in as the teacher."""
    username = getattr(request, "username", None) if request is not None else None
    session_hash = getattr(request, "session_hash", None) if request is not None else None
    if username:
        teacher = ctx.login and ctx.teacher is not None and username == ctx.teacher[0]
        return identity.Who(f"user:{username}", teacher=teacher)
    ident = identity.verify(ctx.secret, token)
    owner = f"browser:{ident}" if ident else identity.session_owner(session_hash)
    return identity.Who(owner, teacher=session_hash is not None and session_hash in ctx.teacher_sessions)


def run_history(ctx: AppContext):
    """The run-history index (core.runs.RunHistory), made on first use for a bare context (tests)."""
    if ctx.history is None:
        from core.runs import RunHistory
        ctx.history = RunHistory(ctx.runs_dir)
        if ctx.manager is not None:
            ctx.history.attach(ctx.manager)
    return ctx.history


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def md_text(text) -> str:
    """``text`` (a class or run name a user typed) as literal text inside Markdown: HTML tags and
    Markdown marks show as typed instead of being rendered (``<img …>``, ``**bold**``)."""
    escaped = html.escape(str(text), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", escaped)


class Controller:
    """A tab's handlers, as the methods of one object over the app context: ``build`` wires them,
    tests call them directly. ``w`` holds the tab's widgets once ``build`` has laid them out (the
    handlers never read them; other tabs' wiring does).

    Each handler is bound once: Gradio puts the events of one function object in one concurrency
    group (``concurrency_id`` defaults to ``id(fn)``), and ``tab.calculate`` would otherwise be a
    new bound method, so a new group, at every access. The repr names the class only: Gradio may
    write a callable's repr into the page config, and a bound method's repr is its object's
    (``ctx`` holds the signing secret)."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.w = SimpleNamespace()
        for name, fn in inspect.getmembers(type(self), inspect.isfunction):
            if not name.startswith("__"):
                setattr(self, name, fn.__get__(self))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def predictors(ctx: AppContext):
    """The server's one cache of loaded models (core.inference.PredictorCache), shared by every
    view that runs a model on an image (Predict, Evaluate's heat-maps, Look inside)."""
    from core.inference import PredictorCache
    return ctx.shared.setdefault("predictors", PredictorCache())


def seen_run(ctx: AppContext, run_id: str | None, browser_id, request, missing: str) -> tuple:
    """(run folder, owner, who) of ``run_id``: a run of the history that this caller may see (never
    a path from the page); ConfigError(``missing``) when no run is given."""
    if not run_id:
        raise ConfigError(missing)
    history = run_history(ctx)
    who = who_is(ctx, request, browser_id)
    owner = history.check_access(run_id, who, private=ctx.private_runs)
    return history.run_dir(run_id), owner, who
