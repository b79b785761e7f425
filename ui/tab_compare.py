"""Compare tab: train several models on the same data in one click, watch their curves overlaid,
rank them in a leaderboard, put two runs' confusion matrices side by side, and manage the run
history (filter, rename, tag, delete, resume, export).

Like the Train tab, nothing trains inside a handler: "Train all" queues one job per model (and
learning rate / freezing mode) on the JobManager and a gr.Timer polls them. The runs to show are
the "Runs compared" selection, so finished runs from the history can be mixed with live ones.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from core import compare, events as ev, export, identity, runs, stats
from core.errors import ConfigError, LabError
from core.models import list_models
from ui import plots, tab_evaluate
from ui.common import AppContext, Controller, md_text, config_from_widgets, run_history, safe, who_is

log = logging.getLogger(__name__)

POLL_S = 1.0
DEFAULT_MODELS = ["tutorial_net", "resnet18"]
HISTORY_COLUMNS = ["run id", "name", "tags", "model", "dataset", "status", "epochs", "best val acc (%)",
                   "test acc (%)", "test acc 95 % CI", "created", "owner"]
LEADERBOARD_DISPLAY = ["run", "model", "status", "best val acc (%)", "test acc (%)", "test acc 95 % CI", "macro F1",
                       "params", "trainable params", "train time (s)", "images/s",
                       "predicted memory (MiB)", "file size (MiB)"]   # the run ids are in the CSV and the history
DIFF_DISPLAY = ["kind", "true class", "predicted class", "A (%)", "B (%)", "B − A (points)"]
ALL_STATUSES = "(all)"
EXPORT_KINDS = ("checkpoint", "torchscript", "onnx", "metrics")


# ---------------------------------------------------------------------------------------------
# Small helpers (plain functions: the tests call them directly)
# ---------------------------------------------------------------------------------------------
_history = run_history


def run_choices(ctx: AppContext, need: str | None = None, who: identity.Who | None = None) -> list[tuple[str, str]]:
    """(label, run id) pairs, newest first: queued and live runs too unless ``need`` says otherwise;
    with ``who``, only the runs they may see (all of them unless runs are private)."""
    return _history(ctx).choices(need=need, who=who, private=ctx.private_runs)


def group_choices(ctx: AppContext, who: identity.Who | None = None) -> list[tuple[str, str]]:
    """(label, group id) of every comparison in the history that ``who`` may see, newest first."""
    return [(g["label"], g["group_id"]) for g in compare.list_groups(_history(ctx))
            if who is None or identity.can_view(g["owner"] if isinstance(g["owner"], str) else None,
                                                who, ctx.private_runs)]


def visible(ctx: AppContext, who: identity.Who | None, run_ids) -> list[str]:
    """The runs of ``run_ids`` that are runs of this history and that ``who`` may see (a list the
    page sent back is not trusted: an id can be made up, and runs can be private)."""
    out = []
    for r in run_ids or []:
        try:
            if who is not None:
                _history(ctx).check_access(r, who, private=ctx.private_runs)
            out.append(r)
        except LabError:
            continue
    return out


def _keep(value, choices) -> list[str] | str | None:
    ids = {v for _, v in choices}
    if isinstance(value, (list, tuple)):
        return [v for v in value if v in ids]
    return value if value in ids else None


def _labels(ctx: AppContext, run_ids: list[str]) -> dict[str, str]:
    """run id → a unique, readable label (the run's name; the id is added when names repeat)."""
    h = _history(ctx)
    names = {r: h.label(r) for r in run_ids}
    counts = pd.Series(list(names.values())).value_counts() if names else pd.Series(dtype=int)
    return {r: (n if counts.get(n, 0) == 1 else f"{n} [{r[-6:]}]") for r, n in names.items()}


_CURVE_CACHE: dict[str, tuple[tuple, pd.DataFrame]] = {}
_CACHE_LOCK = threading.Lock()


def _epoch_frame(ctx: AppContext, run_id: str) -> pd.DataFrame:
    """Per-epoch metrics of a run: from the live job when it trains here, else from its folder
    (cached until events.jsonl changes)."""
    cols = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    job = ctx.manager.find(run_id)
    if job is not None and not job.done:
        rows = [{c: getattr(e, c) for c in cols} for e in list(job.events) if isinstance(e, ev.EpochEnded)]
        df = pd.DataFrame(rows, columns=cols)
        return df.drop_duplicates("epoch", keep="last").sort_values("epoch") if not df.empty else df
    try:
        run_dir = _history(ctx).run_dir(run_id)
    except LabError:
        return pd.DataFrame(columns=cols)
    events = run_dir / runs.EVENTS_FILE
    try:
        st = events.stat()
        key = (st.st_mtime_ns, st.st_size)
    except OSError:
        return pd.DataFrame(columns=cols)
    with _CACHE_LOCK:
        hit = _CURVE_CACHE.get(run_id)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        record = runs.load_run(run_dir)
    except LabError:
        return pd.DataFrame(columns=cols)
    df = record.epochs.reindex(columns=cols) if not record.epochs.empty else pd.DataFrame(columns=cols)
    with _CACHE_LOCK:
        _CURVE_CACHE[run_id] = (key, df)
    return df


def curves_figure(ctx: AppContext, run_ids: list[str]):
    """Loss and accuracy (train dashed, val solid) of the selected runs; one colour per run."""
    run_ids = list(run_ids or [])
    if not run_ids:
        return plots.empty_figure("Pick runs above, or press Train all", "Runs compared")
    labels = _labels(ctx, run_ids)
    data = {labels[r]: _epoch_frame(ctx, r) for r in run_ids}
    return plots.compare_loss_accuracy(data, splits=("train", "val"), title="Runs compared")


def _for_display(df: pd.DataFrame) -> pd.DataFrame:
    """Missing values as None (shown empty), never NaN/<NA> (which JSON cannot carry)."""
    out = df.astype(object)
    return out.where(df.notna(), None)


def ci_column(accuracy: pd.Series, n: pd.Series) -> list[str]:
    """Each accuracy's Wilson 95 % interval, '36.7–45.4 %' ('' when the image count is unknown)."""
    spans = [stats.accuracy_interval(a, c) for a, c in zip(accuracy, n)]
    return [iv.span() if iv is not None else "" for iv in spans]


def leaderboard_display(df: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard for people: accuracies in %, sizes in MiB, times rounded."""
    out = pd.DataFrame({
        "run": df["run"], "model": df["model"], "status": df["status"],
        "best val acc (%)": (df["best val accuracy"] * 100).round(1),
        "test acc (%)": (df["test accuracy"] * 100).round(1),
        "test acc 95 % CI": ci_column(df["test accuracy"], df["test images"]),
        "macro F1": df["macro F1"].round(3),
        "params": df["parameters"], "trainable params": df["trainable parameters"],
        "train time (s)": df["training time (s)"].round(1), "images/s": df["images/s"].round(0),
        "predicted memory (MiB)": (df["predicted training memory (bytes)"].astype("Float64") / 2**20).round(1),
        "file size (MiB)": (df["checkpoint size (bytes)"].astype("Float64") / 2**20).round(2),
    }, columns=LEADERBOARD_DISPLAY)
    return _for_display(out)


#: How the leaderboard's numbers read ("727,626" parameters, "1,222" images/s); the cells keep
#: the numbers, so the ⋮ menu still sorts numerically.
LEADERBOARD_FORMATS = {"best val acc (%)": "{:.1f}", "test acc (%)": "{:.1f}", "macro F1": "{:.3f}",
                       "params": "{:,.0f}", "trainable params": "{:,.0f}", "train time (s)": "{:,.1f}",
                       "images/s": "{:,.0f}", "predicted memory (MiB)": "{:,.1f}", "file size (MiB)": "{:,.2f}"}


def leaderboard_styled(board: pd.DataFrame):
    """The display frame as a pandas Styler: Gradio sends the formatted text as each cell's
    display value next to its number."""
    return board.style.format(LEADERBOARD_FORMATS, na_rep="")


_MEMORY_BUSY: set[str] = set()
_MEMORY_LOCK = threading.Lock()


def _estimate_memory_later(ctx: AppContext, run_ids: list[str]) -> bool:
    """Start estimating (in one background thread) the training memory of runs that have none
    cached yet; True while some estimate for these runs is still running."""
    h = _history(ctx)
    todo = []
    for r in run_ids:
        try:
            row = h.get(r, refresh=False)
        except LabError:
            continue
        # Only once a run has ended: the estimate would take CPU from the training.
        if row.get("predicted_memory_bytes") is None and row.get("params") and not _live(ctx, [r]):
            todo.append(r)
    with _MEMORY_LOCK:
        busy = any(r in _MEMORY_BUSY for r in todo)
        new = [r for r in todo if r not in _MEMORY_BUSY]
        _MEMORY_BUSY.update(new)
    if new:
        def work():
            try:
                for r in new:
                    try:
                        compare.leaderboard(h, [r], memory=True)
                    except LabError as err:   # a model the calculator cannot trace: the column stays empty
                        log.info("no memory estimate for run %s: %s", r, err)
                    except Exception:   # a bug: logged with its traceback, the column stays empty
                        log.exception("memory estimate of run %s failed", r)
            finally:
                with _MEMORY_LOCK:
                    _MEMORY_BUSY.difference_update(new)
        threading.Thread(target=work, daemon=True, name="cmp-memory").start()
        busy = True
    return busy


def queue_text(ctx: AppContext, run_ids: list[str]) -> str:
    """One line per selected run (status, progress, queue position) and the server's queue."""
    m = ctx.manager
    lines = []
    labels = _labels(ctx, list(run_ids or []))
    for r in run_ids or []:
        job = m.find(r)
        if job is not None and not job.done:
            snap = job.snapshot()
            if snap["status"] == ev.QUEUED:
                state = f"queued, position {m.queue_position(r)}"
            else:
                last = snap["last_batch"]
                done = len(snap["epochs"])
                total = job.config.epochs
                state = (f"{snap['status']}: epoch {last.epoch if last else done}/{total}"
                         + (f", batch {last.batch}/{last.batches}" if last else ""))
        else:
            try:
                row = _history(ctx).get(r, refresh=False)
            except LabError:
                lines.append(f"{labels.get(r, r)}: deleted")
                continue
            state = row.get("status") or "?"
            if row.get("test_accuracy") is not None:
                state += f", test accuracy {row['test_accuracy']:.1%}"
            elif row.get("status") in (ev.FAILED, ev.INTERRUPTED, ev.STOPPED) and row.get("message"):
                state += f" — {row['message']}"
        lines.append(f"{labels.get(r, r)}: {state}")
    running, queued = len(m.running()), len([j for j in m.jobs() if j.status == ev.QUEUED])
    lines.append(f"Server: {running} training, {queued} queued (at most {m.max_jobs} at a time).")
    return "\n".join(lines)


def _live(ctx: AppContext, run_ids) -> bool:
    return any((j := ctx.manager.find(r)) is not None and not j.done for r in run_ids or [])


def history_table(ctx: AppContext, filter_text: str | None = None, status: str | None = None,
                  who: identity.Who | None = None) -> pd.DataFrame:
    df = _history(ctx).list(filter_text=filter_text or None,
                            status=None if status in (None, "", ALL_STATUSES) else status)
    if who is not None and ctx.private_runs:
        df = df[[identity.can_view(o if isinstance(o, str) else None, who, True) for o in df["owner"]]]
    pct = lambda s: (pd.to_numeric(s, errors="coerce") * 100).round(1)  # noqa: E731
    return _for_display(pd.DataFrame({
        "run id": df["run_id"], "name": df["name"].fillna(""), "tags": df["tags"].fillna(""),
        "model": df["model"], "dataset": df["dataset"], "status": df["status"],
        "epochs": [f"{int(d or 0)}/{int(e) if e == e and e is not None else '?'}"
                   for d, e in zip(df["epochs_done"], df["epochs"])],
        "best val acc (%)": pct(df["best_val_accuracy"]), "test acc (%)": pct(df["test_accuracy"]),
        "test acc 95 % CI": ci_column(df["test_accuracy"], df["test_images"]),
        "created": [time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t == t and t else ""
                    for t in df["created"]],
        "owner": [owner_label(o) for o in df["owner"]],
    }, columns=HISTORY_COLUMNS))


def owner_label(owner) -> str:
    """Who started a run, short enough for a table cell: the login name, "browser 3f9a2c" (the
    start of the browser's id), or "command line" for runs with no owner."""
    if not isinstance(owner, str) or not owner:
        return "command line"
    kind, _, ident = owner.partition(":")
    if kind == "user":
        return ident
    if kind in ("browser", "session"):
        return f"{kind} {ident[:6]}"
    return owner


def export_files(ctx: AppContext, run_id: str | None, kind: str, who: identity.Who | None = None) -> list[str]:
    """Create the files to download for ``kind`` (checkpoint, torchscript, onnx, metrics) in a
    fresh temporary folder, after checking that ``who`` may export the run (None: a trusted
    caller). Gradio copies what the handler returns into its cache and serves that copy; the
    runs folder itself is never served."""
    if not run_id:
        raise ConfigError("Pick a run in the history table first.")
    if kind not in EXPORT_KINDS:
        raise ConfigError(f"Unknown export {kind!r}; choose one of {', '.join(EXPORT_KINDS)}.")
    h = _history(ctx)
    if who is not None:
        h.check_access(run_id, who, "export")
    run_dir = h.run_dir(run_id)
    if not (run_dir / runs.CONFIG_FILE).is_file():
        raise ConfigError(f"Run {run_id} has no folder yet (still queued?): nothing to export.")
    out = Path(tempfile.mkdtemp(prefix="lab-export-"))   # one per request: no user sees another's files
    if kind == "metrics":
        return [str(p) for p in export.export_metrics_csv(run_dir, out)]
    from core.inference import find_checkpoint
    ckpt = find_checkpoint(run_dir)
    if kind == "checkpoint":
        dest = out / f"{run_id}-{ckpt.name}"
        try:
            os.link(ckpt, dest)          # no copy of a big file when the file system allows it
        except OSError:
            shutil.copy2(ckpt, dest)
        return [str(dest)]
    if kind == "torchscript":
        path = export.export_torchscript(ckpt, out / f"{run_id}.pt")
    else:
        path = export.export_onnx(ckpt, out / f"{run_id}.onnx")
    return [str(path), str(export.sidecar_path(path))]


def pair_view(ctx: AppContext, run_a: str | None, run_b: str | None, normalize: bool = True,
              who: identity.Who | None = None):
    """(heatmap A, heatmap B, summary markdown, difference table, McNemar's paired test in words) for
    two runs (that ``who`` may see)."""
    h = _history(ctx)
    figs, reports, labels, notes = [], [], [], []
    for which, run_id in (("A", run_a), ("B", run_b)):
        if run_id and who is not None:
            whose = tab_evaluate.whose_run(h.check_access(run_id, who, private=ctx.private_runs), who)
            if whose:   # someone else's run says so (in words, never with its owner's token)
                notes.append(f"_Run {which}: {whose}_")
        if not run_id:
            figs.append(plots.empty_figure(f"Pick run {which}", f"Run {which}"))
            reports.append(None)
            labels.append(which)
            continue
        record = runs.load_run(h.run_dir(run_id), live_ids=set(ctx.manager.running()))
        report = record.report()
        label = h.label(run_id)
        labels.append(label)
        reports.append(report)
        if report is None:
            figs.append(plots.empty_figure(f"{label}: no test evaluation yet ({record.status})", f"Run {which}"))
        else:
            figs.append(plots.confusion_heatmap(report.confusion, report.class_names, normalize=normalize,
                                                title=f"{which}: {label} — accuracy {report.accuracy:.1%}",
                                                compact=True))
    empty = pd.DataFrame(columns=DIFF_DISPLAY)
    whose = "".join(f"{n}\n\n" for n in notes)
    if reports[0] is None or reports[1] is None:
        return figs[0], figs[1], whose + "Pick two evaluated runs to see where they differ.", empty, ""
    dirs = [h.run_dir(r) for r in (run_a, run_b)]
    paired = paired_test(dirs[0], dirs[1], run_a == run_b)
    try:
        diff = compare.confusion_difference(reports[0], reports[1], top_pairs=10, labels=("A", "B"))
    except LabError as err:
        return figs[0], figs[1], f"{whose}**Cannot compare:** {md_text(str(err))}", empty, paired
    text = (f"{whose}**A** = {md_text(labels[0])} ({compare.scores_text(reports[0], dirs[0])}) · "
            f"**B** = {md_text(labels[1])} ({compare.scores_text(reports[1], dirs[1])}). "
            "Rows: per-class recall, then the confusions that changed most (share of the true class, %).")
    table = pd.DataFrame({"kind": diff["kind"], "true class": diff["true class"],
                          "predicted class": diff["predicted class"], "A (%)": (diff["A"] * 100).round(1),
                          "B (%)": (diff["B"] * 100).round(1),
                          "B − A (points)": (diff["difference"] * 100).round(1)}, columns=DIFF_DISPLAY)
    return figs[0], figs[1], text, _for_display(table), paired


def image_diff_view(ctx: AppContext, run_a: str | None, run_b: str | None, who: identity.Who) -> tuple:
    """(sentence, A-right-B-wrong gallery, B-right-A-wrong gallery) of two runs ``who`` may see."""
    if not run_a or not run_b or run_a == run_b:
        return "", gr.update(value=[], label="A right, B wrong"), gr.update(value=[], label="B right, A wrong")
    h = _history(ctx)
    for run_id in (run_a, run_b):
        h.check_access(run_id, who, private=ctx.private_runs)
    try:
        diff = compare.image_diff(h.run_dir(run_a), h.run_dir(run_b), limit=24, data_dir=ctx.data_dir)
    except LabError as err:
        return (f"**No image-level comparison:** {md_text(str(err))}", gr.update(value=[]), gr.update(value=[]))
    gallery = lambda items: [(i["image"], f"{i['file'].rsplit('/', 1)[-1]}: {i['caption']}") for i in items]  # noqa: E731
    return (f"**Image by image:** {md_text(diff.sentence)} Below, the most confident wrong answers first "
            "(true class → the other run's answer).",
            gr.update(value=gallery(diff.a_only), label=f"A right, B wrong ({diff.a_only_count})"),
            gr.update(value=gallery(diff.b_only), label=f"B right, A wrong ({diff.b_only_count})"))


def paired_test(dir_a, dir_b, same_run: bool) -> str:
    """McNemar's test of runs A and B on their shared test images, in words; or why there is none."""
    if same_run:
        return "**Paired test:** A and B are the same run; pick two different runs."
    try:
        result = stats.compare_runs(dir_a, dir_b, names=("A", "B"))
    except LabError as err:
        return f"**No paired test:** {md_text(str(err))}"
    return (f"**Paired test (McNemar, on the same {result.n:,} test images):** {md_text(result.sentence)} "
            "Only the images that one run gets right and the other wrong decide it.")


def default_picks(ctx: AppContext, who: identity.Who, session: dict | None, choices, evaluated,
                  a: str | None, b: str | None, hist_value: str | None) -> tuple:
    """(Run A, Run B, the history's selected run) after a refresh of the lists.

    Run A and the history's run follow this browser's latest run as Evaluate does
    (``tab_evaluate.pick_value``: a run this page has just trained, else a pick the user made,
    else this browser's newest run). Run B keeps a pick other than A, else takes this browser's
    next newest evaluated run (after training again, A is the new run and B the one before);
    it is never filled with someone else's run by default."""
    # This browser's run ids: read from the history once, and only if a pick needs them.
    own = functools.cache(lambda: tab_evaluate.own_run_ids(_history(ctx), who))
    a = tab_evaluate.pick_value(evaluated, _keep(a, evaluated), session, view="compare_a", own=own)
    b = _keep(b, evaluated)
    if b is None or b == a:
        mine = own()
        b = next((r for _, r in evaluated if r in mine and r != a), None)
    hist_value = tab_evaluate.pick_value(choices, _keep(hist_value, choices), session, view="history", own=own)
    return a, b, hist_value


# ---------------------------------------------------------------------------------------------
# The handlers: one controller per page (built once in ``build``; the tests call its methods)
# ---------------------------------------------------------------------------------------------
class CompareTab(Controller):
    """The Compare tab's handlers over one AppContext. ``w`` are the tab's widgets once it is
    built (``train_all`` reads its inputs by widget); every other handler works without them.

    Every handler that reads or changes runs takes the browser token and the request: who asks
    decides what they see (--private-runs) and what they may change (core.identity). Run ids the
    page sends back are checked against the history; nothing is taken as a path."""

    def __init__(self, ctx: AppContext, widgets: CompareWidgets | None = None):
        super().__init__(ctx)   # each handler bound once (one concurrency group), a repr without ctx
        self.w = widgets

    # ---- shared steps -------------------------------------------------------------------
    def _who(self, browser_id, request) -> identity.Who:
        return who_is(self.ctx, request, browser_id)

    def _selection_update(self, value, who):
        choices = run_choices(self.ctx, who=who)
        return gr.update(choices=choices, value=_keep(list(value or []), choices))

    def _render(self, run_ids, memory_sync: bool = False, live: bool | None = None):
        """live: whether a run was still live when the caller looked (before rendering). A run
        that ends while this renders is then drawn by the next tick, not left as 'running'."""
        ctx = self.ctx
        run_ids = list(run_ids or [])
        h = _history(ctx)
        if live is None:
            live = _live(ctx, run_ids)
        if memory_sync:
            df = compare.leaderboard(h, run_ids, memory=True, refresh=True)
            busy = False
        else:
            busy = _estimate_memory_later(ctx, run_ids)
            # While runs train the index (kept current by the job listener) is enough; once none
            # is live, re-read the folders: the listener may not have recorded the last run's end
            # yet, and the timer stops after this render.
            df = compare.leaderboard(h, run_ids, memory=False, refresh=not live)
        return curves_figure(ctx, run_ids), leaderboard_styled(leaderboard_display(df)), queue_text(ctx, run_ids), busy

    def _pair_defaults(self, run_ids, a, b, who):
        """Fill the empty side-by-side dropdowns with the first two evaluated selected runs."""
        if a and b:
            return gr.skip(), gr.skip()
        evaluated = run_choices(self.ctx, need="eval", who=who)
        ids = {v for _, v in evaluated}
        picks = [r for r in run_ids or [] if r in ids]
        if len(picks) < 2:
            return gr.skip(), gr.skip()
        return gr.update(choices=evaluated, value=picks[0]), gr.update(choices=evaluated, value=picks[1])

    def _after_edit(self, message, filter_text, status, who):
        return message, history_table(self.ctx, filter_text, status, who)

    # ---- planning and training ----------------------------------------------------------
    @safe
    def preview_plan(self, models_v, lrs_v, freeze_v, epochs_v):
        try:
            n_lr = len(compare.parse_lrs(lrs_v) or [None])
            n_fr = len(compare.parse_freeze_modes(freeze_v) or [None])
        except LabError as err:
            return f"⚠ {err}"
        n = len(models_v or []) * n_lr * n_fr
        if n == 0:
            return "Pick at least one model."
        extra = f" — more than {compare.MAX_RUNS} is refused" if n > compare.MAX_RUNS else ""
        return (f"**{n} run(s)** of {int(epochs_v)} epoch(s): {len(models_v)} model(s) × {n_lr} learning "
                f"rate(s) × {n_fr} freezing mode(s){extra}. They run {self.ctx.manager.max_jobs} at a time.")

    @safe
    def train_all(self, values: dict, request: gr.Request):
        ctx, w = self.ctx, self.w
        session, browser_id = values[ctx.session], values[ctx.browser_id]
        if session is None:
            session = {}
        if not session.get("data_source"):
            session["data_source"] = {"source": "sample", "location": None}
        base = config_from_widgets(ctx, values, session)
        base.epochs = int(values[w.epochs])
        configs = compare.plan_comparison(base, values[w.models], compare.parse_lrs(values[w.lrs]),
                                          compare.parse_freeze_modes(values[w.freeze]))
        who = self._who(browser_id, request)
        group = compare.submit_comparison(ctx.manager, configs, who.owner, _history(ctx))
        session["cmp_group"] = str(group)
        fig, board_df, qtext, _ = self._render(group.run_ids)
        choices = run_choices(ctx, who=who)
        return (gr.update(choices=choices, value=list(group.run_ids)), fig, board_df,
                f"Queued {len(configs)} run(s) as comparison {group}.\n" + qtext, gr.Timer(active=True))

    @safe
    def stop_selected(self, run_ids, browser_id, request: gr.Request):
        ctx = self.ctx
        who = self._who(browser_id, request)
        stopped, others = [], []
        for r in run_ids or []:
            job = ctx.manager.find(r)
            if job is None or job.done:
                continue
            if not identity.can_change(job.owner, who):
                others.append(r)
                continue
            ctx.manager.stop(r)
            stopped.append(r)
        text = f"Stopping {len(stopped)} run(s) (each keeps a checkpoint; Resume in the history continues it)."
        if others:
            text += (f" {len(others)} run(s) belong to someone else and were left running: only their owner "
                     "or the teacher can stop them.")
        return text + "\n" + queue_text(ctx, visible(ctx, who, run_ids))

    # ---- what is compared: the timer, the selection, the comparisons --------------------
    @safe
    def poll(self, run_ids, a=None, b=None, filter_text=None, status=None, browser_id=None,
             request: gr.Request = None):
        who = self._who(browser_id, request)
        run_ids = visible(self.ctx, who, run_ids)
        # Read before rendering: if a run ends while the leaderboard is drawn from the index, the
        # timer goes on and the next tick re-reads its folder (else it stayed 'running').
        live = _live(self.ctx, run_ids)
        fig, board_df, qtext, busy = self._render(run_ids, live=live)
        if live or busy:
            return (gr.skip(), fig, board_df, qtext, gr.Timer(active=True), gr.skip(), gr.skip(), gr.skip())
        # Last tick: refresh the run labels (statuses), open the side-by-side view, and show the
        # finished runs in the history table (it only refreshed on request before).
        return ((self._selection_update(run_ids, who), fig, board_df, qtext, gr.Timer(active=False))
                + self._pair_defaults(run_ids, a, b, who) + (history_table(self.ctx, filter_text, status, who),))

    @safe
    def show_selected(self, run_ids, a=None, b=None, browser_id=None, request: gr.Request = None):
        who = self._who(browser_id, request)
        run_ids = visible(self.ctx, who, run_ids)
        live = _live(self.ctx, run_ids)
        fig, board_df, qtext, _ = self._render(run_ids, memory_sync=not live, live=live)
        # The side-by-side view starts with the first two evaluated runs of the selection.
        return (fig, board_df, qtext, gr.Timer(active=live)) + self._pair_defaults(run_ids, a, b, who)

    @safe
    def pick_group(self, group_id, session=None, browser_id=None, request: gr.Request = None):
        if not group_id:
            return (gr.skip(),) * 7
        who = self._who(browser_id, request)
        if group_id not in {g for _, g in group_choices(self.ctx, who)}:
            raise ConfigError("No such comparison here: pick one from the list.")
        if session is not None:
            session["cmp_group"] = group_id
        ids = compare.group_run_ids(group_id, _history(self.ctx))
        # A new selection: the side-by-side view starts again from its first two evaluated runs.
        return ((gr.update(choices=run_choices(self.ctx, who=who), value=ids),)
                + self.show_selected(ids, None, None, browser_id, request))

    @safe
    def refresh_groups(self, session, browser_id, request: gr.Request):
        """The comparison list; the value is this session's comparison, else this browser's latest."""
        who = self._who(browser_id, request)
        choices = group_choices(self.ctx, who)
        current = (session or {}).get("cmp_group")
        if current is None:
            own = compare.list_groups(_history(self.ctx), owner=who.owner)
            current = own[0]["group_id"] if own else None
        return gr.update(choices=choices, value=_keep(current, choices))

    @safe
    def reconnect(self, session, browser_id, request: gr.Request):
        """After a reload or a server restart: show this browser's latest comparison again, whether
        it is still training (the timer follows it) or long finished (its curves and leaderboard)."""
        who = self._who(browser_id, request)
        own = compare.list_groups(_history(self.ctx), owner=who.owner)
        choices = group_choices(self.ctx, who)
        if not own:
            return (gr.update(choices=choices),) + (gr.skip(),) * 2
        latest = own[0]
        session["cmp_group"] = latest["group_id"]
        # The timer's first tick draws the curves and the leaderboard, and stops once none is live.
        return (gr.update(choices=choices, value=latest["group_id"]),
                gr.update(choices=run_choices(self.ctx, who=who), value=latest["run_ids"]), gr.Timer(active=True))

    @safe
    def refresh_choices(self, run_ids, a, b, hist_value, session=None, browser_id=None, request: gr.Request = None):
        """The run lists, newest first; Run A, Run B and the history's run follow this browser's
        latest run (``default_picks``)."""
        who = self._who(browser_id, request)
        choices = run_choices(self.ctx, who=who)
        evaluated = run_choices(self.ctx, need="eval", who=who)
        a, b, hist_value = default_picks(self.ctx, who, session, choices, evaluated, a, b, hist_value)
        return (gr.update(choices=choices, value=_keep(list(run_ids or []), choices)),
                gr.update(choices=evaluated, value=a), gr.update(choices=evaluated, value=b),
                gr.update(choices=choices, value=hist_value))

    @safe
    def leaderboard_csv(self, run_ids, browser_id=None, request: gr.Request = None):
        run_ids = visible(self.ctx, self._who(browser_id, request), run_ids)
        if not run_ids:
            raise ConfigError("Pick runs to compare first: the CSV is the leaderboard of the selected runs.")
        df = compare.leaderboard(_history(self.ctx), list(run_ids), memory=True)
        path = Path(tempfile.mkdtemp(prefix="lab-leaderboard-")) / f"leaderboard-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        return gr.update(value=str(compare.leaderboard_csv(df, path)), visible=True)  # hidden until there is one

    @safe
    def show_pair(self, a, b, normalize_rows, browser_id=None, request: gr.Request = None):
        return pair_view(self.ctx, a, b, bool(normalize_rows), self._who(browser_id, request))

    @safe
    def show_image_diff(self, a, b, browser_id=None, request: gr.Request = None):
        """The test images A gets right and B wrong, and the reverse, with their counts."""
        return image_diff_view(self.ctx, a, b, self._who(browser_id, request))

    # ---- the run history ----------------------------------------------------------------
    @safe
    def refresh_history(self, filter_text, status, browser_id=None, request: gr.Request = None):
        return history_table(self.ctx, filter_text, status, self._who(browser_id, request))

    @safe
    def select_row(self, df: pd.DataFrame, browser_id, request: gr.Request, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if df is None or row is None or row >= len(df):
            return gr.skip()
        return gr.update(value=str(df.iloc[row]["run id"]),
                         choices=run_choices(self.ctx, who=self._who(browser_id, request)))

    @safe
    def fill_fields(self, run_id, browser_id=None, request: gr.Request = None):
        if not run_id:
            return "", "", ""
        h = _history(self.ctx)
        h.check_access(run_id, self._who(browser_id, request), private=self.ctx.private_runs)
        row = h.get(run_id, refresh=False)
        return row.get("name") or "", row.get("tags") or "", ""

    @safe
    def rename(self, run_id, new_name, filter_text, status, browser_id=None, request: gr.Request = None):
        if not run_id:
            raise ConfigError("Pick a run in the history table first.")
        who = self._who(browser_id, request)
        _history(self.ctx).rename(run_id, new_name, who=who)
        return self._after_edit(f"Renamed {run_id} to “{new_name.strip()}”." if (new_name or "").strip()
                                else f"Cleared the name of {run_id}.", filter_text, status, who)

    @safe
    def save_tags(self, run_id, tag_text, filter_text, status, browser_id=None, request: gr.Request = None):
        if not run_id:
            raise ConfigError("Pick a run in the history table first.")
        who = self._who(browser_id, request)
        row = _history(self.ctx).set_tags(run_id, tag_text, who=who)
        return self._after_edit(f"Tags of {run_id}: {row.get('tags') or '(none)'}.", filter_text, status, who)

    @safe
    def delete(self, run_id, confirm_text, filter_text, status, run_ids, browser_id=None,
               request: gr.Request = None):
        if not run_id:
            raise ConfigError("Pick a run in the history table first.")
        who = self._who(browser_id, request)
        message = _history(self.ctx).delete(run_id, confirm_text, who=who)
        msg, table_df = self._after_edit(message, filter_text, status, who)
        choices = run_choices(self.ctx, who=who)
        return (msg, table_df, "", gr.update(choices=choices, value=None),
                gr.update(choices=choices, value=_keep(list(run_ids or []), choices)))

    @safe
    def resume(self, run_id, epochs, run_ids, browser_id, request: gr.Request):
        if not run_id:
            raise ConfigError("Pick a run in the history table first: a stopped, failed or interrupted one "
                              "goes on where it stopped; a finished one trains further up to 'Epochs in all'.")
        epochs = int(epochs or 0) or None   # 0 or empty: as planned
        who = self._who(browser_id, request)
        job = _history(self.ctx).resume(run_id, epochs=epochs, who=who)   # the run keeps its owner
        ids = list(dict.fromkeys(visible(self.ctx, who, run_ids) + [job.job_id]))
        choices = run_choices(self.ctx, who=who)
        # The box goes back to 0: a number left there must not re-plan the next run resumed.
        return (f"Resuming {run_id} from its last checkpoint, up to epoch {job.config.epochs} ({job.status}); "
                "it is added to the comparison above.",
                gr.update(choices=choices, value=ids), gr.Timer(active=True), 0)

    @safe
    def add_to_comparison(self, run_id, run_ids, browser_id=None, request: gr.Request = None):
        if not run_id:
            raise ConfigError("Pick a run in the history table first.")
        who = self._who(browser_id, request)
        _history(self.ctx).check_access(run_id, who, private=self.ctx.private_runs)
        ids = list(dict.fromkeys(visible(self.ctx, who, run_ids) + [run_id]))
        return gr.update(choices=run_choices(self.ctx, who=who), value=ids)

    # ---- exports: one handler per kind (one endpoint each) ------------------------------
    def _export(self, kind, run_id, browser_id, request):
        files = export_files(self.ctx, run_id, kind, self._who(browser_id, request))
        return files, f"Exported {kind} of {run_id}: " + ", ".join(Path(f).name for f in files)

    @safe
    def export_checkpoint(self, run_id, browser_id=None, request: gr.Request = None):
        return self._export("checkpoint", run_id, browser_id, request)

    @safe
    def export_torchscript(self, run_id, browser_id=None, request: gr.Request = None):
        return self._export("torchscript", run_id, browser_id, request)

    @safe
    def export_onnx(self, run_id, browser_id=None, request: gr.Request = None):
        return self._export("onnx", run_id, browser_id, request)

    @safe
    def export_metrics(self, run_id, browser_id=None, request: gr.Request = None):
        return self._export("metrics", run_id, browser_id, request)

    def exporter(self, kind: str):
        """The export handler of ``kind`` (one of EXPORT_KINDS)."""
        if kind not in EXPORT_KINDS:
            raise ConfigError(f"Unknown export {kind!r}; choose one of {', '.join(EXPORT_KINDS)}.")
        return getattr(self, f"export_{kind}")


# ---------------------------------------------------------------------------------------------
# The layout: plain functions that place the widgets and return them
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class CompareWidgets:
    """The Compare tab's widgets (what ``_wire`` connects and ``on_load`` refreshes)."""
    models: gr.CheckboxGroup
    lrs: gr.Textbox
    freeze: gr.Textbox
    epochs: gr.Slider
    plan: gr.Markdown
    train: gr.Button
    stop: gr.Button
    queue: gr.Textbox
    group: gr.Dropdown
    selected: gr.Dropdown
    refresh: gr.Button
    curves: gr.Plot
    board: gr.Dataframe
    csv_btn: gr.Button
    csv_file: gr.File
    run_a: gr.Dropdown
    run_b: gr.Dropdown
    normalize: gr.Checkbox
    cm_a: gr.Plot
    cm_b: gr.Plot
    pair_md: gr.Markdown
    mcnemar: gr.Markdown
    pair_table: gr.Dataframe
    diff_note: gr.Markdown
    diff_a: gr.Gallery
    diff_b: gr.Gallery
    filter: gr.Textbox
    status: gr.Dropdown
    hist_refresh: gr.Button
    table: gr.Dataframe
    hist_run: gr.Dropdown
    add_btn: gr.Button
    resume_epochs: gr.Number
    resume_btn: gr.Button
    name: gr.Textbox
    rename_btn: gr.Button
    tags: gr.Textbox
    tags_btn: gr.Button
    confirm: gr.Textbox
    delete_btn: gr.Button
    exports: dict                 # export kind → its button
    exp_file: gr.File
    hist_msg: gr.Markdown
    timer: gr.Timer

    @property
    def lists(self) -> list:
        """The run lists that follow the history (refresh_choices' inputs and outputs)."""
        return [self.selected, self.run_a, self.run_b, self.hist_run]

    @property
    def show_outputs(self) -> list:
        return [self.curves, self.board, self.queue, self.timer, self.run_a, self.run_b]


def _plan_column() -> dict:
    """Left column: what to train (models × learning rates × freezing modes), Train all, Stop."""
    names = [s.name for s in list_models()]
    models = gr.CheckboxGroup([(s.name, s.name) for s in list_models()],
                              value=[m for m in DEFAULT_MODELS if m in names], label="Models",
                              elem_id="cmp_models")
    lrs = gr.Textbox(label="Learning rates (comma-separated)", placeholder="empty: the Train tab's, e.g. 0.1, 0.01",
                     elem_id="cmp_lrs")
    freeze = gr.Textbox(label="Freezing modes (comma-separated)",
                        placeholder="empty: the Model tab's; none, features, stages:2",
                        elem_id="cmp_freeze")
    epochs = gr.Slider(1, 100, value=3, step=1, label="Epochs per run", elem_id="cmp_epochs")
    plan = gr.Markdown("", elem_id="cmp_plan")
    with gr.Row():
        train = gr.Button("Train all", variant="primary", elem_id="cmp_train")
        stop = gr.Button("Stop these runs", variant="stop", elem_id="cmp_stop")
    queue = gr.Textbox(label="Queue", lines=5, max_lines=12, interactive=False, elem_id="cmp_queue")
    return {"models": models, "lrs": lrs, "freeze": freeze, "epochs": epochs, "plan": plan, "train": train,
            "stop": stop, "queue": queue}


def _runs_column(ctx: AppContext) -> dict:
    """Right column: the comparison, the runs compared and their curves."""
    group = gr.Dropdown(label="Comparison", choices=[], value=None, elem_id="cmp_group",
                        info="A comparison trained earlier (kept across restarts); "
                             "picking one shows its runs")
    with gr.Row():
        selected = gr.Dropdown(label="Runs compared", choices=[], value=[], multiselect=True,
                               elem_id="cmp_runs", scale=5,
                               info="Runs of a comparison are added here; add finished runs from the history")
        refresh = gr.Button("Refresh", elem_id="cmp_refresh", scale=1)
    curves = gr.Plot(curves_figure(ctx, []), label="Loss and accuracy", elem_id="cmp_curves")
    return {"group": group, "selected": selected, "refresh": refresh, "curves": curves}


def _leaderboard() -> dict:
    board = gr.Dataframe(pd.DataFrame(columns=LEADERBOARD_DISPLAY), label="Leaderboard (sort with the ⋮ menu of a column header)",
                         interactive=False, wrap=True, elem_id="cmp_leaderboard",
                         # numbers sort as numbers (9 before 10), the rest as text
                         datatype=["number" if c.endswith(("(%)", "(s)", "(MiB)", "F1", "params", "images/s"))
                                   else "str" for c in LEADERBOARD_DISPLAY],
                         # the numbers get room for ~9 characters a line; headers wrap at spaces (CSS)
                         elem_classes="lab-word-headers",
                         column_widths=["14%", "11%", "7%"] + [f"{68 / 10:.2f}%"] * 10)
    with gr.Row():
        csv_btn = gr.Button("Download CSV", elem_id="cmp_csv_btn", scale=1)
        csv_file = gr.File(label="Leaderboard CSV", interactive=False, elem_id="cmp_csv", scale=3, visible=False)
    return {"board": board, "csv_btn": csv_btn, "csv_file": csv_file}


def _pair_section() -> dict:
    """Two runs' confusion matrices side by side, and where they differ."""
    gr.Markdown("### Two runs side by side", elem_id="cmp_pair_title")
    with gr.Row():
        run_a = gr.Dropdown(label="Run A", choices=[], elem_id="cmp_run_a", scale=3)
        run_b = gr.Dropdown(label="Run B", choices=[], elem_id="cmp_run_b", scale=3)
        normalize = gr.Checkbox(True, label="Row-normalised (recall)", elem_id="cmp_normalize", scale=1)
    with gr.Row():
        cm_a = gr.Plot(plots.empty_figure("Pick run A", "Run A"), label="Run A", elem_id="cmp_cm_a")
        cm_b = gr.Plot(plots.empty_figure("Pick run B", "Run B"), label="Run B", elem_id="cmp_cm_b")
    pair_md = gr.Markdown("Pick two evaluated runs to see where they differ.", elem_id="cmp_pair_summary")
    # McNemar's paired test: is one run really better on these test images, or is it luck?
    mcnemar = gr.Markdown("", elem_id="cmp_mcnemar")
    pair_table = gr.Dataframe(pd.DataFrame(columns=DIFF_DISPLAY), label="Where they differ", interactive=False,
                              elem_id="cmp_diff")
    # image by image: what one run gets right and the other wrong (the loop of Clean data ends here)
    diff_note = gr.Markdown("", elem_id="cmp_diff_note")
    with gr.Row():
        diff_a = gr.Gallery(label="A right, B wrong", columns=4, height=300, fit_columns=False, object_fit="contain", elem_id="cmp_diff_a",
                            allow_preview=False)
        diff_b = gr.Gallery(label="B right, A wrong", columns=4, height=300, fit_columns=False, object_fit="contain", elem_id="cmp_diff_b",
                            allow_preview=False)
    return {"run_a": run_a, "run_b": run_b, "normalize": normalize, "cm_a": cm_a, "cm_b": cm_b,
            "pair_md": pair_md, "mcnemar": mcnemar, "pair_table": pair_table, "diff_note": diff_note,
            "diff_a": diff_a, "diff_b": diff_b}


def _history_table_rows() -> dict:
    """The history's filter and table, and the run picked in it (Add to comparison, Resume)."""
    with gr.Row():
        filt = gr.Textbox(label="Filter", placeholder="words in the name, model, dataset, tags...",
                          elem_id="cmp_hist_filter", scale=3)
        status = gr.Dropdown([ALL_STATUSES, ev.FINISHED, ev.RUNNING, ev.QUEUED, ev.STOPPED, ev.FAILED,
                              ev.INTERRUPTED], value=ALL_STATUSES, label="Status",
                             elem_id="cmp_hist_status", scale=1)
        hist_refresh = gr.Button("Refresh", elem_id="cmp_hist_refresh", scale=1)
    table = gr.Dataframe(pd.DataFrame(columns=HISTORY_COLUMNS), label="Runs (click a row to select it)",
                         interactive=False, wrap=True, elem_id="cmp_hist_table", elem_classes="lab-word-headers",
                         column_widths=["16%", "11%", "6%", "9%", "9%", "6%", "5%", "6%", "6%", "9%", "8%", "9%"])
    with gr.Row():
        hist_run = gr.Dropdown(label="Selected run", choices=[], elem_id="cmp_hist_run", scale=3)
        add_btn = gr.Button("Add to comparison", elem_id="cmp_hist_add", scale=1)
        resume_epochs = gr.Number(0, label="Epochs in all (0 = as planned)", precision=0, minimum=0,
                                  info="above the epochs done, a finished run trains further",
                                  elem_id="cmp_resume_epochs", scale=1)
        resume_btn = gr.Button("Resume", elem_id="cmp_resume", scale=1)
    return {"filter": filt, "status": status, "hist_refresh": hist_refresh, "table": table, "hist_run": hist_run,
            "add_btn": add_btn, "resume_epochs": resume_epochs, "resume_btn": resume_btn}


def _history_edit_rows() -> dict:
    """Rename, tag, delete and export the run picked in the history."""
    with gr.Row():
        name = gr.Textbox(label="Name", elem_id="cmp_hist_name", scale=3)
        rename_btn = gr.Button("Rename", elem_id="cmp_rename", scale=1)
        tags = gr.Textbox(label="Tags (comma-separated)", elem_id="cmp_hist_tags", scale=3)
        tags_btn = gr.Button("Save tags", elem_id="cmp_tags_btn", scale=1)
    with gr.Row():
        confirm = gr.Textbox(label="To delete, type the run id", elem_id="cmp_delete_confirm", scale=3)
        delete_btn = gr.Button("Delete run", variant="stop", elem_id="cmp_delete", scale=1)
    with gr.Row():
        exports = {"checkpoint": gr.Button("Checkpoint (.pth)", elem_id="cmp_export_ckpt"),
                   "torchscript": gr.Button("TorchScript (.pt)", elem_id="cmp_export_ts"),
                   "onnx": gr.Button("ONNX (.onnx)", elem_id="cmp_export_onnx"),
                   "metrics": gr.Button("Metrics (CSV)", elem_id="cmp_export_csv")}
    exp_file = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="cmp_export_file",
                       height=120)
    hist_msg = gr.Markdown("", elem_id="cmp_hist_msg")
    return {"name": name, "rename_btn": rename_btn, "tags": tags, "tags_btn": tags_btn, "confirm": confirm,
            "delete_btn": delete_btn, "exports": exports, "exp_file": exp_file, "hist_msg": hist_msg}


def _layout(ctx: AppContext) -> CompareWidgets:
    gr.Markdown("Train several models on the data chosen on the **Data** tab (same split, seed, "
                "augmentation and epochs), or pick finished runs, and compare them.", elem_id="cmp_intro")
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            plan = _plan_column()
        with gr.Column(scale=2):
            runs_ = _runs_column(ctx)
    board, pair = _leaderboard(), _pair_section()
    with gr.Accordion("Run history", open=False, elem_id="cmp_history"):
        history = _history_table_rows() | _history_edit_rows()
    return CompareWidgets(**plan, **runs_, **board, **pair, **history, timer=gr.Timer(POLL_S, active=False))


# ---------------------------------------------------------------------------------------------
# The wiring: which event calls which handler (the api_names are the public endpoints)
# ---------------------------------------------------------------------------------------------
def _wire_comparison(ctx: AppContext, w: CompareWidgets, tab: CompareTab) -> None:
    me = ctx.browser_id   # the browser token, last input of every run handler
    for widget in (w.models, w.lrs, w.freeze, w.epochs):
        widget.change(tab.preview_plan, [w.models, w.lrs, w.freeze, w.epochs], w.plan, api_visibility="private",
                      show_progress="hidden", concurrency_limit=None)
    live_outputs = [w.selected, w.curves, w.board, w.queue, w.timer]
    train_inputs = ctx.field_widgets() | {ctx.session, ctx.browser_id, w.models, w.lrs, w.freeze, w.epochs}
    w.train.click(tab.train_all, inputs=train_inputs, outputs=live_outputs, api_name="compare_train_all",
                  show_progress="hidden", concurrency_limit=None).then(
        tab.refresh_groups, [ctx.session, me], w.group, api_visibility="private",
        show_progress="hidden", concurrency_limit=None)
    w.stop.click(tab.stop_selected, [w.selected, me], w.queue, api_name="compare_stop",
                 show_progress="hidden", concurrency_limit=None)
    w.timer.tick(tab.poll, [w.selected, w.run_a, w.run_b, w.filter, w.status, me],
                 [w.selected, w.curves, w.board, w.queue, w.timer, w.run_a, w.run_b, w.table],
                 api_name="compare_poll", show_progress="hidden", concurrency_limit=None)
    w.selected.input(tab.show_selected, [w.selected, w.run_a, w.run_b, me], w.show_outputs,
                     api_name="compare_show", concurrency_limit=None)
    w.group.input(tab.pick_group, [w.group, ctx.session, me], [w.selected] + w.show_outputs,
                  api_name="compare_group", concurrency_limit=None)
    w.refresh.click(tab.refresh_choices, w.lists + [ctx.session, me], w.lists, api_name="compare_runs",
                    concurrency_limit=None)
    w.csv_btn.click(tab.leaderboard_csv, [w.selected, me], w.csv_file, api_name="compare_csv",
                    concurrency_limit=None)
    pair_inputs, pair_outputs = [w.run_a, w.run_b, w.normalize, me], [w.cm_a, w.cm_b, w.pair_md, w.pair_table, w.mcnemar]
    for widget in (w.run_a, w.run_b, w.normalize):
        # reads both runs' predictions (McNemar) and bootstraps their F1: a few at a time
        widget.change(tab.show_pair, pair_inputs, pair_outputs, api_visibility="private",
                      concurrency_id="cmp_pair", concurrency_limit=2).then(
            tab.show_image_diff, [w.run_a, w.run_b, me], [w.diff_note, w.diff_a, w.diff_b],
            api_visibility="private", concurrency_id="cmp_pair", concurrency_limit=2, show_progress="hidden")


def _wire_history(ctx: AppContext, w: CompareWidgets, tab: CompareTab) -> None:
    me = ctx.browser_id
    hist_inputs, edited = [w.filter, w.status, me], [w.hist_msg, w.table]
    w.hist_refresh.click(tab.refresh_history, hist_inputs, w.table, api_name="compare_history",
                         concurrency_limit=None)
    w.filter.submit(tab.refresh_history, hist_inputs, w.table, api_visibility="private", concurrency_limit=None)
    w.status.change(tab.refresh_history, hist_inputs, w.table, api_visibility="private", concurrency_limit=None)
    w.table.select(tab.select_row, [w.table, me], w.hist_run, api_visibility="private", concurrency_limit=None)
    w.hist_run.change(tab.fill_fields, [w.hist_run, me], [w.name, w.tags, w.confirm], api_visibility="private",
                      concurrency_limit=None)
    w.rename_btn.click(tab.rename, [w.hist_run, w.name, w.filter, w.status, me], edited, api_name="rename_run",
                       concurrency_limit=None).success(   # the lists show the new name at once
        tab.refresh_choices, w.lists + [ctx.session, me], w.lists, api_visibility="private",
        show_progress="hidden", concurrency_limit=None)
    w.tags_btn.click(tab.save_tags, [w.hist_run, w.tags, w.filter, w.status, me], edited, api_name="tag_run",
                     concurrency_limit=None)
    w.delete_btn.click(tab.delete, [w.hist_run, w.confirm, w.filter, w.status, w.selected, me],
                       edited + [w.confirm, w.hist_run, w.selected], api_name="delete_run", concurrency_limit=None)
    w.resume_btn.click(tab.resume, [w.hist_run, w.resume_epochs, w.selected, me],
                       [w.hist_msg, w.selected, w.timer, w.resume_epochs], api_name="resume_run",
                       concurrency_limit=None)
    w.add_btn.click(tab.add_to_comparison, [w.hist_run, w.selected, me], w.selected, api_name="compare_add",
                    concurrency_limit=None).then(tab.show_selected, [w.selected, w.run_a, w.run_b, me],
                                                 w.show_outputs, api_visibility="private", concurrency_limit=None)
    for kind, btn in w.exports.items():
        # Exports use the CPU for a few seconds: one at a time for the whole server.
        btn.click(tab.exporter(kind), [w.hist_run, me], [w.exp_file, w.hist_msg], api_name=f"export_{kind}",
                  concurrency_id="cmp_export", concurrency_limit=1)


def build(ctx: AppContext) -> CompareTab:
    """Place the tab's widgets, wire them to one CompareTab, and keep it in ``ctx.shared["compare"]``
    (``on_load`` adds the page-load events to it)."""
    _history(ctx)
    widgets = _layout(ctx)
    tab = CompareTab(ctx, widgets)
    _wire_comparison(ctx, widgets, tab)
    _wire_history(ctx, widgets, tab)
    ctx.shared["compare"] = tab
    return tab


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    """On page load and when the tab is opened: refresh the run lists and the history table; after
    a reload, select this browser's comparison runs that are still training and poll them."""
    tab: CompareTab = ctx.shared["compare"]
    w = tab.w
    list_inputs, hist_inputs = w.lists + [ctx.session, ctx.browser_id], [w.filter, w.status, ctx.browser_id]
    demo.load(tab.refresh_choices, list_inputs, w.lists, api_visibility="private")
    demo.load(tab.refresh_history, hist_inputs, w.table, api_visibility="private")
    # The page-load refresh runs before the browser token is restored: once it is, the picks
    # follow this browser's runs (as Evaluate and Predict do).
    ctx.browser_id.change(tab.refresh_choices, list_inputs, w.lists, api_visibility="private",
                          show_progress="hidden")
    page_tab = ctx.shared.get("tab", {}).get("Compare")
    if page_tab is not None:
        page_tab.select(tab.refresh_choices, list_inputs, w.lists, api_visibility="private")
        page_tab.select(tab.refresh_history, hist_inputs, w.table, api_visibility="private")
    ctx.browser_id.change(tab.reconnect, [ctx.session, ctx.browser_id], [w.group, w.selected, w.timer],
                          api_visibility="private", show_progress="hidden", concurrency_limit=None)
    if page_tab is not None:
        page_tab.select(tab.refresh_groups, [ctx.session, ctx.browser_id], w.group, api_visibility="private",
                        concurrency_limit=None)
