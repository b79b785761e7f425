"""The training loop: ``fit(config, on_event, should_stop)``.

Reads top to bottom as torchvision's classification reference script does: ``prepare`` turns a
RunConfig into data, model and loaders; ``_fit`` sets up the optimiser and scheduler (``_setup``),
restores a checkpoint when resuming (``_restore``), then ``_train_epochs`` runs each epoch:
``train_one_epoch``, ``evaluate`` on the val split, and the end-of-epoch step (``_end_epoch``:
scheduler, best epoch, checkpoints last and best, EpochEnded, early stopping) over one explicit
``TrainState``. At the end the best weights are evaluated on the test split. Events and files go
to the run folder. It runs in the calling thread; the job manager (core.jobs) runs it in a child
process of its own.

Reproducibility: each epoch's order and augmentation depend only on (seed, epoch), and RNG states
are checkpointed, so "2 epochs in one go" and "1 epoch, stop, resume 1 epoch" give the same weights
on the CPU (tests/test_trainer.py checks it) — also when the stop comes in the middle of an epoch
or of a gradient-accumulation group: the RNG state is taken before the next batch is fetched and
the checkpoint keeps the unfinished group's gradients. The DataLoader path seeds each image's
augmentation by (epoch seed, image) (core.loaders), so it resumes exactly with any number of workers.

Under ``torchrun`` (core.distributed, docs/distributed.md) the same loop runs in every process with
DistributedDataParallel: data.batch_size is the global batch, each rank trains its strided share of
it, the stop request is all-reduced between batches, validation and the test run on rank 0, and only
rank 0 writes the run folder. N processes train the same weights as one (tests/test_distributed.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import copy
import io
import logging
import math
import os
import random
import re
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from torch.nn.parallel import DistributedDataParallel

from core import (choices, cost, cpuspeed, datasets, distributed, events as ev, gradstats, loaders, metrics, models,
                  resources, revisions, rundir, storage, tensorloader, transforms)
from core.checkpoints import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from core.config import RunConfig
from core.errors import ConfigError, LabError, StorageError
# The run folder's layout and writers live in core.rundir; these names stay importable from here.
from core.rundir import (BEST_CKPT, CONFIG_FILE, EVAL_FILE, EVENTS_FILE, LAST_CKPT,  # noqa: F401
                         STATUS_FILE, RunLog as _RunLog, new_run_id, record_lost_run, write_eval, write_status)

log = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path("runs")
REPORT_EVERY_S = 0.25   # BatchEnded at most ~4 per second (the dashboard redraws at 2-4 Hz)
NOT_CONVOLUTIONAL = frozenset({"vit_b_16"})   # channels_last would only add transposes

EventSink = Callable[[ev.Event], None]
StopFlag = Callable[[], bool]


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is visible here. "
                          "Choose 'auto' or 'cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) visible.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' was asked for but Apple MPS is not available here.")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (as the tutorials do); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


@dataclass
class Prepared:
    """Everything ``fit`` needs, built from a RunConfig (also used by benchmarks and tests)."""
    config: RunConfig
    dataset: Any
    split: Any
    device: torch.device
    model: nn.Module
    created: Any
    input_size: tuple[int, int]
    in_channels: int
    normalization: Any
    train_spec: list[dict]
    eval_spec: list[dict]
    transform_state: dict
    train_loader: Any
    val_loader: Any | None
    test_loader: Any | None
    notes: list[str] = field(default_factory=list)
    revision: Any = None              # core.revisions.Applied when config.data.revision names one
    revision_record: dict | None = None   # what the run folder's revision.json keeps

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.classes)


def _native_size(ds) -> tuple[int, int] | None:
    """(h, w) when every image of ``ds``, all splits, has one size (the in-memory path takes one
    size only), else None. ``datasets.common_image_size`` checks them all from the load-time scan."""
    size = datasets.common_image_size(ds)
    return (size[1], size[0]) if size else None


def input_size_for(config: RunConfig, native: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) the run feeds its model: data.image_size when set, else what the model needs for
    images of ``native`` size (None: mixed sizes, treated as 224×224)."""
    if config.data.image_size:
        return (config.data.image_size, config.data.image_size)
    return tuple(models.resolve_input_size(config.model.name, native or (224, 224), config.model.small_input_stem))


def planned_input(config: RunConfig, data_dir: str | Path = datasets.DEFAULT_DATA_DIR) -> tuple[int, list[int]]:
    """(number of classes, [C, H, W]) a run of ``config`` will train on, from its dataset's file
    list without preparing loaders or a model (the job manager's memory check uses it). Nothing is
    downloaded: a dataset that is not here yet raises MissingFileError."""
    ds = datasets.load_dataset(config.data.source, config.data.location, data_dir=data_dir, download=False)
    h, w = input_size_for(config, _native_size(ds))
    return len(ds.classes), [1 if ds.mode == "L" else 3, h, w]


def prepare(config: RunConfig, data_dir: str | Path = datasets.DEFAULT_DATA_DIR, dataset=None,
            saved_revision: dict | None = None) -> Prepared:
    """Load data, split it, build the model and the loaders for ``config`` (no training).

    With ``data.revision`` the revision's decisions are applied after the split, which is made on the
    original labels (so train/val/test hold the same images as a run without it). ``saved_revision``:
    a run folder's revision.json, used when the revision's own file is gone (a resumed run)."""
    config.validate()
    d = config.data
    device = distributed.local_device(resolve_device(config.device))
    if choices.PRECISIONS.get(config.precision).cuda_only and device.type != "cuda":
        raise ConfigError(f"{config.precision} mixed precision needs a CUDA GPU; use bf16 or fp32 on this device.")
    ds = dataset if dataset is not None else datasets.load_dataset(d.source, d.location, data_dir=data_dir)
    split = datasets.split_dataset(ds, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                   seed=d.split_seed)
    notes = list(split.warnings)
    applied = record = None
    if d.revision:
        applied, record = _apply_revision(d.revision, ds, split, data_dir, saved_revision)
        ds, split = applied.dataset, applied.split
        notes.extend(applied.notes)
    in_channels = 1 if ds.mode == "L" else 3
    native = _native_size(ds)
    created = _build_model(config, ds, in_channels, native, notes)
    input_size = tuple(created.input_size)  # the model may round it (ViT: a multiple of its patch)
    normalization, train_spec, eval_spec = _pipeline_specs(config, ds, split, native, input_size)
    _check_distributed_batch(config, len(split.train), notes)
    make = _loader_maker(config, ds, device, native, input_size, normalization, train_spec, eval_spec, notes)
    train_loader = make(split.train, True)
    if train_loader is None:
        raise ConfigError("The training split is empty: lower the val/test fractions or add images.")
    t_state = transforms.transform_state(eval_spec, normalization, ds.mode, list(input_size))
    return Prepared(config, ds, split, device, created.model, created, input_size, in_channels,
                    normalization, train_spec, eval_spec, t_state, train_loader,
                    make(split.val, False), make(split.test, False), notes, applied, record)


def _check_distributed_batch(config: RunConfig, n_train: int, notes: list[str]) -> None:
    """Under torchrun data.batch_size is the global batch: each of the N processes trains
    batch_size / N images of it. ConfigError when N does not divide it, or when the epoch's last
    batch (the one trained: see ``_batches_used``) would leave a process without an image."""
    n, bs = distributed.world_size(), config.data.batch_size
    if n == 1:
        return
    if bs % n:
        raise ConfigError(f"data.batch_size {bs} is the global batch, shared by the {n} processes of this "
                          f"torchrun: {n} must divide it. Use a batch size that is a multiple of {n}, e.g. "
                          f"{max(n, bs // n * n)} or {(bs // n + 1) * n}.")
    last = n_train % bs
    if last and last < n and not (last == 1 and n_train > bs):
        raise ConfigError(f"the epoch's last batch has {last} training image(s), fewer than the {n} processes of "
                          f"this torchrun, so one would train on none: change data.batch_size ({bs}) so the "
                          f"{n_train} training images leave none or at least {n} in the last batch.")
    notes.append(distributed.describe(bs, config.optim.lr))


