"""What a run costs in time, measured on this machine before it starts, and a time budget's plan.

The measuring is the trainer's (``core.trainer.measure_cost`` and ``estimate_cost``: it runs the
run's own steps); this module holds the estimate, its arithmetic and its wording. ``measure_cost`` times a few real training steps (the run's model, optimiser, precision, batch size and
data path, on a copy of the model, so the run itself is untouched) and a few evaluation batches,
for at most ``max_seconds`` (3 s by default), and extrapolates: seconds per epoch (training,
validation and the checkpoints), for the whole run, and for the final test evaluation.
The first two steps are left out of the median (oneDNN and the allocator set themselves up then), so
the figure is what an epoch after the first costs; the first epoch of a run is a little slower.

``plan_epochs`` turns a time budget into epochs: as many as fit in what is left of the budget after
the data preparation, the measurement and the final evaluation. The run is then an ordinary run of
that many epochs (its schedule ends with them, and it reproduces from its config.json); the trainer
also stops at an epoch's end if the machine turned slower and the next epoch would end past the
budget, so a budgeted run ends on time to within one epoch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from core.errors import LabError

MAX_MEASURE_S = 3.0
STATED_ERROR = 0.15   # an epoch after the first takes the predicted training time to within this fraction
# The plan fills this share of the time left: an epoch a few per cent slower than measured (a busy
# machine) then still finishes the schedule instead of being cut at the budget.
PLAN_SHARE = 0.95
# A budget plans at most this many epochs (the Epochs slider's end): "1 hour" of the tutorial Net on
# the sample would otherwise be some 10,000 epochs, each a checkpoint and a row on every open page.
MAX_PLANNED_EPOCHS = 200
WARMUP_STEPS = 2      # left out of the median: oneDNN and the allocator set themselves up
MAX_STEPS = 200
ENOUGH_STEPS, ENOUGH_S = 20, 1.0   # a measurement may end early once it has this many steps and seconds


@dataclass(frozen=True)
class CostEstimate:
    step_seconds: float          # one training batch (data, forward, backward, optimiser step)
    eval_batch_seconds: float    # one evaluation batch
    train_batches: int           # per epoch
    val_batches: int
    test_batches: int
    checkpoint_seconds: float    # writing last.pth (and best.pth when the epoch is the best)
    measured_steps: int
    measure_seconds: float

    @property
    def train_seconds(self) -> float:
        """The training part of an epoch (what the run's epoch table reports as its seconds)."""
        return self.train_batches * self.step_seconds

    @property
    def epoch_seconds(self) -> float:
        """A whole epoch: training, validation and the checkpoints."""
        return self.train_seconds + self.val_batches * self.eval_batch_seconds + self.checkpoint_seconds

    @property
    def test_seconds(self) -> float:
        return self.test_batches * self.eval_batch_seconds

    def run_seconds(self, epochs: int) -> float:
        return epochs * self.epoch_seconds + self.test_seconds

    def describe(self, epochs: int) -> str:
        return (f"≈ {duration(self.epoch_seconds)} per epoch, ≈ {duration(self.run_seconds(epochs))} for "
                f"{epochs} epoch{'s' * (epochs != 1)} (measured on this machine: {self.measured_steps} training "
                f"steps in {self.measure_seconds:.1f} s)")



def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_epochs(estimate: CostEstimate, budget_s: float, elapsed_s: float) -> int:
    """The epochs that fit in ``budget_s`` seconds of which ``elapsed_s`` are spent (data
    preparation and the measurement), leaving time for the final test evaluation and a margin
    (PLAN_SHARE); at least 1 and at most MAX_PLANNED_EPOCHS (the run then ends before its budget)."""
    left = (budget_s - elapsed_s - estimate.test_seconds) * PLAN_SHARE
    return min(MAX_PLANNED_EPOCHS, max(1, math.floor(left / max(estimate.epoch_seconds, 1e-9))))


_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '5m', '1.5h' or '1h30m'; LabError saying the form otherwise."""
    t = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)(s|sec|min|m|h)?", t)
    if not t or "".join(n + (u or "") for n, u in parts) != t or (len(parts) > 1 and not all(u for _, u in parts)):
        raise LabError(f"A duration must be a number of seconds or a number with s, m or h, such as 90, 90s, "
                       f"5m or 1h30m; got {text!r}.")
    return float(sum(float(n) * _UNITS[u or "s"] for n, u in parts))


def compare(predicted_train_s: float, measured_train_s: float) -> str:
    """'0.42 s, predicted 0.40 s (+5%)': an epoch's training time against the prediction."""
    diff = (measured_train_s - predicted_train_s) / max(predicted_train_s, 1e-9)
    return f"{measured_train_s:.2f} s, predicted {predicted_train_s:.2f} s ({diff:+.0%})"
