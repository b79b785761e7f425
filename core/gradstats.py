"""Weight and gradient distributions per layer, epoch by epoch, and what they say in words.

When ``RunConfig.record_distributions`` is on, the trainer builds a ``DistributionRecorder``:
``grads()`` is called once per epoch, just before the epoch's last optimiser step (so from the
last batch's gradients, before clipping; an fp16 run's loss scale is divided out), and
``record(epoch)`` at the end of the epoch adds the weights as they are then (those the epoch's
checkpoint holds). One JSON line per epoch goes to the run folder (``rundir.append_distributions``).
Off, nothing is built and the loop only tests ``before_last_step is None`` once per optimiser step.

Per parameter tensor (named as in ``model.named_parameters()``): the weight quantiles
QUANTILE_NAMES (min, 5 %, 25 %, median, 75 %, 95 %, max; over at most MAX_QUANTILE_VALUES values,
an evenly strided subsample of larger tensors, so no RNG is drawn), the weight L2 norm, and the L2
norm of its gradient (None for a frozen tensor).

API::

    DistributionRecorder(model, scaler=None).grads() / .record(epoch) -> dict
    read_distributions(run_dir) -> DataFrame[epoch, layer, min, q05, q25, median, q75, q95, max,
                                             weight_norm, grad_norm, grad_finite]   # last record per epoch
    diagnose(frame) -> {"status": "ok"|"vanishing"|"exploding"|"no data", "messages": [str]}
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from core import rundir

log = logging.getLogger(__name__)

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
QUANTILE_NAMES = ("min", "q05", "q25", "median", "q75", "q95", "max")
COLUMNS = ["epoch", "layer", *QUANTILE_NAMES, "weight_norm", "grad_norm"]
MAX_QUANTILE_VALUES = 1_000_000
# Thresholds of diagnose(), documented in docs/architecture.md ("Explanations and statistics").
VANISHING_RATIO = 1e-3     # first layer's gradient norm below this × the largest layer's
STALLED_NORM = 1e-8        # every gradient norm below this: nothing is learning
EXPLODING_RATIO = 10.0     # a layer's gradient norm above this × its weight norm
EXPLODING_GROWTH = 100.0   # the largest gradient norm grew this much since the first epoch


class DistributionRecorder:
    """Collects one epoch's statistics of ``model`` (the model itself, not a DataParallel wrapper)."""

    def __init__(self, model: nn.Module, scaler: Any = None):
        self.model, self.scaler = model, scaler
        self._grad_norms: dict[str, float | None] = {}

    @torch.no_grad()
    def grads(self) -> None:
        """Take the gradient norms now (call it before the optimiser step that uses them)."""
        named = [(n, p.grad) for n, p in self.model.named_parameters()]
        present = [g for _, g in named if g is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in present]).tolist() if present else []
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        values = iter(norms)
        self._grad_norms = {n: (next(values) / scale if g is not None else None) for n, g in named}

    @torch.no_grad()
    def record(self, epoch: int) -> dict:
        """{"epoch", "layers": {name: {min..max, weight_norm, grad_norm}}} with the weights as
        they are now and the gradient norms last taken (then forgotten)."""
        q = None
        layers = {}
        for name, p in self.model.named_parameters():
            w = p.detach().flatten().float()
            if q is None or q.device != w.device:
                q = torch.tensor(QUANTILES, device=w.device)
            step = max(1, math.ceil(w.numel() / MAX_QUANTILE_VALUES))
            values = torch.quantile(w[::step], q).tolist() + [torch.linalg.vector_norm(w).item()]
            layers[name] = dict(zip((*QUANTILE_NAMES, "weight_norm"), values))
            layers[name]["grad_norm"] = self._grad_norms.get(name)
        self._grad_norms = {}
        return {"epoch": int(epoch), "layers": layers}


def frame_from_records(records: list[dict]) -> pd.DataFrame:
    """Records (``DistributionRecorder.record`` or the file's lines) → the long DataFrame; the
    last record of each epoch wins (a resumed run repeats epochs). Layers keep the model's order."""
    latest = {rec["epoch"]: rec for rec in records}
    rows = [{"epoch": epoch, "layer": name, **{c: stats.get(c) for c in COLUMNS[2:]},
             "grad_finite": _finite_or_none(stats.get("grad_norm"))}
            for epoch, rec in sorted(latest.items()) for name, stats in (rec.get("layers") or {}).items()]
    frame = pd.DataFrame(rows, columns=COLUMNS + ["grad_finite"])
    return frame.astype({**{c: "float64" for c in COLUMNS[2:]}, "grad_finite": bool})


