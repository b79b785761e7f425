"""Reading runs back: the run folders under ``runs/`` are the source of truth.

The run folder's layout and its files' writers are core.rundir's. This module turns a folder into a ``RunRecord`` (curves,
final metrics, status) and lists the runs of a runs directory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from core import events as ev, identity, resume, rundir, storage
from core.config import RunConfig
from core.errors import ConfigError, DataError
from core.metrics import EvalReport
from core.rundir import (BEST_CKPT, CARD_FILE, CONFIG_FILE, EVAL_FILE, EVENTS_FILE, INDEX_FILE,  # noqa: F401
                         LAST_CKPT, META_FILE, STATUS_FILE, UNREADABLE_STATUS, dataset_label, library_versions,
                         list_run_dirs, read_json as _read_json, read_meta, read_status, write_card, write_meta)

log = logging.getLogger(__name__)


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


def load_run(run_dir: str | Path, live_ids: set[str] | frozenset = frozenset()) -> RunRecord:
    """Read one run folder (tolerates a run that is still being written)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise DataError(f"Run {run_dir.name} is not a Classifier Lab run folder (no {CONFIG_FILE}).")
    try:
        config = RunConfig.load(run_dir / CONFIG_FILE)
    except Exception:  # a config from an older or edited version: still show the run
        config = None
    epochs, steps, started, seconds = [], [], None, None
    events_path = run_dir / EVENTS_FILE
    if events_path.exists():
        with events_path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError:  # a line being written right now
                    continue
                kind = raw.get("kind")
                if kind == "EpochEnded":
                    epochs.append(raw)
                elif kind == "BatchEnded":
                    steps.append({"step": raw["step"], "epoch": raw["epoch"] - 1 + raw["batch"] / raw["batches"],
                                  "loss": raw["loss"], "lr": raw["lr"], "images_per_sec": raw["images_per_sec"]})
                elif kind == "RunStarted":
                    started = raw
                    if raw.get("start_epoch", 0) == 0:  # a fresh start (not a resume) resets curves
                        epochs, steps = [], []
                elif kind == "RunFinished":
                    seconds = (seconds or 0.0) + raw.get("seconds", 0.0)
    # A resumed run repeats the epochs after its checkpoint: keep the latest row per epoch.
    epoch_df = pd.DataFrame(epochs)
    if not epoch_df.empty:
        epoch_df = epoch_df.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    step_df = pd.DataFrame(steps, columns=["step", "epoch", "loss", "lr", "images_per_sec"])
    if not step_df.empty:
        step_df = step_df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    status, message = read_status(run_dir, live_ids)
    eval_data = rundir.read_eval(run_dir)
    return RunRecord(run_dir.name, run_dir, config, status, message, epoch_df, step_df, started, eval_data, seconds,
                     meta=read_meta(run_dir))


def misclassified_images(record: RunRecord, limit: int = 24, data_dir: str | Path | None = None):
    """(PIL image, caption) pairs of the run's most confident test errors, for a gallery.

    Pixels, never paths: a path in a gallery would have to be served from the data folder, which
    would then serve every user's uploads to anyone who guessed a name. File-backed datasets are
    read from their files; array-backed ones (torchvision sets) are reloaded from the data folder."""
    if not record.eval:
        return []
    report = record.report()
    rows = report.misclassified.head(limit)
    files = record.eval.get("files", {})
    need_dataset = any(not Path(str(files.get(str(r["sample"]), ""))).is_file() for _, r in rows.iterrows())
    ds = None
    if need_dataset and record.config is not None:
        from core import datasets
        try:
            ds = datasets.load_dataset(record.config.data.source, record.config.data.location,
                                       data_dir=data_dir or datasets.DEFAULT_DATA_DIR, download=False)
        except Exception:  # the data may be gone; show what we can
            ds = None
    out = []
    for _, r in rows.iterrows():
        caption = f"{r['true']} → {r['predicted']} {r['confidence']:.0%}"  # short: thumbnails are narrow
        path = files.get(str(r["sample"]))
        image = _read_image(path) if path and Path(path).is_file() else None
        if image is not None:
            out.append((image, caption))
        elif ds is not None:
            out.append((ds.load_image(int(r["sample"])), caption))
    return out


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


