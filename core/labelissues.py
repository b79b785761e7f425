"""Likely label errors: out-of-sample predicted probabilities by K-fold cross-validation of a quick
model, fed to confident learning (the ``cleanlab`` package: Northcutt et al. 2021, from its
authors; nothing of it is re-implemented here).

    issues = find_label_issues(ds, split.train + split.val)      # K = 5 folds, method "auto"
    issues.ranking.head(20)                                       # most suspicious first
    issues.to_csv("suspects.csv")

Every examined image gets its probabilities from a model that never saw it: the images are cut
into K stratified folds (``sklearn.model_selection.StratifiedKFold``, seeded) and the model of
fold k is trained on the other K − 1 folds and predicts fold k. Two quick models:

* ``"features"`` (the fast path, when a zoo model's ImageNet weights file is already on disk; never
  downloaded): a frozen pretrained network computes each image's features once, at
  ``FEATURE_SIZE`` px, and a multinomial logistic regression (scikit-learn) is fitted per fold.
* ``"cnn"`` (the default without weights): a small CNN (``QuickNet``) trained from scratch per fold
  on the images held in memory as one uint8 tensor (``core.tensorloader``: batched crop and flip),
  Nesterov SGD with a one-cycle schedule and label smoothing; bf16 mixed precision where the CPU
  computes bf16 natively; horizontal-flip averaging at prediction; on the CPU (deterministic, and
  the GPU stays with training jobs). ``max_seconds`` plans the epochs from a measured speed.

cleanlab then flags the issues (``cleanlab.filter.find_label_issues``, ``filter_by=FILTER_BY``) and
scores every image (``cleanlab.rank.get_label_quality_scores``, ``QUALITY_METHOD``; low = suspicious).
A seed gives the same folds, models and ranking on the same machine and thread count.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from core.errors import ConfigError, DataError, MissingFileError

METHODS = ("auto", "features", "cnn")
DEFAULT_FOLDS = 5
# cleanlab's rule for which images to flag: the number of issues confident learning estimates
# (cleanlab.count.num_label_issues), taken from the bottom of the self-confidence ranking, so the
# flagged images are exactly the top of the ranking. On the 10 %-flipped mini set it gave the best
# precision at the same recall of cleanlab's rules (0.41 / 0.87 vs prune_by_noise_rate 0.32 / 0.85,
# both 0.36 / 0.84).
FILTER_BY = "low_self_confidence"
# ... but a weak quick model (59 % out of sample on that set) makes cleanlab's count about twice the
# true one: every confident mistake of the model on a correct label counts as an issue. The lab
# flags, of cleanlab's issues, those whose given label the model rates at under half of chance
# (1 / (2 K) for K classes; 0.05 for ten). On the same benchmark (500 flips of 5,000): cleanlab alone
# 1,077 flagged, precision 0.41, recall 0.88; with the cut 506, 0.68 / 0.68. The cut was chosen
# after seeing that benchmark (one noise level, one dataset): cleanlab's own flag stays in the
# ranking's "cleanlab" column, and the ranking itself is cleanlab's.
CHANCE_FRACTION = 0.5
QUALITY_METHOD = "self_confidence"    # cleanlab's default score: the given label's out-of-sample probability
# Zoo models whose ImageNet weights serve the features path, in order of preference (the first on disk).
FEATURE_MODELS = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v3_large",
                  "mobilenet_v2", "densenet121", "convnext_tiny")
FEATURE_SIZE = 96                     # px: the frozen network's input (32-px images upscaled)
FEATURE_C = 0.5                       # inverse L2 strength of the linear head (standardised features)
CNN_MAX_SIZE = 32                     # px: the CNN sees images at most this size (thumbnails)
LOW_ACCURACY = 0.5                    # below this out-of-sample accuracy the ranking is a rough guide

Progress = Callable[[float, str], None]
COLUMNS = ["index", "file", "split", "given", "suggested", "given_prob", "suggested_prob", "quality",
           "flagged", "cleanlab", "fold"]


@dataclass(frozen=True)
class Recipe:
    """The small CNN's training recipe (measured on the CIFAR-10 mini set: see the benchmark)."""
    epochs: int = 12
    batch_size: int = 64              # many small steps: 256 reached 45 %, 64 reached 64 % in 8 epochs
    lr: float = 0.1                   # peak of the one-cycle schedule
    momentum: float = 0.9             # Nesterov
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    padding: int = 4                  # random crop from a zero-padded copy (at 32 px)
    flip_p: float = 0.5
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depth: int = 1                    # convolutions per stage after the first layer
    min_batch: int = 16               # small sets: batch = training images / 16, at least this
    min_steps: int = 400              # small sets: more epochs, so every fold gets this many steps
    max_epochs: int = 60              # ... up to this many

    def for_images(self, n: int, epochs: int | None = None) -> "Recipe":
        """The recipe for ``n`` training images per fold: a smaller batch and more epochs for a small
        set (a few hundred images would otherwise get a dozen steps); ``epochs`` fixes the epochs."""
        batch = max(1, min(self.batch_size, max(self.min_batch, n // 16)))
        steps = math.ceil(n / batch)
        if epochs is None:
            epochs = min(self.max_epochs, max(self.epochs, math.ceil(self.min_steps / steps)))
        return replace(self, batch_size=batch, epochs=epochs)


DEFAULT_RECIPE = Recipe()


@dataclass
class LabelIssues:
    """The finder's result: one ranking row per examined image, most suspicious first."""
    dataset: str
    method: str
    folds: int
    seconds: float
    oos_accuracy: float
    ranking: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def flagged(self) -> pd.DataFrame:
        """The rows cleanlab flags as likely label errors (most suspicious first)."""
        return self.ranking[self.ranking["flagged"]].reset_index(drop=True)

    def to_csv(self, path) -> None:
        """Write the whole ranking (every examined image) as CSV."""
        self.ranking.to_csv(path, index=False)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "method": self.method, "folds": self.folds, "seconds": self.seconds,
                "oos_accuracy": self.oos_accuracy, "notes": list(self.notes),
                "ranking": self.ranking.to_dict(orient="list")}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelIssues":
        ranking = pd.DataFrame(d.get("ranking") or {c: [] for c in COLUMNS})
        for column in ("flagged", "cleanlab"):
            if column in ranking:
                ranking[column] = ranking[column].astype(bool)
        return cls(dataset=d["dataset"], method=d["method"], folds=int(d["folds"]), seconds=float(d["seconds"]),
                   oos_accuracy=float(d["oos_accuracy"]), ranking=ranking, notes=list(d.get("notes", [])))

    def summary(self) -> str:
        """Two lines in plain words: what was examined, how, and how many look wrong."""
        n, k = len(self.ranking), int(self.ranking["flagged"].sum()) if len(self.ranking) else 0
        return (f"{k} of {n} images look mislabelled ({k / max(n, 1):.1%}) in {self.dataset}.\n"
                f"Method: {self.method}; out-of-sample accuracy {self.oos_accuracy:.1%}; {self.seconds:.0f} s.")


# -------------------------------------------------------------------------------------------------
# Checks and folds

def _check_arguments(ds, indices, folds, method) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices, given labels) after checking the arguments; LabError saying what to change."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be a whole number of at least 2 (5 is usual), got {folds!r}.")
    idx = np.asarray([int(i) for i in indices], dtype=np.int64)
    if len(idx) == 0:
        raise DataError(f"No images to examine in {ds.name}: pick a dataset part that has images.")
    if len(np.unique(idx)) != len(idx):
        raise DataError("The images to examine contain the same index twice; pass each image once.")
    if idx.min() < 0 or idx.max() >= len(ds):
        raise DataError(f"Image index out of range for {ds.name} ({len(ds)} images): "
                        f"{int(idx.min() if idx.min() < 0 else idx.max())}.")
    labels = np.asarray([ds.targets[i] for i in idx], dtype=np.int64)
    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2:
        only = ds.classes[present[0]] if len(present) else "none"
        raise DataError(f"Finding label errors needs images of at least 2 classes; the images examined are all "
                        f"'{only}'. Include the other classes' images.")
    few = [(ds.classes[c], int(n)) for c, n in zip(present, counts) if n < folds]
    if few:
        names = ", ".join(f"'{c}' ({n})" for c, n in few[:5])
        raise DataError(f"{folds}-fold cross-validation needs at least {folds} images of each class; "
                        f"too few in {names}. Add images, use fewer folds (at most {min(n for _, n in few)}, "
                        "at least 2), or leave those classes out.")
    return idx, labels


