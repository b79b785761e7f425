"""The run folder: one home for its layout, and for every write and small read of its files.

``runs/<run-id>/`` holds::

    config.json    the RunConfig (RunConfig.save, atomic)
    events.jsonl   one event per line, appended while the run trains (RunLog)
    status.json    {"status", "message", "updated", "pid", ...} (write_status / read_status)
    eval.json      the test evaluation of the best weights (write_eval / read_json)
    predictions.json  per test image: dataset index, true and predicted class, confidences
                   (write_predictions / read_predictions; McNemar's test, confusion cells)
    initial.pth    the first conv layer's weights before training (INITIAL_WEIGHTS; a few KB)
    distributions.jsonl  per epoch, when config.record_distributions: weight quantiles and
                   gradient norms per parameter tensor (append_distributions / read_distributions)
    last.pth       the checkpoint Resume continues from; best.pth, the best epoch's weights
    meta.json      what the run history adds: name, tags, owner, group_id, a cached memory estimate
    card.json      what was trained on what, where, with which libraries (write_card)
    revision.json  a run with data.revision: the ref, the decisions applied (and skipped, and why),
                   their digest and notes (core.revisions; written by the trainer)
    error.log      the traceback of an internal error

and the runs folder itself ``index.sqlite``, the run history's index (core.runs). Every JSON file
is replaced atomically through ``storage.atomic_write_json``, the engine's only atomic JSON write.
Nothing here knows about the index, the job queue or the dashboard.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

from core import events as ev, storage

log = logging.getLogger(__name__)

CONFIG_FILE, EVENTS_FILE, STATUS_FILE, EVAL_FILE = "config.json", "events.jsonl", "status.json", "eval.json"
LAST_CKPT, BEST_CKPT = "last.pth", "best.pth"
META_FILE, CARD_FILE, ERROR_LOG = "meta.json", "card.json", "error.log"
PREDICTIONS_FILE, INITIAL_WEIGHTS, DISTRIBUTIONS_FILE = "predictions.json", "initial.pth", "distributions.jsonl"
REVISION_FILE = "revision.json"   # a run on a dataset revision: its ref, digest and the decisions applied
PREDICTIONS_VERSION = 1
PREDICTION_COLUMNS = ("index", "target", "predicted", "confidence", "true_prob")
INDEX_FILE = "index.sqlite"   # in the runs folder, beside the run folders
UNREADABLE_STATUS = ("status unknown: the status file (status.json) is unreadable; the run may have failed. "
                     "Its checkpoints, if any, are intact")

EventSink = Callable[[ev.Event], None]


# ---- ids and folders -----------------------------------------------------------------------
def new_run_id(config) -> str:
    """'20250101-120000-resnet18-ab12cd': sorts by start time, says the model, never collides."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model.name}-{uuid.uuid4().hex[:6]}"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def list_run_dirs(runs_dir: str | Path) -> list[Path]:
    """Run folders, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    dirs = [p for p in runs_dir.iterdir() if p.is_dir() and is_run_dir(p)]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def checkpoint(run_dir: str | Path) -> Path | None:
    """The weights a run is used with: best.pth (its best epoch), else last.pth; None before the
    first epoch is saved."""
    for name in (BEST_CKPT, LAST_CKPT):
        path = Path(run_dir) / name
        if path.is_file():
            return path
    return None


# ---- JSON files ----------------------------------------------------------------------------
def read_json(path: str | Path) -> dict:
    """A JSON object file, or {} when it is missing, damaged or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):   # JSONDecodeError and UnicodeDecodeError (a damaged file) alike
        return {}


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Replace ``path`` atomically (the old file stays whole when the write fails); raises the OSError."""
    storage.atomic_write_json(path, data, indent=indent)


def read_meta(run_dir: str | Path) -> dict:
    """The run's ``meta.json`` (name, tags, owner, group_id, cached memory estimate), or {}."""
    return read_json(Path(run_dir) / META_FILE)


def write_meta(run_dir: str | Path, meta: dict) -> None:
    write_json(Path(run_dir) / META_FILE, meta)


def read_eval(run_dir: str | Path) -> dict | None:
    """eval.json, or None when there is none (or it cannot be read)."""
    path = Path(run_dir) / EVAL_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_eval(run_dir: str | Path, data: dict) -> None:
    write_json(Path(run_dir) / EVAL_FILE, data, indent=None)


