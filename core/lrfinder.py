"""The learning-rate range test (Smith 2017, "Cyclical learning rates", section 3.3; the fastai
"LR finder"): train for ~100 mini-batches while the rate rises exponentially from ``start_lr`` to
``end_lr``, record the loss, and stop once it diverges (the smoothed loss above ``diverge`` × its
best, or not finite). The loss is smoothed with an exponential moving average (``beta``, bias
corrected, as fastai does).

The suggestion is the rate where the smoothed loss falls fastest (the most negative slope of the
smoothed loss against log(rate), between the first 10 % of the curve and its minimum): "steepest
descent". ``min_over_10`` (the rate at the smoothed minimum, divided by 10) is returned too, as the
other common rule; when it is lower than the steepest descent (a flat, noisy curve whose steepest
fall lies near divergence) it is the suggestion. Both are heuristics from one short run from the current weights; the caveat
says so in words.

The model's weights (buffers too) and the optimiser's state (its rates included) are put back
afterwards, and so are the global RNG states and the model's train/eval mode: the test leaves no
trace.

API::

    lr_range_test(model, loader, optimizer, loss_fn=None, *, start_lr=1e-7, end_lr=10, steps=100,
                  beta=0.98, diverge=4.0, device="cpu", on_step=None) -> LRFinderResult
    find_lr(config, data_dir=..., steps=100, start_lr=1e-7, end_lr=10, on_step=None) -> LRFinderResult
        # a RunConfig's data and a fresh model built from it (thrown away afterwards)
    on_step(done, steps): called after each step (a progress bar)
    LRFinderResult: curve (DataFrame[step, lr, loss, smoothed]), suggestion, min_over_10, method,
                    stopped_early, caveat; .to_dict()
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from core import datasets
from core.checkpoints import capture_rng_state, restore_rng_state
from core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_STEPS = 500      # a range test is a quick look: more steps is a training run (and may be asked through the API)
SKIP_START = 0.1     # the first 10 % of the curve is ignored for the suggestion (the average warms up)
# No suggestion unless the smoothed loss falls by this share below its value after the warm-up: on
# the sample the tutorial net's loss moved by 1 % in 100 steps, and the rates read off that noise
# (0.35 by steepest descent, 5e-6 by minimum ÷ 10): a run at the first ended at chance, the second is too small to learn at.
MIN_FALL = 0.05
CAVEAT = ("A rule of thumb, not an optimum: the suggestion comes from how the loss moved during "
          "{steps} steps from these weights with this batch size. A schedule, a longer run or another "
          "batch size moves the best rate; try the suggestion and rates about 3× above and below it.")


@dataclass
class LRFinderResult:
    curve: pd.DataFrame                 # step, lr, loss, smoothed
    suggestion: float | None            # steepest descent, or min_over_10 when that is lower
    min_over_10: float | None           # the smoothed minimum's rate / 10
    method: str
    stopped_early: bool                 # diverged before end_lr
    caveat: str
    timed_out: bool = False             # stopped at max_seconds before end_lr

    def to_dict(self) -> dict[str, Any]:
        return {"curve": self.curve.to_dict(orient="list"), "suggestion": self.suggestion,
                "min_over_10": self.min_over_10, "method": self.method, "stopped_early": self.stopped_early, "timed_out": self.timed_out,
                "caveat": self.caveat}


def _batches(loader) -> Iterator:
    """The loader's batches, over and over (a small dataset has fewer than 100)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("The learning-rate finder got no batches: the training split is empty.")


def _suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float | None, float | None]:
    """(steepest-descent rate, minimum rate / 10) of a smoothed curve; None when too short."""
    if len(lrs) < 10:
        return None, None
    start = max(1, int(len(lrs) * SKIP_START))
    # the minimum after the warm-up: on a flat curve the first few averages (of one to a few noisy
    # losses) were often the lowest, which left a model that learns late without a suggestion
    low = start + int(np.argmin(smoothed[start:]))
    min_over_10 = float(lrs[low] / 10)
    if smoothed[low] > (1 - MIN_FALL) * smoothed[start]:
        return None, None   # a flat curve tells nothing: any "suggestion" from it is noise
    if low - start < 2:
        return None, min_over_10
    slope = np.gradient(smoothed[start:low + 1], np.log(lrs[start:low + 1]))
    return float(lrs[start + int(np.argmin(slope))]), min_over_10


