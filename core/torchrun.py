"""A run as ``torchrun`` processes, driven like any run: the dashboard's "use all GPUs".

``torchrun_fit`` has ``core.trainer.fit``'s signature, so the job manager runs it in a job's process
in place of ``fit`` (``JobManager`` picks it for ``config.multi_gpu`` when there are several
devices): it starts ``python -m torch.distributed.run --standalone --nproc_per_node=N -m core.train``
in a process group of its own, reads the run's events back from the run folder's events.jsonl as
rank 0 writes them (so progress, plots and the log work as for any run), and turns a stop request
into the Ctrl-C every rank acts on (they stop after the same batch and rank 0 saves the checkpoint).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from core import events as ev
from core.config import RunConfig
from core.rundir import EVENTS_FILE

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.2
STOP_GRACE_S = 60.0   # after a stop request, how long the ranks get to save and exit before they are killed


def command(config_path: Path, *, nproc: int, runs_dir, data_dir, run_id: str,
            resume_from: str | Path | None, epochs: int) -> list[str]:
    """The torchrun command line of a run (one node, ``nproc`` processes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "core.train", "--quiet", "--runs-dir", str(runs_dir), "--data-dir", str(data_dir)]
    if resume_from:
        return cmd + ["--resume", str(resume_from), "--epochs", str(epochs)]
    return cmd + ["--config", str(config_path), "--run-id", run_id]


class _Follower:
    """Reads the complete lines appended to events.jsonl since the last call."""

    def __init__(self, path: Path, skip_existing: bool):
        self.path, self.offset = path, path.stat().st_size if skip_existing and path.exists() else 0

    def new_events(self) -> list[ev.Event]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [ev.from_dict(json.loads(line)) for line in complete.splitlines() if line.strip()]


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
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            finished = _follow(proc, follower, on_event, should_stop)
            out.seek(max(0, out.seek(0, os.SEEK_END) - 2000))
            tail = out.read().decode("utf-8", "replace")
    if finished is None:
        status = ev.STOPPED if proc.returncode in (130, -signal.SIGINT) else ev.FAILED
        log.warning("torchrun for run %s ended (exit %s) without a final event:\n%s", run_dir.name,
                    proc.returncode, tail)
        lines = [t for t in tail.splitlines() if t.strip()]
        finished = ev.RunFinished(status=status, best_epoch=None, best_metric=None, seconds=0.0,
                                  message=f"the torchrun processes ended (exit {proc.returncode}) without a final "
                                          f"status: {lines[-1][:200] if lines else 'no output'}")
        on_event(finished)
    return finished.status


def _follow(proc: subprocess.Popen, follower: _Follower, on_event, should_stop) -> ev.RunFinished | None:
    """Relay the run's events until the processes end; a stop request becomes one SIGINT to the
    process group (torchrun and every rank), and a kill if they have not ended STOP_GRACE_S later."""
    finished, stop_sent = None, None
    while True:
        ended = proc.poll() is not None
        for event in follower.new_events():
            on_event(event)
            if isinstance(event, ev.RunFinished):
                finished = event
        if ended:
            return finished
        if stop_sent is None and should_stop():
            stop_sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
        elif stop_sent is not None and time.monotonic() - stop_sent > STOP_GRACE_S:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(POLL_S)
