"""Background training jobs: a Job owns its thread, a stop Event and an append-only event log;
the JobManager runs at most ``max_jobs`` at once and queues the rest (first come, first served).

The dashboard never trains inside a request handler: in Gradio 6.31 a generator handler dies
when its tab is closed or reloaded, and ``cancels=`` does not stop a running plain function
(shared/gradio-notes.md). Instead a handler submits a job here and a ``gr.Timer`` polls
``Job.snapshot()``; a reloaded page finds its jobs again by owner or run id.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import datasets, events as ev
from core.config import RunConfig
from core.errors import ConfigError


@dataclass
class Job:
    """One training run managed in the background."""
    job_id: str                      # equals the run id (the run folder's name)
    config: RunConfig
    owner: str                       # who started it (a username or a browser session id)
    resume_from: str | None = None
    status: str = ev.QUEUED
    message: str = "waiting for a free training slot"
    events: list[ev.Event] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    result: Any = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_stop(self) -> None:
        """Ask the run to stop; it takes effect before the next batch and leaves a checkpoint."""
        self._stop.set()
        with self._lock:
            if self.status == ev.RUNNING:
                self.status, self.message = ev.STOPPING, "stopping after the current batch"

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def done(self) -> bool:
        return self.status in ev.FINAL_STATUSES

    def _record(self, event: ev.Event) -> None:
        with self._lock:
            self.events.append(event)
            if isinstance(event, ev.RunFinished):
                self.status, self.message = event.status, event.message
            elif isinstance(event, ev.StatusChanged) and self.status != ev.STOPPING:
                self.status, self.message = event.status, event.message

    def events_since(self, index: int) -> tuple[list[ev.Event], int]:
        """Events from ``index`` on, and the index to ask from next time (cheap incremental polling)."""
        with self._lock:
            new = self.events[index:]
            return new, index + len(new)

    def snapshot(self) -> dict[str, Any]:
        """A consistent summary for the UI: status, message, progress, last epoch, started info."""
        with self._lock:
            started = next((e for e in self.events if isinstance(e, ev.RunStarted)), None)
            last_batch = next((e for e in reversed(self.events) if isinstance(e, ev.BatchEnded)), None)
            epochs = [e for e in self.events if isinstance(e, ev.EpochEnded)]
            return {"job_id": self.job_id, "owner": self.owner, "status": self.status,
                    "message": self.message, "started": started, "last_batch": last_batch,
                    "epochs": epochs, "n_events": len(self.events), "model": self.config.model.name}


class JobManager:
    """Runs jobs in background threads, ``max_jobs`` at a time; the others wait in a queue."""

    def __init__(self, runs_dir: str | Path = "runs", data_dir: str | Path = datasets.DEFAULT_DATA_DIR,
                 max_jobs: int = 1, fit: Callable | None = None):
        if max_jobs < 1:
            raise ConfigError(f"max_jobs must be at least 1, got {max_jobs}.")
        self.runs_dir = Path(runs_dir)
        self.data_dir = Path(data_dir)
        self.max_jobs = max_jobs
        self._fit = fit  # injectable for tests; default core.trainer.fit
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Job, ev.Event], None]] = []

    # ---- submitting and stopping --------------------------------------------------------
    def submit(self, config: RunConfig, owner: str = "local", resume_from: str | Path | None = None,
               job_id: str | None = None) -> Job:
        """Queue a run; it starts as soon as a slot is free. Returns the Job at once."""
        from core.trainer import new_run_id
        config.validate()
        if config.model.pretrained and not config.model.weights_path:
            # offline without the ImageNet file: say so now, naming the file, not from a failed run
            from core import models
            models.check_pretrained(config.model.name)
        if config.tensorboard:   # fail now, with the install command, rather than in the queue
            from core import tb
            tb.require()
        if resume_from is not None:
            job_id = Path(resume_from).parent.name
            if job_id in self._jobs and not self._jobs[job_id].done:
                raise ConfigError(f"Run {job_id} is already running or queued.")
        job = Job(job_id=job_id or new_run_id(config), config=config, owner=owner,
                  resume_from=str(resume_from) if resume_from else None)
        with self._lock:
            self._jobs[job.job_id] = job
            self._queue.append(job.job_id)
        job._record(ev.StatusChanged(status=ev.QUEUED, message="waiting for a free training slot"))
        self._start_next()
        return job

    def stop(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job_id in self._queue:  # never started: just take it out of the queue
                self._queue.remove(job_id)
                job._record(ev.RunFinished(status=ev.STOPPED, message="removed from the queue before it started",
                                           best_epoch=None, best_metric=None, seconds=0.0))
                job.ended = time.time()
                return job
        job.request_stop()
        return job

    def add_listener(self, fn: Callable[[Job, ev.Event], None]) -> None:
        """Call ``fn(job, event)`` for every event of every job (e.g. the run-history index)."""
        self._listeners.append(fn)

    # ---- queries --------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise ConfigError(f"No training job {job_id!r} on this server (it may have ended before a restart).") from None

    def find(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self, owner: str | None = None) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j for j in jobs if owner is None or j.owner == owner]

    def latest_for(self, owner: str) -> Job | None:
        jobs = self.jobs(owner)
        return max(jobs, key=lambda j: j.created) if jobs else None

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to start; None when the job is not waiting."""
        with self._lock:
            return self._queue.index(job_id) + 1 if job_id in self._queue else None

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has ended (for tests and the command line)."""
        job = self.get(job_id)
        deadline = None if timeout is None else time.time() + timeout
        while not job.done:
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(0.05)
        if job._thread is not None:
            job._thread.join(timeout=5)
        return job

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every job (each leaves a checkpoint) and wait for the threads."""
        with self._lock:
            queued = list(self._queue)
        for job_id in queued:
            self.stop(job_id)
        for job in self.jobs():
            job.request_stop()
        for job in self.jobs():
            if job._thread is not None:
                job._thread.join(timeout=timeout)

    # ---- internals --------------------------------------------------------------------------
    def _start_next(self) -> None:
        with self._lock:
            while self._queue and len(self._running) < self.max_jobs:
                job = self._jobs[self._queue.pop(0)]
                self._running.add(job.job_id)
                job.started = time.time()
                job._thread = threading.Thread(target=self._run, args=(job,), daemon=True,
                                               name=f"train-{job.job_id}")
                job._thread.start()

    def _run(self, job: Job) -> None:
        from core.trainer import fit
        fit_fn = self._fit or fit

        def on_event(event: ev.Event) -> None:
            job._record(event)
            for fn in self._listeners:
                try:
                    fn(job, event)
                except Exception:  # a listener (e.g. the history index) must never kill training
                    pass

        try:
            job.result = fit_fn(job.config, on_event=on_event, should_stop=lambda: job.stop_requested,
                                runs_dir=self.runs_dir, data_dir=self.data_dir, run_id=job.job_id,
                                resume_from=job.resume_from)
        except Exception as err:  # fit reports its own failures; this is the last line of defence
            on_event(ev.RunFinished(status=ev.FAILED, message=f"internal error: {err}", best_epoch=None,
                                    best_metric=None, seconds=0.0))
        finally:
            job.ended = time.time()
            if not job.done:
                job._record(ev.RunFinished(status=ev.FAILED, message="the run ended without a final status",
                                           best_epoch=None, best_metric=None, seconds=0.0))
            with self._lock:
                self._running.discard(job.job_id)
            self._start_next()
