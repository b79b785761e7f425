"""Background training jobs: each Job trains in a child process of its own, with a stop request
and an append-only event log; the JobManager runs at most ``max_jobs`` at once and queues the rest
(first come, first served), after checking that the run's memory fits.

The dashboard never trains inside a request handler: in Gradio 6.31 a generator handler dies
when its tab is closed or reloaded, and ``cancels=`` does not stop a running plain function.
Instead a handler submits a job here and a ``gr.Timer`` polls
``Job.snapshot()``; a reloaded page finds its jobs again by owner or run id.

Why a process per run: a segfault in native code, an out-of-memory kill or a runaway allocation
ends that run and never the server or the other runs. The child runs ``fit`` and sends every
event over a pipe; a thread in the server per job receives them, records them on the Job and calls
the listeners. A child that dies without a final event is recorded as failed with the reason in
words (``describe_exit``), in the job and in the run folder. The child sets its
``oom_score_adj`` to 1000, so the kernel's out-of-memory killer takes a training run, not the server.

Start method: forkserver, with ``core.trainer`` (and so torch) imported once in the fork server,
so a job starts without importing torch again (a spawned interpreter would, at every start);
and unlike fork it is safe from a threaded server (no locks copied mid-use).

Stop requests travel on a second pipe rather than a ``multiprocessing.Event``: a child killed
while it checks an Event can leave the Event's lock held, and the server's next ``set()`` would
then hang; a pipe also tells the child when the server has gone (end of file), so an orphaned run
stops at its next batch and leaves a checkpoint instead of training on unseen.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any, Callable

from core import datasets, events as ev, resources, torchrun
from core.config import RunConfig
from core.errors import ConfigError, LabError

log = logging.getLogger("classifier_lab.jobs")

START_METHOD = "forkserver"
PRELOAD = ["core.trainer"]       # imported once in the fork server; every child starts with it
STOP_MESSAGE = "stop"
KILL_GRACE_S = 5.0               # after SIGTERM at shutdown, before SIGKILL
OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj")
# What a crash signal means, for the message (the numbers differ between platforms: by name).
_CRASHES = {"SIGSEGV": "segmentation fault", "SIGBUS": "bus error", "SIGABRT": "aborted",
            "SIGILL": "illegal instruction", "SIGFPE": "arithmetic fault"}


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
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _control: Any = field(default=None, repr=False)    # the server's end of the stop pipe
    _process: Any = field(default=None, repr=False)    # the multiprocessing.Process training it
    _watcher: threading.Thread | None = field(default=None, repr=False)
    _terminated: bool = field(default=False, repr=False)   # ended by the server's shutdown
    _changes: int = field(default=0, repr=False)   # counts every change a page would show (see ``changes``)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_stop(self) -> None:
        """Ask the run to stop; it takes effect before the next batch and leaves a checkpoint."""
        self._stop.set()
        with self._lock:
            if self.status == ev.RUNNING:
                self.status, self.message = ev.STOPPING, "stopping after the current batch"
                self._changes += 1
            self._send_stop()

    def _send_stop(self) -> None:
        """Tell the child (the caller holds ``_lock``, so two requests never interleave)."""
        if self._control is None:
            return
        try:
            self._control.send(STOP_MESSAGE)
        except OSError as err:   # the process has just ended; its watcher records how
            log.debug("stop request for %s not delivered: %s", self.job_id, err)

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def pid(self) -> int | None:
        """The process id of the child training this job (None before it starts)."""
        return self._process.pid if self._process is not None else None

    @property
    def changes(self) -> int:
        """How many times the job has changed (an event, or a stop request): a polling page that
        has shown change N reads this one number and skips everything else while it is still N."""
        return self._changes

    @property
    def done(self) -> bool:
        return self.status in ev.FINAL_STATUSES

    def _record(self, event: ev.Event) -> None:
        with self._lock:
            self.events.append(event)
            self._changes += 1
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
                    "epochs": epochs, "n_events": len(self.events), "changes": self._changes,
                    "model": self.config.model.name}


def describe_exit(exitcode: int | None, memory_hint: str = "") -> str:
    """Why a training process ended without reporting a result, and what to do, in words.

    ``exitcode`` is ``multiprocessing.Process.exitcode`` (negative: the signal that ended it);
    ``memory_hint`` follows a SIGKILL (e.g. "Try a smaller batch: batch 64 fits in what is free now.").
    """
    if exitcode is None:
        return "The training process disappeared without an exit status. Start the run again."
    if exitcode == 0:
        return "The training process ended without a final status. Start the run again."
    if exitcode > 0:
        return (f"The training process exited with code {exitcode} before reporting a result; the "
                "server's console shows its error output. Start the run again, and if it happens again, "
                "report it with that output.")
    number = -exitcode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if name == "SIGKILL":
        text = (f"The training process was killed (signal {number}, SIGKILL), most likely because the "
                "system ran out of memory.")
        return f"{text} {memory_hint}" if memory_hint else f"{text} Lower the batch size."
    if name in _CRASHES:
        extra = " (often a full disk or too little shared memory in /dev/shm)" if name == "SIGBUS" else ""
        return (f"The training process crashed ({_CRASHES[name]}, signal {number}, {name}){extra}. This is "
                "a fault in native code (PyTorch, an image decoder or a driver), not in your settings: try "
                "once more; if it happens again, try another model, device or data format, and keep the "
                "run folder for a bug report.")
    if name == "SIGTERM":
        return (f"The training process was terminated (signal {number}, SIGTERM) by another program or a "
                "system shutdown. Resume the run from its last checkpoint.")
    return (f"The training process was ended by signal {number} ({name}). Resume the run from its last "
            "checkpoint, or start it again.")


# ---------------------------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------------------------
def _prepare_child(threads: int, environ: dict[str, str]) -> None:
    """Settings of a fresh training process, before anything trains."""
    # Ctrl-C in the server's terminal reaches the whole process group; the server's shutdown then
    # stops each run cleanly (with a checkpoint), which a KeyboardInterrupt here would not.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The fork server kept the environment of its own start: take the server's as it is now, as a
    # spawned process would.
    os.environ.clear()
    os.environ.update(environ)
    # torch.compile (config.compile) compiles in a pool of its own: no more workers than the run's threads
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    import torch
    torch.set_num_threads(threads)   # as many as the server's torch uses (what a run in a thread had)
    try:
        OOM_SCORE_ADJ.write_text("1000")   # no privilege needed to raise one's own score
    except OSError as err:
        log.debug("oom_score_adj not set (%s); the kernel chooses as usual", err)


def _child_main(fit_fn: Callable, config: RunConfig, fit_kwargs: dict, events, control, threads: int,
                environ: dict[str, str]) -> None:
    """Runs in the training process: ``fit_fn`` with every event sent to the server."""
    _prepare_child(threads, environ)
    stopped = False

    def should_stop() -> bool:
        nonlocal stopped
        if not stopped and control.poll():   # a stop request, or end of file: the server has gone
            stopped = True
        return stopped

    def on_event(event: ev.Event) -> None:
        nonlocal stopped
        try:
            events.send(event)
        except OSError as err:   # the server has gone: nobody to report to, so stop (with a checkpoint)
            if not stopped:
                log.warning("the server no longer reads this run's events (%s); stopping after this batch", err)
            stopped = True

    try:
        fit_fn(config, on_event=on_event, should_stop=should_stop, **fit_kwargs)
    except BaseException as err:   # fit reports its own failures; this is the last line of defence
        log.exception("the training function raised")
        on_event(ev.RunFinished(status=ev.FAILED, message=f"internal error: {type(err).__name__}: {err}",
                                best_epoch=None, best_metric=None, seconds=0.0))
    finally:
        events.close()
        control.close()


# ---------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------
class JobManager:
    """Runs jobs in child processes, ``max_jobs`` at a time; the others wait in a queue.

    max_job_memory: bytes one run may use at most (``launch.py --max-job-memory``); a run is also
    refused when it needs more than is free. fit: the training function (default
    ``core.trainer.fit``); it runs in the child, so it must be a module-level function.
    """

    def __init__(self, runs_dir: str | Path = "runs", data_dir: str | Path = datasets.DEFAULT_DATA_DIR,
                 max_jobs: int = 1, fit: Callable | None = None, max_job_memory: int | None = None,
                 train_threads: int | None = None, cpu_processes: int | None = None,
                 multi_gpu_jobs: bool = True):
        if max_jobs < 1:
            raise ConfigError(f"max_jobs must be at least 1, got {max_jobs}.")
        if max_job_memory is not None and max_job_memory <= 0:
            raise ConfigError(f"max_job_memory must be a number of bytes above 0, got {max_job_memory}.")
        if fit is not None:
            _check_picklable(fit)
        self.runs_dir = Path(runs_dir)
        self.data_dir = Path(data_dir)
        self.max_jobs = max_jobs
        self.max_job_memory = max_job_memory
        if train_threads is not None and train_threads < 1:
            raise ConfigError(f"train_threads must be at least 1, got {train_threads}.")
        self.train_threads = train_threads   # each child's torch threads; None: as many as the server's
        self._fit = fit  # injectable for tests; default core.trainer.fit
        # "use all GPUs" (config.multi_gpu) runs torchrun with one process per GPU; on a machine without
        # several GPUs, cpu_processes Gloo processes instead (None: such a run trains in one process)
        self.cpu_processes = cpu_processes
        # off on a server for a class: one user's "use all GPUs" would take every GPU from the others
        self.multi_gpu_jobs = multi_gpu_jobs
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []
        self._running: set[str] = set()
        self._closed = False
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Job, ev.Event], None]] = []
        self._inputs: dict[tuple, tuple[int, list[int]]] = {}   # dataset look-ups of the memory check
        self._context = multiprocessing.get_context(START_METHOD)
        self._context.set_forkserver_preload(PRELOAD)
        # Started now, so the fork server imports torch while the dashboard starts, not at the first run.
        from multiprocessing import forkserver
        forkserver.ensure_running()

    # ---- submitting and stopping --------------------------------------------------------
    def submit(self, config: RunConfig, owner: str = "local", resume_from: str | Path | None = None,
               job_id: str | None = None) -> Job:
        """Queue a run; it starts as soon as a slot is free. Returns the Job at once.

        Raises ConfigError before anything is queued when the run cannot fit in memory (with the
        largest batch that does), or when it is already running."""
        from core.trainer import new_run_id
        config.validate()
        if self._closed:
            raise ConfigError("The training queue has shut down with the server; start the server again.")
        if config.model.pretrained and not config.model.weights_path:
            # offline without the ImageNet file: say so now, naming the file, not from a failed run
            from core import models
            models.check_pretrained(config.model.name)
        if config.multi_gpu and not self.multi_gpu_jobs:
            raise ConfigError("Use all GPUs is off on this server: it is shared by a class, and one run on every "
                              "GPU would take them from everyone else. Untick it (the run trains on one device), "
                              "or train on all GPUs with torchrun from a terminal (docs/distributed.md).")
        if config.tensorboard:   # fail now, with the install command, rather than in the queue
            from core import tb
            tb.require()
        if resume_from is not None:
            job_id = Path(resume_from).parent.name
            with self._lock:   # said at once, before the memory check; checked again when queueing
                self._refuse_active(job_id)
        self.check_fits(config)
        job = Job(job_id=job_id or new_run_id(config), config=config, owner=owner,
                  resume_from=str(resume_from) if resume_from else None)
        with self._lock:   # check and queue in one step: two Resume clicks at once queue the run once
            if self._closed:
                raise ConfigError("The training queue has shut down with the server; start the server again.")
            self._refuse_active(job.job_id)
            self._jobs[job.job_id] = job
            self._queue.append(job.job_id)
        job._record(ev.StatusChanged(status=ev.QUEUED, message="waiting for a free training slot"))
        self._start_next()
        return job

    def _refuse_active(self, job_id: str) -> None:
        """ConfigError when ``job_id`` is queued or running (the caller holds ``_lock``)."""
        job = self._jobs.get(job_id)
        if job is not None and not job.done:
            raise ConfigError(f"Run {job_id} is already running or queued.")

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
        """Block until the job has ended and its process is gone (for tests and the command line)."""
        job = self.get(job_id)
        deadline = None if timeout is None else time.time() + timeout
        while not job.done:
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(0.05)
        if job._watcher is not None:
            job._watcher.join(timeout=30)
        return job

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every job (each leaves a checkpoint) and wait for the processes; those still
        running after ``timeout`` seconds are terminated, then killed."""
        with self._lock:
            self._closed = True
            queued = list(self._queue)
        for job_id in queued:
            self.stop(job_id)
        jobs = self.jobs()
        for job in jobs:
            job.request_stop()
        deadline = time.time() + timeout
        for job in jobs:
            if job._process is not None:
                job._process.join(max(0.0, deadline - time.time()))
        for job in jobs:
            proc = job._process
            if proc is not None and proc.is_alive():
                log.warning("run %s did not stop within %.0f s; ending its process", job.job_id, timeout)
                job._terminated = True
                proc.terminate()
                proc.join(KILL_GRACE_S)
                if proc.is_alive():
                    proc.kill()
        for job in jobs:
            if job._watcher is not None:
                job._watcher.join(timeout=KILL_GRACE_S)

    # ---- admission ---------------------------------------------------------------------------
    def check_fits(self, config: RunConfig, now: bool = False) -> None:
        """Refuse (ConfigError, naming the largest batch that fits) a run whose estimated training
        memory is more than it may use; ``submit`` calls it, and a comparison calls it for every run
        before it queues any. ``now``: the work starts at once beside the running jobs (the LR
        finder), so their memory is not counted as free even when every slot is busy. A run the
        check cannot size is admitted: an estimator limitation must never block training."""
        try:
            refusal = self._memory_refusal(config, now)
        except LabError as err:   # e.g. the dataset is not here yet: the run itself will say so
            log.info("memory check skipped for a %s run: %s", config.model.name, err)
            return
        except Exception:
            log.exception("memory check failed for a %s run; admitting it unchecked", config.model.name)
            return
        if refusal:
            raise ConfigError(refusal)

    def _memory_refusal(self, config: RunConfig, now: bool = False) -> str | None:
        from core import trainer
        device = trainer.resolve_device(config.device)
        with self._lock:
            will_wait = not now and (bool(self._queue) or len(self._running) >= self.max_jobs)
        budget, words = resources.training_budget(self._free_memory(device.type, will_wait),
                                                  self.max_job_memory, device.type)
        if budget is None:
            return None
        classes, shape = self._planned_input(config)
        need = resources.training_memory(config, classes, shape, device.type)
        if need <= budget:
            return None
        try:
            fits = resources.largest_fitting_batch(config, classes, shape, budget, device.type,
                                                   limit=config.data.batch_size)
            # The message also suggests accumulation, whose peak is higher: size that batch for it.
            accumulated = fits if config.optim.accumulation_steps > 1 or fits < 1 else \
                resources.largest_fitting_batch(config, classes, shape, budget, device.type, limit=fits,
                                                accumulation_steps=2)
        except Exception:   # the refusal stands; only the suggested batch is missing
            log.exception("no batch suggestion for a %s run", config.model.name)
            fits = accumulated = None
        return resources.refusal_message(config, shape, need, words, fits, accumulated)

    def _free_memory(self, device_type: str, will_wait: bool) -> int | None:
        """Memory free for a run on ``device_type``. A run that waits for a slot starts after the
        runs training now, so (on the CPU) their memory counts as free for it; the GPU memory of our
        own runs cannot be told apart from other programs', so a waiting GPU run is checked against
        the cap only (None)."""
        if device_type == "cuda":
            return None if will_wait else resources.free_cuda_memory("cuda")
        if device_type != "cpu":
            return None   # Apple MPS shares system memory in ways /proc does not show
        free = resources.free_cpu_memory()
        if free is not None and will_wait:
            free += sum(resources.read_process_rss(pid) or 0 for pid in self._running_pids())
        return free

    def _running_pids(self) -> list[int]:
        with self._lock:
            jobs = [self._jobs[j] for j in self._running]
        return [job.pid for job in jobs if job.pid is not None]

    def _planned_input(self, config: RunConfig) -> tuple[int, list[int]]:
        """(classes, [C, H, W]) of a run, looked up once per dataset (reading a dataset's file
        list takes 0.5-1.5 s for a few thousand images on 2 cores)."""
        from core import trainer
        d, m = config.data, config.model
        key = (d.source, d.location, d.image_size, m.name, m.small_input_stem, _stamp(d.location))
        if key not in self._inputs:
            self._inputs[key] = trainer.planned_input(config, self.data_dir)
        return self._inputs[key]

    # ---- internals --------------------------------------------------------------------------
    def _start_next(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._queue or len(self._running) >= self.max_jobs:
                    return
                job = self._jobs[self._queue.pop(0)]
                self._running.add(job.job_id)
                job.started = time.time()
            self._launch(job)

    def _launch(self, job: Job) -> None:
        try:
            self._start_process(job)
        except Exception as err:
            log.exception("could not start the training process of %s", job.job_id)
            self._deliver(job, ev.RunFinished(
                status=ev.FAILED, message=f"internal error: the training process could not start "
                f"({type(err).__name__}: {err}); the server log has the details",
                best_epoch=None, best_metric=None, seconds=0.0))
            self._release(job)

    def _start_process(self, job: Job) -> None:
        import torch

        from core import trainer
        events_r, events_w = self._context.Pipe(duplex=False)
        control_r, control_w = self._context.Pipe(duplex=False)
        kwargs = {"runs_dir": self.runs_dir, "data_dir": self.data_dir, "run_id": job.job_id,
                  "resume_from": job.resume_from}
        fit_fn, procs = self._fit or trainer.fit, self._processes(job.config)
        if procs > 1:   # in a job process of its own like any run, which drives torchrun's processes
            fit_fn, kwargs["nproc"] = torchrun.torchrun_fit, procs
        proc = self._context.Process(
            target=_child_main, name=f"train-{job.job_id}",
            args=(fit_fn, job.config, kwargs, events_w, control_r,
                  self.train_threads or torch.get_num_threads(), dict(os.environ)))
        try:
            proc.start()
        except BaseException:
            events_r.close()
            control_w.close()
            raise
        finally:   # the child holds its own copies; once it is gone the events pipe reads end of file
            events_w.close()
            control_r.close()
        with job._lock:
            job._process, job._control = proc, control_w
            if job._stop.is_set():   # a stop that came while the process was starting
                job._send_stop()
        job._watcher = threading.Thread(target=self._watch, args=(job, proc, events_r), daemon=True,
                                        name=f"job-{job.job_id}")
        job._watcher.start()

    def _processes(self, config: RunConfig) -> int:
        """How many torchrun processes a run trains with: one per GPU for "use all GPUs" on a machine
        with several, ``cpu_processes`` on the CPU when set; 1 (an ordinary run) otherwise."""
        if not config.multi_gpu or self._fit is not None:
            return 1
        import torch
        if config.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return torch.cuda.device_count()
        return self.cpu_processes or 1

    def _watch(self, job: Job, proc, events) -> None:
        """The job's thread in the server: relay the child's events until it ends, then record
        how it ended when it could not say so itself."""
        lost = None
        try:
            _relay(events, proc, lambda event: self._deliver(job, event))
        except Exception as err:   # an unreadable message: the child can no longer report, so end it
            log.exception("lost the events of run %s; ending its process", job.job_id)
            lost = f"internal error: the server could not read the training process's messages ({err})"
            proc.kill()
        finally:
            events.close()
        proc.join()
        try:
            if not job.done:
                status, message = self._exit_reason(job, proc.exitcode, lost)
                self._record_lost(job, status, message)
        except Exception:
            log.exception("could not record how run %s ended", job.job_id)
            job._record(ev.RunFinished(status=ev.FAILED, message="the training process ended without a final status",
                                       best_epoch=None, best_metric=None, seconds=0.0))
        finally:
            with job._lock:
                job._control.close()
                job._control = None
            self._release(job)

    def _release(self, job: Job) -> None:
        job.ended = time.time()
        with self._lock:
            self._running.discard(job.job_id)
        self._start_next()

    def _deliver(self, job: Job, event: ev.Event) -> None:
        job._record(event)
        for fn in list(self._listeners):
            try:
                fn(job, event)
            except Exception:  # a listener (e.g. the history index) must never stop a run's events
                log.exception("job listener %r failed on %s of run %s", fn, event.kind, job.job_id)

    def _exit_reason(self, job: Job, exitcode: int | None, lost: str | None) -> tuple[str, str]:
        if lost:
            return ev.FAILED, lost
        if job._terminated:
            return ev.INTERRUPTED, ("The server shut down before this run could stop; resume it from its "
                                    "last checkpoint.")
        hint = self._memory_hint(job) if exitcode == -signal.SIGKILL else ""
        return ev.FAILED, describe_exit(exitcode, hint)

    def _memory_hint(self, job: Job) -> str:
        """After an out-of-memory kill: the largest batch the estimator says fits in what is free
        now (the dead run's memory is free again), as a sentence; "" when it cannot tell."""
        import torch

        from core import trainer
        config, batch = job.config, job.config.data.batch_size
        try:
            started = next((e for e in job.events if isinstance(e, ev.RunStarted)), None)
            if started is not None:
                classes, shape = len(started.classes), started.input_shape
                device_type = torch.device(started.device).type
            else:
                classes, shape = self._planned_input(config)
                device_type = trainer.resolve_device(config.device).type
            budget, _ = resources.training_budget(self._free_memory(device_type, False), self.max_job_memory,
                                                  device_type)
            if budget is None:
                return ""
            fits = resources.largest_fitting_batch(config, classes, shape, budget, device_type, limit=batch)
        except Exception:
            log.exception("no batch suggestion after run %s was killed", job.job_id)
            return ""
        free = resources.format_size(budget)
        if fits >= batch:
            return (f"The memory estimate says batch {batch} fits in what is free now ({free}), so other "
                    "programs probably took the memory while it trained: close them, or lower the batch size.")
        if fits < 1:
            return f"Not even batch 1 fits in what is free now ({free}): pick a smaller model or input size."
        return f"Try a smaller batch: batch {fits} fits in what is free now ({free})."

    def _record_lost(self, job: Job, status: str, message: str) -> None:
        """The end of a run whose process died: in the job (listeners included) and its folder."""
        from core import trainer
        started = next((e for e in job.events if isinstance(e, ev.RunStarted)), None)
        epochs = [e for e in job.events if isinstance(e, ev.EpochEnded)]
        best = [e for e in epochs if e.is_best]
        metric = None
        if best:
            metric = best[-1].val_accuracy if job.config.monitor == "val_accuracy" else best[-1].val_loss
        finished = ev.RunFinished(status=status, message=message, best_epoch=best[-1].epoch if best else None,
                                  best_metric=metric, seconds=time.time() - (job.started or job.created))
        done = epochs[-1].epoch if epochs else (started.start_epoch if started else 0)
        if started is not None:
            run_dir = Path(started.run_dir)
        else:
            run_dir = Path(job.resume_from).parent if job.resume_from else self.runs_dir / job.job_id
        if (run_dir / trainer.CONFIG_FILE).is_file():
            try:
                trainer.record_lost_run(run_dir, job.config, finished, done)
            except OSError:
                log.exception("could not write the end of run %s in %s", job.job_id, run_dir)
        self._deliver(job, finished)


def _relay(events, proc, deliver: Callable[[ev.Event], None]) -> None:
    """Pass each event the child sends to ``deliver`` until the child is gone. The process's
    sentinel is watched too: a DataLoader worker the child forked may hold the pipe open a little
    longer than the child lives."""
    while True:
        ready = mp_connection.wait([events, proc.sentinel])
        if events not in ready:   # the process ended: take what it sent before it went
            while events.poll():
                try:
                    deliver(events.recv())
                except EOFError:
                    return
            return
        try:
            event = events.recv()
        except EOFError:
            return
        deliver(event)


def _check_picklable(fit: Callable) -> None:
    try:
        pickle.dumps(fit)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise TypeError(f"JobManager(fit=...) runs fit in a child process, which receives it by name, so it "
                        f"must be a module-level function; {fit!r} is not ({err}).") from None


def _stamp(location: str | None) -> tuple[int, int] | None:
    """When a dataset file or folder last changed (a changed dataset is looked up again)."""
    try:
        st = os.stat(location) if location else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if st else None