def fold_plan(labels: Sequence[int], folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each image: stratified by label, shuffled with ``seed``. The model of
    fold k trains on every image whose fold is not k and predicts those whose fold is k."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    out = np.empty(len(labels), dtype=np.int64)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(skf.split(np.zeros(len(labels)), labels)):
        out[held] = k
    return out


def _resolve_method(method: str, weights_dir) -> tuple[str, str | None, str]:
    """("features", zoo model, note) or ("cnn", None, note) for the method asked for."""
    from core.models import pretrained_status

    if method == "cnn":
        return "cnn", None, ""
    statuses = [(name, pretrained_status(name, weights_dir)) for name in FEATURE_MODELS]
    for name, status in statuses:
        if status.available:
            return "features", name, status.message
    if method == "features":
        first = statuses[0][1]
        raise MissingFileError(f"The features method needs a pretrained model's ImageNet weights on disk and "
                               f"none is there: {first.message} Or choose the method 'cnn' (no weights needed).",
                               files=[first.file_name], folder=first.folder)
    return "cnn", None, "No ImageNet weights on disk, so a small CNN is trained from scratch (slower, weaker)."


# -------------------------------------------------------------------------------------------------
# The finder

def find_label_issues(ds, indices, *, folds: int = DEFAULT_FOLDS, method: str = "auto", seed: int = 0,
                      progress: Progress | None = None, max_seconds: float | None = None, weights_dir=None,
                      splits: dict | None = None, epochs: int | None = None) -> LabelIssues:
    """Rank ``indices`` of ``ds`` by how likely their label is wrong (see the module docstring).

    ``method``: "auto" (frozen pretrained features when a weights file is on disk, else "cnn"),
    "features" or "cnn". ``progress(fraction, text)`` is called along the way. ``max_seconds``
    plans the CNN's epochs so the whole call ends in about that time. ``splits``: {index: "train" |
    "val" | "test"} for the split column. ``epochs`` overrides the CNN recipe's epochs (tests).
    """
    import torch

    start = time.perf_counter()
    idx, labels = _check_arguments(ds, indices, folds, method)
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ConfigError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}.")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"epochs must be a whole number of at least 1, got {epochs!r}.")
    report = _Reporter(progress)
    kind, model_name, note = _resolve_method(method, weights_dir)
    present = np.unique(labels)                      # train over the classes present only
    y = np.searchsorted(present, labels)
    fold_of = fold_plan(y, folds, seed)
    notes = [note] if note else []
    with torch.random.fork_rng(devices=[]):          # the caller's random stream is left as it was
        if kind == "features":
            probs, words = _features_probs(ds, idx, y, fold_of, model_name, weights_dir, seed, report, notes)
        else:
            recipe = DEFAULT_RECIPE.for_images(int((fold_of != 0).sum()), epochs)
            probs, words = _cnn_probs(ds, idx, y, fold_of, recipe, seed, report, notes,
                                      deadline=None if max_seconds is None else start + max_seconds)
    report(0.97, "Confident learning (cleanlab)")
    ranking, oos = _rank(ds, idx, y, present, probs, fold_of, splits)
    seconds = time.perf_counter() - start
    notes += _result_notes(ranking, oos, seconds, max_seconds)
    report(1.0, "Done")
    return LabelIssues(dataset=ds.name, method=f"{folds}-fold cross-validation of {words}", folds=folds,
                       seconds=seconds, oos_accuracy=oos, ranking=ranking, notes=notes)


