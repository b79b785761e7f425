"""A run as ``torchrun`` processes, driven like any run: the dashboard's "use all GPUs".

``torchrun_fit`` has ``core.trainer.fit``'s signature, so the job manager runs it in a job's process
in place of ``fit`` (``JobManager`` picks it for ``config.multi_gpu`` when there are several
devices): it starts ``python -m torch.distributed.run --standalone --nproc_per_node=N -m core.train``
in a process group of its own, reads the run's events back from the run folder's events.jsonl as
rank 0 writes them (so progress, plots and the log work as for any run), and turns a stop request
into the Ctrl-C every rank acts on (they stop after the same batch and rank 0 saves the checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from core import events as ev, rundir
from core.config import RunConfig
from core.rundir import EVENTS_FILE

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.2
# torchrun passes a Ctrl-C on to the ranks and kills them 30 s later; this backstop kills the whole
# process group when even that has not ended it, and ends ranks left waiting after the run's last event.
STOP_GRACE_S = 45.0
AFTER_FINISH_S = 30.0


def command(config_path: Path, *, nproc: int, runs_dir, data_dir, run_id: str,
            resume_from: str | Path | None, epochs: int) -> list[str]:
    """The torchrun command line of a run (one node, ``nproc`` processes, rendezvous on this machine
    only). Paths are absolute: the processes run in the server's working folder like any run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "core.train", "--quiet", "--runs-dir", str(Path(runs_dir).resolve()),
           "--data-dir", str(Path(data_dir).resolve())]
    if resume_from:
        return cmd + ["--resume", str(Path(resume_from).resolve()), "--epochs", str(epochs)]
    return cmd + ["--config", str(config_path), "--run-id", run_id]


def _environment() -> dict[str, str]:
    """The server's environment, with the project importable from any working folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class _Follower:
    """Reads the complete lines appended to events.jsonl since the last call."""

    def __init__(self, path: Path, skip_existing: bool):
        self.path, self.offset = path, path.stat().st_size if skip_existing and path.exists() else 0
        self.epochs = 0   # EpochEnded read so far (what the run folder's last checkpoint holds)

    def new_events(self) -> list[ev.Event]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        out = []
        for line in complete.splitlines():
            try:
                out.append(ev.from_dict(json.loads(line)))
                self.epochs += isinstance(out[-1], ev.EpochEnded)
            except ValueError as err:   # one unreadable line (json's errors are ValueErrors) is skipped
                log.warning("events.jsonl of %s: skipped a line (%s)", self.path.parent.name, err)
        return out


def torchrun_fit(config: RunConfig, on_event: Callable[[ev.Event], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, *, runs_dir, data_dir, run_id: str | None = None,
                 resume_from: str | Path | None = None, nproc: int = 2) -> str:
    """Train ``config`` with ``nproc`` torchrun processes; report through ``on_event``; stop when
    ``should_stop()`` turns true. Returns the run's final status."""
    on_event = on_event or (lambda e: None)
    should_stop = should_stop or (lambda: False)
    run_dir = Path(resume_from).parent if resume_from else Path(runs_dir) / str(run_id)
    follower = _Follower(run_dir / EVENTS_FILE, skip_existing=bool(resume_from))
    with tempfile.TemporaryDirectory(prefix="lab-torchrun-") as tmp:
        config_path = Path(tmp) / "config.json"
        config.save(config_path)
        cmd = command(config_path, nproc=nproc, runs_dir=runs_dir, data_dir=data_dir, run_id=run_dir.name,
                      resume_from=resume_from, epochs=config.epochs)
        with (Path(tmp) / "torchrun.log").open("w+b") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=_environment())
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)   # the server's shutdown: finally runs
            try:
                finished = _follow(proc, follower, on_event, should_stop)
            finally:
                _end_group(proc)
                signal.signal(signal.SIGTERM, previous)
            out.seek(max(0, out.seek(0, os.SEEK_END) - 4000))
            tail = out.read().decode("utf-8", "replace")
    if finished is None:
        finished = _lost(run_dir, config, proc.returncode, tail, follower.epochs)
        on_event(finished)
    return finished.status


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _end_group(proc: subprocess.Popen) -> None:
    """No process of the run outlives its job: a Ctrl-C to torchrun, then a kill of the group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)   # ranks torchrun left behind, if any
    proc.wait()


def _lost(run_dir: Path, config: RunConfig, returncode: int | None, tail: str, epochs: int) -> ev.RunFinished:
    """The run's end when rank 0 could not write it: the reason a rank gave (or torchrun's exit), in
    the run folder's status as well (it would say "running" with a dead process otherwise)."""
    log.warning("torchrun for run %s ended (exit %s) without a final event:\n%s", run_dir.name, returncode, tail)
    status = ev.STOPPED if returncode in (130, -signal.SIGINT) else ev.FAILED
    said = [t.strip() for t in tail.splitlines() if re.match(r"\s*(rank \d+: failed:|error:)", t)]
    reason = said[-1][:300] if said else f"torchrun exited with status {returncode}"
    finished = ev.RunFinished(status=status, message=f"the training processes ended without a final status: "
                              f"{reason}", best_epoch=None, best_metric=None, seconds=0.0)
    if run_dir.is_dir():
        with contextlib.suppress(OSError):
            rundir.record_lost_run(run_dir, config, finished, epochs)
    return finished


def _follow(proc: subprocess.Popen, follower: _Follower, on_event, should_stop) -> ev.RunFinished | None:
    """Relay the run's events until the processes end. A stop request becomes one Ctrl-C to torchrun,
    which passes it on to every rank (they stop after the same batch; rank 0 saves the checkpoint);
    ranks still there AFTER_FINISH_S after the run's last event (one failed, the others wait in a
    collective) are ended by the caller."""
    finished, stop_sent, finished_at = None, False, None
    while True:
        ended = proc.poll() is not None
        for event in follower.new_events():
            on_event(event)
            if isinstance(event, ev.RunFinished):
                finished, finished_at = event, time.monotonic()
        if ended or (finished_at is not None and time.monotonic() - finished_at > AFTER_FINISH_S):
            return finished
        if not stop_sent and should_stop():
            stop_sent = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
        time.sleep(POLL_S)