def _apply_revision(ref: str, ds, split, data_dir, saved: dict | None):
    """(Applied, the record for revision.json): revision ``ref`` on ``ds`` and ``split``; from the run
    folder's ``saved`` revision.json when the revision's file is gone (and it names the same ref)."""
    extra = []
    try:
        source = revisions.revision_record(ref, data_dir)
    except revisions.RevisionMissing:
        if not saved or saved.get("ref") != ref or not isinstance(saved.get("decisions"), dict):
            raise
        source, extra = saved, [revisions.revision_file_note(ref)]
    applied = revisions.apply_record(ds, split, source)
    if saved and saved.get("ref") == ref and saved.get("digest") not in (None, applied.digest):
        extra.append(f"revision {ref}: the decisions applied now differ from this run's first session "
                     "(an image changed or is gone since); see revision.json")
    applied.notes.extend(extra)
    return applied, applied.record(source)


def _build_model(config: RunConfig, ds, in_channels: int, native: tuple[int, int] | None, notes: list[str]):
    """The model for ``ds`` (CreatedModel), frozen as asked; what it says goes to ``notes``."""
    m = config.model
    created = models.create_model(m.name, num_classes=len(ds.classes), in_channels=in_channels,
                                  input_size=input_size_for(config, native), pretrained=m.pretrained,
                                  weights_path=m.weights_path, small_input_stem=m.small_input_stem,
                                  init=m.init, weights_dir=None)
    notes.extend(created.notes)
    size = tuple(created.input_size)
    if native and tuple(native) != size:
        notes.append(f"images are resized from {native[1]}×{native[0]} to {size[1]}×{size[0]} for {m.name}")
    models.apply_freeze(created.model, m.name, m.freeze, m.freeze_stages)
    return created


def _pipeline_specs(config: RunConfig, ds, split, native, input_size) -> tuple[Any, list[dict], list[dict]]:
    """(normalization, train spec, eval spec): the user's augmentation (with a Resize in front when
    the images need one and it has none) or the tutorials' default, and the matching eval steps."""
    d, m = config.data, config.model
    preset = d.normalize
    if preset == "auto":
        preset = "imagenet" if (m.pretrained or m.weights_path) else "tutorial"
    # One channel for grayscale sets; "dataset" statistics from the training split only.
    normalization = transforms.make_normalization(preset, ds.mode, ds, split.train)
    needs_resize = native is None or tuple(native) != tuple(input_size)
    native_wh = (native[1], native[0]) if native else (0, 0)  # (0, 0): mixed sizes, always resize
    hflip = not (d.source == "torchvision" and d.location == "MNIST")  # a mirrored digit is another glyph
    if d.train_augment is not None:
        train_spec = list(d.train_augment)
        if needs_resize and not any(s["name"] in ("RandomResizedCrop", "Resize") for s in train_spec):
            train_spec = [{"name": "Resize", "params": {"size": list(input_size)}}] + train_spec
    else:
        train_spec = transforms.default_train_spec(input_size, native_size=native_wh, hflip=hflip)
    return normalization, train_spec, transforms.default_eval_spec(input_size, native_size=native_wh)


def _loader_maker(config: RunConfig, ds, device, native, input_size, normalization, train_spec, eval_spec,
                  notes: list[str]) -> Callable[[Sequence[int], bool], Any]:
    """``make(indices, train)`` → a loader of those images (None when there are none): the
    in-memory tensor loader when every image has one size, the augmentation is crop and flip only
    and the set is small enough (or in_memory="on"), else a DataLoader. Says which in ``notes``."""
    d = config.data
    train_tf = transforms.build_transform(train_spec, normalization, ds.mode)
    eval_tf = transforms.build_transform(eval_spec, normalization, ds.mode)
    batched = tensorloader.batched_augment_params(train_spec, input_size) if native else None
    n_bytes = len(ds) * (1 if ds.mode == "L" else 3) * input_size[0] * input_size[1]
    use_memory = {"on": True, "off": False}.get(d.in_memory, n_bytes <= tensorloader.AUTO_MAX_BYTES)
    if use_memory and batched is None:
        if d.in_memory == "on":
            notes.append("in-memory loading was asked for, but the images differ in size or the "
                         "augmentation uses steps other than crop and flip: using the DataLoader")
        use_memory = False
    notes.append("data: in-memory uint8 tensor, batched crop/flip" if use_memory
                 else f"data: DataLoader with {loaders.resolve_num_workers(d.num_workers, d.batch_size)} worker(s)")

    shard = {"rank": distributed.rank(), "world_size": distributed.world_size()}

    def make(indices, train):
        if not len(indices):
            return None
        share = shard if train else {}   # training is sharded; evaluation runs whole on rank 0
        if use_memory:
            arr = ds.to_uint8_array(indices, size=None if tuple(native) == tuple(input_size) else input_size)
            images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
            return tensorloader.TensorLoader(
                images, [ds.targets[i] for i in indices], d.batch_size, train,
                normalization.mean, normalization.std, seed=config.seed, device=device,
                **(batched if train else {}), **share)
        return loaders.make_loader(ds, list(indices), train_tf if train else eval_tf, d.batch_size,
                                   train=train, num_workers=d.num_workers, device=str(device),
                                   seed=config.seed, **share)
    return make


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """The run's optimiser, from the one registry (core.choices.OPTIMIZERS); an unknown name is a
    ConfigError listing the valid ones."""
    o = config.optim
    spec = choices.OPTIMIZERS.get(o.optimizer)   # before the groups: a wrong name is the first thing said
    groups = models.param_groups(model, config.model.name, o.lr, head_lr=o.head_lr,
                                 weight_decay=o.weight_decay)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError("No parameter is trainable with this freezing choice; unfreeze something.")
    return spec.for_run(groups, o)


def build_scheduler(optimizer, config: RunConfig, steps_per_epoch: int):
    """Return (scheduler or None, stepped_per_batch). Warm-up is applied separately (per batch)."""
    o, epochs = config.optim, config.epochs
    main_epochs = max(1, epochs - o.warmup_epochs)
    if o.scheduler == "none":
        return None, False
    if o.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma), False
    if o.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(o.milestones), gamma=o.gamma), False
    if o.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=o.gamma), False
    if o.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs), False
    if o.scheduler == "plateau":
        mode = "max" if config.monitor == "val_accuracy" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=o.gamma,
                                                          patience=o.plateau_patience), False
    # OneCycle has its own warm-up (pct_start) and is stepped per optimiser step.
    steps = math.ceil(steps_per_epoch / o.accumulation_steps) * epochs
    max_lrs = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=steps,
                                               pct_start=o.onecycle_warmup), True


def resume_scheduler(scheduler, optimizer, config: RunConfig, saved: dict | None, *, saved_kind: str,
                     saved_epochs: int, epochs_done: int, batches_done: int, steps_per_epoch: int):
    """The scheduler a resumed run continues with (call after loading the optimizer's state).

    Same epoch count as the checkpoint's: its saved state, unchanged, so the resume is exact.
    A new count (``--resume runs/<id>/last.pth --epochs N``): step, multistep, exponential and
    plateau do not depend on it and also continue unchanged; cosine and OneCycle were planned for
    the old horizon (OneCycle fails once its steps run out, cosine climbs back up past its end), so
    the rest of the run is re-planned over the steps that remain, from where the rate is now
    (``_replan_cosine``, ``_replan_onecycle``). A different scheduler than the checkpoint's starts
    its own plan afresh (the saved state belongs to another kind).
    """
    kind = config.optim.scheduler
    if scheduler is None or not saved or saved_kind != kind:
        return scheduler
    if saved_epochs == config.epochs or kind not in ("cosine", "onecycle") or config.epochs <= epochs_done:
        scheduler.load_state_dict(saved)
        return scheduler
    if saved["last_epoch"] <= 0:
        # The old plan had not started (still warming up): the fresh one for the new horizon,
        # built from the configuration, is exactly what the run would have had.
        return scheduler
    # What remains is counted from the run's epochs and batches, not from the saved plan's step
    # count: after an earlier re-plan those are no longer the run's steps.
    if kind == "cosine":   # stepped once per epoch after the warm-up; every remaining epoch is past it
        return _replan_cosine(optimizer, saved, remaining=config.epochs - epochs_done)
    accumulation = config.optim.accumulation_steps
    per_epoch = math.ceil(steps_per_epoch / accumulation)
    remaining = per_epoch * (config.epochs - epochs_done) - batches_done // accumulation
    return _replan_onecycle(scheduler, optimizer, saved, remaining=max(1, remaining))


