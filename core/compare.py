"""Quick model comparison: plan a grid of runs, queue them as one group, rank them.

``plan_comparison`` turns one base configuration into the cartesian product models × learning
rates × freezing modes — same data, split, seed, epochs and augmentation, so only what is compared
changes. ``submit_comparison`` queues them on the JobManager (they run ``max_jobs`` at a time) and
records their group in the run history. ``leaderboard`` ranks finished (or running) runs with
their accuracy, size, speed and the predicted training memory; ``confusion_difference`` says
where two runs' confusion matrices differ most. ``plan_retrain`` pairs a configuration on the original
labels with the same on a dataset revision (core.revisions): the retrain loop's comparison.

Command line, every accuracy with its 95 % interval and, for two runs, McNemar's paired test:

    python -m core.compare runs/<run-a> runs/<run-b>      # run folders, or run ids in --runs-dir
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from core import resources, rundir, stats
from core.config import FREEZE_CHOICES, RunConfig
from core.errors import ConfigError, DataError, LabError
from core.metrics import EvalReport

MAX_RUNS = 24   # one click should not queue a day of training by accident

LEADERBOARD_COLUMNS = ["run", "model", "status", "best val accuracy", "test accuracy", "test images", "macro F1",
                       "parameters", "trainable parameters", "training time (s)", "images/s",
                       "predicted training memory (bytes)", "checkpoint size (bytes)", "run id"]
DIFF_COLUMNS = ["kind", "true class", "predicted class", "A", "B", "difference"]

# Sorting a leaderboard by one of these puts the biggest first by default.
_HIGHER_IS_BETTER = {"best val accuracy", "test accuracy", "macro F1", "images/s"}


# ---------------------------------------------------------------------------------------------
# Planning and submitting
# ---------------------------------------------------------------------------------------------
def parse_lrs(text: str | Sequence[float] | None) -> list[float] | None:
    """'0.1, 0.01 1e-3' → [0.1, 0.01, 0.001]; empty → None (keep the base learning rate)."""
    if text is None:
        return None
    items = text.replace(";", ",").replace(",", " ").split() if isinstance(text, str) else list(text)
    out: list[float] = []
    for item in items:
        try:
            lr = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"Learning rate {item!r} is not a number; write them comma-separated, "
                              "e.g. 0.1, 0.01, 1e-3.") from None
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"Learning rate {item!r} must be a positive number.")
        if lr not in out:
            out.append(lr)
    return out or None


def parse_freeze_modes(text: str | Sequence[str] | None) -> list[str] | None:
    """'none, features, stages:2' → ['none', 'features', 'stages:2']; empty → None."""
    if text is None:
        return None
    items = text.replace(";", ",").split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        mode = "".join(str(item).split()).lower().replace("=", ":")
        if not mode:
            continue
        _freeze_of(mode, 1)  # validates
        if mode not in out:
            out.append(mode)
    return out or None


def _freeze_of(mode: str, default_stages: int) -> tuple[str, int]:
    """'none' | 'features' | 'stages' | 'stages:N' → (freeze, freeze_stages)."""
    name, _, n = mode.partition(":")
    if name not in FREEZE_CHOICES or (n and name != "stages"):
        raise ConfigError(f"Freezing mode {mode!r} is not one of none, features, stages, stages:N "
                          "(N = how many leading stages to freeze).")
    if name != "stages":
        return name, 0
    if not n:
        return name, max(1, default_stages)
    if not n.isdigit() or int(n) < 1:
        raise ConfigError(f"Freezing mode {mode!r}: N in stages:N must be a whole number >= 1.")
    return name, int(n)


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def plan_comparison(base: RunConfig, models: Sequence[str], lrs: Sequence[float] | None = None,
                    freeze_modes: Sequence[str] | None = None) -> list[RunConfig]:
    """One RunConfig per (model, learning rate, freezing mode), in that nesting order.

    Everything else (data, split, seed, epochs, augmentation, optimiser...) is the base's. Each
    config gets a readable ``name`` such as ``"resnet18 lr=0.01"`` (``+ " freeze=features"`` when
    freezing modes are compared). A model's own weights file (``model.weights_path``) is kept only
    for the base's model: it would not fit another architecture.
    """
    from core.models import get_model_spec

    models = [str(m).strip() for m in (models or []) if str(m).strip()]
    if not models:
        raise ConfigError("Pick at least one model to compare.")
    models = list(dict.fromkeys(models))
    for name in models:
        get_model_spec(name)  # unknown → ModelError listing the valid names
    lrs = list(dict.fromkeys(float(v) for v in lrs)) if lrs else [base.optim.lr]
    for lr in lrs:
        if not lr > 0:
            raise ConfigError(f"Learning rate {lr} must be > 0.")
    modes = parse_freeze_modes(freeze_modes) if freeze_modes else None
    compare_freeze = modes is not None
    if modes is None:
        modes = [base.model.freeze if base.model.freeze != "stages" else f"stages:{base.model.freeze_stages}"]
    n = len(models) * len(lrs) * len(modes)
    if n > MAX_RUNS:
        raise ConfigError(f"This comparison would queue {n} runs ({len(models)} models × {len(lrs)} learning "
                          f"rates × {len(modes)} freezing modes); at most {MAX_RUNS} at once. Pick fewer.")
    base.validate()
    configs = []
    for model in models:
        for lr in lrs:
            for mode in modes:
                cfg = RunConfig.from_dict(copy.deepcopy(base.to_dict()))
                cfg.model.name = model
                if model != base.model.name:
                    cfg.model.weights_path = None
                cfg.optim.lr = lr
                cfg.model.freeze, cfg.model.freeze_stages = _freeze_of(mode, base.model.freeze_stages)
                cfg.name = f"{model} lr={_fmt_lr(lr)}" + (f" freeze={mode}" if compare_freeze else "")
                configs.append(cfg.validate())
    return configs


def plan_retrain(config: RunConfig, revision_ref: str, data_dir: str | Path | None = None) -> list[RunConfig]:
    """The retrain loop's pair: [the configuration on the original labels (data.revision None), the same
    on revision ``revision_ref``], alike in everything else (data, split seed and fractions, seed,
    epochs, model, optimiser), so the fixed test split compares them. Names: "original labels" and
    "<revision name> @N". A bare revision id means its latest version (the ref is pinned to it, so later
    edits do not change the run). A config that already names a revision is compared from the
    original labels, not from that revision. Unknown revision or version → ConfigError."""
    from core import revisions
    from core.datasets import DEFAULT_DATA_DIR

    config.validate()
    rev, version = revisions.load_revision(revision_ref, DEFAULT_DATA_DIR if data_dir is None else data_dir)
    original = RunConfig.from_dict(copy.deepcopy(config.to_dict()))
    original.data.revision, original.name = None, "original labels"
    cleaned = RunConfig.from_dict(copy.deepcopy(config.to_dict()))
    cleaned.data.revision, cleaned.name = rev.ref(version), f"{rev.name} @{version}"
    return [original.validate(), cleaned.validate()]


class GroupId(str):
    """The id of a submitted comparison (a str), carrying the run ids it queued (``run_ids``)."""

    run_ids: list[str]

    def __new__(cls, value: str, run_ids: Sequence[str] = ()) -> "GroupId":
        obj = super().__new__(cls, value)
        obj.run_ids = list(run_ids)
        return obj


_GROUPS: dict[str, list[str]] = {}  # group id → run ids (this server); the history keeps them too


def new_group_id() -> str:
    return f"cmp-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def submit_comparison(manager, configs: Sequence[RunConfig], owner: str = "local", history=None) -> GroupId:
    """Queue every config on ``manager`` (they start as slots free up) as one comparison group.

    The group id is recorded in the run history (``history``: a core.runs.RunHistory) before each
    job is submitted, so even a run that starts at once is indexed with its group. Returns the
    group id, whose ``run_ids`` lists the queued runs in order."""
    from core.rundir import new_run_id

    configs = list(configs)
    if not configs:
        raise ConfigError("Nothing to compare: the plan is empty.")
    for cfg in configs:
        cfg.validate()
    for number, cfg in enumerate(configs, 1):   # all or nothing: no half-queued group when one cannot fit
        try:
            manager.check_fits(cfg)
        except ConfigError as err:
            raise ConfigError(f"Run {number} of the comparison ({cfg.model.name}, lr {cfg.optim.lr:g}): {err} "
                              "Nothing was queued.") from None
    group_id = new_group_id()
    run_ids = []
    for cfg in configs:
        run_id = new_run_id(cfg)
        if history is not None:
            history.register_queued(run_id, cfg, owner=owner, group_id=group_id)
        manager.submit(cfg, owner=owner, job_id=run_id)
        run_ids.append(run_id)
        _GROUPS[group_id] = list(run_ids)
    return GroupId(group_id, run_ids)


def group_run_ids(group_id: str, history=None) -> list[str]:
    """The runs of a comparison group: from this server's memory, else from the history index."""
    if group_id in _GROUPS:
        return list(_GROUPS[group_id])
    if history is not None:
        df = history.list(group_id=group_id, sort="created", descending=False)
        return list(df["run_id"])
    return []