class _Reporter:
    """progress(fraction, text), never called backwards and never failing the finder."""

    def __init__(self, progress: Progress | None):
        self.progress, self.last = progress, 0.0

    def __call__(self, fraction: float, text: str) -> None:
        self.last = max(self.last, min(1.0, float(fraction)))
        if self.progress is not None:
            self.progress(self.last, text)


def _rank(ds, idx, y, present, probs, fold_of, splits) -> tuple[pd.DataFrame, float]:
    """cleanlab's flags and quality scores → the ranking frame (most suspicious first)."""
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    probs = np.clip(probs.astype(np.float64), 1e-7, None)
    probs /= probs.sum(axis=1, keepdims=True)
    flagged = cl_find(y, probs, filter_by=FILTER_BY, n_jobs=1)
    quality = get_label_quality_scores(y, probs, method=QUALITY_METHOD)
    best = probs.argmax(axis=1)
    rows = np.arange(len(y))
    splits = splits or {}
    frame = pd.DataFrame({
        "index": idx, "file": [ds.describe(int(i)) for i in idx],
        "split": [splits.get(int(i), "") for i in idx],
        "given": [ds.classes[present[c]] for c in y], "suggested": [ds.classes[present[c]] for c in best],
        "given_prob": probs[rows, y], "suggested_prob": probs[rows, best], "quality": quality,
        "flagged": np.asarray(flagged, dtype=bool) & (probs[rows, y] < CHANCE_FRACTION / len(present)),
        "cleanlab": np.asarray(flagged, dtype=bool), "fold": fold_of})
    frame = frame.sort_values(["quality", "index"], kind="mergesort").reset_index(drop=True)
    return frame, float((best == y).mean())