# =============================================================================================
# Run history: an SQLite index over the run folders
# =============================================================================================
# The folders stay the source of truth. The index (``<runs_dir>/index.sqlite``) makes listing,
# filtering and sorting hundreds of runs instant and holds what the folders do not say by
# themselves in a cheap way (the owner, comparison groups, a cached memory estimate); everything
# the index holds that cannot be recomputed from config/events/status/eval is also written to
# ``meta.json`` in the run folder, so ``rebuild()`` loses nothing.
SCHEMA_VERSION = 1
LIVE_STATUSES = (ev.QUEUED, ev.RUNNING, ev.STOPPING)
MAX_NAME_CHARS, MAX_TAGS = 200, 20

# (column, SQLite type). Fractions 0..1 for accuracies; bytes for sizes; Unix times.
INDEX_COLUMNS: list[tuple[str, str]] = [
    ("run_id", "TEXT PRIMARY KEY"), ("name", "TEXT"), ("tags", "TEXT"), ("owner", "TEXT"),
    ("model", "TEXT"), ("dataset", "TEXT"), ("status", "TEXT"), ("message", "TEXT"),
    ("created", "REAL"), ("updated", "REAL"), ("epochs_done", "INTEGER"), ("epochs", "INTEGER"),
    ("best_val_accuracy", "REAL"), ("test_accuracy", "REAL"), ("macro_f1", "REAL"),
    ("params", "INTEGER"), ("trainable_params", "INTEGER"), ("train_seconds", "REAL"),
    ("images_per_sec", "REAL"), ("predicted_memory_bytes", "INTEGER"), ("checkpoint_bytes", "INTEGER"),
    ("group_id", "TEXT"), ("batch_size", "INTEGER"), ("lr", "REAL"), ("optimizer", "TEXT"),
    ("freeze", "TEXT"), ("has_last", "INTEGER"), ("has_eval", "INTEGER"), ("run_dir", "TEXT"),
    ("status_mtime", "REAL"),
]
COLUMN_NAMES = [c for c, _ in INDEX_COLUMNS]
SORT_COLUMNS = tuple(c for c in COLUMN_NAMES if c not in ("run_dir", "status_mtime"))


def _index_trouble(err: Exception) -> bool:
    """An error of the index file itself (disk full, I/O error, locked too long, damaged), which
    the history works around, as opposed to a mistake in the SQL (a bug, raised)."""
    return isinstance(err, sqlite3.OperationalError) or type(err) is sqlite3.DatabaseError


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


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _macro_f1(eval_data: dict | None) -> float | None:
    for row in (eval_data or {}).get("averages", []) or []:
        if row.get("average") == "macro":
            return float(row["f1"])
    return None


def _num(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value  # NaN → None


def _text(value) -> str | None:
    """A text cell of the index, None for empty or NaN (pandas reads a NULL as NaN)."""
    return value if isinstance(value, str) and value else None


def _no_run(run_id: str) -> str:
    return f"No run {run_id!r} in the run history: pick a run from the list (it may have been deleted)."


def run_label(row: dict) -> str:
    """How a run reads in a list: its name, else "resnet18 · 3 epochs · 14:42" (the start time;
    with the date when not today). Never the folder, which says nothing to a person."""
    name = _text(row.get("name"))
    if name:
        return name
    parts = [_text(row.get("model")) or "run"]
    epochs = _num(row.get("epochs"))
    if epochs:
        parts.append(f"{int(epochs)} epoch{'s' * (int(epochs) != 1)}")
    created = _num(row.get("created"))
    if created:
        same_day = time.strftime("%Y%m%d", time.localtime(created)) == time.strftime("%Y%m%d")
        parts.append(time.strftime("%H:%M" if same_day else "%b %d %H:%M", time.localtime(created)))
    return " · ".join(parts)


def summarize_record(record: RunRecord, meta: dict | None = None) -> dict[str, Any]:
    """One index row (see INDEX_COLUMNS) from a RunRecord and its meta.json."""
    meta = read_meta(record.run_dir) if meta is None else meta
    cfg, started, epochs = record.config, record.started or {}, record.epochs
    best_val = ips = None
    epochs_done = 0
    train_seconds = record.seconds
    if not epochs.empty:
        epochs_done = int(epochs["epoch"].max())
        if "val_accuracy" in epochs:
            best_val = _num(pd.to_numeric(epochs["val_accuracy"], errors="coerce").max())
        if "images_per_sec" in epochs:
            ips = _num(pd.to_numeric(epochs["images_per_sec"], errors="coerce").mean())
        if train_seconds is None and "seconds" in epochs:
            train_seconds = _num(pd.to_numeric(epochs["seconds"], errors="coerce").sum())
    status_data = _read_json(record.run_dir / STATUS_FILE)
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
        "dataset": dataset_label(cfg.data) if cfg else None,
        "status": record.status,
        "message": record.message,
        "created": _created_time(record.run_dir),
        "updated": time.time(),
        "epochs_done": epochs_done,
        "epochs": cfg.epochs if cfg else None,
        "best_val_accuracy": best_val,
        "test_accuracy": _num((record.eval or {}).get("accuracy")),
        "macro_f1": _macro_f1(record.eval),
        "params": started.get("params_total"),
        "trainable_params": started.get("params_trainable"),
        "train_seconds": _num(train_seconds),
        "images_per_sec": ips,
        "predicted_memory_bytes": memory.get("bytes") if key is not None and memory.get("key") == key else None,
        "checkpoint_bytes": _size(record.run_dir / BEST_CKPT),
        "group_id": meta.get("group_id"),
        "batch_size": cfg.data.batch_size if cfg else None,
        "lr": cfg.optim.lr if cfg else None,
        "optimizer": cfg.optim.optimizer if cfg else None,
        "freeze": cfg.model.freeze if cfg else None,
        "has_last": int((record.run_dir / LAST_CKPT).is_file()),
        "has_eval": int((record.run_dir / EVAL_FILE).is_file()),
        "run_dir": str(record.run_dir),
        "status_mtime": _mtime(record.run_dir / STATUS_FILE),
    }


