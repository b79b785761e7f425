"""A run read back from its folder: ``load_run`` → ``RunRecord`` (configuration, curves, status,
test evaluation, name), and ``summarize_record`` → the run's row in the history's index.

The folders are the source of truth (their layout: core.rundir). ``RunEvents`` reads a run's
events incrementally, so the history can follow a live run by its new lines alone.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from core import rundir
from core.config import RunConfig
from core.errors import ConfigError, DataError
from core.metrics import EvalReport
from core.rundir import BEST_CKPT, CONFIG_FILE, EVAL_FILE, EVENTS_FILE, LAST_CKPT, STATUS_FILE

MAX_NAME_CHARS, MAX_TAGS = 200, 20
STEP_COLUMNS = ["step", "epoch", "loss", "lr", "images_per_sec"]


@dataclass
class RunRecord:
    run_id: str
    run_dir: Path
    config: RunConfig | None
    status: str
    message: str
    epochs: pd.DataFrame                      # one row per epoch (EpochEnded fields)
    steps: pd.DataFrame                       # step, epoch (fractional), loss, lr, images_per_sec
    started: dict[str, Any] | None = None     # the RunStarted event as a dict
    eval: dict[str, Any] | None = None        # eval.json
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)   # meta.json: the run history's name, tags, owner

    @property
    def label(self) -> str:
        """The run's name: the one it was renamed to, else its config's, else its id."""
        return (self.meta.get("name") or (self.config.name if self.config else None) or self.run_id)

    @property
    def checkpoint(self) -> Path | None:
        return rundir.checkpoint(self.run_dir)

    def report(self) -> EvalReport | None:
        return EvalReport.from_dict(self.eval) if self.eval else None


class RunEvents:
    """A run's ``events.jsonl`` read into its curves, incrementally: ``update()`` reads only the
    lines appended since its last call, so following a live run costs its new lines, not the
    whole file each epoch. A line still being written waits for the next call; a file that
    shrank (replaced) is read again from its start. ``steps=False`` skips the batch reports
    (an index row needs only epochs). Thread-safe."""

    def __init__(self, path: str | Path, steps: bool = True):
        self.path = Path(path)
        self.keep_steps = steps
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.offset = 0                       # bytes of the file taken so far
        self.epochs: list[dict] = []          # EpochEnded events as dicts
        self.steps: list[dict] = []           # STEP_COLUMNS
        self.started: dict | None = None      # the last RunStarted
        self.seconds: float | None = None     # the RunFinished durations added up

    def update(self) -> "RunEvents":
        with self._lock:
            try:
                with self.path.open("rb") as fh:
                    if os.fstat(fh.fileno()).st_size < self.offset:
                        self._reset()
                    fh.seek(self.offset)
                    data = fh.read()
            except OSError:   # no events yet (or the folder is gone): nothing new
                return self
            self.offset += self._take_lines(data)
        return self

    def _take_lines(self, data: bytes) -> int:
        """Take the complete lines of ``data``; returns how many of its bytes were taken."""
        *lines, tail = data.split(b"\n")
        for line in lines:
            if self.keep_steps or not line.startswith(_BATCH_LINE):
                self._take(_json_line(line))
        raw = _json_line(tail) if tail.strip() else None
        if raw is None:       # a line being written (or nothing): taken once it is whole
            return len(data) - len(tail)
        self._take(raw)       # whole, but its newline not written yet
        return len(data)

    def _take(self, raw: dict | None) -> None:
        kind = raw.get("kind") if raw else None
        if kind == "EpochEnded":
            self.epochs.append(raw)
        elif kind == "BatchEnded" and self.keep_steps:
            self.steps.append({"step": raw["step"], "epoch": raw["epoch"] - 1 + raw["batch"] / raw["batches"],
                               "loss": raw["loss"], "lr": raw["lr"], "images_per_sec": raw["images_per_sec"]})
        elif kind == "RunStarted":
            self.started = raw
            if raw.get("start_epoch", 0) == 0:  # a fresh start (not a resume) resets curves
                self.epochs, self.steps = [], []
        elif kind == "RunFinished":
            self.seconds = (self.seconds or 0.0) + raw.get("seconds", 0.0)

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(epochs, steps) as DataFrames. A resumed run repeats the epochs after its checkpoint:
        the latest row per epoch (and step) is kept."""
        with self._lock:
            epoch_df = pd.DataFrame(self.epochs)
            step_df = pd.DataFrame(self.steps, columns=STEP_COLUMNS)
        if not epoch_df.empty:
            epoch_df = epoch_df.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
        if not step_df.empty:
            step_df = step_df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
        return epoch_df, step_df


