"""The run history's index: ``<runs_dir>/index.sqlite``, one row per run, kept in line with the folders.

The folders stay the source of truth. The index makes listing, filtering and sorting hundreds of
runs instant and holds what the folders do not say by themselves in a cheap way (the owner,
comparison groups, a cached memory estimate); everything it holds that cannot be recomputed from
config/events/status/eval is also in the run's ``meta.json``, so ``rebuild()`` loses nothing.

Keeping in line (``sync``) does not look into every folder at every listing: a full look
(``rescan``) happens when the set of folders changed (one directory listing tells), when asked,
and at least every ``RESCAN_EVERY_S`` (a run changed in place by another process). In between only
the rows that can change by themselves are re-read: runs live elsewhere (the command line, a dead
server's) and rows without a folder. Live runs of this server are kept current by the history's
job listener, which follows their events.jsonl by its new lines (``follow``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from core import events as ev, rundir
from core.errors import ConfigError, DataError
from core.rundir import INDEX_FILE, STATUS_FILE
from core.runrecord import RunEvents, load_run, mtime, normalize_tags, summarize_record

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2   # 2: the revision column (a run's data.revision)
LIVE_STATUSES = (ev.QUEUED, ev.RUNNING, ev.STOPPING)
RESCAN_EVERY_S = 30.0
# (column, SQLite type). Fractions 0..1 for accuracies; bytes for sizes; Unix times.
INDEX_COLUMNS: list[tuple[str, str]] = [
    ("run_id", "TEXT PRIMARY KEY"), ("name", "TEXT"), ("tags", "TEXT"), ("owner", "TEXT"),
    ("model", "TEXT"), ("dataset", "TEXT"), ("status", "TEXT"), ("message", "TEXT"),
    ("created", "REAL"), ("updated", "REAL"), ("epochs_done", "INTEGER"), ("epochs", "INTEGER"),
    ("best_val_accuracy", "REAL"), ("test_accuracy", "REAL"), ("test_images", "INTEGER"), ("macro_f1", "REAL"),
    ("params", "INTEGER"), ("trainable_params", "INTEGER"), ("train_seconds", "REAL"),
    ("images_per_sec", "REAL"), ("predicted_memory_bytes", "INTEGER"), ("checkpoint_bytes", "INTEGER"),
    ("group_id", "TEXT"), ("batch_size", "INTEGER"), ("lr", "REAL"), ("optimizer", "TEXT"),
    ("freeze", "TEXT"), ("has_last", "INTEGER"), ("has_eval", "INTEGER"), ("run_dir", "TEXT"),
    ("status_mtime", "REAL"), ("revision", "TEXT"),
]
COLUMN_NAMES = [c for c, _ in INDEX_COLUMNS]
SORT_COLUMNS = tuple(c for c in COLUMN_NAMES if c not in ("run_dir", "status_mtime"))
# Kept from the old row when the folder does not say it (before meta.json had it).
_INDEX_ONLY = ("owner", "group_id", "predicted_memory_bytes")


def _index_trouble(err: Exception) -> bool:
    """An error of the index file itself (disk full, I/O error, locked too long, damaged), which
    the history works around, as opposed to a mistake in the SQL (a bug, raised)."""
    return isinstance(err, sqlite3.OperationalError) or type(err) is sqlite3.DatabaseError


def check_run_id(run_id: str) -> None:
    """Refuse anything but a plain folder name (a path, '..', nothing)."""
    if not run_id or Path(run_id).name != run_id or run_id in (".", ".."):
        raise ConfigError(f"{run_id!r} is not a run id (a folder name such as "
                          "20250101-120000-resnet18-ab12cd).")


def read_row(run_dir: Path, live_ids: set[str], old: dict | None, events: RunEvents | None = None) -> dict | None:
    """One run folder as an index row (None when it is not a run); ``old``, its row in the
    index, gives what only the index knew (before meta.json had it); ``events``, a follower of
    its events.jsonl (only the new lines are read)."""
    if not rundir.is_run_dir(run_dir):
        return None
    try:
        record = load_run(run_dir, live_ids, events)
    except DataError:
        return None
    row = summarize_record(record)
    if old is not None:
        for key in _INDEX_ONLY:
            if row.get(key) is None and old.get(key) is not None:
                row[key] = old[key]
        if old.get("created") and old["created"] < row["created"]:
            row["created"] = old["created"]
    return row


def filter_runs(df: pd.DataFrame, filter_text: str | None = None, status: str | None = None,
                model: str | None = None, tag: str | None = None, sort: str = "created",
                descending: bool = True, group_id: str | None = None) -> pd.DataFrame:
    """Index rows filtered and sorted (see RunHistory.list)."""
    if sort not in SORT_COLUMNS:
        raise ConfigError(f"Cannot sort runs by {sort!r}; choose one of {', '.join(SORT_COLUMNS)}.")
    df = df.astype({"tags": "object", "name": "object", "owner": "object", "group_id": "object"})
    for column, value in (("status", status), ("model", model), ("group_id", group_id)):
        if value:
            df = df[df[column] == value]
    if tag:
        df = df[df["tags"].fillna("").map(lambda t: tag.strip() in normalize_tags(t))]
    if filter_text and filter_text.strip():
        hay = df[["run_id", "name", "model", "dataset", "revision", "tags", "owner", "message"]].fillna("") \
            .astype(str).agg(" ".join, axis=1).str.lower()
        keep = pd.Series(True, index=df.index)
        for word in filter_text.lower().split():
            keep &= hay.str.contains(word, regex=False)
        df = df[keep]
    df = df.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
    return df.reset_index(drop=True)


class IndexFile:
    """The SQLite file: its schema and one transaction per write. Thread-safe: every call opens
    its own short connection and writes are serialised by a lock. A file that cannot be used
    (disk full, I/O error, damaged) makes ``stale`` true and is said once in the log."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.RLock()
        self.stale = False     # a write failed: the rows lag behind the folders
        self._warned = False   # that is logged once, not at every listing

    def _connect(self) -> sqlite3.Connection:
        # SQLite's default rollback journal, not WAL: a WAL reader must write (its -shm file), so
        # on a full disk even listing the runs failed with "disk I/O error"; with a rollback
        # journal reading needs no space. Writes are few and short, so readers barely wait.
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA synchronous=NORMAL")   # the index can be rebuilt; no fsync per row
        return con

    def ok(self) -> bool:
        """Whether the file is an index of this schema version."""
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

    def create(self) -> bool:
        """An empty index of this schema version in place of the file (False: it cannot be written)."""
        with self.lock:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            cols = ", ".join(f"{c} {t}" for c, t in INDEX_COLUMNS)
            if not self.write(f"CREATE TABLE runs ({cols}); "
                              "CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT); "
                              f"INSERT INTO info VALUES ('schema_version', '{SCHEMA_VERSION}');", script=True):
                return False
            self.stale = False
            return True

    def writable(self) -> bool:
        """After failed writes: whether a write goes through again (space was freed)."""
        if not self.write("UPDATE info SET value=value WHERE key='schema_version'"):
            return False
        self.stale = False
        return True

    def recovered(self) -> None:
        """Say once in the log that the index works again, when it does."""
        if not self.stale and self._warned:
            self._warned = False
            log.info("The run history index %s works again.", self.path)

    def write(self, sql: str, params: Sequence = (), many: bool = False, script: bool = False) -> bool:
        """One write to the index (a transaction); False when the index cannot be written (disk
        full, I/O error, damaged file). Nothing is lost then: the folders are the truth, ``table``
        reads them directly meanwhile and brings the index up to date once it can be written."""
        try:
            with self.lock, closing(self._connect()) as con:
                if script:
                    con.executescript(f"BEGIN; {sql} COMMIT;")
                else:
                    (con.executemany if many else con.execute)(sql, params)
            return True
        except sqlite3.DatabaseError as err:
            if not _index_trouble(err):
                raise
            self._failed(err)
            return False

    def read(self, sql: str, params: Sequence = ()) -> list[dict] | None:
        """Rows of a query on the index; None when there is no index or it cannot be read."""
        if not self.path.is_file():   # connecting would create an empty file
            return None
        try:
            with closing(self._connect()) as con:
                return [dict(r) for r in con.execute(sql, params)]
        except sqlite3.DatabaseError as err:
            if not _index_trouble(err):
                raise
            self._failed(err)
            return None

    def _failed(self, err: Exception) -> None:
        self.stale = True
        if not self._warned:   # once: on a full disk every listing would say it again
            self._warned = True
            log.warning("The run history index %s cannot be used (%s): listing the run folders directly "
                        "until it can be written again.", self.path, err)


