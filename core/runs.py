"""The run history: ``RunHistory(runs_dir)``, what the dashboard asks about the runs of a runs folder.

A thin façade over small units, one job each:

* ``core.runindex.RunIndex`` — the SQLite index (``index.sqlite``) and keeping it in line with the
  folders (rebuilt from them when missing or of another version);
* ``RunMeta`` — ``meta.json`` (name, tags, owner, group, cached memory estimate), and what waits
  for the folder of a queued run;
* ``JobListener`` — a JobManager listener: records who started a run and keeps its row current,
  following its events.jsonl by its new lines only;
* ``RunEdits`` — rename, tags, the memory cache, delete;
* ``core.resume.plan_resume`` — what resuming means.

Reading a run folder back (``load_run`` → ``RunRecord``) is core.runrecord's; the folder's layout
and files are core.rundir's. Both are re-exported here for the dashboard's callers.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from core import events as ev, identity, resume, rundir, stats, storage
from core.config import RunConfig
from core.errors import ConfigError
from core.rundir import (CARD_FILE, CONFIG_FILE, EVENTS_FILE, INDEX_FILE, META_FILE,  # noqa: F401 (re-exported)
                         UNREADABLE_STATUS, read_meta, read_status)
from core.runindex import LIVE_STATUSES, RunIndex, filter_runs
from core.runrecord import (MAX_NAME_CHARS, MAX_TAGS, RunRecord, as_number, as_text,  # noqa: F401 (re-exported)
                            load_run, memory_key, misclassified_images, normalize_tags, run_label, summarize_record)

log = logging.getLogger(__name__)


def _no_run(run_id: str) -> str:
    return f"No run {run_id!r} in the run history: pick a run from the list (it may have been deleted)."


class RunMeta:
    """The runs' ``meta.json``: what the history adds to a run folder. For a queued run (no folder
    yet) the changes wait in memory and are written when its folder appears (``settle``)."""

    def __init__(self, index: RunIndex):
        self.index = index
        self._lock = threading.RLock()
        self._pending: dict[str, dict] = {}   # run id → meta to write when its folder appears

    def update(self, run_id: str, **changes) -> dict:
        """Change a run's meta.json (StorageError when it cannot be written; the old one stays)."""
        run_dir = self.index.run_dir(run_id)
        with self._lock:
            meta = rundir.read_meta(run_dir)
            meta.update(changes)
            if run_dir.is_dir():
                try:
                    rundir.write_meta(run_dir, meta)
                except OSError as err:   # the old meta.json stays whole (atomic write)
                    raise storage.storage_error(err, self.index.runs_dir,
                                                f"saving the name and tags of run {run_id} ({META_FILE})") from err
            else:  # queued: the folder does not exist yet; written when the run starts
                self._pending.setdefault(run_id, {}).update(changes)
        return meta

    def queue(self, run_id: str, **meta) -> None:
        with self._lock:
            self._pending.setdefault(run_id, {}).update(meta)

    def pending(self, run_id: str) -> dict | None:
        return self._pending.get(run_id)

    def forget(self, run_id: str) -> None:
        self._pending.pop(run_id, None)

    def settle(self, run_id: str, run_dir: Path, owner: str) -> None:
        """The run's folder exists: write what waited for it, and who started the run."""
        with self._lock:
            meta = rundir.read_meta(run_dir)
            meta.update(self._pending.pop(run_id, {}))
            meta.setdefault("owner", owner)
            try:
                rundir.write_meta(run_dir, meta)
            except OSError as err:   # disk full: the run's own files say how it went; index it anyway
                log.warning("%s of run %s not written: %s", META_FILE, run_id, err)



