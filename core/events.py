"""What the trainer reports, as plain dataclasses (JSON-able through ``to_dict``).

A run emits: StatusChanged(queued/running/...) → RunStarted → BatchEnded × N → EpochEnded (per
epoch) … → Evaluated (test split) → RunFinished. The job manager appends them to an event log the
dashboard polls; the run folder keeps them as ``events.jsonl``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

# Job and run statuses. "stopped" = stopped by the user (a usable checkpoint is left);
# "interrupted" = the server died while it ran (set when the run history is read back).
QUEUED, RUNNING, STOPPING, STOPPED, FINISHED, FAILED, INTERRUPTED = (
    "queued", "running", "stopping", "stopped", "finished", "failed", "interrupted")
FINAL_STATUSES = (STOPPED, FINISHED, FAILED, INTERRUPTED)


@dataclass
class Event:
    time: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass
class StatusChanged(Event):
    status: str
    message: str = ""


@dataclass
class RunStarted(Event):
    run_id: str
    run_dir: str
    device: str
    classes: list[str]
    split_sizes: dict[str, int]
    input_shape: list[int]          # C, H, W fed to the model
    params_total: int
    params_trainable: int
    batches_per_epoch: int
    start_epoch: int                # 0 for a new run; >0 when resumed
    epochs: int
    notes: list[str] = field(default_factory=list)  # e.g. "resized 32→224", "in-memory loader"
    start_batch: int = 0            # batches of epoch start_epoch + 1 done before a mid-epoch resume


@dataclass
class BatchEnded(Event):
    epoch: int                      # 1-based
    batch: int                      # 1-based within the epoch
    batches: int                    # per epoch
    step: int                       # global optimiser-independent batch counter, 1-based
    loss: float
    lr: float
    images_per_sec: float


@dataclass
class EpochEnded(Event):
    epoch: int
    epochs: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float
    eta_seconds: float
    images_per_sec: float
    is_best: bool


@dataclass
class Evaluated(Event):
    split: str                      # "test" (or "val" when there is no test split)
    accuracy: float
    top5_accuracy: float | None
    macro_f1: float
    report_path: str
    num_samples: int = 0            # images evaluated (for the accuracy's interval)


@dataclass
class RunFinished(Event):
    status: str                     # finished | stopped | failed
    message: str
    best_epoch: int | None
    best_metric: float | None
    seconds: float



def from_dict(raw: dict[str, Any]) -> Event:
    """The event ``to_dict`` wrote (a line of events.jsonl); ValueError for an unknown kind."""
    kinds = {cls.__name__: cls for cls in Event.__subclasses__()}
    fields = dict(raw)
    cls = kinds.get(fields.pop("kind", None))
    if cls is None:
        raise ValueError(f"unknown event kind in {raw!r:.80}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in names})