def list_groups(history, owner: str | None = None) -> list[dict[str, Any]]:
    """The comparison groups in the history, newest first: ``{"group_id", "label", "run_ids",
    "owner", "created"}``; ``owner`` keeps only that owner's groups. They come from the index, so
    they survive a restart of the server (the folders' meta.json files keep the group ids)."""
    df = history.list(sort="created", descending=False)
    df = df[df["group_id"].notna() & (df["group_id"] != "")]
    if owner is not None:
        df = df[df["owner"] == owner]
    groups = []
    for group_id, part in df.groupby("group_id", sort=False):
        created = float(part["created"].min())
        models = list(dict.fromkeys(part["model"].astype(str)))
        shown = ", ".join(models[:4]) + (f" +{len(models) - 4}" if len(models) > 4 else "")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
        groups.append({"group_id": str(group_id), "run_ids": list(part["run_id"]),
                       "owner": part["owner"].iloc[0], "created": created,
                       "label": f"{when} — {len(part)} run(s): {shown}"})
    groups.sort(key=lambda g: g["created"], reverse=True)
    return groups


# ---------------------------------------------------------------------------------------------
# Leaderboard
# ---------------------------------------------------------------------------------------------
def predicted_training_memory(config: RunConfig, num_classes: int, input_shape: Sequence[int]) -> int:
    """Training memory (bytes) core.memory predicts for this run's model, input and batch size:
    the simulated step peak (as on the Memory tab), for a GPU."""
    return resources.training_memory(config, num_classes, input_shape, device_type="cuda")