def write_predictions(run_dir: str | Path, split: str, index, target, predicted, confidence, true_prob) -> None:
    """predictions.json: one entry per evaluated image, as parallel lists (compact: no keys
    repeated per image; probabilities rounded to 5 decimals). ``index`` is the image's index in
    the dataset (eval.json's "files" names it); ``confidence`` the probability of the predicted
    class, ``true_prob`` that of the true class."""
    columns = (index, target, predicted, confidence, true_prob)
    data = {"version": PREDICTIONS_VERSION, "split": split}
    for name, values in zip(PREDICTION_COLUMNS, columns):
        values = [round(float(v), 5) for v in values] if name in ("confidence", "true_prob") else [int(v) for v in values]
        data[name] = values
    if len({len(data[c]) for c in PREDICTION_COLUMNS}) != 1:
        raise ValueError("write_predictions: the columns differ in length")   # a bug in the caller
    write_json(Path(run_dir) / PREDICTIONS_FILE, data, indent=None)


def read_predictions(run_dir: str | Path) -> dict | None:
    """predictions.json as {"split", "index", "target", "predicted", "confidence", "true_prob"}
    (lists of equal length), or None when the run has none (older runs, unfinished ones) or the
    file is damaged or of another version."""
    data = read_json(Path(run_dir) / PREDICTIONS_FILE)
    if data.get("version") != PREDICTIONS_VERSION:
        return None
    cols = [data.get(c) for c in PREDICTION_COLUMNS]
    if not all(isinstance(c, list) for c in cols) or len({len(c) for c in cols}) != 1:
        log.warning("%s of run %s is damaged; ignored", PREDICTIONS_FILE, Path(run_dir).name)
        return None
    return data


def append_distributions(run_dir: str | Path, record: dict) -> None:
    """Append one epoch's weight and gradient statistics (a JSON line) to distributions.jsonl."""
    with (Path(run_dir) / DISTRIBUTIONS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")


def read_distributions(run_dir: str | Path) -> list[dict]:
    """The epochs' records of distributions.jsonl in file order ([] when there is none); a
    damaged line (a crash mid-write) is skipped. A resumed run repeats epochs: callers keep the
    last record of each epoch."""
    path = Path(run_dir) / DISTRIBUTIONS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
            out.append(rec)
    return out


# ---- status.json ---------------------------------------------------------------------------
def write_status(run_dir: Path, status: str, message: str = "", *, final: bool = False, **extra) -> None:
    """Replace status.json atomically: if the write fails, the previous status stays whole.

    final: the run's last status (finished, stopped, failed). On a disk so full that even the
    temporary copy finds no room, the previous status ("running", by this live process) would say
    forever that the run trains and block its deletion; so, only then, the file is rewritten in
    place (``_rewrite_in_place``). Raises the OSError when both fail."""
    data = {"status": status, "message": message, "updated": time.time(), "pid": os.getpid(), **extra}
    try:
        write_json(Path(run_dir) / STATUS_FILE, data, indent=None)
    except OSError:
        if not final:
            raise
        _rewrite_in_place(Path(run_dir) / STATUS_FILE, json.dumps(data, ensure_ascii=False))


def _rewrite_in_place(path: Path, text: str) -> None:
    """Overwrite an existing small file's bytes without a new file: padded with spaces to its old
    length (JSON allows them) and written in one call, it stays within the blocks the file already
    has, so it needs no free space. Not atomic; a torn file reads as "no status" (interrupted,
    resumable), never as a wrong epoch count."""
    data = text.encode("utf-8")
    data += b" " * max(0, path.stat().st_size - len(data))
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_status(run_dir: Path, live_ids: set[str] | frozenset = frozenset()) -> tuple[str, str]:
    """(status, message) of a run folder; a 'running' run that no live job owns is 'interrupted',
    unless another process that is still alive (the command line, a second server) trains it."""
    run_dir = Path(run_dir)
    path = run_dir / STATUS_FILE
    if not path.exists():
        return (ev.INTERRUPTED, "no status file: the run did not get past its start") if is_run_dir(run_dir) \
            else ("unknown", "not a run folder")
    data = read_json(path)
    # The trainer replaces the file atomically, so a damaged one is not a write in progress. Its
    # outcome is unknown: calling it "interrupted" would hide that a run may have failed.
    if not isinstance(data.get("status"), str):
        return ev.FAILED, UNREADABLE_STATUS
    status, message = data["status"], str(data.get("message", ""))
    if status in (ev.RUNNING, ev.STOPPING, ev.QUEUED) and run_dir.name not in live_ids:
        if not _writer_alive(data):
            return ev.INTERRUPTED, "the server stopped while this run was training; resume it from its last checkpoint"
        if data.get("pid") != os.getpid():
            return status, f"{message or status} (in another process, pid {data.get('pid')})"
    return status, message


def _writer_alive(data: dict) -> bool:
    """Whether the process that wrote this status file is still there: its pid is alive and (where
    the start time can be read) started before the file was written, so not a reused pid."""
    pid = data.get("pid")
    if not _pid_alive(pid):
        return False
    started = _process_start_time(pid)
    updated = data.get("updated")
    return started is None or not isinstance(updated, (int, float)) or started <= updated + 2


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A process that has died but whose parent has not collected it yet (a training child between
    # its death and the fork server's wait) still answers kill(pid, 0): a zombie is not alive.
    return _process_state(pid) not in ("Z", "X")


def _process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (R, S, D, Z = zombie, X = dead...) from /proc; else None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]   # field 3
    except (OSError, IndexError):
        return None


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc on Linux; else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])          # field 22: starttime
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# ---- card.json -----------------------------------------------------------------------------
def dataset_label(data: dict | Any) -> str:
    """A readable dataset name from a DataConfig (or its dict): 'CIFAR-10 sample', 'CIFAR10',
    the folder's or file's name."""
    d = data if isinstance(data, dict) else dataclasses.asdict(data)
    source, location = d.get("source", "sample"), d.get("location")
    if source == "sample" or not location:
        return "CIFAR-10 sample" if source == "sample" else source
    if source == "torchvision":
        return str(location)
    return Path(str(location)).name or str(location)