class JobListener:
    """A JobManager listener (RunStarted, EpochEnded, Evaluated, RunFinished): records who started
    each run (meta.json, and the owner in card.json) and keeps its index row current. It runs on
    the job's thread in the server, so it reads only what is new: the run's events.jsonl is
    followed by its new lines from RunStarted to RunFinished."""
    EVENTS = (ev.RunStarted, ev.EpochEnded, ev.Evaluated, ev.RunFinished)

    def __init__(self, index: RunIndex, meta: RunMeta, live_ids):
        self.index, self.meta, self.live_ids = index, meta, live_ids

    def __call__(self, job, event) -> None:
        if not isinstance(event, self.EVENTS):
            return
        run_id, finished = job.job_id, isinstance(event, ev.RunFinished)
        run_dir = Path(event.run_dir) if isinstance(event, ev.RunStarted) else self.index.run_dir(run_id)
        if isinstance(event, (ev.RunStarted, ev.RunFinished)) and run_dir.is_dir():
            self.meta.settle(run_id, run_dir, job.owner)
            if isinstance(event, ev.RunStarted):
                # The trainer writes the card itself (every run folder has one, however it was
                # started) and counts the sessions and durations; only the owner is known here.
                try:
                    rundir.write_card(run_dir, job.config, owner=job.owner)
                except OSError:
                    pass
        live = self.live_ids()
        (live.discard if finished else live.add)(run_id)
        row = self.index.refresh(run_id, run_dir, live, follow=not finished)
        if finished:
            self.index.unfollow(run_id)
        if row is None:
            # No run folder (the run failed before it was created): keep what the job says.
            status = event.status if finished else job.status
            self.index.upsert_folderless({"run_id": run_id, "status": status, "owner": job.owner,
                                          "message": getattr(event, "message", job.message), "updated": time.time()})


class RunEdits:
    """What a user changes: a run's name and tags, the cached memory estimate, deleting it.
    Who may is the history's question (RunHistory.check_access), asked before these."""

    def __init__(self, index: RunIndex, meta: RunMeta, job_of):
        self.index, self.meta, self.job_of = index, meta, job_of

    def require_run(self, run_id: str) -> Path:
        run_dir = self.index.run_dir(run_id)
        if not rundir.is_run_dir(run_dir) and self.meta.pending(run_id) is None:
            raise ConfigError(_no_run(run_id))
        return run_dir

    def rename(self, run_id: str, name: str | None) -> dict:
        self.require_run(run_id)
        name = " ".join(str(name or "").split()) or None
        if name and len(name) > MAX_NAME_CHARS:
            raise ConfigError(f"A run name can have at most {MAX_NAME_CHARS} characters; this one has {len(name)}.")
        self.meta.update(run_id, name=name)
        return self.index.refresh(run_id) or self._touch(run_id, name=name)

    def set_tags(self, run_id: str, tags: str | Sequence[str] | None) -> dict:
        self.require_run(run_id)
        tags = normalize_tags(tags)
        self.meta.update(run_id, tags=tags)
        return self.index.refresh(run_id) or self._touch(run_id, tags=", ".join(tags))

    def set_predicted_memory(self, run_id: str, n_bytes: int | None, key: str | None) -> None:
        if n_bytes is None or key is None:
            return
        try:
            self.meta.update(run_id, predicted_memory={"bytes": int(n_bytes), "key": key})
        except OSError:   # a cache: on a full disk it is computed again next time
            return
        self._touch(run_id, predicted_memory_bytes=int(n_bytes))

    def _touch(self, run_id: str, **values) -> dict:
        if self.index.get(run_id) is not None:
            self.index.upsert({"run_id": run_id, **values, "updated": time.time()})
        return self.index.get(run_id) or {}

    def delete(self, run_id: str, confirm: str | None, live_ids: set[str]) -> str:
        run_dir = self.index.run_dir(run_id)
        if (confirm or "").strip() != run_id:
            raise ConfigError(f"To delete run {run_id}, type its id exactly ({run_id}) to confirm. "
                              "Nothing was deleted.")
        job = self.job_of(run_id)
        if job is not None and not job.done:
            raise ConfigError(f"Run {run_id} is {job.status}: stop it first (Train tab or Stop), then delete it.")
        if run_dir.exists():
            self._delete_folder(run_id, run_dir, live_ids)
        # On a full disk this may fail; the folder is gone, so the next listing drops the row.
        self.index.delete([run_id])
        self.meta.forget(run_id)
        return f"Deleted run {run_id}."

    def _delete_folder(self, run_id: str, run_dir: Path, live_ids: set[str]) -> None:
        if not rundir.is_run_dir(run_dir) and not (run_dir / META_FILE).is_file():
            raise ConfigError(f"The folder of run {run_id} is not a Classifier Lab run folder; it was left alone.")
        if run_dir.resolve().parent != self.index.runs_dir.resolve():
            raise ConfigError(f"Run {run_id} is kept outside the runs folder; the server's owner can delete "
                              "it by hand.")
        status, _ = rundir.read_status(run_dir, live_ids)
        if status in (ev.RUNNING, ev.STOPPING):
            raise ConfigError(f"Run {run_id} is still training in another process (its status file says "
                              f"{status}); stop it first.")
        try:
            shutil.rmtree(run_dir)   # needs no free space: deleting is how a full disk is cleared
        except OSError as err:
            raise storage.storage_error(err, self.index.runs_dir, f"deleting run {run_id}") from err