_BATCH_LINE = b'{"kind": "BatchEnded"'   # how RunLog writes a batch report (json.dumps of to_dict)


def _json_line(line: bytes) -> dict | None:
    try:
        raw = json.loads(line)
    except ValueError:   # a damaged line (a crash mid-write): skipped
        return None
    return raw if isinstance(raw, dict) else None


def load_run(run_dir: str | Path, live_ids: set[str] | frozenset = frozenset(),
             events: RunEvents | None = None) -> RunRecord:
    """Read one run folder (tolerates a run that is still being written). ``events``: a reader of
    its events.jsonl kept from an earlier call, which then reads only the new lines."""
    run_dir = Path(run_dir)
    if not rundir.is_run_dir(run_dir):
        raise DataError(f"Run {run_dir.name} is not a Classifier Lab run folder (no {CONFIG_FILE}).")
    try:
        config = RunConfig.load(run_dir / CONFIG_FILE)
    except Exception:  # a config from an older or edited version: still show the run
        config = None
    events = (events or RunEvents(run_dir / EVENTS_FILE)).update()
    epoch_df, step_df = events.frames()
    status, message = rundir.read_status(run_dir, live_ids)
    return RunRecord(run_dir.name, run_dir, config, status, message, epoch_df, step_df, events.started,
                     rundir.read_eval(run_dir), events.seconds, meta=rundir.read_meta(run_dir))


def misclassified_images(record: RunRecord, limit: int = 24, data_dir: str | Path | None = None):
    """(PIL image, caption) pairs of the run's most confident test errors, for a gallery
    (``misclassified_items`` without the details)."""
    return [(item["image"], item["caption"]) for item in misclassified_items(record, limit, data_dir)]