def _finite_or_none(value) -> bool:
    """False only for a gradient norm that is NaN or infinite (None: a frozen tensor, fine)."""
    return value is None or math.isfinite(value)


def read_distributions(run_dir: str | Path) -> pd.DataFrame:
    """The run's recorded distributions across epochs (empty when it recorded none)."""
    return frame_from_records(rundir.read_distributions(run_dir))


def _exploding(frame: pd.DataFrame) -> list[str]:
    out = []
    bad = frame[~frame["grad_finite"]]
    if not bad.empty:
        first = bad.iloc[0]
        out.append(f"Exploding gradients: the gradient of {first['layer']} is {first['grad_norm']} in epoch "
                   f"{int(first['epoch'])}. Lower the learning rate or turn on gradient clipping.")
    fine = frame[frame["grad_finite"] & frame["grad_norm"].notna()]
    big = fine[fine["grad_norm"] > EXPLODING_RATIO * fine["weight_norm"].clip(lower=1e-12)]
    if not out and not big.empty:
        row = big.loc[(big["grad_norm"] / big["weight_norm"]).idxmax()]
        out.append(f"Exploding gradients: in epoch {int(row['epoch'])} the gradient of {row['layer']} "
                   f"({row['grad_norm']:.3g}) is {row['grad_norm'] / row['weight_norm']:.0f}× the size of its "
                   "weights. Lower the learning rate or turn on gradient clipping.")
    peaks = fine.groupby("epoch")["grad_norm"].max()
    if not out and len(peaks) > 1 and peaks.iloc[0] > 0 and peaks.max() > EXPLODING_GROWTH * peaks.iloc[0]:
        out.append(f"Exploding gradients: the largest gradient norm grew from {peaks.iloc[0]:.3g} (epoch "
                   f"{int(peaks.index[0])}) to {peaks.max():.3g} (epoch {int(peaks.idxmax())}). Lower the "
                   "learning rate or turn on gradient clipping.")
    return out


def _vanishing(frame: pd.DataFrame) -> list[str]:
    weights = frame[frame["grad_norm"].notna() & frame["layer"].str.endswith("weight")]
    for epoch, rows in weights.groupby("epoch", sort=True):
        top = rows["grad_norm"].max()
        if top < STALLED_NORM:
            return [f"Vanishing gradients: every gradient is below {STALLED_NORM:g} in epoch {int(epoch)}; the "
                    "model has stopped learning (saturated activations, dead ReLUs or a learning rate of 0)."]
        first = rows.iloc[0]
        if first["grad_norm"] < VANISHING_RATIO * top:
            return [f"Vanishing gradients: in epoch {int(epoch)} the first layer's gradient ({first['layer']}, "
                    f"{first['grad_norm']:.2g}) is {top / max(first['grad_norm'], 1e-300):.0e}× smaller than "
                    "the largest; the early layers barely learn. Use ReLU-type activations, batch "
                    "normalisation, residual connections or a better initialisation."]
    return []


def diagnose(frame: pd.DataFrame) -> dict[str, Any]:
    """Flag vanishing and exploding gradients in words (thresholds: the module constants).

    Exploding: a non-finite gradient; a layer's gradient norm above EXPLODING_RATIO × its weight
    norm; or the largest gradient norm growing EXPLODING_GROWTH× since the first epoch. Vanishing:
    the first weight's gradient norm below VANISHING_RATIO × the largest layer's, or every
    gradient below STALLED_NORM. Exploding is reported first when both apply."""
    if frame is None or frame.empty or (frame["grad_norm"].isna() & frame["grad_finite"]).all():
        return {"status": "no data", "messages": ["No gradients were recorded: turn on 'record weight and "
                                                  "gradient distributions' for the run."]}
    exploding = _exploding(frame)
    if exploding:
        return {"status": "exploding", "messages": exploding}
    vanishing = _vanishing(frame)
    if vanishing:
        return {"status": "vanishing", "messages": vanishing}
    return {"status": "ok", "messages": ["The gradients look healthy: neither vanishing nor exploding."]}
