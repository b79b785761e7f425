"""What resuming a run means, decided in one place for the command line (``--resume``), the Train
tab (Resume last run) and the run history (Compare → Run history → Resume).

A run may be resumed when it stopped, failed or was interrupted: it goes on in its own folder from
its ``last.pth``, up to the epochs asked for (as planned by default) and at least one more; a
finished run only when more epochs in all are asked for than it has done. Never while it is
queued, training or stopping, here or in another process (its folder's status says so). Only its
owner or the teacher may resume it; the resumed job keeps the run's owner.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core import events as ev, identity, rundir
from core.checkpoints import load_checkpoint
from core.config import RunConfig
from core.errors import ConfigError

RESUMABLE_STATUSES = (ev.STOPPED, ev.FAILED, ev.INTERRUPTED)


@dataclass(frozen=True)
class Wording:
    """How a refusal names the run and says what to do instead: the run history's words by
    default; the Train tab speaks of "your last run" and of its own buttons."""
    subject: str | None = None                  # None: "Run <run id>"
    restart: str = "Start it again instead."
    more_epochs: str = "ask for more epochs in all than {done}; or start a new run."


@dataclass
class ResumePlan:
    run_id: str
    checkpoint: Path          # the run's last.pth: training goes on in its folder
    config: RunConfig         # the checkpoint's configuration, ``epochs`` = the total to train to
    epochs_done: int
    owner: str                # whose job the resumed run is


def resumed_epochs(done: int, planned: int, finished: bool, wanted: int | None) -> int | None:
    """Epochs in all for a run resumed after ``done`` epochs (``planned`` in its config) when
    ``wanted`` are asked for (None or 0: as planned). A stopped run trains at least one more
    epoch; a finished one goes on only when asked for more than it has done (else None)."""
    if finished:
        return int(wanted) if wanted and int(wanted) > done else None
    return max(int(wanted or planned), done + 1)


def plan_resume(run_dir: str | Path, *, status: str | None = None, epochs: int | None = None,
                who: identity.Who | None = None, run_owner: str | None = None, owner: str | None = None,
                wording: Wording = Wording()) -> ResumePlan:
    """Decide whether the run in ``run_dir`` may be resumed, from which checkpoint and up to which
    epoch; ConfigError (in ``wording``) when not. status: the run's status as the caller knows it
    (default: its folder's). who: who asks (None: a trusted caller, the command line), checked
    against ``run_owner``. The job's owner: ``owner``, else the run's, else who asks."""
    run_dir = Path(run_dir)
    subject = wording.subject or f"Run {run_dir.name}"
    if who is not None:
        identity.require_change(run_owner, who, "resume")
    status = status or rundir.read_status(run_dir)[0]
    finished = status == ev.FINISHED
    if status not in RESUMABLE_STATUSES and not finished:
        raise ConfigError(f"{subject} is {status}; only stopped, failed or interrupted runs can be resumed "
                          "(and finished ones trained for more epochs).")
    last = run_dir / rundir.LAST_CKPT
    if not last.is_file():
        raise ConfigError(f"{subject} ended ({status}) before its first checkpoint: there is nothing to "
                          f"resume. {wording.restart}")
    ckpt = load_checkpoint(last)
    config = RunConfig.from_dict(ckpt["config"])
    done = int(ckpt.get("epoch", 0))
    total = resumed_epochs(done, config.epochs, finished, epochs)
    if total is None:
        raise ConfigError(f"{subject} finished all its {done} epoch{'s' * (done != 1)}. To train it further, "
                          + wording.more_epochs.format(done=done))
    config.epochs = total
    return ResumePlan(run_dir.name, last, config, done,
                      owner or run_owner or (who.owner if who is not None else "local"))
