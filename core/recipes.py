"""Default recipes: the training settings a run starts from, chosen from the data and the model.

A recipe is a set of ``RunConfig`` field values for one situation — a network trained from scratch
on small images, a pretrained network fine-tuned, a network from scratch on large images, a
transformer — with the reason in words. The dashboard fills them into the Train tab when the data or
the model changes (every one stays a setting the user can change) and the command line uses them
for each setting not given as a flag; a saved configuration is used as it is.

Why these values (measured on 2 CPU cores, figures in README "Fast by default"): the tutorials'
batch 4 (or the lab's former batch 32 with cosine) spends most of its time on per-step overhead and
learns slowly; batch 128 with a one-cycle schedule (a quarter of the steps rising to the peak rate),
Nesterov momentum, label smoothing 0.1 and a ±2 px reflect-padded crop + flip (the default
augmentation of small images, core.transforms) took the tutorial Net to 68.3 % on full CIFAR-10 in
10 epochs and 50 s, against 66.4 % in 111 s before. The number of epochs aims at about 200,000
image presentations for a small set (a few thousand images need several tens of epochs) and at
least 10; a time budget (core.cost) plans the epochs to a deadline instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from core import cpuspeed
from core.config import RunConfig

SMALL_IMAGE = 64            # below this side length: the CIFAR-style recipe (crop + flip, no resizing)
FROM_SCRATCH_IMAGES = 200_000   # image presentations a from-scratch run aims at
FINE_TUNE_IMAGES = 50_000
TRANSFORMERS = ("vit_b_16",)


# Every field a recipe sets (the dashboard updates these settings when it applies one).
FIELDS = ("data.batch_size", "epochs", "optim.optimizer", "optim.lr", "optim.head_lr", "optim.momentum",
          "optim.nesterov", "optim.weight_decay", "optim.scheduler", "optim.onecycle_warmup", "optim.warmup_epochs",
          "optim.label_smoothing", "precision")


@dataclass(frozen=True)
class Recipe:
    situation: str                       # "from scratch, small images (4,400 training images)"
    fields: dict[str, Any]               # dotted RunConfig field → value
    why: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the dashboard and the command line."""
        shown = ", ".join(f"{_LABELS.get(k, k)} {_show(k, v)}" for k, v in self.fields.items()
                          if v is not None and not (k == "optim.warmup_epochs" and v == 0))
        return f"Recipe for {self.situation}: {shown}."


_LABELS = {"data.batch_size": "batch", "epochs": "epochs", "optim.optimizer": "optimizer", "optim.lr": "peak rate",
           "optim.head_lr": "head rate", "optim.momentum": "momentum", "optim.nesterov": "Nesterov",
           "optim.weight_decay": "weight decay", "optim.scheduler": "schedule", "optim.onecycle_warmup": "rising over",
           "optim.warmup_epochs": "warm-up epochs", "optim.label_smoothing": "label smoothing",
           "precision": "precision"}


