"""Training functions for JobManager(fit=...) in tests. The manager runs fit in a child process,
which receives it by name, so these live at module level in a module that imports little (the
child imports it before it starts)."""
from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

from core import events as ev

RELEASE_FILE = ".release-test-fits"
NEVER_RELEASED_S = 60   # a forgotten release ends the fake run instead of leaving a process behind


def release(runs_dir: str | Path) -> None:
    """Let every ``fit_until_released`` of ``runs_dir`` finish (a file: the fit runs in another process)."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    (Path(runs_dir) / RELEASE_FILE).touch()


def fit_until_released(config, on_event, should_stop, *, runs_dir, **kwargs):
    """Say it is preparing, then wait until ``release(runs_dir)`` (or a stop) and finish 1 epoch's worth."""
    on_event(ev.StatusChanged(status=ev.RUNNING, message="preparing data and model"))
    deadline = time.monotonic() + NEVER_RELEASED_S
    while not (Path(runs_dir) / RELEASE_FILE).exists() and not should_stop():
        if time.monotonic() > deadline:
            on_event(ev.RunFinished(status=ev.FAILED, message="the test never released this run",
                                    best_epoch=None, best_metric=None, seconds=0.0))
            return
        time.sleep(0.02)
    on_event(ev.RunFinished(status=ev.FINISHED, message="finished 1 epoch(s)", best_epoch=1, best_metric=0.5,
                            seconds=1.0))


def segfault_fit(config, on_event, should_stop, **kwargs):
    """A native crash in the middle of a run: the process dies of SIGSEGV without a final event."""
    on_event(ev.StatusChanged(status=ev.RUNNING, message="training"))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # no core file left in the working folder
    os.kill(os.getpid(), signal.SIGSEGV)


def raising_fit(config, on_event, should_stop, **kwargs):
    """A bug that escapes fit: the child reports it as an internal error."""
    raise RuntimeError("a bug outside fit's own error handling")


def stubborn_fit(config, on_event, should_stop, *, runs_dir, **kwargs):
    """A run that does not answer stop requests (stuck in a long native call, say)."""
    on_event(ev.StatusChanged(status=ev.RUNNING, message="training"))
    deadline = time.monotonic() + NEVER_RELEASED_S
    while not (Path(runs_dir) / RELEASE_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def threads_fit(config, on_event, should_stop, **kwargs):
    """Report the torch threads this child was given, then finish."""
    import torch
    on_event(ev.RunFinished(status=ev.FINISHED, message=f"{torch.get_num_threads()} threads", best_epoch=None,
                            best_metric=None, seconds=0.0))