class RunHistory:
    """The runs under ``runs_dir``: listed from the index (``index.sqlite``), kept in step with a
    JobManager (``attach``), edited, resumed. Thread-safe. The index is rebuilt from the folders
    when it is missing, unreadable or of another schema version; ``list`` also picks up folders
    written by someone else (the command line, another server) and notices runs whose process
    died (status 'interrupted'), without looking into every folder at every call (see
    core.runindex; ``rescan`` looks now)."""

    def __init__(self, runs_dir: str | Path = "runs"):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.manager = None
        self.index = RunIndex(self.runs_dir, self._live_ids)
        self.meta = RunMeta(self.index)
        self.edits = RunEdits(self.index, self.meta, self._job)
        self.listener = JobListener(self.index, self.meta, self._live_ids)
        self._attached: set[int] = set()

    @property
    def path(self) -> Path:
        return self.index.path

    def _live_ids(self) -> set[str]:
        if self.manager is None:
            return set()
        return {j.job_id for j in self.manager.jobs() if not j.done}

    def _job(self, run_id: str):
        return self.manager.find(run_id) if self.manager is not None else None

    # ---- keeping up ------------------------------------------------------------------------
    def attach(self, manager) -> "RunHistory":
        """Keep the index up to date with ``manager``'s jobs (see JobListener)."""
        self.manager = manager
        if id(manager) not in self._attached:
            self._attached.add(id(manager))
            manager.add_listener(self.listener)
        return self

    def register_queued(self, run_id: str, config: RunConfig, owner: str | None = None,
                        group_id: str | None = None) -> None:
        """Index a job that is queued but has no folder yet (comparison groups use this)."""
        self.meta.queue(run_id, **{k: v for k, v in (("owner", owner), ("group_id", group_id)) if v is not None})
        self.index.upsert_folderless({
            "run_id": run_id, "name": config.name, "tags": "", "owner": owner, "model": config.model.name,
            "dataset": rundir.dataset_label(config.data), "status": ev.QUEUED,
            "message": "waiting for a free training slot", "created": time.time(), "updated": time.time(),
            "epochs_done": 0, "epochs": config.epochs, "group_id": group_id, "batch_size": config.data.batch_size,
            "lr": config.optim.lr, "optimizer": config.optim.optimizer, "freeze": config.model.freeze,
            "has_last": 0, "has_eval": 0, "run_dir": str(self.runs_dir / run_id),
            "revision": config.data.revision})

    def rebuild(self) -> int:
        """Re-create the index from the run folders; returns the number of runs indexed."""
        return self.index.rebuild()

    def sync(self, everything: bool = False) -> None:
        """Bring the index in line with the folders now (``everything``: re-read every folder)."""
        self.index.sync(rescan=True, everything=everything)

    def rescan(self) -> None:
        """Look at every folder now, for runs changed in place by someone else."""
        self.index.sync(rescan=True)

    def run_dir(self, run_id: str) -> Path:
        """The folder of ``run_id`` (validated: a plain name inside runs_dir)."""
        return self.index.run_dir(run_id)

    # ---- reading ---------------------------------------------------------------------------
    def list(self, filter_text: str | None = None, status: str | None = None, model: str | None = None,
             tag: str | None = None, sort: str = "created", descending: bool = True,
             group_id: str | None = None, rescan: bool = False) -> pd.DataFrame:
        """The runs as a DataFrame (one row per run, core.runindex.INDEX_COLUMNS), filtered and
        sorted. filter_text: case-insensitive words that must all appear in the run id, name,
        model, dataset, revision, tags, owner or message. status/model/tag/group_id: exact matches.
        rescan: look at every folder first (else see core.runindex)."""
        return filter_runs(self.index.table(rescan=rescan), filter_text, status, model, tag, sort, descending,
                           group_id)

    def get(self, run_id: str, refresh: bool = True) -> dict:
        """One run's row; ``refresh`` re-reads its folder first (else the index as it is, which
        the listener keeps current for live runs). ConfigError when unknown."""
        self.run_dir(run_id)  # validates the id
        row = self.index.refresh(run_id) if refresh else None
        if row is None:
            row = self.index.get(run_id)
        if row is None:
            raise ConfigError(_no_run(run_id))
        return row

    def label(self, run_id: str) -> str:
        row = self.index.get(run_id)
        return run_label(row) if row else run_id

    def choices(self, need: str | None = None, who: identity.Who | None = None, private: bool = False,
                **filters) -> list[tuple[str, str]]:
        """(label, run id) pairs for a dropdown, newest first: the run's name as the label (never a
        folder), the id as the value. need: None, 'eval' or 'checkpoint'. With ``who``, only the
        runs ``who`` may view (``private``: their own, or all for the teacher), theirs marked "· yours"."""
        df = self.list(**filters)
        if need == "eval":
            df = df[df["has_eval"] == 1]
        elif need == "checkpoint":
            df = df[(df["has_last"] == 1) | df["checkpoint_bytes"].notna()]
        out = []
        for row in df.to_dict("records"):
            if who is not None and not identity.can_view(as_text(row.get("owner")), who, private):
                continue
            label = run_label(row)
            if as_number(row.get("test_accuracy")) is not None:
                iv = stats.accuracy_interval(row["test_accuracy"], row.get("test_images"))
                label += f" · test {row['test_accuracy']:.1%}" + (f" ±{100 * iv.half_width:.1f}" if iv else "")
            elif row.get("status") != ev.FINISHED:
                label += f" · {row.get('status')}"
            if who is not None and as_text(row.get("owner")) == who.owner:
                label += " · yours"   # in a class, thirty runs of the same model read alike
            out.append((label, row["run_id"]))
        seen = pd.Series([label for label, _ in out]).value_counts() if out else pd.Series(dtype=int)
        # Two runs that read the same (same model and minute) get the end of their ids to tell them apart.
        return [(f"{label} [{run_id[-6:]}]" if seen.get(label, 0) > 1 else label, run_id) for label, run_id in out]

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

    # ---- who may do what -------------------------------------------------------------------
    def owner(self, run_id: str) -> tuple[bool, str | None]:
        """(known, owner) of a run: whether the id is a run of this history (indexed, in the runs
        folder, or a job of the attached queue) and who started it (None: the command line)."""
        self.run_dir(run_id)  # a path or anything but a plain id is refused here
        row = self.index.get(run_id) or self.index.refresh(run_id)
        job, pending = self._job(run_id), self.meta.pending(run_id)
        if row is None and job is None and pending is None:
            return False, None
        owner = as_text(row.get("owner")) if row else None
        if owner is None and pending is not None:
            owner = pending.get("owner")
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

    # ---- changing --------------------------------------------------------------------------
    def rename(self, run_id: str, name: str | None, who: identity.Who | None = None) -> dict:
        """Give a run a display name (kept in its meta.json); empty clears it. With ``who``, only
        when they may change the run (``None``: a trusted caller, e.g. the command line)."""
        if who is not None:
            self.check_access(run_id, who, "rename")
        return self.edits.rename(run_id, name)

    def set_tags(self, run_id: str, tags: str | Sequence[str] | None, who: identity.Who | None = None) -> dict:
        """Replace a run's tags ('a, b' or a list; kept in meta.json); ``who`` as for ``rename``."""
        if who is not None:
            self.check_access(run_id, who, "tag")
        return self.edits.set_tags(run_id, tags)

    def set_predicted_memory(self, run_id: str, n_bytes: int | None, key: str | None) -> None:
        """Cache a training-memory estimate (index + meta.json, valid while ``key`` matches)."""
        self.edits.set_predicted_memory(run_id, n_bytes, key)

    def delete(self, run_id: str, confirm: str | None, who: identity.Who | None = None) -> str:
        """Delete a run's folder (checkpoints included) and its row — only when ``confirm`` is
        exactly the run id, and never while the run is training or queued; ``who`` as for ``rename``."""
        if who is not None:
            self.check_access(run_id, who, "delete")
        return self.edits.delete(run_id, confirm, self._live_ids())

    def resume(self, run_id: str, owner: str | None = None, epochs: int | None = None,
               who: identity.Who | None = None):
        """Continue a run through the attached JobManager as core.resume.plan_resume decides (from
        its last.pth, in its folder); returns the Job. ``who`` as for ``rename``; the job keeps the
        run's owner (``owner`` overrides it; a command-line run becomes the resumer's)."""
        if who is not None:
            self.check_access(run_id, who, "resume")
        if self.manager is None:
            raise ConfigError("Resuming needs the training queue: this history is not attached to a JobManager.")
        run_dir = self.edits.require_run(run_id)
        row = self.get(run_id)
        plan = resume.plan_resume(run_dir, status=row["status"], epochs=epochs, who=who,
                                  run_owner=as_text(row.get("owner")), owner=owner)
        return self.manager.submit(plan.config, owner=plan.owner, resume_from=plan.checkpoint)