def _show(key: str, value: Any) -> str:
    if key == "optim.onecycle_warmup":
        return f"{value:.0%} of the steps"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): there bf16 autocast about
    doubles the matrix throughput (410 against 190 GFLOP/s on this machine kind); elsewhere it is
    emulated and slower than fp32."""
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _precision(model: str, device_type: str, tiny_maps: bool = False) -> str:
    import torch
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # On a CPU with native bf16, where it measured faster for the model (core.cpuspeed: the tutorial
    # Net 10.1 s against 12.7 s for 40 sample epochs, 55 % against 56 % test accuracy; ResNet-18 2.3×;
    # the depthwise families slower).
    if device_type == "cpu" and cpu_has_bf16() and cpuspeed.bf16_pays(model, tiny_maps):
        return "bf16"
    return "fp32"


def _batch(n_train: int, device_type: str = "cpu") -> int:
    """128 (512 on a CUDA GPU, which 128 images a step leave mostly idle), or less for a small set:
    at least ~10 steps an epoch (20 on a GPU), and a power of two."""
    b, steps = (512, 20) if device_type == "cuda" else (128, 10)
    while b > 8 and b * steps > n_train:
        b //= 2
    return b


def recommend(model: str, *, pretrained: bool, n_train: int, image_side: int, device_type: str = "cpu",
              small_stem: bool = True) -> Recipe:
    """The recipe for training ``model`` (pretrained or not) on ``n_train`` images fed at
    ``image_side`` pixels, on a device of ``device_type`` ('cpu', 'cuda', 'mps'); ``small_stem``: the
    model's small-input stem is on (model.small_input_stem)."""
    n = max(1, n_train)
    batch = _batch(n, device_type)
    common = {"data.batch_size": batch, "optim.scheduler": "onecycle", "optim.onecycle_warmup": 0.25,
              "optim.warmup_epochs": 0, "optim.label_smoothing": 0.1, "precision": _precision(model, device_type, tiny_maps=not small_stem and image_side < SMALL_IMAGE)}
    if model in TRANSFORMERS:
        lr = 1e-4 if pretrained else 1e-3
        fields = {"optim.optimizer": "adamw", "optim.lr": lr, "optim.head_lr": None, "optim.weight_decay": 0.05}
        situation = "a vision transformer" + (", fine-tuned" if pretrained else " from scratch")
        epochs = _epochs(n, FINE_TUNE_IMAGES if pretrained else FROM_SCRATCH_IMAGES, 3 if pretrained else 10)
        why = ["(transformers train with AdamW and a warm-up; SGD at a convolutional network's rates diverges)"]
    elif pretrained:
        fields = {"optim.optimizer": "sgd", "optim.lr": 0.01 * batch / 128, "optim.head_lr": 0.1 * batch / 128,
                  "optim.momentum": 0.9, "optim.nesterov": True, "optim.weight_decay": 1e-4}
        situation = "fine-tuning pretrained weights"
        epochs = _epochs(n, FINE_TUNE_IMAGES, 3, 10)
        why = ["(pretrained layers need a small rate and the new head a larger one; a few epochs suffice)"]
    else:
        fields = {"optim.optimizer": "sgd", "optim.lr": 0.05 * batch / 128, "optim.head_lr": None,
                  "optim.momentum": 0.9, "optim.nesterov": True, "optim.weight_decay": 5e-4}
        size = "small" if image_side < SMALL_IMAGE else "large"
        situation = f"training from scratch on {size} images"
        epochs = _epochs(n, FROM_SCRATCH_IMAGES, 10)
        why = ["(a one-cycle schedule, Nesterov momentum and label smoothing 0.1 took the tutorial Net to 68.3 % on "
               "CIFAR-10 in 10 epochs, 50 s on 2 CPU cores, at batch 128 and peak rate 0.05)"]
    fields = {"data.batch_size": batch, "epochs": epochs, **fields, **{k: v for k, v in common.items()
                                                                       if k != "data.batch_size"}}
    situation += f" ({n:,} training images)"
    if fields["precision"] != "fp32":
        where = "this GPU" if device_type == "cuda" else "this CPU computes it natively and"
        why.append(f"({fields['precision']} mixed precision: {where} it measured faster for this model)"
                   if device_type != "cuda" else f"({fields['precision']} mixed precision on {where})")
    return Recipe(situation, fields, why)


def _epochs(n: int, images: int, low: int, high: int = 40) -> int:
    """Epochs for about ``images`` presentations of a set of ``n``, between ``low`` and ``high``."""
    return int(min(high, max(low, math.ceil(images / n))))


def apply(config: RunConfig, recipe: Recipe, keep: set[str] | frozenset[str] = frozenset()) -> RunConfig:
    """A copy of ``config`` with the recipe's values, except the dotted fields in ``keep``
    (those the user set). The result is validated."""
    raw = config.to_dict()
    for dotted, value in recipe.fields.items():
        if dotted in keep:
            continue
        node = raw
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return RunConfig.from_dict(raw)


def for_config(config: RunConfig, data_dir, dataset=None) -> Recipe:
    """The recipe for ``config``'s model and dataset (loaded from its file list, not decoded): the
    training split's size after the run's val/test split, the side the model is fed at, and the
    device the run will use."""
    from core import datasets, trainer
    d = config.data
    ds = dataset if dataset is not None else datasets.load_dataset(d.source, d.location, data_dir=data_dir,
                                                                   download=False)
    split = datasets.split_dataset(ds, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                   seed=d.split_seed)
    h, w = trainer.input_size_for(config, trainer._native_size(ds))
    device = trainer.resolve_device(config.device)
    return recommend(config.model.name, pretrained=bool(config.model.pretrained or config.model.weights_path),
                     n_train=len(split.train), image_side=min(h, w), device_type=device.type,
                     small_stem=config.model.small_input_stem)