def _result_notes(ranking: pd.DataFrame, oos: float, seconds: float, max_seconds) -> list[str]:
    n, k = len(ranking), int(ranking["flagged"].sum())
    c = int(ranking["cleanlab"].sum()) if "cleanlab" in ranking else k
    notes = [f"{k} of {n} images ({k / n:.1%}) flagged as likely label errors: of the {c} that cleanlab "
             f"finds (confident learning, {FILTER_BY}), those whose given label the model rates below half "
             f"of chance; quality is the given label's out-of-sample probability ({QUALITY_METHOD}).",
             f"The quick model agrees with {oos:.1%} of the given labels on images it did not train on."]
    if oos < LOW_ACCURACY:
        notes.append("The quick model is weak on this set, so many correct labels look doubtful: treat the "
                     "ranking as a rough guide (pretrained weights on disk make it better).")
    if max_seconds is not None and seconds > max_seconds * 1.1:
        notes.append(f"It took {seconds:.0f} s, more than the {max_seconds:.0f} s asked for (one epoch per fold "
                     "is the least it trains).")
    return notes


# -------------------------------------------------------------------------------------------------
# The features path: frozen pretrained network + logistic regression per fold

def _features_probs(ds, idx, y, fold_of, model_name, weights_dir, seed, report, notes):
    feats = extract_features(ds, idx, model_name, weights_dir=weights_dir,
                             progress=lambda f, t: report(0.85 * f, t))
    k = int(fold_of.max()) + 1
    probs = np.zeros((len(idx), int(y.max()) + 1))
    for fold in range(k):
        report(0.85 + 0.12 * fold / k, f"Fold {fold + 1} of {k}: linear head")
        train, held = fold_of != fold, fold_of == fold
        probs[held] = _fit_linear(feats[train], y[train], feats[held], probs.shape[1], seed)
    notes.append(f"Features: {model_name} (ImageNet weights, frozen) at {FEATURE_SIZE} px, {feats.shape[1]} "
                 f"per image; a multinomial logistic regression (C = {FEATURE_C}) per fold.")
    return probs, f"frozen {model_name} features + linear head"


def extract_features(ds, idx, model_name: str, weights_dir=None, size: int = FEATURE_SIZE,
                     batch_size: int = 128, progress: Progress | None = None) -> np.ndarray:
    """N×D penultimate features of a zoo model with its ImageNet weights (from disk only), frozen,
    eval mode, ImageNet normalisation, images resized to ``size`` px (RGB)."""
    import torch

    from core.models import create_model, get_model_spec, pretrained_status

    status = pretrained_status(model_name, weights_dir)
    if not status.available:   # create_model would try a download: the finder never does
        raise MissingFileError(status.message, files=[status.file_name], folder=status.folder)
    created = create_model(model_name, num_classes=2, pretrained=True, input_size=size, weights_dir=weights_dir)
    model = created.model.eval()
    head = model.get_submodule(get_model_spec(model_name)._family.head_name(model_name))
    captured: list = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float()))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    out = []
    try:
        with torch.inference_mode():
            for b in range(0, len(idx), batch_size):
                x = torch.from_numpy(_rgb_array(ds, idx[b:b + batch_size], size)).permute(0, 3, 1, 2).float()
                model((x - mean) / std)
                out.append(captured.pop().flatten(1).numpy())
                if progress is not None:
                    progress(min(1.0, (b + batch_size) / len(idx)), f"Features of {min(b + batch_size, len(idx))} "
                             f"of {len(idx)} images")
    finally:
        hook.remove()
    return np.concatenate(out)