class RunIndex:
    """The index's rows, kept in line with the run folders (see the module's docstring).
    ``live_ids()`` names the runs this server trains now (the history's job queue)."""

    def __init__(self, runs_dir: str | Path, live_ids: Callable[[], set[str]] = set):
        self.runs_dir = Path(runs_dir)
        self.file = IndexFile(self.runs_dir / INDEX_FILE)
        self.path = self.file.path
        self.live_ids = live_ids
        self._folders: tuple[frozenset, float] | None = None   # (names, when) at the last full look
        self._unfinished: set[str] = set()    # folders without config.json then (being created)
        self._folderless: set[str] = set()    # rows of jobs whose folder did not exist yet
        self._followed: dict[str, RunEvents] = {}   # live runs: their events, read by new lines
        if not self.file.ok():
            self.rebuild()

    def rebuild(self) -> int:
        """Re-create the index from the run folders; returns the number of runs indexed (0 when it
        cannot be written now: the history then lists the folders, see ``table``)."""
        with self.file.lock:
            if not self.file.create():
                return 0
            live = self.live_ids()
            count = sum(self.refresh(d.name, d, live) is not None for d in rundir.list_run_dirs(self.runs_dir))
            self._folders = None   # the next listing looks at the folders again
            return count

    # ---- rows ------------------------------------------------------------------------------
    def upsert(self, row: dict) -> None:
        row = {k: row.get(k) for k in COLUMN_NAMES if k in row}
        cols = list(row)
        sql = (f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
               f"ON CONFLICT(run_id) DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in cols if c != "run_id"))
        self.file.write(sql, [row[c] for c in cols])

    def upsert_folderless(self, row: dict) -> None:
        """A row of a job whose folder does not exist (yet): looked at again at every listing,
        dropped once the job is over without one."""
        self._folderless.add(row["run_id"])
        self.upsert(row)

    def get(self, run_id: str) -> dict | None:
        rows = self.file.read("SELECT * FROM runs WHERE run_id=?", (run_id,))
        return rows[0] if rows else None

    def delete(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            self.unfollow(run_id)
            self._folderless.discard(run_id)
        if run_ids:
            self.file.write("DELETE FROM runs WHERE run_id=?", [(r,) for r in run_ids], many=True)

    def run_dir(self, run_id: str) -> Path:
        """The folder of ``run_id`` (validated: a plain name; where the index says, else inside
        runs_dir)."""
        check_run_id(run_id)
        row = self.get(run_id) if self.path.exists() else None
        if row and row.get("run_dir"):
            return Path(row["run_dir"])
        return self.runs_dir / run_id

    def refresh(self, run_id: str, run_dir: Path | None = None, live_ids: set[str] | None = None, *,
                follow: bool = False) -> dict | None:
        """Re-read one run folder into its row (None when the folder is not a run). Only a row
        that changed is written: listing an unchanged history writes nothing. ``follow``: keep
        reading its events.jsonl from where this read stops (a live run), until ``unfollow``."""
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir(run_id)
        events = self._followed.get(run_id)
        if events is None and follow:
            events = self._followed.setdefault(run_id, RunEvents(run_dir / rundir.EVENTS_FILE, steps=False))
        old = self.get(run_id)
        row = read_row(run_dir, self.live_ids() if live_ids is None else live_ids, old, events)
        if row is not None:
            self._folderless.discard(run_id)
            if old is None or any(row[k] != old.get(k) for k in row if k != "updated"):
                self.upsert(row)
        return row

    def unfollow(self, run_id: str) -> None:
        self._followed.pop(run_id, None)

    # ---- keeping in line with the folders ---------------------------------------------------
    def sync(self, rescan: bool = False, everything: bool = False) -> None:
        """Bring the index in line with the folders. A full look at them (new folders added,
        vanished ones removed, changed status files re-read) when ``rescan``, when the set of
        folders changed or at least every RESCAN_EVERY_S; else only the rows that change by
        themselves (see the module's docstring). ``everything``: re-read every folder (after
        writes to the index failed)."""
        with self.file.lock:
            found = self.file.read("SELECT run_id, status, status_mtime, run_dir FROM runs")
            if found is None:
                return
            rows = {r["run_id"]: r for r in found}
            live = self.live_ids()
            names = self._folder_names()
            if rescan or everything or self._folders_changed(names):
                self._look_at_folders(rows, live, names, everything)
            else:
                self._look_at_watched(rows, live)

    def _folder_names(self) -> frozenset:
        """What runs_dir holds, but the index's own files (its journal comes and goes with writes)."""
        try:
            return frozenset(n for n in os.listdir(self.runs_dir) if not n.startswith(INDEX_FILE))
        except OSError:
            return frozenset()

    def _folders_changed(self, names: frozenset) -> bool:
        if self._folders is None or self._folders[0] != names:
            return True
        if time.monotonic() - self._folders[1] > RESCAN_EVERY_S:
            return True
        return any(rundir.is_run_dir(self.runs_dir / name) for name in self._unfinished)

    def _look_at_folders(self, rows: dict, live: set[str], names: frozenset, everything: bool) -> None:
        on_disk = {p.name: p for p in rundir.list_run_dirs(self.runs_dir)}
        for run_id, run_dir in on_disk.items():
            row = rows.get(run_id)
            if (everything or row is None or row["run_dir"] != str(run_dir)
                    or row["status_mtime"] != mtime(run_dir / STATUS_FILE)
                    or (row["status"] in LIVE_STATUSES and run_id not in live)):
                self.refresh(run_id, run_dir, live)
        gone = [run_id for run_id, row in rows.items() if run_id not in on_disk and self._gone(run_id, row, live)]
        self.delete(gone)
        self._unfinished = {n for n in names - on_disk.keys() if (self.runs_dir / n).is_dir()}
        self._folders = (names, time.monotonic())

    def _look_at_watched(self, rows: dict, live: set[str]) -> None:
        """Between full looks: re-read the runs that say they are live but are not this server's
        (another process trains them, or their process died) and the rows without a folder."""
        gone = []
        for run_id, row in rows.items():
            if run_id in live or not (row["status"] in LIVE_STATUSES or run_id in self._folderless):
                continue
            run_dir = Path(row["run_dir"]) if row["run_dir"] else self.runs_dir / run_id
            if rundir.is_run_dir(run_dir):
                new = self.refresh(run_id, run_dir, live, follow=True)
                if new is not None and new["status"] not in LIVE_STATUSES:
                    self.unfollow(run_id)
            elif self._gone(run_id, row, live):
                gone.append(run_id)
        self.delete(gone)

    @staticmethod
    def _gone(run_id: str, row: dict, live: set[str]) -> bool:
        """A row whose folder is not in runs_dir is gone, unless the run is kept elsewhere
        (resumed from another folder) or its job is queued or just starting."""
        if row["run_dir"] and rundir.is_run_dir(row["run_dir"]):
            return False
        return run_id not in live

    def recover(self) -> None:
        """After a failed write: once the index can be written again (space was freed), bring
        every row up to date — or rebuild it when it is missing or damaged."""
        if not self.file.ok():
            self.rebuild()
        elif self.file.writable():
            self.sync(everything=True)
        self.file.recovered()

    def table(self, rescan: bool = False) -> pd.DataFrame:
        """Every row: from the index, or from the run folders while it cannot be kept current."""
        if self.file.stale:
            self.recover()
        if not self.file.stale:
            self.sync(rescan=rescan)
        rows = None if self.file.stale else self.file.read("SELECT * FROM runs")
        if rows is None:
            return self.scan()
        return pd.DataFrame.from_records(rows, columns=COLUMN_NAMES, coerce_float=True)

    def scan(self) -> pd.DataFrame:
        """The rows read from the run folders alone, writing nothing (a full disk); from the index,
        when it can be read, only what the folders lack: runs queued (no folder yet) or kept
        elsewhere, and owners from before meta.json had them."""
        live = self.live_ids()
        known = {r["run_id"]: r for r in self.file.read("SELECT * FROM runs") or []}
        rows = []
        for run_dir in rundir.list_run_dirs(self.runs_dir):
            row = read_row(run_dir, live, known.pop(run_dir.name, None))
            if row is not None:
                rows.append(row)
        for run_id, old in known.items():
            row = read_row(Path(old["run_dir"]), live, old) if old.get("run_dir") else None
            if row is not None or run_id in live:
                rows.append(row or old)
        return pd.DataFrame.from_records(rows, columns=COLUMN_NAMES, coerce_float=True)