def _record_memory(record) -> tuple[int | None, str | None]:
    from core.runrecord import memory_key

    started = record.started or {}
    classes, shape = started.get("classes") or [], started.get("input_shape")
    key = memory_key(record.config, len(classes), shape)
    if key is None:
        return None, None
    try:
        return predicted_training_memory(record.config, len(classes), shape), key
    except LabError:
        return None, key


def _row_from_summary(s: dict) -> dict[str, Any]:
    return {"run": s.get("name") or s["run_id"], "model": s.get("model"), "status": s.get("status"),
            "best val accuracy": s.get("best_val_accuracy"), "test accuracy": s.get("test_accuracy"),
            "test images": s.get("test_images"), "macro F1": s.get("macro_f1"), "parameters": s.get("params"),
            "trainable parameters": s.get("trainable_params"), "training time (s)": s.get("train_seconds"),
            "images/s": s.get("images_per_sec"),
            "predicted training memory (bytes)": s.get("predicted_memory_bytes"),
            "checkpoint size (bytes)": s.get("checkpoint_bytes"), "run id": s["run_id"]}


def leaderboard(history_or_records, run_ids: Sequence[str] | None = None, sort_by: str = "test accuracy",
                ascending: bool | None = None, memory: bool = True, refresh: bool = True) -> pd.DataFrame:
    """Rank runs: one row each with LEADERBOARD_COLUMNS.

    ``history_or_records``: a core.runs.RunHistory (then ``run_ids`` picks the runs, in any
    order; the memory estimate is cached in the index and the run's meta.json) or a list of
    core.runrecord.RunRecord. Accuracies are fractions 0..1. Sorted by ``sort_by`` (best first for
    accuracies, F1 and speed, smallest first otherwise; ties broken by best val accuracy);
    missing values last. ``memory=False`` skips estimating memory that is not cached yet;
    ``refresh=False`` takes the history's rows as indexed (cheap, for polling live runs)."""
    from core.runrecord import RunRecord, load_run, summarize_record
    from core.runs import RunHistory

    if sort_by not in LEADERBOARD_COLUMNS:
        raise ConfigError(f"Cannot sort the leaderboard by {sort_by!r}; choose one of {', '.join(LEADERBOARD_COLUMNS)}.")
    rows = []
    if isinstance(history_or_records, RunHistory):
        history = history_or_records
        for run_id in run_ids or []:
            try:
                summary = history.get(run_id, refresh=refresh)
            except LabError:
                continue  # deleted meanwhile
            if memory and summary.get("predicted_memory_bytes") is None and summary.get("params"):
                try:
                    record = load_run(summary["run_dir"])
                except LabError:
                    record = None
                if record is not None and record.config is not None:
                    n_bytes, key = _record_memory(record)
                    history.set_predicted_memory(run_id, n_bytes, key)
                    summary["predicted_memory_bytes"] = n_bytes
            rows.append(_row_from_summary(summary))
    else:
        records = [r for r in history_or_records if isinstance(r, RunRecord)]
        if run_ids:
            wanted = set(run_ids)
            records = [r for r in records if r.run_id in wanted]
        for record in records:
            summary = summarize_record(record)
            if memory and summary.get("predicted_memory_bytes") is None and record.config is not None:
                summary["predicted_memory_bytes"], _ = _record_memory(record)
            rows.append(_row_from_summary(summary))
    df = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    return sort_leaderboard(df, sort_by, ascending)