def library_versions() -> dict[str, str]:
    """Versions that matter to reproduce a run (for card.json)."""
    import platform

    import numpy
    import torch
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import torchvision
        out["torchvision"] = torchvision.__version__
    except ImportError:  # the zoo needs it, but a card must never fail
        pass
    try:
        import PIL
        out["pillow"] = PIL.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def _card_config(run_dir: Path, config) -> dict:
    """The card's part that comes from the configuration alone."""
    d, m = config.data, config.model
    return {
        "run_id": run_dir.name,
        "name": config.name,
        "model": {"name": m.name, "pretrained": m.pretrained, "weights_path": m.weights_path,
                  "small_input_stem": m.small_input_stem, "freeze": m.freeze,
                  "freeze_stages": m.freeze_stages, "init": m.init},
        "dataset": {"name": dataset_label(d), "source": d.source, "location": d.location,
                    "val_fraction": d.val_fraction, "test_fraction": d.test_fraction,
                    "split_seed": d.split_seed, "normalize": d.normalize, "revision": d.revision,
                    "augmentation": "custom" if d.train_augment is not None else "default"},
        "training": {"epochs": config.epochs, "batch_size": d.batch_size, "optimizer": config.optim.optimizer,
                     "lr": config.optim.lr, "scheduler": config.optim.scheduler,
                     "precision": config.precision, "deterministic": config.deterministic},
        "seed": config.seed,
        "versions": library_versions(),
    }


def _card_started(card: dict, started: ev.RunStarted) -> None:
    card.setdefault("started", started.time)
    card["sessions"] = card.get("sessions", 0) + 1
    card["device"] = started.device
    if started.device.startswith("cuda"):
        try:
            import torch
            card["device_name"] = torch.cuda.get_device_name(torch.device(started.device))
        except Exception:  # a name is a nicety: the card is written without it
            log.warning("no CUDA device name for the card of %s", started.device, exc_info=True)
    card["dataset"].update({"classes": list(started.classes), "num_classes": len(started.classes),
                            "split_sizes": dict(started.split_sizes)})
    card["model"].update({"input_shape": list(started.input_shape), "params": started.params_total,
                          "trainable_params": started.params_trainable})
    card["notes"] = list(started.notes)
    card["status"] = ev.RUNNING