def _check_range(start_lr: float, end_lr: float, steps: int) -> None:
    if not (0 < start_lr < end_lr) or not math.isfinite(end_lr):
        raise ConfigError(f"The learning-rate finder needs 0 < start rate < end rate; got {start_lr:g} and {end_lr:g}.")
    if steps < 10:
        raise ConfigError(f"The learning-rate finder needs at least 10 steps, got {steps}.")
    if steps > MAX_STEPS:
        raise ConfigError(f"The learning-rate finder takes at most {MAX_STEPS} steps, got {steps}: "
                          "to train longer, start a run.")


def lr_range_test(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: nn.Module | None = None, *,
                  start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100, beta: float = 0.98,
                  diverge: float = 4.0, device: str | torch.device = "cpu",
                  on_step: Callable[[int, int], None] | None = None,
                  max_seconds: float | None = None) -> LRFinderResult:
    """Run the range test on ``model`` with ``optimizer`` over ``loader``'s (x, y) batches (see the
    module docstring). Parameter groups keep their ratios to the first group, whose rate is the
    one reported. Weights, optimiser state, RNG states and train mode are restored afterwards.
    ``on_step(done, steps)`` is called after each step; after ``max_seconds`` the test stops where it
    is (a big model on a CPU: the server's finder must end)."""
    _check_range(start_lr, end_lr, steps)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    device = torch.device(device)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    saved_rng, was_training = capture_rng_state(), model.training
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    rows, avg, best, stopped = [], 0.0, math.inf, False
    deadline = time.monotonic() + max_seconds if max_seconds is not None else math.inf
    try:
        model.train()
        batches = _batches(loader)
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for g, ratio in zip(optimizer.param_groups, ratios):
                g["lr"] = lr * ratio
            x, y = next(batches)
            loss = loss_fn(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            avg = beta * avg + (1 - beta) * value
            smoothed = avg / (1 - beta ** (i + 1))
            if not math.isfinite(value) or not math.isfinite(smoothed):
                stopped = True
                break
            rows.append((i + 1, lr, value, smoothed))
            if on_step is not None:
                on_step(i + 1, steps)
            best = min(best, smoothed)
            if i > 0 and smoothed > diverge * best:
                stopped = True
                break
            if time.monotonic() > deadline:
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
        restore_rng_state(saved_rng)
    return _result(rows, steps, stopped)


def _result(rows: list, steps: int, stopped: bool) -> LRFinderResult:
    """The curve of a test and what it suggests (see the module docstring)."""
    curve = pd.DataFrame(rows, columns=["step", "lr", "loss", "smoothed"])
    suggestion, min_over_10 = _suggest(curve["lr"].to_numpy(), curve["smoothed"].to_numpy())
    method = "steepest descent of the smoothed loss"
    if suggestion is not None and min_over_10 is not None and min_over_10 < suggestion:
        # the lower, safer of the two rules: on a flat, noisy curve the steepest fall can lie next to
        # divergence (a run of the sample at such a rate ended at chance, 10 %)
        method = (f"rate at the lowest smoothed loss ÷ 10 (lower, so safer, than the steepest descent "
                  f"at {suggestion:.3g})")
        suggestion = min_over_10
    timed_out = not stopped and len(curve) < steps
    return LRFinderResult(curve, suggestion, min_over_10, method, stopped, CAVEAT.format(steps=len(curve)), timed_out)


def find_lr(config, data_dir: str | Path = datasets.DEFAULT_DATA_DIR, steps: int = 100,
            start_lr: float = 1e-7, end_lr: float = 10.0,
            on_step: Callable[[int, int], None] | None = None, max_seconds: float | None = None) -> LRFinderResult:
    """The range test for a RunConfig: its data, a fresh model built from it (pretrained, frozen as
    configured), optimiser and loss, on its training split with its augmentation. The model is
    thrown away afterwards (its CUDA memory given back) and nothing is written anywhere."""
    from core import trainer   # here: the trainer is only needed for this entry point

    prep = trainer.prepare(config, data_dir=data_dir)
    model = prep.model.to(prep.device)
    optimizer = trainer.build_optimizer(model, config)
    loader = prep.train_loader
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(1, 0)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    try:
        return lr_range_test(model, loader, optimizer, loss_fn, start_lr=start_lr, end_lr=end_lr, steps=steps,
                             device=prep.device, on_step=on_step, max_seconds=max_seconds)
    finally:
        del prep, model, optimizer, loader
        if torch.cuda.is_initialized():   # never start CUDA in this process just to clean up
            torch.cuda.empty_cache()   # the training runs (other processes) may use it again
