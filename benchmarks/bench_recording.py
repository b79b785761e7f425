"""Cost of recording weight and gradient distributions (RunConfig.record_distributions), on vs off.

    python benchmarks/bench_recording.py [--reps 3] [--epochs 3] [--models tutorial_net,resnet18] [--threads 2]

(resnet18 with its small-input stem trains some 60 images/s on 2 cores: about 30 s an epoch.)

For each model it trains the same configuration (embedded CIFAR-10 sample, seed 0, batch 32) with
recording off and on, interleaved in one process (the order alternates from one repetition to the
next, so machine noise hits both alike), and prints side by side, median over the repetitions:
  s/epoch      the trainer's own per-epoch time (EpochEnded.seconds: the training loop only, which
               holds the gradient norms taken before the last step, not the weight quantiles);
  record ms    time spent in the recorder per epoch (gradient norms before the last step, weight
               quantiles after the loop);
  cost         record ms ÷ the off run's s/epoch: the share of an epoch recording adds. The on−off
               difference of s/epoch is printed too; it is mostly machine noise, as large either way.
The recorder runs once per epoch, so its share shrinks as epochs get longer: the tutorial net's
sub-second epochs are the worst case. Figures are comparable only within one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import events as ev, gradstats  # noqa: E402
from core.config import RunConfig  # noqa: E402
from core.trainer import fit  # noqa: E402


class _Timed(gradstats.DistributionRecorder):
    """The recorder, timing its two calls (class attribute: the totals of one run)."""
    spent = 0.0

    def grads(self) -> None:
        t = time.perf_counter()
        super().grads()
        _Timed.spent += time.perf_counter() - t

    def record(self, epoch: int) -> dict:
        t = time.perf_counter()
        out = super().record(epoch)
        _Timed.spent += time.perf_counter() - t
        return out


def _one(model: str, record: bool, epochs: int, runs: Path, data: Path) -> tuple[float, float]:
    """(median seconds per epoch, recorder ms per epoch) of one run."""
    cfg = RunConfig.from_dict({"model": {"name": model}, "epochs": epochs, "device": "cpu", "seed": 0,
                               "data": {"batch_size": 32}, "record_distributions": record})
    seconds: list[float] = []
    _Timed.spent = 0.0
    result = fit(cfg, on_event=lambda e: seconds.append(e.seconds) if isinstance(e, ev.EpochEnded) else None,
                 runs_dir=runs, data_dir=data)
    if result.status != ev.FINISHED:
        raise SystemExit(f"{model}: {result.message}")
    return statistics.median(seconds), 1000 * _Timed.spent / epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--models", default="tutorial_net", help="comma-separated zoo names, e.g. tutorial_net,resnet18")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gradstats.DistributionRecorder = _Timed   # the trainer builds gradstats.DistributionRecorder
    with tempfile.TemporaryDirectory() as tmp:
        runs, data = Path(tmp) / "runs", Path(tmp) / "data"
        print(f"{'model':14s} {'off s/epoch':>12s} {'on s/epoch':>11s} {'on-off':>8s} {'record ms':>10s} {'cost':>7s}")
        for model in args.models.split(","):
            times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            _one(model, False, 1, runs, data)   # warm-up: dataset extraction, caches
            for rep in range(args.reps):
                for record in ((False, True) if rep % 2 == 0 else (True, False)):
                    times[record].append(_one(model, record, args.epochs, runs, data))
            off = statistics.median(s for s, _ in times[False])
            on = statistics.median(s for s, _ in times[True])
            spent = statistics.median(ms for _, ms in times[True])
            print(f"{model:14s} {off:12.3f} {on:11.3f} {on - off:+8.3f} {spent:10.1f} {spent / 10 / off:6.2f}%")


if __name__ == "__main__":
    main()