def _card_finished(card: dict, finished: ev.RunFinished) -> None:
    card["finished"] = finished.time
    card["status"] = finished.status
    card["message"] = finished.message
    durations = card.setdefault("session_seconds", [])
    durations.append(round(float(finished.seconds), 3))
    card["duration_s"] = round(sum(durations), 3)
    card["best_epoch"] = finished.best_epoch


def write_card(run_dir: str | Path, config, started: ev.RunStarted | None = None,
               finished: ev.RunFinished | None = None, owner: str | None = None) -> Path:
    """Write (or complete) ``card.json``: what was trained on what, where, with which libraries.

    RunLog writes it for every run, at RunStarted (model, data, split sizes, seed, device,
    versions) and again at RunFinished (status, duration). A resumed run keeps its first start
    time and adds up the durations of its sessions. Without an event it only refreshes the
    configuration's part (and sets ``owner``): the run history does that to record who started a
    run, without counting a session twice."""
    run_dir = Path(run_dir)
    card = read_json(run_dir / CARD_FILE)
    for key, value in _card_config(run_dir, config).items():  # nested sections are merged: RunStarted's details stay
        if isinstance(value, dict) and isinstance(card.get(key), dict):
            card[key].update(value)
        else:
            card[key] = value
    if owner:
        card["owner"] = owner
    if started is not None:
        _card_started(card, started)
    if finished is not None:
        _card_finished(card, finished)
    write_json(run_dir / CARD_FILE, card)
    return run_dir / CARD_FILE


# ---- events.jsonl --------------------------------------------------------------------------
class RunLog:
    """Appends events to events.jsonl in the run folder, keeps its card.json up to date, feeds
    the run's own TensorBoard log when there is one, and forwards the events to the caller.

    The card is written here, at RunStarted and RunFinished, so that every run folder has one,
    whoever started the run (the dashboard's job manager, ``python -m core.train`` or a plain
    ``fit()`` call). It is written before the caller sees the event, so a listener (the run
    history) finds it current."""

    def __init__(self, run_dir: Path, sink: EventSink | None, config):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / EVENTS_FILE
        self.sink = sink
        self.config = config
        self.tensorboard: EventSink | None = None

    def __call__(self, event: ev.Event) -> None:
        try:
            self._append(event)
        except OSError as err:
            if not isinstance(event, ev.RunFinished):
                # The run cannot keep its record (disk full...): end it now with the reason,
                # rather than train on with curves that will never be seen.
                raise storage.storage_error(err, self.run_dir.parent,
                                            f"writing the run's events ({EVENTS_FILE})") from err
            # The run is ending with its reason anyway: the caller must still hear of it.
            log.warning("the final event of %s was not written to %s: %s", self.run_dir.name, EVENTS_FILE, err)
        if isinstance(event, (ev.RunStarted, ev.RunFinished)):
            self._card(event)
        if self.tensorboard is not None:
            self._to_tensorboard(event)
        if self.sink is not None:
            self.sink(event)

    def _to_tensorboard(self, event: ev.Event) -> None:
        """A TensorBoard problem never stops training: the run goes on without that log, and the
        server log says why (a full disk in a line, anything else with its traceback)."""
        try:
            self.tensorboard(event)
        except OSError as err:
            log.warning("TensorBoard log of run %s stopped: %s", self.run_dir.name, err)
            self.tensorboard = None
        except Exception:
            log.exception("TensorBoard log of run %s failed; the run goes on without it", self.run_dir.name)
            self.tensorboard = None

    def _append(self, event: ev.Event) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")

    def _card(self, event: ev.Event) -> None:
        try:
            write_card(self.run_dir, self.config, started=event if isinstance(event, ev.RunStarted) else None,
                       finished=event if isinstance(event, ev.RunFinished) else None)
        except Exception as err:  # the card describes the run; it must never fail it
            warnings.warn(f"{CARD_FILE} not written in {self.run_dir}: {type(err).__name__}: {err}")


def record_lost_run(run_dir: Path, config, finished: ev.RunFinished, epochs_completed: int) -> None:
    """Write the end of a run whose process died before ``fit`` could (the job manager calls it
    with the reason): status.json as the trainer's end writes it, and ``finished`` in events.jsonl
    and card.json, so the run history shows the reason after a restart too."""
    write_status(run_dir, finished.status, finished.message, final=True, seconds=finished.seconds,
                 epochs_completed=epochs_completed)
    RunLog(run_dir, None, config)(finished)