def _replan_cosine(optimizer, saved: dict, remaining: int):
    """Cosine over ``remaining`` more epochs that starts at the current rate and keeps the shape of
    the old plan: the new plan has the same fraction done (rounded up) and exactly ``remaining``
    epochs left, and CosineAnnealingLR, built "resuming", scales the rest of its curve from the
    current rate — so the rate goes on falling and never jumps back up. A plan that had already
    reached its end sits at its floor (0), which would leave nothing to train: it goes on from the
    rate its last epoch trained at instead."""
    planned, done, eta_min = saved["T_max"], saved["last_epoch"], saved["eta_min"]
    if done >= planned:
        done = planned - 1
        for group, base in zip(optimizer.param_groups, saved["base_lrs"]):
            group["lr"] = eta_min + (base - eta_min) * (1 + math.cos(math.pi * done / planned)) / 2
    total = -(-remaining * planned // (planned - done))   # integers: a float quotient can round 98 up to 99
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=eta_min,
                                                      last_epoch=total - remaining - 1)


def _replan_onecycle(scheduler, optimizer, saved: dict, remaining: int):
    """OneCycle over ``remaining`` more optimiser steps. Mid-cycle, what is left of the cycle is
    stretched (or squeezed) over them: the new plan's annealing ends on the run's last step, as the
    old one did, and the steps left to that end are scaled by one factor, which keeps the rate (and
    the cycled momentum) where it is, up to rounding that is taken towards the lower rate. A cycle
    that has already ended (its rate at the floor, ~1/250,000 of the peak) starts a new cycle over
    the added steps, as fitting "one more cycle" does; it keeps the same peak rate."""
    planned, done = saved["total_steps"], saved["last_epoch"]
    max_lrs = [g["max_lr"] for g in optimizer.param_groups]
    # the old plan's rising fraction (its first phase ends at pct_start * total - 1), kept by the new one
    pct = min(0.99, max(0.01, (float(saved["_schedule_phases"][0]["end_step"]) + 1) / planned))
    if done >= planned - 1:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=remaining, pct_start=pct)
    if remaining == 1:   # nothing to stretch: the old plan's next step
        scheduler.load_state_dict(saved)
        return scheduler
    # The annealing ends at step total-1. The old plan has planned-1-done steps left to its end, the
    # new one remaining-1: scale the plan by their ratio (rounded up: a little further along, a
    # slightly lower rate), and resume it `remaining` steps before its end. Built "resuming"
    # (last_epoch >= 0), OneCycleLR keeps the bounds (initial, peak and floor rate, momentum range)
    # that the optimiser's state brought from the checkpoint.
    total = max(remaining, -(-(remaining - 1) * planned // (planned - 1 - done)))
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total, pct_start=pct,
                                               last_epoch=total - remaining - 1)


def class_weights_for(config: RunConfig, targets: Sequence[int], num_classes: int) -> torch.Tensor | None:
    cw = config.optim.class_weights
    if cw is None:
        return None
    if cw == "balanced":  # inverse class frequency, scaled so a balanced set gives all ones
        counts = torch.bincount(torch.as_tensor(list(targets)), minlength=num_classes).float()
        return counts.sum() / (num_classes * counts.clamp(min=1))
    if len(cw) != num_classes:
        raise ConfigError(f"optim.class_weights has {len(cw)} values but the dataset has {num_classes} classes.")
    return torch.tensor(cw, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# One epoch, and evaluation
# ---------------------------------------------------------------------------------------------
class Diverged(LabError):
    """The loss became NaN or infinite."""


class _StopRequested(Exception):
    pass


def _autocast(device: torch.device, precision: str):
    dtype = choices.PRECISIONS.get(precision).dtype
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def uses_channels_last(config: RunConfig, device: torch.device) -> bool:
    """Whether a run trains in channels_last: on the CPU where it measured faster for the model in
    the run's precision (core.cpuspeed), on a CUDA GPU every convolutional network in mixed
    precision (the layout tensor cores take without transposes; NVIDIA's advice, as airbench does)."""
    if device.type == "cuda":
        return config.precision != "fp32" and config.model.name not in NOT_CONVOLUTIONAL
    return device.type == "cpu" and cpuspeed.channels_last_pays(config.model.name, config.precision)


def _on_device(model: nn.Module, config: RunConfig, device: torch.device) -> nn.Module:
    """``model`` in the run's memory layout (marked, for _channels_last) on ``device``: the one set-up
    the run and the cost measurement share."""
    if uses_channels_last(config, device):
        model = model.to(memory_format=torch.channels_last)
        model._lab_channels_last = True
    return model.to(device)


def _channels_last(model: nn.Module) -> bool:
    """Whether the model takes its input in channels_last (uses_channels_last). Looks through
    DataParallel and DistributedDataParallel: the wrappers do not carry the model's attributes."""
    inner = model.module if isinstance(model, (nn.DataParallel, DistributedDataParallel)) else model
    return getattr(inner, "_lab_channels_last", False)


def _num_samples(loader) -> int:
    if isinstance(loader, tensorloader.TensorLoader):
        return loader.num_samples()
    return len(loader.dataset)


def train_one_epoch(model, loader, optimizer, loss_fn, device, *, epoch: int, config: RunConfig,
                    scaler=None, scheduler=None, per_batch_scheduler=False, warmup_steps=0,
                    step_offset=0, skip_batches=0, resume_partial: dict | None = None,
                    emit: EventSink = lambda e: None, should_stop: StopFlag = lambda: False,
                    before_last_step: Callable[[], None] | None = None) -> dict:
    """Train for one epoch; return {'loss', 'accuracy', 'images', 'seconds', 'stopped_at', 'partial'}.

    A stop request is checked before each batch is fetched, not after: on the DataLoader path the
    augmentation of a batch draws from the global RNG as the batch is fetched, so the RNG state a
    checkpoint keeps must be the one from before that fetch for a resumed epoch to see exactly the
    batches of an uninterrupted one. On a stop, ``stopped_at`` is the number of batches done and
    ``partial`` holds what continuing the epoch exactly needs: that RNG state, the running loss and
    accuracy sums, and the gradients of an accumulation group the stop cut in two (None at a group
    boundary). Give it back as ``resume_partial`` together with ``skip_batches`` to continue.

    Warm-up scales the learning rate linearly over the first ``warmup_steps`` batches.
    ``before_last_step`` (the distribution recorder, when on) is called once, just before the
    epoch's last optimiser step, while the last batch's gradients are there.
    """
    models.set_train_mode(model, True)
    used = _batches_used(loader, config.data.batch_size)
    accumulation = config.optim.accumulation_steps
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    for p, grad in zip(params, (resume_partial or {}).get("grads") or ()):
        if grad is not None:   # the first half of an accumulation group, from before the stop
            p.grad = grad.to(p.device)
    tally = _EpochTally(resume_partial if distributed.is_main() else None)   # the stop's sums are global ones
    report = _BatchReports(emit, epoch, len(loader), used)
    step = step_offset
    batch_iter = iter(loader)
    for b in range(skip_batches + 1, used + 1):
        if should_stop():
            grads = [p.grad for p in params] if (b - 1) % accumulation else None
            return tally.result(stopped_at=b - 1, grads=grads)
        x, y = next(batch_iter)
        step += 1
        if warmup_steps and step <= warmup_steps:
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * step / warmup_steps
        out, y, loss = _forward(model, x, y, loss_fn, device, config.precision)
        loss_value = loss.item()   # one device sync a step, for the divergence check and the tallies
        if not math.isfinite(loss_value):
            raise _diverged(loss_value, epoch, b, optimizer)
        # Average over the batches of this accumulation group; the last group of an epoch may be
        # shorter, and dividing by the full group size would give its batches less weight.
        group_start = (b - 1) // accumulation * accumulation + 1
        group_size = min(accumulation, used - group_start + 1)
        global_n = _global_batch_size(loader, b, config.data.batch_size)
        scaled = loss / group_size if global_n == y.shape[0] else loss * _rank_share(y.shape[0], global_n) / group_size
        (scaler.scale(scaled) if scaler else scaled).backward()
        lr = optimizer.param_groups[0]["lr"]   # reported: the rate this batch trained at, not the next one's
        if b - group_start + 1 == group_size:
            if before_last_step is not None and b == used:
                before_last_step()
            _optimizer_step(model, optimizer, scaler, config.optim.grad_clip,
                            scheduler if per_batch_scheduler else None)
        tally.add(out, y, loss_value)
        report(b, step, loss_value, lr, global_n)
    return tally.result()


def _batches_used(loader, batch_size: int) -> int:
    """The epoch's batches, less a last batch of one image when the batch size is larger: BatchNorm
    cannot take statistics of a single value per channel (1×1 feature maps fail outright)."""
    batches = len(loader)
    return batches - 1 if batches > 1 and batch_size > 1 and _num_samples(loader) % batch_size == 1 else batches


def _global_batch_size(loader, batch: int, batch_size: int) -> int:
    """Images in global batch ``batch`` (1-based) of an epoch: all processes together."""
    return min(batch_size, _num_samples(loader) - (batch - 1) * batch_size)


def _rank_share(n_local: int, n_global: int) -> float:
    """The factor on this rank's mean loss that makes DistributedDataParallel's average over the
    ranks the mean over the global batch, also when the ranks' shares differ by an image (the last
    batch): n_local × world_size / n_global. (With class weights the loss is a weighted mean, and
    the result is then close to, not exactly, one process's.)"""
    return n_local * distributed.world_size() / n_global


def _forward(model, x, y, loss_fn, device: torch.device, precision: str):
    """(logits, targets on the device, loss) of one batch, in the run's precision."""
    non_blocking = device.type == "cuda"
    x = x.to(device, non_blocking=non_blocking)
    y = y.to(device, non_blocking=non_blocking)
    if _channels_last(model):
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        out = model(x)
        loss = loss_fn(out, y)
    return out, y, loss


def _diverged(loss_value: float, epoch: int, batch: int, optimizer) -> Diverged:
    lr = optimizer.param_groups[0]["lr"]
    return Diverged(f"The loss became {loss_value} at epoch {epoch}, batch {batch}. The learning rate "
                    f"({lr:.3g}) is probably too high: try {lr / 10:.3g}, or turn on gradient clipping.")


def _optimizer_step(model, optimizer, scaler, grad_clip: float | None, scheduler=None) -> None:
    """The end of an accumulation group: clip, step (through the fp16 scaler), clear the
    gradients, and step a per-batch scheduler (OneCycle)."""
    if grad_clip:
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()


class _EpochTally:
    """An epoch's running loss and accuracy sums (continued from a stop's record) and its result."""

    def __init__(self, partial: dict | None):
        partial = partial or {}
        self.loss_sum = partial.get("loss_sum", 0.0)
        self.correct, self.seen = partial.get("correct", 0), partial.get("seen", 0)
        self.t0 = time.perf_counter()

    def add(self, out: torch.Tensor, y: torch.Tensor, loss_value: float) -> None:
        n = y.shape[0]
        self.loss_sum += loss_value * n
        self.correct += (out.argmax(1) == y).sum().item()
        self.seen += n

    def result(self, stopped_at: int | None = None, grads: list | None = None) -> dict:
        """train_one_epoch's answer; after a stop, ``partial`` is what continuing needs (see there).
        Under torchrun the sums are those of all ranks (one all-reduce)."""
        self.loss_sum, self.correct, self.seen = distributed.sum_all([self.loss_sum, self.correct, self.seen])
        self.correct, self.seen = int(self.correct), int(self.seen)
        partial = None if stopped_at is None else {"loss_sum": self.loss_sum, "correct": self.correct,
                                                   "seen": self.seen, "grads": grads, "rng": capture_rng_state()}
        return {"loss": self.loss_sum / max(self.seen, 1), "accuracy": self.correct / max(self.seen, 1),
                "images": self.seen, "seconds": time.perf_counter() - self.t0, "stopped_at": stopped_at,
                "partial": partial}


class _BatchReports:
    """BatchEnded at most every REPORT_EVERY_S seconds and for the epoch's last batch, with the
    speed since the previous report."""

    def __init__(self, emit: EventSink, epoch: int, batches: int, last: int):
        self.emit, self.epoch, self.batches, self.last = emit, epoch, batches, last
        self.since = time.perf_counter()
        self.images = 0

    def __call__(self, batch: int, step: int, loss: float, lr: float, n: int) -> None:
        self.images += n
        now = time.perf_counter()
        if now - self.since >= REPORT_EVERY_S or batch == self.last:
            self.emit(ev.BatchEnded(epoch=self.epoch, batch=batch, batches=self.batches, step=step, loss=loss,
                                    lr=lr, images_per_sec=self.images / max(now - self.since, 1e-9)))
            self.since, self.images = now, 0


def evaluate(model, loader, loss_fn, device, precision="fp32", class_names=None, sample_ids=None):
    """Loss, accuracy and (when class_names is given) a full metrics report on ``loader``."""
    models.set_train_mode(model, False)
    acc = metrics.Accumulator()
    total_loss, seen = 0.0, 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if _channels_last(model):
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, precision):
                out = model(x)
            out = out.float()
            total_loss += loss_fn(out, y).item() * y.shape[0]
            seen += y.shape[0]
            acc.update(out.cpu(), y.cpu())
    result = {"loss": total_loss / max(seen, 1), "accuracy": acc.accuracy(), "report": None}
    if class_names is not None:   # the final evaluation: the report, and each image's probabilities
        result.update(report=acc.report(class_names, sample_ids=sample_ids), probs=acc.probs(), targets=acc.targets())
    return result


# ---------------------------------------------------------------------------------------------
# Cost before Start: a few real steps timed (core.cost holds the estimate and its arithmetic)
# ---------------------------------------------------------------------------------------------
def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_train_steps(prep, config: RunConfig, max_seconds: float) -> tuple[float, int, torch.nn.Module, object]:
    """(median seconds per step after the warm-up, steps timed, the model copy, its optimiser)."""
    model = _on_device(copy.deepcopy(prep.model), config, prep.device)
    models.set_train_mode(model, True)
    optimizer = build_optimizer(model, config)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    loader = prep.train_loader
    _set_loader_epoch(loader, config.seed, 0, 0)
    times, t_begin = [], time.perf_counter()
    batch_iter = iter(loader)
    for k in range(min(cost.MAX_STEPS, _batches_used(loader, config.data.batch_size) * 4)):
        t0 = time.perf_counter()
        try:
            x, y = next(batch_iter)
        except StopIteration:   # a small set: go round again
            batch_iter = iter(loader)
            x, y = next(batch_iter)
        out, y, loss = _forward(model, x, y, loss_fn, prep.device, config.precision)
        loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        (out.argmax(1) == y).sum().item()   # the epoch's running accuracy, as train_one_epoch keeps it
        _sync_device(prep.device)
        times.append(time.perf_counter() - t0)
        spent, timed = time.perf_counter() - t_begin, k + 1 - cost.WARMUP_STEPS
        if spent >= max_seconds or (timed > 0 and (spent >= max_seconds * 0.8 or
                                                   (timed >= cost.ENOUGH_STEPS and spent >= cost.ENOUGH_S))):
            break   # a model whose steps take longer than the budget is timed on what fits (even one step)
    timed = times[cost.WARMUP_STEPS:] or times
    # the median: a step slowed by another process (a shared server, a busy laptop) does not move it
    return statistics.median(timed), len(timed), model, optimizer


def _eval_batch_seconds(prep, config: RunConfig, model, max_seconds: float) -> float:
    """Seconds per evaluation batch: the mean of up to 3 after one warm-up batch (fewer when they
    take longer than ``max_seconds``)."""
    loader = prep.val_loader or prep.test_loader or prep.train_loader
    models.set_train_mode(model, False)
    times = []
    with torch.inference_mode():
        for k, (x, _) in enumerate(loader):
            t0 = time.perf_counter()
            x = x.to(prep.device)
            if _channels_last(model):
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(prep.device, config.precision):
                model(x).float().cpu()
            times.append(time.perf_counter() - t0)
            if k >= 3 or sum(times) >= max_seconds:
                break
    timed = times[1:] or times
    return sum(timed) / len(timed)


def _checkpoint_seconds(model, optimizer) -> float:
    """One last.pth write (serialised to memory), plus half of one for best.pth."""
    t0 = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, io.BytesIO())
    return 1.5 * (time.perf_counter() - t0)