def misclassified_items(record: RunRecord, limit: int | None = 24,
                        data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The run's most confident test errors, most confident first, as ``cell_images`` gives a
    cell's: {"image", "file", "index", "true", "predicted", "confidence", "true_prob", "caption"}.

    Pixels, never paths: a path in a gallery would have to be served from the data folder, which
    would then serve every user's uploads to anyone who guessed a name. File-backed datasets are
    read from their files; array-backed ones (torchvision sets) are reloaded from the data folder.
    Images that cannot be read any more are left out."""
    if not record.eval:
        return []
    rows = record.report().misclassified
    if limit is not None:
        rows = rows.head(limit)
    rows = pd.DataFrame({"index": [int(s) for s in rows["sample"]], "true": rows["true"].astype(str),
                         "predicted": rows["predicted"].astype(str), "confidence": rows["confidence"],
                         "true_prob": rows["true_prob"]})
    return image_items(record, rows, data_dir)


def image_items(record: RunRecord, rows: pd.DataFrame, data_dir: str | Path | None) -> list[dict[str, Any]]:
    """Gallery items of ``rows`` [index (dataset index), true, predicted (names), confidence,
    true_prob], in their order; the rows whose image cannot be read are left out."""
    files = (record.eval or {}).get("files", {})
    out = []
    for (_, r), image in zip(rows.iterrows(), _images(record, [int(i) for i in rows["index"]], data_dir)):
        if image is None:
            continue
        index = int(r["index"])
        out.append({"image": image, "file": files.get(str(index), f"#{index}"), "index": index,
                    "true": r["true"], "predicted": r["predicted"], "confidence": float(r["confidence"]),
                    "true_prob": float(r["true_prob"]),   # short caption: thumbnails are narrow
                    "caption": f"{r['true']} → {r['predicted']} {r['confidence']:.0%}"})
    return out


def _images(record: RunRecord, samples: list, data_dir: str | Path | None) -> list:
    """The images of the evaluated samples (eval.json's sample ids: dataset indices), None for one
    that cannot be read: from their files, else from the dataset reloaded (array-backed sets)."""
    files = (record.eval or {}).get("files", {})
    need_dataset = any(not Path(str(files.get(str(s), ""))).is_file() for s in samples)
    ds = None
    if need_dataset and record.config is not None:
        from core import datasets
        try:
            ds = datasets.load_dataset(record.config.data.source, record.config.data.location,
                                       data_dir=data_dir or datasets.DEFAULT_DATA_DIR, download=False)
        except Exception:  # the data may be gone; show what we can
            ds = None
    out = []
    for s in samples:
        path = files.get(str(s))
        image = _read_image(path) if path and Path(path).is_file() else None
        if image is None and ds is not None:
            try:
                image = ds.load_image(int(s))
            except (DataError, ValueError, IndexError):
                image = None
        out.append(image)
    return out


def class_index(names: list[str], value: int | str, what: str) -> int:
    """The index of ``value`` (a class name, or an index as a number) in ``names``; DataError
    naming the classes otherwise. ``what``: "true" or "predicted", for the message."""
    if isinstance(value, str) and value in names:
        return names.index(value)
    if not isinstance(value, str) and 0 <= int(value) < len(names):
        return int(value)
    shown = value if not isinstance(value, str) else value[:80]   # a message never echoes a whole request
    raise DataError(f"The {what} class {shown!r} is not one of this run's classes: {', '.join(names)}.")


def _cell_rows(record: RunRecord, t: int, p: int) -> pd.DataFrame:
    """Rows [index, confidence, true_prob] of the cell (t, p), most confident first: from the
    per-image predictions, else (runs evaluated before they were saved) eval.json's error table."""
    preds = rundir.read_predictions(record.run_dir)
    if preds is not None:
        df = pd.DataFrame({c: preds[c] for c in rundir.PREDICTION_COLUMNS})
        df = df[(df["target"] == t) & (df["predicted"] == p)]
    elif t != p:
        mis = record.report().misclassified
        names = record.report().class_names
        mis = mis[(mis["true"] == names[t]) & (mis["predicted"] == names[p])]
        df = pd.DataFrame({"index": [int(x) for x in mis["sample"]], "confidence": mis["confidence"].to_numpy(),
                           "true_prob": mis["true_prob"].to_numpy()})
    else:
        raise DataError(f"Run {record.run_id} was evaluated before per-image predictions were saved "
                        f"({rundir.PREDICTIONS_FILE}), so only its errors (cells off the diagonal) can be "
                        "shown. Train it again to see the correctly classified images.")
    return df.sort_values(["confidence", "index"], ascending=[False, True], kind="stable")


def cell_images(record: RunRecord, true_class: int | str, predicted_class: int | str, limit: int | None = 24,
                data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The test images in confusion-matrix cell (true_class, predicted_class), most confident first.

    Classes by index or name. Each item: {"image": PIL image, "file": the dataset's name for it
    (path relative to the dataset, or "CIFAR10 test #12"), "index": dataset index, "true" and
    "predicted" (class names), "confidence": probability of the predicted class, "true_prob": of
    the true class, "caption"}. Images that
    cannot be read any more are left out. Pixels, never server paths (see misclassified_images)."""
    if not record.eval:
        raise DataError(f"Run {record.run_id} has no test evaluation ({EVAL_FILE}) yet: let it finish first.")
    names = [str(c) for c in record.eval["class_names"]]
    t, p = class_index(names, true_class, "true"), class_index(names, predicted_class, "predicted")
    rows = _cell_rows(record, t, p)
    if limit is not None:
        rows = rows.head(limit)
    rows = rows.assign(true=names[t], predicted=names[p])
    return image_items(record, rows, data_dir)


def _read_image(path: str):
    """The image at ``path`` as a PIL image in memory, or None when it cannot be read (a file
    changed since the evaluation costs its thumbnail, not the gallery)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def normalize_tags(tags: str | Sequence[str] | None) -> list[str]:
    """'a, b,,a ' or ['a', 'b'] → ['a', 'b'] (trimmed, no empties, no duplicates, order kept)."""
    if tags is None:
        return []
    if isinstance(tags, str) and len(tags) > MAX_TAGS * 60:   # checked before any work on it
        raise ConfigError(f"Tags are at most {MAX_TAGS} words of up to 50 characters; got {len(tags):,} characters.")
    items = tags.split(",") if isinstance(tags, str) else [str(t) for t in tags]
    out: dict[str, None] = {}   # ordered and de-duplicated in one pass
    for t in items:
        # Cut first, then compared: a cut just after a word leaves a space that would make
        # "word " a second "word".
        t = " ".join(t.split())[:50].rstrip()
        if t:
            out.setdefault(t)
        if len(out) > MAX_TAGS:
            raise ConfigError(f"At most {MAX_TAGS} tags per run; got more. Remove some.")
    return list(out)


def _created_time(run_dir: Path) -> float:
    """When the run was started: the first event's time, else the config file's mtime."""
    try:
        with (run_dir / EVENTS_FILE).open(encoding="utf-8") as fh:
            return float(json.loads(fh.readline())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return (run_dir / CONFIG_FILE).stat().st_mtime
    except OSError:
        return time.time()


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _macro_f1(eval_data: dict | None) -> float | None:
    for row in (eval_data or {}).get("averages", []) or []:
        if row.get("average") == "macro":
            return float(row["f1"])
    return None


def as_number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value  # NaN → None


def as_text(value) -> str | None:
    """A text cell of the index, None for empty or NaN (pandas reads a NULL as NaN)."""
    return value if isinstance(value, str) and value else None


def run_label(row: dict) -> str:
    """How a run reads in a list: its name, else "resnet18 · 3 epochs · 14:42" (the start time;
    with the date when not today). Never the folder, which says nothing to a person."""
    name = as_text(row.get("name"))
    if name:
        return name
    parts = [as_text(row.get("model")) or "run"]
    epochs = as_number(row.get("epochs"))
    if epochs:
        parts.append(f"{int(epochs)} epoch{'s' * (int(epochs) != 1)}")
    created = as_number(row.get("created"))
    if created:
        same_day = time.strftime("%Y%m%d", time.localtime(created)) == time.strftime("%Y%m%d")
        parts.append(time.strftime("%H:%M" if same_day else "%b %d %H:%M", time.localtime(created)))
    return " · ".join(parts)


def summarize_record(record: RunRecord, meta: dict | None = None) -> dict[str, Any]:
    """One index row (see core.runindex.INDEX_COLUMNS) from a RunRecord and its meta.json."""
    meta = (record.meta or rundir.read_meta(record.run_dir)) if meta is None else meta
    cfg, started, epochs = record.config, record.started or {}, record.epochs
    best_val = ips = None
    epochs_done = 0
    train_seconds = record.seconds
    if not epochs.empty:
        epochs_done = int(epochs["epoch"].max())
        if "val_accuracy" in epochs:
            best_val = as_number(pd.to_numeric(epochs["val_accuracy"], errors="coerce").max())
        if "images_per_sec" in epochs:
            ips = as_number(pd.to_numeric(epochs["images_per_sec"], errors="coerce").mean())
        if train_seconds is None and "seconds" in epochs:
            train_seconds = as_number(pd.to_numeric(epochs["seconds"], errors="coerce").sum())
    status_data = rundir.read_json(record.run_dir / STATUS_FILE)
    if status_data.get("epochs_completed") is not None:
        epochs_done = max(epochs_done, int(status_data["epochs_completed"]))
    memory = meta.get("predicted_memory") or {}
    key = memory_key(cfg, len(started.get("classes") or []), started.get("input_shape")) if cfg else None
    return {
        "run_id": record.run_id,
        "name": meta.get("name") or (cfg.name if cfg and cfg.name else None),
        "tags": ", ".join(normalize_tags(meta.get("tags"))),
        "owner": meta.get("owner"),
        "model": cfg.model.name if cfg else None,
        "dataset": rundir.dataset_label(cfg.data) if cfg else None,
        "status": record.status,
        "message": record.message,
        "created": _created_time(record.run_dir),
        "updated": time.time(),
        "epochs_done": epochs_done,
        "epochs": cfg.epochs if cfg else None,
        "best_val_accuracy": best_val,
        "test_accuracy": as_number((record.eval or {}).get("accuracy")),
        "test_images": as_number((record.eval or {}).get("num_samples")),
        "macro_f1": _macro_f1(record.eval),
        "params": started.get("params_total"),
        "trainable_params": started.get("params_trainable"),
        "train_seconds": as_number(train_seconds),
        "images_per_sec": ips,
        "predicted_memory_bytes": memory.get("bytes") if key is not None and memory.get("key") == key else None,
        "checkpoint_bytes": file_size(record.run_dir / BEST_CKPT),
        "group_id": meta.get("group_id"),
        "batch_size": cfg.data.batch_size if cfg else None,
        "lr": cfg.optim.lr if cfg else None,
        "optimizer": cfg.optim.optimizer if cfg else None,
        "freeze": cfg.model.freeze if cfg else None,
        "has_last": int((record.run_dir / LAST_CKPT).is_file()),
        "has_eval": int((record.run_dir / EVAL_FILE).is_file()),
        "run_dir": str(record.run_dir),
        "status_mtime": mtime(record.run_dir / STATUS_FILE),
        "revision": cfg.data.revision if cfg else None,   # the labels' revision ref; None: the dataset's own
    }


def memory_key(config: RunConfig | None, num_classes: int, input_shape) -> str | None:
    """What a training-memory estimate depends on (a cached estimate is reused only on a match)."""
    if config is None or not num_classes or not input_shape:
        return None
    m, o = config.model, config.optim
    key = [m.name, int(num_classes), [int(v) for v in input_shape], config.data.batch_size,
           o.optimizer, o.momentum, config.precision, m.freeze, m.freeze_stages, m.small_input_stem]
    # Gradient accumulation raises the peak (the gradients are held all step long). Appended only
    # above 1, so the keys of plain runs, whose estimate it does not change, stay valid; estimates
    # cached for accumulated runs before the estimator counted it no longer match.
    if o.accumulation_steps > 1:
        key.append({"accumulation_steps": int(o.accumulation_steps)})
    return json.dumps(key)