def sort_leaderboard(df: pd.DataFrame, sort_by: str = "test accuracy", ascending: bool | None = None) -> pd.DataFrame:
    if sort_by not in df.columns:
        raise ConfigError(f"Cannot sort the leaderboard by {sort_by!r}; choose one of {', '.join(df.columns)}.")
    if ascending is None:
        ascending = sort_by not in _HIGHER_IS_BETTER
    keys = [sort_by] + (["best val accuracy"] if sort_by != "best val accuracy" else [])
    asc = [ascending] + [False] * (len(keys) - 1)
    df = _typed(df.copy())
    return df.sort_values(keys, ascending=asc, na_position="last", kind="stable").reset_index(drop=True)


def leaderboard_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the leaderboard as UTF-8 CSV (one header row, no index); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, encoding="utf-8")
    return path


def read_leaderboard_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV written by ``leaderboard_csv`` back with the same column types."""
    return _typed(pd.read_csv(path, encoding="utf-8"))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("parameters", "trainable parameters", "predicted training memory (bytes)", "checkpoint size (bytes)"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in ("best val accuracy", "test accuracy", "macro F1", "training time (s)", "images/s"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


# ---------------------------------------------------------------------------------------------
# Two runs side by side
# ---------------------------------------------------------------------------------------------
def _as_report(report) -> EvalReport:
    if isinstance(report, EvalReport):
        return report
    if isinstance(report, dict):
        return EvalReport.from_dict(report)
    raise DataError(f"Expected an evaluation report (EvalReport or {rundir.EVAL_FILE} dict), got "
                    f"{type(report).__name__}.")


def confusion_difference(report_a, report_b, top_classes: int | None = None, top_pairs: int = 10,
                         labels: tuple[str, str] = ("A", "B")) -> pd.DataFrame:
    """Where two runs' test results differ most, from their row-normalised confusion matrices.

    Rows of kind "recall" (one per class, the diagonal: fraction of the class recognised) and then
    "confusion" (off-diagonal pairs: fraction of true class predicted as another), each sorted by
    the absolute difference B − A, biggest first. Columns: DIFF_COLUMNS (A and B are fractions
    0..1, difference = B − A). ``top_classes`` limits the recall rows (None: all classes);
    ``top_pairs`` the confusion rows (pairs with no difference are left out). The two runs must
    have the same class names (in any order; B is reordered to A's)."""
    a, b = _as_report(report_a), _as_report(report_b)
    names_a, names_b = list(a.class_names), list(b.class_names)
    if names_a != names_b:
        if sorted(names_a) != sorted(names_b):
            only_a = sorted(set(names_a) - set(names_b))
            only_b = sorted(set(names_b) - set(names_a))
            raise DataError(
                f"Runs {labels[0]} and {labels[1]} were evaluated on different classes "
                f"({len(names_a)} vs {len(names_b)}; only in {labels[0]}: {', '.join(only_a) or '—'}; only in "
                f"{labels[1]}: {', '.join(only_b) or '—'}). Compare two runs trained on the same dataset.")
    order = [names_b.index(n) for n in names_a]
    ca = a.confusion_normalized
    cb = np.asarray(b.confusion_normalized)[np.ix_(order, order)]
    diff = cb - ca
    k = len(names_a)
    recall = [{"kind": "recall", "true class": names_a[i], "predicted class": names_a[i],
               "A": float(ca[i, i]), "B": float(cb[i, i]), "difference": float(diff[i, i])} for i in range(k)]
    recall.sort(key=lambda r: (-abs(r["difference"]), r["true class"]))
    if top_classes is not None:
        recall = recall[:max(0, int(top_classes))]
    pairs = [{"kind": "confusion", "true class": names_a[i], "predicted class": names_a[j],
              "A": float(ca[i, j]), "B": float(cb[i, j]), "difference": float(diff[i, j])}
             for i in range(k) for j in range(k) if i != j and abs(diff[i, j]) > 1e-12]
    pairs.sort(key=lambda r: (-abs(r["difference"]), r["true class"], r["predicted class"]))
    pairs = pairs[:max(0, int(top_pairs))]
    return pd.DataFrame(recall + pairs, columns=DIFF_COLUMNS)


def scores_text(report: EvalReport, run_dir: str | Path) -> str:
    """'accuracy 41.0% (95 % CI 36.8–45.4 %), macro F1 0.402 (0.371–0.433)': the accuracy's Wilson
    interval, and the macro F1's bootstrap one where the run kept its per-image predictions."""
    acc = stats.accuracy_interval(report.accuracy, report.num_samples)
    text = f"accuracy {report.accuracy:.1%}" + (f" (95 % CI {acc.span()})" if acc is not None else "")
    f1 = stats.kept_macro_f1_interval(run_dir)   # None: a run from before predictions.json
    return f"{text}, macro F1 {report.macro_f1:.3f}" + (f" ({f1.span(percent=False)})" if f1 is not None else "")


# ---------------------------------------------------------------------------------------------
# Command line: python -m core.compare RUN RUN [...]
# ---------------------------------------------------------------------------------------------
def _run_folder(arg: str, runs_dir: Path) -> Path:
    """A run folder given as a path, or as a run id in ``runs_dir``."""
    for path in (Path(arg), runs_dir / arg):
        if rundir.is_run_dir(path):
            return path
    raise DataError(f"{arg} is not a run folder, nor a run id in {runs_dir}; give a run folder "
                    "(runs/<run-id>) or a run id with --runs-dir.")


def _cli_name(record) -> str:
    return record.run_id if record.label == record.run_id else f"{record.label} ({record.run_id})"


def _cli_lines(folders: Sequence[Path]) -> list[str]:
    """One line per run (best test accuracy first), then McNemar's test of the best against each other."""
    from core.runrecord import load_run

    evaluated, lines = [], []
    for folder in folders:
        record = load_run(folder)
        report = record.report()
        if report is None:
            lines.append(f"{_cli_name(record)}: no test evaluation yet ({record.status})")
        else:
            evaluated.append((report.accuracy, record, report))
    evaluated.sort(key=lambda item: -item[0])
    lines[:0] = [f"{_cli_name(r)}: {scores_text(rep, r.run_dir)}" for _, r, rep in evaluated]
    top = stats.accuracy_interval(evaluated[0][2].accuracy, evaluated[0][2].num_samples) if evaluated else None
    if top is not None and stats.small_split_warning(top):
        lines.append(f"note: {stats.precision_sentence(top.n, top.estimate)}")
    best = evaluated[0][1] if evaluated else None
    for _, other, _ in evaluated[1:]:
        try:
            result = stats.compare_runs(best.run_dir, other.run_dir, names=(best.label, other.label))
            lines.append(f"paired test (McNemar): {result.sentence}")
        except LabError as err:
            lines.append(f"no paired test of {best.label} and {other.label}: {err}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from core.trainer import DEFAULT_RUNS_DIR

    p = argparse.ArgumentParser(prog="python -m core.compare", description="Rank finished runs by test "
                                "accuracy, each with its 95 % interval, and test whether they really differ.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder, or run id in --runs-dir")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where run ids are looked up")
    args = p.parse_args(argv)
    try:
        folders = [_run_folder(arg, args.runs_dir) for arg in args.runs]
        lines = _cli_lines(folders)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- image-level difference of two runs ---------------------------------------------------------
@dataclass
class ImageDiff:
    """The test images one run gets right and the other wrong (items as runrecord.cell_images gives
    them; ``predicted`` is the run that got it wrong), with the four counts and a sentence."""
    n: int
    a_only: list
    b_only: list
    a_only_count: int
    b_only_count: int
    both_right: int
    both_wrong: int
    sentence: str


def image_diff(run_a, run_b, limit: int = 24, data_dir=None, names: tuple[str, str] = ("A", "B")) -> ImageDiff:
    """Where two runs tested on the same images differ, image by image: A right and B wrong (most
    confident wrong answer of B first), and the reverse. Other test images → DataError (stats)."""
    from core import runrecord

    pair = stats.paired_predictions(run_a, run_b, (Path(run_a).name, Path(run_b).name))
    record_a, record_b = runrecord.load_run(run_a), runrecord.load_run(run_b)
    classes = record_a.report().class_names
    ca, cb = pair["correct_a"], pair["correct_b"]

    def items(mask, record, pred, conf):
        order = np.flatnonzero(mask)[np.argsort(-conf[mask], kind="stable")][:limit]
        rows = pd.DataFrame({"index": pair["index"][order], "true": [classes[t] for t in pair["target"][order]],
                             "predicted": [classes[p] for p in pred[order]], "confidence": conf[order],
                             "true_prob": np.zeros(len(order))})
        return runrecord.image_items(record, rows, data_dir)

    a_only, b_only = ca & ~cb, cb & ~ca
    counts = (int(a_only.sum()), int(b_only.sum()), int((ca & cb).sum()), int((~ca & ~cb).sum()))
    sentence = (f"{names[0]} got {counts[0]} image(s) right that {names[1]} got wrong, {names[1]} {counts[1]} that "
                f"{names[0]} got wrong; both right on {counts[2]}, both wrong on {counts[3]} (of {len(ca)} test "
                "images).")
    return ImageDiff(len(ca), items(a_only, record_b, pair["pred_b"], pair["conf_b"]),
                     items(b_only, record_a, pair["pred_a"], pair["conf_a"]), *counts, sentence)