def measure_cost(prep: Prepared, config: RunConfig | None = None,
                 max_seconds: float = cost.MAX_MEASURE_S) -> cost.CostEstimate:
    """Time a few real steps of the run ``prep`` (a Prepared) describes; see the module doc."""
    config = config or prep.config
    t0 = time.perf_counter()
    rng = torch.random.get_rng_state()
    try:
        step_s, steps, model, optimizer = _timed_train_steps(prep, config, max_seconds)
        eval_s = _eval_batch_seconds(prep, config, model, max_seconds / 3)
        ckpt_s = _checkpoint_seconds(model, optimizer)
    finally:
        torch.random.set_rng_state(rng)   # the run's own draws stay what they would have been
    batches = _batches_used(prep.train_loader, config.data.batch_size)
    return cost.CostEstimate(step_s, eval_s, batches, len(prep.val_loader) if prep.val_loader else 0,
                        len(prep.test_loader) if prep.test_loader else 0, ckpt_s, steps,
                        time.perf_counter() - t0)


def estimate_cost(config: RunConfig, data_dir, max_seconds: float = cost.MAX_MEASURE_S) -> tuple[cost.CostEstimate, float]:
    """(estimate, seconds the data preparation took) for ``config`` before it is started: the
    dashboard's "cost before Start". Prepares the data and model as the run will."""
    t0 = time.perf_counter()
    prep = prepare(config, data_dir=data_dir)
    prepared_s = time.perf_counter() - t0
    return measure_cost(prep, config, max_seconds), prepared_s


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    run_id: str
    run_dir: Path
    status: str
    message: str
    best_epoch: int | None
    best_metric: float | None
    epochs_completed: int
    history: list[dict]
    eval_report: Any = None