def _rgb_array(ds, indices, size) -> np.ndarray:
    arr = ds.to_uint8_array([int(i) for i in indices], size=(size, size))
    return np.repeat(arr, 3, axis=3) if arr.shape[3] == 1 else arr


def _fit_linear(x_train, y_train, x_held, num_classes, seed) -> np.ndarray:
    """Probabilities of ``x_held`` (all ``num_classes`` columns) from a standardised multinomial
    logistic regression fitted on the training folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=FEATURE_C, max_iter=300, random_state=seed))
    clf.fit(x_train, y_train)
    out = np.zeros((len(x_held), num_classes))
    out[:, clf.classes_] = clf.predict_proba(x_held)
    return out


# -------------------------------------------------------------------------------------------------
# The CNN path: a small network trained from scratch per fold, data in memory

def quick_net(in_channels: int, num_classes: int, widths: Sequence[int] = DEFAULT_RECIPE.widths,
              depth: int = DEFAULT_RECIPE.depth):
    """QuickNet: conv-BN-ReLU, then per width a conv → 2×2 max-pool → BN → ReLU stage, global max
    pool and a linear head (the shape of the fast CIFAR-10 nets, made small for a CPU)."""
    from torch import nn

    layers = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
              nn.ReLU(inplace=True)]
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)


def _fast_bf16() -> bool:
    """bf16 autocast only where the CPU computes bf16 natively (AMX or AVX-512 BF16); elsewhere it
    is emulated and slower than fp32."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, name, None)
        try:
            if check is not None and check():
                return True
        except (RuntimeError, AttributeError):
            pass
    return False


@dataclass
class _CnnData:
    images: object            # uint8 tensor N×C×H×W
    mean: list
    std: list
    device: str
    bf16: bool


def _cnn_data(ds, idx, report) -> _CnnData:
    import torch

    sizes = {ds.image_size(int(i)) for i in idx}
    w, h = sizes.pop() if len(sizes) == 1 else (CNN_MAX_SIZE, CNN_MAX_SIZE)
    size = (min(h, CNN_MAX_SIZE), min(w, CNN_MAX_SIZE))
    images = []
    for b in range(0, len(idx), 1000):
        report(0.05 * b / len(idx), f"Loading images ({b} of {len(idx)})")
        images.append(ds.to_uint8_array([int(i) for i in idx[b:b + 1000]], size=size))
    arr = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).contiguous()
    pixels = arr.float().div_(255)
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    # The CPU always: deterministic, and the GPU stays with the training jobs (whose memory check does
    # not know about the finder); a small CNN on 32-px images is CPU-sized work.
    return _CnnData(arr, mean, std, "cpu", _fast_bf16())


def _cnn_probs(ds, idx, y, fold_of, recipe: Recipe, seed, report, notes, deadline=None):
    data = _cnn_data(ds, idx, report)
    k = int(fold_of.max()) + 1
    if deadline is not None:
        recipe = _plan_epochs(data, y, fold_of, recipe, seed, deadline, notes)
    probs = np.zeros((len(idx), int(y.max()) + 1))
    for fold in range(k):
        def fold_report(f, text, fold=fold):
            report(0.05 + 0.92 * (fold + f) / k, f"Fold {fold + 1} of {k}: {text}")
        train, held = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        model = _train_fold(data, train, y[train], probs.shape[1], recipe, seed * 1000 + fold, fold_report)
        probs[held] = _predict(model, data, held)
    size = tuple(data.images.shape[2:])
    notes.append(f"QuickNet (widths {'-'.join(map(str, recipe.widths))}) trained from scratch per fold at "
                 f"{size[0]}×{size[1]} px: {recipe.epochs} epochs, batch {recipe.batch_size}, Nesterov SGD with a "
                 f"one-cycle schedule (peak {recipe.lr}), label smoothing {recipe.label_smoothing}, random crop "
                 f"and flip; {'bf16 mixed precision' if data.bf16 else 'fp32'} on {data.device}.")
    return probs, "a small CNN trained from scratch"