def memory_key(config: RunConfig | None, num_classes: int, input_shape) -> str | None:
    """What a training-memory estimate depends on (a cached estimate is reused only on a match)."""
    if config is None or not num_classes or not input_shape:
        return None
    m, o = config.model, config.optim
    return json.dumps([m.name, int(num_classes), [int(v) for v in input_shape], config.data.batch_size,
                       o.optimizer, o.momentum, config.precision, m.freeze, m.freeze_stages,
                       m.small_input_stem])


class RunHistory:
    """SQLite index of the runs under ``runs_dir`` (``index.sqlite``, WAL mode).

    Thread-safe: every call opens its own short connection and writes are serialised by a lock.
    The index is rebuilt from the folders when it is missing, unreadable or of another schema
    version; ``list`` also picks up folders written by someone else (the command line, another
    server) and notices runs whose process died (status 'interrupted').
    """

    def __init__(self, runs_dir: str | Path = "runs"):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.runs_dir / INDEX_FILE
        self.manager = None
        self._lock = threading.RLock()
        self._pending: dict[str, dict] = {}   # run id → meta to write when its folder appears
        self._attached: set[int] = set()
        self._stale = False    # a write to the index failed: it lags behind the folders
        self._warned = False   # that is logged once, not at every listing
        if not self._index_ok():
            self.rebuild()

    # ---- connection and schema -----------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # SQLite's default rollback journal, not WAL: a WAL reader must write (its -shm file), so
        # on a full disk even listing the runs failed with "disk I/O error"; with a rollback
        # journal reading needs no space. Writes are few and short, so readers barely wait.
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA synchronous=NORMAL")   # the index can be rebuilt; no fsync per row
        return con

    def _index_ok(self) -> bool:
        if not self.path.is_file():
            return False
        try:
            with closing(self._connect()) as con:
                row = con.execute("SELECT value FROM info WHERE key='schema_version'").fetchone()
                cols = [r[1] for r in con.execute("PRAGMA table_info(runs)")]
                if con.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    # An index from before is in WAL mode: switch it (see _connect). While another
                    # process holds it open the switch fails and waits for a later start; WAL
                    # keeps working meanwhile, as before.
                    with contextlib.suppress(sqlite3.OperationalError):
                        con.execute("PRAGMA journal_mode=DELETE")
            return row is not None and int(row[0]) == SCHEMA_VERSION and cols == COLUMN_NAMES
        except (sqlite3.DatabaseError, ValueError):
            return False

    def rebuild(self) -> int:
        """Re-create the index from the run folders; returns the number of runs indexed (0 when it
        cannot be written now: the history then lists the folders, see ``list``)."""
        with self._lock:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            cols = ", ".join(f"{c} {t}" for c, t in INDEX_COLUMNS)
            if not self._write(f"CREATE TABLE runs ({cols}); "
                               "CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT); "
                               f"INSERT INTO info VALUES ('schema_version', '{SCHEMA_VERSION}');", script=True):
                return 0
            self._stale = False
            count = 0
            for run_dir in list_run_dirs(self.runs_dir):
                if self._refresh(run_dir.name, run_dir) is not None:
                    count += 1
            return count

    # ---- writing rows --------------------------------------------------------------------
    def _upsert(self, row: dict) -> None:
        row = {k: row.get(k) for k in COLUMN_NAMES if k in row}
        cols = list(row)
        sql = (f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
               f"ON CONFLICT(run_id) DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in cols if c != "run_id"))
        self._write(sql, [row[c] for c in cols])

    def _write(self, sql: str, params: Sequence = (), many: bool = False, script: bool = False) -> bool:
        """One write to the index (a transaction); False when the index cannot be written (disk
        full, I/O error, damaged file). Nothing is lost then: the folders are the truth, ``list``
        reads them directly meanwhile and brings the index up to date once it can be written."""
        try:
            with self._lock, closing(self._connect()) as con:
                if script:
                    con.executescript(f"BEGIN; {sql} COMMIT;")
                else:
                    (con.executemany if many else con.execute)(sql, params)
            return True
        except sqlite3.DatabaseError as err:
            if not _index_trouble(err):
                raise
            self._index_failed(err)
            return False

    def _read(self, sql: str, params: Sequence = ()) -> list[dict] | None:
        """Rows of a query on the index; None when there is no index or it cannot be read."""
        if not self.path.is_file():   # connecting would create an empty file
            return None
        try:
            with closing(self._connect()) as con:
                return [dict(r) for r in con.execute(sql, params)]
        except sqlite3.DatabaseError as err:
            if not _index_trouble(err):
                raise
            self._index_failed(err)
            return None

    def _index_failed(self, err: Exception) -> None:
        self._stale = True
        if not self._warned:   # once: on a full disk every listing would say it again
            self._warned = True
            log.warning("The run history index %s cannot be used (%s): listing the run folders directly "
                        "until it can be written again.", self.path, err)

    def _get(self, run_id: str) -> dict | None:
        rows = self._read("SELECT * FROM runs WHERE run_id=?", (run_id,))
        return rows[0] if rows else None

    def _live_ids(self) -> set[str]:
        if self.manager is None:
            return set()
        return {j.job_id for j in self.manager.jobs() if not j.done}

    def _refresh(self, run_id: str, run_dir: Path | None = None, live_ids: set[str] | None = None) -> dict | None:
        """Re-read one run folder into its row (None when the folder is not a run). Only a row
        that changed is written: listing an unchanged history writes nothing."""
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir(run_id)
        old = self._get(run_id)
        row = self._read_row(run_dir, self._live_ids() if live_ids is None else live_ids, old)
        if row is not None and (old is None or any(row[k] != old.get(k) for k in row if k != "updated")):
            self._upsert(row)
        return row

    @staticmethod
    def _read_row(run_dir: Path, live_ids: set[str], old: dict | None) -> dict | None:
        """One run folder as an index row (None when it is not a run); ``old``, its row in the
        index, gives what only the index knew (before meta.json had it)."""
        if not (run_dir / CONFIG_FILE).is_file():
            return None
        try:
            record = load_run(run_dir, live_ids)
        except DataError:
            return None
        row = summarize_record(record)
        if old is not None:  # keep what only the index knew (before meta.json had it)
            for key in ("owner", "group_id", "predicted_memory_bytes"):
                if row.get(key) is None and old.get(key) is not None:
                    row[key] = old[key]
            if old.get("created") and old["created"] < row["created"]:
                row["created"] = old["created"]
        return row

    def run_dir(self, run_id: str) -> Path:
        """The folder of ``run_id`` (validated: a plain name inside runs_dir)."""
        if not run_id or Path(run_id).name != run_id or run_id in (".", ".."):
            raise ConfigError(f"{run_id!r} is not a run id (a folder name such as "
                              "20250101-120000-resnet18-ab12cd).")
        row = self._get(run_id) if self.path.exists() else None
        if row and row.get("run_dir"):
            return Path(row["run_dir"])
        return self.runs_dir / run_id

    def _update_meta(self, run_id: str, **changes) -> dict:
        run_dir = self.run_dir(run_id)
        with self._lock:
            meta = read_meta(run_dir)
            meta.update({k: v for k, v in changes.items()})
            if run_dir.is_dir():
                try:
                    write_meta(run_dir, meta)
                except OSError as err:   # the old meta.json stays whole (atomic write)
                    raise storage.storage_error(err, self.runs_dir,
                                                f"saving the name and tags of run {run_id} ({META_FILE})") from err
            else:  # queued: the folder does not exist yet; written when the run starts
                self._pending.setdefault(run_id, {}).update(changes)
        return meta

    # ---- the JobManager listener ---------------------------------------------------------
    def attach(self, manager) -> "RunHistory":
        """Keep the index up to date with ``manager``'s jobs (RunStarted, EpochEnded, Evaluated,
        RunFinished); record who started each run (meta.json, and the owner in card.json)."""
        self.manager = manager
        if id(manager) not in self._attached:
            self._attached.add(id(manager))
            manager.add_listener(self._on_event)
        return self

    def _on_event(self, job, event) -> None:
        if not isinstance(event, (ev.RunStarted, ev.EpochEnded, ev.Evaluated, ev.RunFinished)):
            return
        run_id = job.job_id
        run_dir = Path(event.run_dir) if isinstance(event, ev.RunStarted) else self.run_dir(run_id)
        if isinstance(event, (ev.RunStarted, ev.RunFinished)) and run_dir.is_dir():
            with self._lock:
                meta = read_meta(run_dir)
                meta.update(self._pending.pop(run_id, {}))
                meta.setdefault("owner", job.owner)
                try:
                    write_meta(run_dir, meta)
                except OSError as err:   # disk full: the run's own files say how it went; index it anyway
                    log.warning("meta.json of run %s not written: %s", run_id, err)
            if isinstance(event, ev.RunStarted):
                # The trainer writes the card itself (every run folder has one, however it was
                # started) and counts the sessions and durations; only the owner is known here.
                try:
                    write_card(run_dir, job.config, owner=job.owner)
                except OSError:
                    pass
        live = self._live_ids()
        if isinstance(event, ev.RunFinished):
            live.discard(run_id)
        else:
            live.add(run_id)
        if self._refresh(run_id, run_dir, live_ids=live) is None:
            # No run folder (the run failed before it was created): keep what the job says.
            status = event.status if isinstance(event, ev.RunFinished) else job.status
            self._upsert({"run_id": run_id, "status": status, "message": getattr(event, "message", job.message),
                          "updated": time.time(), "owner": job.owner})

    def register_queued(self, run_id: str, config: RunConfig, owner: str | None = None,
                        group_id: str | None = None) -> None:
        """Index a job that is queued but has no folder yet (comparison groups use this)."""
        meta = {k: v for k, v in (("owner", owner), ("group_id", group_id)) if v is not None}
        with self._lock:
            self._pending.setdefault(run_id, {}).update(meta)
        self._upsert({"run_id": run_id, "name": config.name, "tags": "", "owner": owner,
                      "model": config.model.name, "dataset": dataset_label(config.data),
                      "status": ev.QUEUED, "message": "waiting for a free training slot",
                      "created": time.time(), "updated": time.time(), "epochs_done": 0,
                      "epochs": config.epochs, "group_id": group_id, "batch_size": config.data.batch_size,
                      "lr": config.optim.lr, "optimizer": config.optim.optimizer, "freeze": config.model.freeze,
                      "has_last": 0, "has_eval": 0, "run_dir": str(self.runs_dir / run_id)})

    # ---- reading -------------------------------------------------------------------------
    def sync(self, everything: bool = False) -> None:
        """Bring the index in line with the folders: new folders are added, vanished ones
        removed, changed status files and runs whose process died are re-read (``everything``:
        every folder, after writes to the index failed)."""
        with self._lock:
            found = self._read("SELECT run_id, status, status_mtime, run_dir FROM runs")
            if found is None:
                return
            rows = {r["run_id"]: r for r in found}
            live = self._live_ids()
            on_disk = {p.name: p for p in list_run_dirs(self.runs_dir)}
            for run_id, run_dir in on_disk.items():
                row = rows.get(run_id)
                if everything or row is None or row["run_dir"] != str(run_dir):
                    self._refresh(run_id, run_dir, live)
                elif (row["status_mtime"] != _mtime(run_dir / STATUS_FILE)
                      or (row["status"] in LIVE_STATUSES and run_id not in live)):
                    self._refresh(run_id, run_dir, live)
            gone = []
            for run_id, row in rows.items():
                if run_id in on_disk:
                    continue
                if row["run_dir"] and (Path(row["run_dir"]) / CONFIG_FILE).is_file():
                    continue  # a run kept outside runs_dir (resumed from elsewhere)
                job = self.manager.find(run_id) if self.manager is not None else None
                if job is not None and not job.done:
                    continue  # queued or just starting
                gone.append(run_id)
            if gone:
                self._write("DELETE FROM runs WHERE run_id=?", [(r,) for r in gone], many=True)

    def _recover(self) -> None:
        """After a failed write: once the index can be written again (space was freed), bring
        every row up to date — or rebuild it when it is missing or damaged."""
        if not self._index_ok():
            self.rebuild()
        elif self._write("UPDATE info SET value=value WHERE key='schema_version'"):  # a write needs room
            self._stale = False
            self.sync(everything=True)
        if not self._stale and self._warned:
            self._warned = False
            log.info("The run history index %s works again.", self.path)

    def _table(self) -> pd.DataFrame:
        """Every row: from the index, or from the run folders while it cannot be kept current."""
        if self._stale:
            self._recover()
        if not self._stale:
            self.sync()
        rows = None if self._stale else self._read("SELECT * FROM runs")
        if rows is None:
            return self._scan()
        return pd.DataFrame.from_records(rows, columns=COLUMN_NAMES, coerce_float=True)

    def _scan(self) -> pd.DataFrame:
        """The rows read from the run folders alone, writing nothing (a full disk); from the index,
        when it can be read, only what the folders lack: runs queued (no folder yet) or kept
        elsewhere, and owners from before meta.json had them."""
        live = self._live_ids()
        known = {r["run_id"]: r for r in self._read("SELECT * FROM runs") or []}
        rows = []
        for run_dir in list_run_dirs(self.runs_dir):
            row = self._read_row(run_dir, live, known.pop(run_dir.name, None))
            if row is not None:
                rows.append(row)
        for run_id, old in known.items():
            row = self._read_row(Path(old["run_dir"]), live, old) if old.get("run_dir") else None
            if row is not None or run_id in live:
                rows.append(row or old)
        return pd.DataFrame.from_records(rows, columns=COLUMN_NAMES, coerce_float=True)

    def list(self, filter_text: str | None = None, status: str | None = None, model: str | None = None,
             tag: str | None = None, sort: str = "created", descending: bool = True,
             group_id: str | None = None) -> pd.DataFrame:
        """The runs as a DataFrame (one row per run, INDEX_COLUMNS), filtered and sorted.

        filter_text: case-insensitive words that must all appear in the run id, name, model,
        dataset, tags, owner or message. status/model/tag/group_id: exact matches."""
        if sort not in SORT_COLUMNS:
            raise ConfigError(f"Cannot sort runs by {sort!r}; choose one of {', '.join(SORT_COLUMNS)}.")
        df = self._table()
        df = df.astype({"tags": "object", "name": "object", "owner": "object", "group_id": "object"})
        if status:
            df = df[df["status"] == status]
        if model:
            df = df[df["model"] == model]
        if group_id:
            df = df[df["group_id"] == group_id]
        if tag:
            df = df[df["tags"].fillna("").map(lambda t: tag.strip() in normalize_tags(t))]
        if filter_text and filter_text.strip():
            hay = df[["run_id", "name", "model", "dataset", "tags", "owner", "message"]].fillna("") \
                .astype(str).agg(" ".join, axis=1).str.lower()
            keep = pd.Series(True, index=df.index)
            for word in filter_text.lower().split():
                keep &= hay.str.contains(word, regex=False)
            df = df[keep]
        df = df.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
        return df.reset_index(drop=True)

    def get(self, run_id: str, refresh: bool = True) -> dict:
        """One run's row; ``refresh`` re-reads its folder first (else the index as it is, which
        the listener keeps current for live runs). ConfigError when unknown."""
        self.run_dir(run_id)  # validates the id
        row = self._refresh(run_id) if refresh else None
        if row is None and self.path.exists():
            row = self._get(run_id)
        if row is None:
            raise ConfigError(_no_run(run_id))
        return row

    def label(self, run_id: str) -> str:
        row = self._get(run_id)
        return run_label(row) if row else run_id

    def choices(self, need: str | None = None, who: identity.Who | None = None, private: bool = False,
                **filters) -> list[tuple[str, str]]:
        """(label, run id) pairs for a dropdown, newest first: the run's name as the label (never a
        folder), the id as the value. need: None, 'eval' or 'checkpoint'. With ``who``, only the
        runs ``who`` may view (``private``: their own, or all for the teacher)."""
        df = self.list(**filters)
        if need == "eval":
            df = df[df["has_eval"] == 1]
        elif need == "checkpoint":
            df = df[(df["has_last"] == 1) | df["checkpoint_bytes"].notna()]
        out = []
        for row in df.to_dict("records"):
            if who is not None and not identity.can_view(_text(row.get("owner")), who, private):
                continue
            label = run_label(row)
            if _num(row.get("test_accuracy")) is not None:
                label += f" · test {row['test_accuracy']:.1%}"
            elif row.get("status") != ev.FINISHED:
                label += f" · {row.get('status')}"
            out.append((label, row["run_id"]))
        seen = pd.Series([label for label, _ in out]).value_counts() if out else pd.Series(dtype=int)
        # Two runs that read the same (same model and minute) get the end of their ids to tell them apart.
        return [(f"{label} [{run_id[-6:]}]" if seen.get(label, 0) > 1 else label, run_id) for label, run_id in out]

    # ---- who may do what -----------------------------------------------------------------
    def owner(self, run_id: str) -> tuple[bool, str | None]:
        """(known, owner) of a run: whether the id is a run of this history (indexed, in the runs
        folder, or a job of the attached queue) and who started it (None: the command line)."""
        self.run_dir(run_id)  # a path or anything but a plain id is refused here
        row = self._get(run_id) if self.path.exists() else None
        if row is None:
            row = self._refresh(run_id)
        job = self.manager.find(run_id) if self.manager is not None else None
        if row is None and job is None and run_id not in self._pending:
            return False, None
        owner = _text(row.get("owner")) if row else None
        if owner is None and run_id in self._pending:
            owner = self._pending[run_id].get("owner")
        if owner is None and job is not None:
            owner = job.owner
        return True, owner

    def check_access(self, run_id: str, who: identity.Who, action: str | None = None,
                     private: bool = False) -> str | None:
        """Refuse (ConfigError, in plain words) an id that is not a run here, a run ``who`` may not
        see, or, with ``action`` ('delete', 'rename', ...), a run ``who`` may not change. Returns
        the run's owner."""
        if not run_id:
            raise ConfigError("Pick a run first.")
        known, owner = self.owner(run_id)
        if not known:
            raise ConfigError(_no_run(run_id))
        if action is None:
            identity.require_view(owner, who, private)
        else:
            identity.require_change(owner, who, action)
        return owner

    # ---- editing -------------------------------------------------------------------------
    def _require_run(self, run_id: str) -> Path:
        run_dir = self.run_dir(run_id)
        if not (run_dir / CONFIG_FILE).is_file() and run_id not in self._pending:
            raise ConfigError(_no_run(run_id))
        return run_dir

    def rename(self, run_id: str, name: str | None, who: identity.Who | None = None) -> dict:
        """Give a run a display name (kept in its meta.json); empty clears it. With ``who``, only
        when they may change the run (``None``: a trusted caller, e.g. the command line)."""
        if who is not None:
            self.check_access(run_id, who, "rename")
        self._require_run(run_id)
        name = " ".join(str(name or "").split()) or None
        if name and len(name) > MAX_NAME_CHARS:
            raise ConfigError(f"A run name can have at most {MAX_NAME_CHARS} characters; this one has {len(name)}.")
        self._update_meta(run_id, name=name)
        return self._refresh(run_id) or self._touch(run_id, name=name)

    def set_tags(self, run_id: str, tags: str | Sequence[str] | None, who: identity.Who | None = None) -> dict:
        """Replace a run's tags ('a, b' or a list; kept in meta.json); ``who`` as for ``rename``."""
        if who is not None:
            self.check_access(run_id, who, "tag")
        self._require_run(run_id)
        tags = normalize_tags(tags)
        self._update_meta(run_id, tags=tags)
        return self._refresh(run_id) or self._touch(run_id, tags=", ".join(tags))

    def set_predicted_memory(self, run_id: str, n_bytes: int | None, key: str | None) -> None:
        """Cache a training-memory estimate (index + meta.json, valid while ``key`` matches)."""
        if n_bytes is None or key is None:
            return
        try:
            self._update_meta(run_id, predicted_memory={"bytes": int(n_bytes), "key": key})
        except OSError:   # a cache: on a full disk it is computed again next time
            return
        self._touch(run_id, predicted_memory_bytes=int(n_bytes))

    def _touch(self, run_id: str, **values) -> dict:
        if self._get(run_id) is not None:
            self._upsert({"run_id": run_id, **values, "updated": time.time()})
        return self._get(run_id) or {}

    def delete(self, run_id: str, confirm: str | None, who: identity.Who | None = None) -> str:
        """Delete a run's folder (checkpoints included) and its row — only when ``confirm`` is
        exactly the run id, and never while the run is training or queued; ``who`` as for ``rename``."""
        if who is not None:
            self.check_access(run_id, who, "delete")
        run_dir = self.run_dir(run_id)
        if (confirm or "").strip() != run_id:
            raise ConfigError(f"To delete run {run_id}, type its id exactly ({run_id}) to confirm. "
                              "Nothing was deleted.")
        job = self.manager.find(run_id) if self.manager is not None else None
        if job is not None and not job.done:
            raise ConfigError(f"Run {run_id} is {job.status}: stop it first (Train tab or Stop), then delete it.")
        if run_dir.exists():
            if not (run_dir / CONFIG_FILE).is_file() and not (run_dir / META_FILE).is_file():
                raise ConfigError(f"The folder of run {run_id} is not a Classifier Lab run folder; it was left alone.")
            if run_dir.resolve().parent != self.runs_dir.resolve():
                raise ConfigError(f"Run {run_id} is kept outside the runs folder; the server's owner can delete "
                                  "it by hand.")
            status, _ = read_status(run_dir, self._live_ids())
            if status in (ev.RUNNING, ev.STOPPING):
                raise ConfigError(f"Run {run_id} is still training in another process (its status file says "
                                  f"{status}); stop it first.")
            try:
                shutil.rmtree(run_dir)   # needs no free space: deleting is how a full disk is cleared
            except OSError as err:
                raise storage.storage_error(err, self.runs_dir, f"deleting run {run_id}") from err
        # On a full disk this may fail; the folder is gone, so the next listing drops the row.
        self._write("DELETE FROM runs WHERE run_id=?", (run_id,))
        self._pending.pop(run_id, None)
        return f"Deleted run {run_id}."

    # ---- resuming ------------------------------------------------------------------------
    def interrupted(self) -> list[Path]:
        """Run folders whose status says running but whose process is gone (the server died)."""
        df = self.list(status=ev.INTERRUPTED)
        return [Path(p) for p in df["run_dir"]]

    def last_run(self, owner: str, exclude_groups: bool = False) -> dict | None:
        """The index row of the run ``owner`` was last active in (the last status change: start,
        stop, end) among those not training or queued now; exclude_groups leaves out the runs of
        comparisons. None when there is none."""
        df = self.list()
        df = df[(df["owner"] == owner) & ~df["run_id"].isin(self._live_ids())
                & ~df["status"].isin(LIVE_STATUSES) & df["run_dir"].notna()]
        if exclude_groups:
            df = df[df["group_id"].isna() | (df["group_id"] == "")]
        if df.empty:
            return None
        active = df["status_mtime"].fillna(df["created"])
        return df.loc[active.astype(float).idxmax()].to_dict()

    def resume(self, run_id: str, owner: str | None = None, epochs: int | None = None,
               who: identity.Who | None = None):
        """Continue a run through the attached JobManager as core.resume.plan_resume decides (from
        its last.pth, in its folder); returns the Job. ``who`` as for ``rename``; the job keeps the
        run's owner (``owner`` overrides it; a command-line run becomes the resumer's)."""
        if who is not None:
            self.check_access(run_id, who, "resume")
        if self.manager is None:
            raise ConfigError("Resuming needs the training queue: this history is not attached to a JobManager.")
        run_dir = self._require_run(run_id)
        row = self.get(run_id)
        plan = resume.plan_resume(run_dir, status=row["status"], epochs=epochs, who=who,
                                  run_owner=_text(row.get("owner")), owner=owner)
        return self.manager.submit(plan.config, owner=plan.owner, resume_from=plan.checkpoint)