def _tensorboard_sink(config: RunConfig, data_dir) -> EventSink:
    """config.tensorboard: the run's own TensorBoard log in its folder, whoever started it.
    ConfigError (with the install command) when the tensorboard package is missing."""
    from core import tb
    return tb.TensorBoardLogger(data_dir=data_dir).sink(config)


@contextlib.contextmanager
def _writing(run_dir: Path, doing: str):
    """Turn a failed write in a run folder into a StorageError naming the runs folder, the free
    space and ``doing`` ('saving the checkpoint of epoch 2')."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        raise storage.storage_error(err, run_dir.parent, doing) from err


def _save_checkpoints(run_dir: Path, state: dict, *, best: bool, doing: str) -> None:
    """best.pth (when the epoch is the best) before last.pth: if either write fails, last.pth —
    what Resume continues from, and what the status counts — is still the previous epoch's. (If
    only last.pth fails, best.pth already holds the new epoch; Resume trains that epoch again,
    with the same seeds, and writes both.)"""
    if not distributed.is_main():   # under torchrun rank 0 writes them (every rank holds the same weights)
        return
    with _writing(run_dir, doing):
        if best:
            save_checkpoint(run_dir / BEST_CKPT, state)
        save_checkpoint(run_dir / LAST_CKPT, state)


def _saved_note(epochs_done: int) -> str:
    """What the run's message ends with when a write fails: what Resume would continue from."""
    if epochs_done <= 0:
        return "start the run again: no epoch is saved yet"
    return "Resume: epoch 1 is saved" if epochs_done == 1 else f"Resume: epochs 1–{epochs_done} are saved"


# torch's deterministic-algorithms switch, cudnn's flags and CUBLAS_WORKSPACE_CONFIG are
# process-wide: a run sets them (seed_everything, cudnn.benchmark) and must put back what was there
# before when it ends, or every later run and test in the process inherits them. A caller may run
# fits side by side in threads (the job manager gives each run a process of its own instead), so
# they are saved when the first of them starts and put back when the last one ends.
_switches_lock = threading.Lock()
_switches = {"runs": 0, "saved": None}