def _train_fold(data: _CnnData, train, labels, num_classes, recipe: Recipe, seed, report, max_steps=None):
    """Train QuickNet on the images ``train`` (positions in data.images); returns it in eval mode.
    ``max_steps`` stops early (the speed probe)."""
    import torch
    from torch import nn

    from core.tensorloader import TensorLoader

    torch.manual_seed(seed)
    model = quick_net(data.images.shape[1], num_classes, recipe.widths, recipe.depth).to(data.device)
    model = model.to(memory_format=torch.channels_last)
    scale = data.images.shape[2] / 32
    loader = TensorLoader(data.images[torch.from_numpy(train)], labels.tolist(), recipe.batch_size, train=True,
                          mean=data.mean, std=data.std, padding=max(1, round(recipe.padding * scale)),
                          flip_p=recipe.flip_p, seed=seed, device=data.device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": rest, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    if recipe.epochs * len(loader) >= 8:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, epochs=recipe.epochs,
                                                    steps_per_epoch=len(loader), pct_start=0.25)
    else:   # a one-cycle of under 8 steps divides by zero (the speed probe of a tiny set): a flat rate
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    model.train()
    steps = 0
    for epoch in range(recipe.epochs):
        loader.set_epoch(epoch)
        for x, t in loader:
            with torch.autocast(data.device, dtype=torch.bfloat16, enabled=data.bf16):
                loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return model.eval()
        report((epoch + 1) / recipe.epochs, f"epoch {epoch + 1} of {recipe.epochs}")
    return model.eval()


def _predict(model, data: _CnnData, held, batch_size: int = 500) -> np.ndarray:
    """Softmax probabilities of the images ``held``, averaged with their mirror images."""
    import torch

    from core.tensorloader import TensorLoader

    loader = TensorLoader(data.images[torch.from_numpy(held)], [0] * len(held), batch_size, train=False,
                          mean=data.mean, std=data.std, device=data.device)
    out = []
    with torch.inference_mode(), torch.autocast(data.device, dtype=torch.bfloat16, enabled=data.bf16):
        for x, _ in loader:
            x = x.contiguous(memory_format=torch.channels_last)
            p = model(x).float().softmax(1) + model(x.flip(3)).float().softmax(1)
            out.append((p / 2).cpu().numpy())
    return np.concatenate(out)


def _plan_epochs(data: _CnnData, y, fold_of, recipe: Recipe, seed, deadline: float, notes) -> Recipe:
    """Epochs per fold that end the finder by ``deadline``, from a measured training speed (a few
    steps of a throw-away model; the folds' own seeds are untouched)."""
    steps, train = 6, np.flatnonzero(fold_of != 0)
    batch = min(recipe.batch_size, len(train))
    _train_fold(data, train, y[train], int(y.max()) + 1, replace(recipe, epochs=1), seed, lambda *_: None,
                max_steps=2)   # warm-up: first calls allocate and pick kernels
    t0 = time.perf_counter()
    _train_fold(data, train, y[train], int(y.max()) + 1, replace(recipe, epochs=1), seed, lambda *_: None,
                max_steps=steps)
    per_image = (time.perf_counter() - t0) / (steps * batch)
    folds = int(fold_of.max()) + 1
    per_epoch_all_folds = per_image * len(train) * folds * 1.05 + per_image * len(y) / 3 / recipe.epochs
    left = deadline - time.perf_counter() - 3.0          # cleanlab and the ranking: a few seconds
    fit = max(1, min(recipe.epochs, math.floor(left / per_epoch_all_folds)))
    notes.append(f"Time limit: measured {1 / per_image:,.0f} training images/s, so {fit} epochs per fold "
                 f"(the recipe's {recipe.epochs} at most) to end in time.")
    return replace(recipe, epochs=fit)


__all__ = ["LabelIssues", "find_label_issues", "fold_plan", "extract_features", "quick_net", "Recipe",
           "DEFAULT_RECIPE", "METHODS", "DEFAULT_FOLDS", "FEATURE_MODELS"]