@contextlib.contextmanager
def _restoring_global_switches():
    with _switches_lock:
        if _switches["runs"] == 0:
            _switches["saved"] = (torch.are_deterministic_algorithms_enabled(),
                                  torch.is_deterministic_algorithms_warn_only_enabled(),
                                  torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                                  os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        _switches["runs"] += 1
    try:
        yield
    finally:
        with _switches_lock:
            _switches["runs"] -= 1
            if _switches["runs"] == 0:
                deterministic, warn_only, cudnn_deterministic, benchmark, cublas = _switches["saved"]
                torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
                torch.backends.cudnn.deterministic = cudnn_deterministic
                torch.backends.cudnn.benchmark = benchmark
                if cublas is None:
                    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
                else:
                    os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def fit(config: RunConfig, on_event: EventSink | None = None, should_stop: StopFlag | None = None, *,
        runs_dir: str | Path = DEFAULT_RUNS_DIR, data_dir: str | Path = datasets.DEFAULT_DATA_DIR,
        run_id: str | None = None, resume_from: str | Path | None = None, dataset=None) -> FitResult:
    """Train ``config``; report through ``on_event``; stop when ``should_stop()`` turns true.

    resume_from: a checkpoint (``last.pth`` of a run); training continues in that run's folder,
    from where it stopped, up to ``config.epochs`` epochs (see ``resume_scheduler`` for a count
    other than the checkpoint's). Errors never escape: a failed run ends with a
    RunFinished(status='failed') event carrying the reason, and is returned as such. The
    deterministic and cudnn switches are put back as they were when the run ends. A new run with
    ``config.time_budget_s`` sets ``config.epochs`` to the epochs it plans (core.cost).
    """
    with _restoring_global_switches(), distributed.session(cuda=_wants_cuda(config.device)):
        return _fit(config, on_event, should_stop, runs_dir=runs_dir, data_dir=data_dir, run_id=run_id,
                    resume_from=resume_from, dataset=dataset)


def _wants_cuda(device: str) -> bool:
    """Whether a run asking for ``device`` trains on CUDA (torchrun's process group then uses NCCL)."""
    name = str(device or "auto")
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


class _Quiet:
    """The event log of a rank other than 0 under torchrun: it writes and reports nothing."""
    tensorboard = None

    def __call__(self, event: ev.Event) -> None:
        pass


def _fit(config: RunConfig, on_event: EventSink | None, should_stop: StopFlag | None, *, runs_dir, data_dir,
         run_id, resume_from, dataset) -> FitResult:
    should_stop = distributed.agreed_stop(should_stop or (lambda: False))   # every rank stops at the same batch
    run_dir = Path(resume_from).parent if resume_from else Path(runs_dir) / distributed.broadcast(run_id or new_run_id(config))
    run_id = run_dir.name
    emit = _RunLog(run_dir, on_event, config) if distributed.is_main() else _Quiet()
    t_start = time.time()
    state = TrainState()
    prep = None
    try:
        # In here: a missing or damaged checkpoint fails the run with the reason, as fit promises.
        ckpt = load_checkpoint(resume_from) if resume_from else None
        _open_run_folder(run_dir, config, emit, data_dir)
        seed_everything(config.seed + distributed.rank(), config.deterministic)   # per rank: seed + rank
        saved = rundir.read_json(run_dir / rundir.REVISION_FILE) if config.data.revision else None
        prep = prepare(config, data_dir=data_dir, dataset=dataset, saved_revision=saved)
        if prep.revision_record is not None and distributed.is_main():
            with _writing(run_dir, f"writing {rundir.REVISION_FILE}"):
                rundir.write_json(run_dir / rundir.REVISION_FILE, prep.revision_record)
        budget = _plan_budget(config, prep, run_dir, emit, t_start) if config.time_budget_s and ckpt is None else None
        run = _setup(config, prep)
        run.deadline = budget
        notes = _restore(run, state, ckpt, Path(resume_from).name) if ckpt is not None else []
        if ckpt is None:
            _save_initial_weights(run, run_dir)
        _announce(run, state, run_dir, emit, notes)
        _train_epochs(run, state, run_dir, emit, should_stop)
        report = None   # under torchrun: rank 0 evaluates, the others wait for it
        if distributed.is_main():
            report = _final_evaluation(run_dir, prep, run.eval_model, run.core_model, run.eval_loss_fn, prep.device,
                                       config, emit)
        distributed.barrier()
        status = ev.FINISHED
        message = f"finished {state.epochs_done} epoch(s)"
        if state.out_of_time:
            message += f" of the {config.epochs} planned: the time budget was reached"
        if report is not None:
            message += f"; test accuracy {report.accuracy:.1%}"
    except Exception as err:   # every way a run ends early, bugs included: ended with its reason (fit's promise)
        status, message = _how_it_ended(err, config, prep, state, run_dir, run_id)
        report = None
    return _finish(run_dir, run_id, emit, status, message, state.best_epoch, state.best_metric,
                   state.epochs_done, state.history, t_start, report)


# ---------------------------------------------------------------------------------------------
# The run's parts and state, and the epoch loop
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where a run stands: what it carries from epoch to epoch, and what last.pth keeps of it besides
    the weights, optimiser and scheduler (``_Run.checkpoint``)."""
    epochs_done: int = 0              # complete epochs, all in last.pth
    history: list[dict] = field(default_factory=list)   # one row per epoch (EpochEnded's numbers)
    best_epoch: int | None = None
    best_metric: float | None = None
    skip_batches: int = 0             # batches of the next epoch trained before a stop (resume mid-epoch)
    partial: dict | None = None       # that epoch's record from train_one_epoch (sums, cut accumulation group)
    rng: dict | None = None           # the RNG state to continue that epoch with
    epoch_times: list[float] = field(default_factory=list)   # this session's, for the ETA
    out_of_time: bool = False         # the time budget ended the run before its planned epochs

    @property
    def bad_epochs(self) -> int:
        """Epochs without improvement: those since the best one (or since the start). Derived from
        what the checkpoint holds, so early stopping counts the same across a resume."""
        return self.epochs_done - (self.best_epoch or 0)


@dataclass
class _Run:
    """What a run trains with, built once from its Prepared (``_setup``)."""
    config: RunConfig
    prep: Prepared
    model: nn.Module                  # what runs the batches: the model, or (Distributed)DataParallel around it
    core_model: nn.Module             # the model itself: what checkpoints hold
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_batch: bool                   # the scheduler steps per optimiser step (OneCycle), not per epoch
    scaler: Any                       # fp16's GradScaler, else None
    loss_fn: nn.Module
    eval_loss_fn: nn.Module
    warmup_steps: int
    recorder: gradstats.DistributionRecorder | None = None   # config.record_distributions
    deadline: float | None = None     # a time budget's end (time.time()), less the final evaluation

    @property
    def batches(self) -> int:
        return len(self.prep.train_loader)

    @property
    def eval_model(self) -> nn.Module:
        """What evaluates: under torchrun the plain model (rank 0 evaluates alone, and
        DistributedDataParallel's forward would wait for the other ranks), else the training one."""
        return self.core_model if distributed.active() else self.model

    def checkpoint(self, state: TrainState, epoch_count: int, batches_done: int = 0,
                   partial: dict | None = None) -> dict:
        """last.pth's content. partial: train_one_epoch's record of a stopped epoch (RNG state from
        before the next batch, running sums, unfinished accumulation gradients), kept so resuming is exact."""
        rest = {k: v for k, v in partial.items() if k != "rng"} if partial else None
        prep, config = self.prep, self.config
        return {"model": self.core_model.state_dict(), "model_name": config.model.name,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": epoch_count, "batches_done": batches_done, "partial_epoch": rest,
                "config": config.to_dict(), "classes": prep.classes, "transform": prep.transform_state,
                "input_shape": [prep.in_channels, *prep.input_size],
                "rng": partial["rng"] if partial else capture_rng_state(),
                "history": state.history, "best_epoch": state.best_epoch, "best_metric": state.best_metric}


def _open_run_folder(run_dir: Path, config: RunConfig, emit: _RunLog, data_dir) -> None:
    """The run folder with config.json, the TensorBoard log when asked, and status "preparing".
    Under torchrun only rank 0 writes it; the other ranks write nothing anywhere."""
    if not distributed.is_main():
        return
    with _writing(run_dir, "creating the run folder"):
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
    if config.tensorboard:   # before the first event: the log opens at RunStarted
        emit.tensorboard = _tensorboard_sink(config, data_dir)
    emit(ev.StatusChanged(status=ev.RUNNING, message="preparing data and model"))
    with _writing(run_dir, f"writing {STATUS_FILE}"):
        write_status(run_dir, ev.RUNNING, "preparing")


def _setup(config: RunConfig, prep: Prepared) -> _Run:
    """The model on its device (channels_last; under torchrun DistributedDataParallel, which starts
    every rank from rank 0's weights; else DataParallel as configured), the optimiser, scheduler,
    fp16 scaler and losses."""
    device, model = prep.device, prep.model
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
    model = _on_device(model, config, device)
    if distributed.active():   # one process per device (torchrun); DataParallel is not used with it
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif config.multi_gpu and device.type == "cuda" and torch.cuda.device_count() > 1:
        # the documented fallback of one process (the dashboard and torchrun use DDP instead)
        model = nn.DataParallel(model)
        prep.notes.append(f"DataParallel over {torch.cuda.device_count()} GPUs (one process; torchrun with "
                          "DistributedDataParallel is faster: docs/distributed.md)")
    core_model = model.module if isinstance(model, (nn.DataParallel, DistributedDataParallel)) else model
    if config.compile:   # checkpoints keep core_model's own state_dict (no "_orig_mod." prefixes)
        model = torch.compile(model)
        prep.notes.append("torch.compile: the first steps compile the model (10–70 s on a CPU); it pays "
                          "for long runs of bigger models (ResNet-18 +21 %), not for the tutorial Net")
    optimizer = build_optimizer(core_model, config)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    batches = len(prep.train_loader)
    scheduler, per_batch = build_scheduler(optimizer, config, batches)
    scaler = torch.amp.GradScaler(device.type) if choices.PRECISIONS.get(config.precision).grad_scaler else None
    weights = class_weights_for(config, [prep.dataset.targets[i] for i in prep.split.train], len(prep.classes))
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                  label_smoothing=config.optim.label_smoothing)
    warmup_steps = 0 if config.optim.scheduler == "onecycle" else config.optim.warmup_epochs * batches
    recorder = (gradstats.DistributionRecorder(core_model, scaler)
                if config.record_distributions and distributed.is_main() else None)
    return _Run(config, prep, model, core_model, optimizer, scheduler, per_batch, scaler, loss_fn,
                nn.CrossEntropyLoss(), warmup_steps, recorder)


def _restore(run: _Run, state: TrainState, ckpt: dict, name: str) -> list[str]:
    """Continue from a checkpoint: weights, optimiser, scheduler, scaler and the state; returns the
    note RunStarted carries."""
    run.core_model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    state.epochs_done = ckpt["epoch"]
    state.skip_batches = ckpt.get("batches_done", 0)
    state.partial, state.rng = ckpt.get("partial_epoch"), ckpt.get("rng")
    run.scheduler = resume_scheduler(run.scheduler, run.optimizer, run.config, ckpt.get("scheduler"),
                                     saved_kind=ckpt["config"]["optim"]["scheduler"],
                                     saved_epochs=ckpt["config"]["epochs"], epochs_done=state.epochs_done,
                                     batches_done=state.skip_batches, steps_per_epoch=run.batches)
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    state.history = list(ckpt.get("history", []))
    state.best_epoch, state.best_metric = ckpt.get("best_epoch"), ckpt.get("best_metric")
    batches = state.skip_batches
    return [f"resumed from {name}: {state.epochs_done} epoch(s) done"
            + (f" and {batches} batch(es) of epoch {state.epochs_done + 1}" if batches else "")]


def _announce(run: _Run, state: TrainState, run_dir: Path, emit: _RunLog, notes: list[str]) -> None:
    """RunStarted (data, model size, where training starts) and status "training"."""
    prep, config = run.prep, run.config
    params = list(run.core_model.parameters())
    emit(ev.RunStarted(run_id=run_dir.name, run_dir=str(run_dir), device=str(prep.device), classes=prep.classes,
                       split_sizes={"train": len(prep.split.train), "val": len(prep.split.val),
                                    "test": len(prep.split.test)},
                       input_shape=[prep.in_channels, *prep.input_size],
                       params_total=sum(p.numel() for p in params),
                       params_trainable=sum(p.numel() for p in params if p.requires_grad),
                       batches_per_epoch=run.batches, start_epoch=state.epochs_done, epochs=config.epochs,
                       notes=prep.notes + notes, start_batch=state.skip_batches))
    if distributed.is_main():
        with _writing(run_dir, f"writing {STATUS_FILE}"):
            write_status(run_dir, ev.RUNNING, "training", pid=os.getpid())


def _train_epochs(run: _Run, state: TrainState, run_dir: Path, emit: _RunLog, should_stop: StopFlag) -> None:
    """The epoch loop, as torchvision's classification reference reads: train one epoch, evaluate,
    then the end-of-epoch step (scheduler, best, checkpoint, early stopping). A stop request
    between batches saves the unfinished epoch and raises _StopRequested."""
    config, prep = run.config, run.prep
    for epoch in range(state.epochs_done + 1, config.epochs + 1):
        if should_stop():
            raise _StopRequested
        t_epoch = time.time()
        _start_epoch(run, state, epoch)
        stats = train_one_epoch(run.model, prep.train_loader, run.optimizer, run.loss_fn, prep.device, epoch=epoch,
                                config=config, scaler=run.scaler, scheduler=run.scheduler,
                                per_batch_scheduler=run.per_batch, warmup_steps=run.warmup_steps,
                                step_offset=(epoch - 1) * run.batches + state.skip_batches,
                                skip_batches=state.skip_batches,
                                resume_partial=state.partial if state.skip_batches else None,
                                emit=emit, should_stop=should_stop,
                                before_last_step=run.recorder.grads if run.recorder is not None else None)
        if stats["stopped_at"] is not None:
            _save_checkpoints(run_dir, run.checkpoint(state, epoch - 1, stats["stopped_at"], stats["partial"]),
                              best=False, doing=f"saving the checkpoint of the stop in epoch {epoch}")
            raise _StopRequested
        state.skip_batches, state.partial, state.rng = 0, None, None
        if run.recorder is not None:
            _record_distributions(run, run_dir, epoch)
        lr_used = run.optimizer.param_groups[0]["lr"]   # the epoch's rate, before the scheduler moves it
        val = None
        if prep.val_loader is not None:   # under torchrun: on rank 0, its loss and accuracy sent to all
            val = distributed.on_main(lambda: evaluate(run.eval_model, prep.val_loader, run.eval_loss_fn,
                                                       prep.device, config.precision))
        if _end_epoch(run, state, epoch, stats, val, lr_used, run_dir, emit):
            break
        if distributed.any_rank(_out_of_time(run, epoch, t_epoch, emit)):
            state.out_of_time = True
            break


def _out_of_time(run: _Run, epoch: int, t_epoch: float, emit: _RunLog) -> bool:
    """True when the run has a time budget and another epoch as long as this one would end past it
    (the machine turned slower than measured): the run ends here, on time to within one epoch."""
    if run.deadline is None or epoch >= run.config.epochs:
        return False
    if run.config.compile and epoch == 1:   # compiling made it long; the plan timed the compiled-free step
        return False
    if time.time() + (time.time() - t_epoch) <= run.deadline:
        return False
    emit(ev.StatusChanged(status=ev.RUNNING, message=f"time budget reached: stopping after epoch {epoch} of the "
                          f"{run.config.epochs} planned (this machine ran slower than measured)"))
    return True


def _plan_budget(config: RunConfig, prep: Prepared, run_dir: Path, emit: _RunLog, t_start: float) -> float:
    """config.time_budget_s: measure this machine's speed on the run (core.cost), set config.epochs
    to what fits (config.json says so, and the schedule is built for it), note the plan; return the
    deadline for the epochs (the budget's end less the final evaluation)."""
    emit(ev.StatusChanged(status=ev.RUNNING, message="timing a few steps to plan the epochs for the time budget"))
    est = measure_cost(prep, config)
    budget = config.time_budget_s
    config.epochs = distributed.broadcast(cost.plan_epochs(est, budget, time.time() - t_start))   # rank 0's plan
    notes = [f"time budget {cost.duration(budget)}: {config.epochs} epoch(s) planned, {est.describe(config.epochs)}"]
    if config.epochs == cost.MAX_PLANNED_EPOCHS:
        notes.append(f"the plan stops at {cost.MAX_PLANNED_EPOCHS} epochs, so the run ends before its budget")
    if config.optim.warmup_epochs >= config.epochs:
        notes.append(f"warm-up of {config.optim.warmup_epochs} epoch(s) left out: the plan has {config.epochs}")
        config.optim.warmup_epochs = 0
    if distributed.is_main():   # what was planned, as an ordinary run: --config replays exactly these epochs
        with _writing(run_dir, f"writing {CONFIG_FILE}"):
            dataclasses.replace(config, time_budget_s=None).save(run_dir / CONFIG_FILE)
    prep.notes.extend(notes)
    return t_start + budget - est.test_seconds


def _record_distributions(run: _Run, run_dir: Path, epoch: int) -> None:
    """The epoch's weight quantiles and gradient norms (config.record_distributions) into the run
    folder. A diagnostic: a failed write is logged, and the run goes on."""
    try:
        rundir.append_distributions(run_dir, run.recorder.record(epoch))
    except OSError as err:
        log.warning("distributions of epoch %d of run %s not written: %s", epoch, run_dir.name, err)


def _save_initial_weights(run: _Run, run_dir: Path) -> None:
    """The first conv layer's weights before any training step (``initial.pth``), so its kernels
    can be shown beside the trained ones (core.internals.conv_kernels); a few KB."""
    if not distributed.is_main():
        return
    name = models.first_conv_name(run.config.model.name)
    weight = run.core_model.get_submodule(name).weight.detach().cpu().clone()
    with _writing(run_dir, f"saving the initial weights ({rundir.INITIAL_WEIGHTS})"):
        save_checkpoint(run_dir / rundir.INITIAL_WEIGHTS, {"layer": name, "weight": weight,
                                                           "model_name": run.config.model.name})


def _start_epoch(run: _Run, state: TrainState, epoch: int) -> None:
    """The epoch's order and augmentation depend only on (seed, epoch); a resume in the middle of
    the epoch continues with the RNG as it was before the first batch not yet trained."""
    seed = _epoch_seed(run.config.seed, epoch)
    torch.manual_seed(seed)
    _set_loader_epoch(run.prep.train_loader, seed, epoch, state.skip_batches)
    if state.skip_batches and state.rng:
        restore_rng_state(state.rng)


def _set_loader_epoch(loader, seed: int, epoch: int, skip_batches: int) -> None:
    """Make the epoch's order (and, for the tensor loader, augmentation) depend on (seed, epoch)."""
    if isinstance(loader, tensorloader.TensorLoader):
        loader.set_epoch(epoch, skip_batches)
    else:
        loaders.set_epoch(loader, seed, skip_batches)


def _end_epoch(run: _Run, state: TrainState, epoch: int, stats: dict, val: dict | None, lr_used: float,
               run_dir: Path, emit: _RunLog) -> bool:
    """Step the scheduler, keep the best, save the checkpoints, report EpochEnded; True when early
    stopping ends the run here."""
    config = run.config
    monitor_max = config.monitor == "val_accuracy"
    metric = None if val is None else (val["accuracy"] if monitor_max else val["loss"])
    _step_scheduler(run, epoch, metric)
    improved = metric is not None and (state.best_metric is None or
                                       (metric > state.best_metric if monitor_max else metric < state.best_metric))
    saved_best = state.best_epoch, state.best_metric   # what the checkpoints on disk say, until this epoch's are
    if improved:
        state.best_epoch, state.best_metric = epoch, metric
    state.epoch_times.append(stats["seconds"])
    row = {"epoch": epoch, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
           "val_loss": val["loss"] if val else None, "val_accuracy": val["accuracy"] if val else None,
           "lr": lr_used, "seconds": stats["seconds"], "images_per_sec": stats["images"] / max(stats["seconds"], 1e-9)}
    state.history.append(row)
    try:
        _save_checkpoints(run_dir, run.checkpoint(state, epoch), doing=f"saving the checkpoint of epoch {epoch}",
                          best=improved or (val is None and epoch == config.epochs))
    except StorageError:   # the run ends with what its checkpoints hold, not this epoch
        state.history.pop()
        state.best_epoch, state.best_metric = saved_best
        raise
    state.epochs_done = epoch   # only now: the status written at the end counts the epochs last.pth holds
    emit(ev.EpochEnded(epoch=epoch, epochs=config.epochs, train_loss=row["train_loss"],
                       train_accuracy=row["train_accuracy"], val_loss=row["val_loss"],
                       val_accuracy=row["val_accuracy"], lr=lr_used, seconds=row["seconds"],
                       eta_seconds=float(np.mean(state.epoch_times)) * (config.epochs - epoch),
                       images_per_sec=row["images_per_sec"], is_best=improved))
    patience = config.early_stopping_patience
    if patience and val is not None and state.bad_epochs >= patience:
        emit(ev.StatusChanged(status=ev.RUNNING, message=f"early stopping: no improvement in "
                              f"{config.monitor} for {patience} epoch(s)"))
        return True
    return False


def _step_scheduler(run: _Run, epoch: int, metric: float | None) -> None:
    """The per-epoch scheduler step: plateau on the monitored metric (when there is a val split),
    the others once the warm-up is over. OneCycle steps per batch, in train_one_epoch."""
    if run.scheduler is None or run.per_batch:
        return
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if metric is not None:
            run.scheduler.step(metric)
    elif epoch > run.config.optim.warmup_epochs:
        run.scheduler.step()


def _how_it_ended(err: Exception, config: RunConfig, prep: Prepared | None, state: TrainState, run_dir: Path,
                  run_id: str) -> tuple[str, str]:
    """(status, message) of a run that ended early: a stop request, a full disk (and what Resume
    has), a user error, out of memory (with the batch that fits), or a bug (its trace kept in the
    run's error.log and the server log). Called inside the ``except``, so the trace is the error's."""
    if isinstance(err, _StopRequested):
        return ev.STOPPED, (f"stopped by request after {state.epochs_done} complete epoch(s); "
                            "resume from last.pth")
    if isinstance(err, StorageError):   # disk full, read-only, failing: say so, and what Resume has
        return ev.FAILED, err.sentence(then=_saved_note(state.epochs_done))
    if isinstance(err, LabError):
        return ev.FAILED, str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        shape = [prep.in_channels, *prep.input_size] if prep is not None else None
        return ev.FAILED, _oom_message(config, shape, len(prep.classes) if prep is not None else None,
                                       prep.device if prep is not None else None)
    log.exception("run %s failed", run_id)   # a bug or an unexpected library error: in the server log,
    with contextlib.suppress(OSError):       # where it cannot be lost, and in the run folder (rank 0's)
        if distributed.is_main():
            (run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
    return ev.FAILED, (f"internal error: {type(err).__name__}: {without_paths(str(err))} (details in the run's "
                       "error.log and the server's console)")


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\":,()]+/)*[^\s'\":,()]*")


def without_paths(text: str, limit: int = 300) -> str:
    """An error's text as a page may show it (other users see failed runs): every absolute path
    replaced by its last part, at most ``limit`` characters."""
    text = _ABSOLUTE_PATH.sub(lambda m: Path(m.group()).name or "/", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _final_evaluation(run_dir, prep, model, core_model, loss_fn, device, config, emit):
    loader, split_name, indices = prep.test_loader, "test", prep.split.test
    if loader is None:
        loader, split_name, indices = prep.val_loader, "val", prep.split.val
    if loader is None:
        return None
    best = run_dir / BEST_CKPT
    if best.exists():  # evaluate the weights the run keeps as best
        core_model.load_state_dict(load_checkpoint(best, map_location=device)["model"])
    ids = [str(i) for i in indices]
    result = evaluate(model, loader, loss_fn, device, config.precision, class_names=prep.classes, sample_ids=ids)
    report = result["report"]
    data = report.to_dict()
    data.update({"split": split_name, "loss": result["loss"],
                 "files": {str(i): prep.dataset.describe(i) for i in indices}})
    probs, targets = result["probs"], result["targets"]
    predicted = probs.argmax(axis=1)
    rows = np.arange(len(targets))
    with _writing(run_dir, f"saving the test results ({EVAL_FILE}, {rundir.PREDICTIONS_FILE})"):
        rundir.write_predictions(run_dir, split_name, indices, targets, predicted, probs[rows, predicted],
                                 probs[rows, targets])
        write_eval(run_dir, data)
    emit(ev.Evaluated(split=split_name, accuracy=report.accuracy, top5_accuracy=report.topk.get(5),
                      macro_f1=report.macro_f1, report_path=str(run_dir / EVAL_FILE),
                      num_samples=report.num_samples))
    return report


def _finish(run_dir, run_id, emit, status, message, best_epoch, best_metric, epochs_done, history,
            t_start, report=None) -> FitResult:
    seconds = time.time() - t_start
    try:
        if distributed.is_main():
            write_status(run_dir, status, message, final=True, seconds=seconds, epochs_completed=epochs_done)
    except OSError as err:   # the caller still hears how the run ended (RunFinished below)
        log.warning("status of run %s not written (%s): %s", run_id, status, err)
    emit(ev.RunFinished(status=status, message=message, best_epoch=best_epoch, best_metric=best_metric,
                        seconds=seconds))
    return FitResult(run_id, run_dir, status, message, best_epoch, best_metric, epochs_done, history, report)


def _oom_message(config: RunConfig, input_shape: Sequence[int] | None, num_classes: int | None,
                 device: torch.device | None = None) -> str:
    """Out of memory: on a GPU, say which batch size the memory calculator says would fit.

    The calculator's figure is for the GPU's memory, so without a CUDA device (an out-of-memory
    error raised elsewhere, or a test) there is no figure, only the advice to lower the batch size.
    """
    bs = config.data.batch_size
    if device is None or device.type != "cuda":
        where = f" on {device}" if device is not None else ""
        return (f"Out of memory at batch size {bs}{where}. Lower the batch size (or use gradient "
                "accumulation to keep the effective batch).")
    msg = f"Out of GPU memory at batch size {bs}."
    if input_shape is not None and num_classes:
        try:
            torch.cuda.empty_cache()
            index = device.index if device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            fit_bs = resources.largest_fitting_batch(config, num_classes, input_shape, total * 0.9)
            msg += f" The memory calculator says batch size {fit_bs} fits in 90 % of this GPU's memory."
        except (LabError, RuntimeError) as err:   # the calculator cannot size it, or CUDA will not say
            log.info("no batch suggestion for the out-of-memory message: %s", err)
        except Exception:   # a bug: in the log with its trace; the out-of-memory itself is the message
            log.exception("no batch suggestion for the out-of-memory message")
    return msg + " Lower the batch size, or use bf16/fp16 mixed precision or gradient accumulation."
