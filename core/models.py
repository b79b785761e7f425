"""The model zoo: registry, construction, pretrained weights, freezing, init, param groups, layer table.

Every entry builds for any class count >= 2, any number of input channels and any input size at
or above its minimum (square or not). torchvision models come from ``torchvision.models.get_model``
with ``weights=None``; ImageNet weights are read from the torch hub cache (or a folder the user
names) by this module, so that a missing file becomes a clear ``MissingFileError`` instead of a
download stack trace.

Small images: each family has a "small-input stem" (``small_input_stem=True``) that reduces the
early downsampling, as CIFAR versions of these networks do. The architecture never depends on
``pretrained``, so a checkpoint of a fine-tuned model loads into a freshly built one.

  family        small-input stem (total downsampling before -> after)
  TutorialNet   nothing to change: it is a 32x32 network already
  LeNet-5       nothing to change (28x28 input is zero-padded to 32x32 by conv1, as LeCun did)
  FastCIFAR     nothing to change: airbench's CIFAR network (2x2 stem, 3 pooling groups)
  AlexNet       conv1 11x11 stride 4 -> stride 1 (padding 5, same kernel)          32 -> 8
  VGG           the first max-pool is removed                                       32 -> 16
  ResNet        conv1 7x7 stride 2 -> 3x3 stride 1, max-pool removed (CIFAR ResNet) 32 -> 8
  DenseNet      conv0 7x7 stride 2 -> 3x3 stride 1, pool0 removed (CIFAR DenseNet)  32 -> 8
  MobileNet V2/V3, EfficientNet  the first two stride-2 convs (stem, first
                downsampling block) -> stride 1 (kuangliu's CIFAR MobileNetV2)      32 -> 8
  ShuffleNetV2  conv1 stride 2 -> 1, max-pool removed                               32 -> 8
  SqueezeNet    conv1 3x3 stride 2 -> stride 1 (padding 1)                          16 -> 8
  ConvNeXt      4x4 stride-4 patchify stem -> 3x3 stride 1                          32 -> 8
  ViT           16x16 patches -> 4x4 patches (position embedding sized to the grid)
Where a stem conv changes kernel size, pretrained filters are resampled (area interpolation that
keeps each filter's sum), an approximation that fine-tuning corrects.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torchvision.models.vision_transformer import VisionTransformer

from core import offline
from core.errors import MissingFileError, ModelError
from core.registry import Registry

__all__ = [
    "MODELS", "INITS", "FREEZE_MODES", "ModelSpec", "CreatedModel", "LoadReport", "WeightsStatus",
    "list_models", "get_model_spec", "create_model", "resolve_input_size", "min_input_size",
    "count_params", "pretrained_status", "load_weights_file", "list_stages", "apply_freeze",
    "set_train_mode", "init_weights", "head_parameters", "param_groups", "layer_table",
    "cam_layer", "first_conv_name",
    "TutorialNet", "LeNet5", "FastCIFAR",
]

# Set to "1" to never try to download ImageNet weights (tests, air-gapped machines).
OFFLINE_ENV = offline.OFFLINE_ENV   # the one switch (core.offline); kept here for callers
DOWNLOAD_TIMEOUT_S = 15.0
# A weights file must fill at least this share of the model's tensors, otherwise it is taken to
# belong to another architecture (a new head or stem alone never comes close to half).
MIN_MATCH_FRACTION = 0.5

Size = tuple[int, int]


def _size2(size: int | Iterable[int], what: str = "input_size") -> Size:
    """``32`` or ``(h, w)`` → ``(h, w)`` of positive ints."""
    if isinstance(size, bool):
        raise ModelError(f"{what} must be an int or (height, width), got {size!r}.")
    if isinstance(size, int):
        h = w = size
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ModelError(f"{what} must be an int or (height, width), got {size!r}.") from None
    if h < 1 or w < 1:
        raise ModelError(f"{what} must be positive, got {h}×{w}.")
    return h, w


def _fmt(size: Size) -> str:
    return f"{size[0]}×{size[1]}"


# ---------------------------------------------------------------------------------------------
# Small networks written here (torchvision has none of them)
# ---------------------------------------------------------------------------------------------

def _fixed_size_check(model_name: str, built: Size, x: torch.Tensor) -> None:
    # A flatten layer sized for one input size gives an opaque matmul error on any other size.
    if tuple(x.shape[-2:]) != built:
        raise ModelError(
            f"{model_name} was built for {_fmt(built)} input but got {x.shape[-2]}×{x.shape[-1]}; "
            f"resize the images to {_fmt(built)} or build the model for the new size."
        )


class TutorialNet(nn.Module):
    """The CIFAR-10 tutorial's ``Net``; the flatten size follows the input size and channels.

    Attribute names match the tutorial, so its saved ``cifar_net.pth`` loads unchanged.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: Size = (32, 32)):
        super().__init__()
        self.input_size = tuple(input_size)
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        fh, fw = (((s - 4) // 2 - 4) // 2 for s in self.input_size)
        if fh < 1 or fw < 1:
            raise ModelError(f"tutorial_net cannot take {_fmt(self.input_size)} input: too small.")
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _fixed_size_check("tutorial_net", self.input_size, x)
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): tanh, average-pool subsampling, C5 as a dense layer.

    Inputs smaller than 32 (MNIST's 28×28) are zero-padded by 2 in C1, as LeCun padded the digits
    to 32×32. C3 is fully connected to S2 and the output layer is linear (not RBF), as in every
    modern re-implementation.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: Size = (32, 32)):
        super().__init__()
        self.input_size = tuple(input_size)
        pad = 2 if min(self.input_size) < 32 else 0
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)  # C1
        self.act1 = nn.Tanh()
        self.pool1 = nn.AvgPool2d(2)  # S2
        self.conv2 = nn.Conv2d(6, 16, 5)  # C3
        self.act2 = nn.Tanh()
        self.pool2 = nn.AvgPool2d(2)  # S4
        fh, fw = (((s + 2 * pad - 4) // 2 - 4) // 2 for s in self.input_size)
        if fh < 1 or fw < 1:
            raise ModelError(f"lenet5 cannot take {_fmt(self.input_size)} input: too small.")
        self.fc1 = nn.Linear(16 * fh * fw, 120)  # C5
        self.act3 = nn.Tanh()
        self.fc2 = nn.Linear(120, 84)  # F6
        self.act4 = nn.Tanh()
        self.fc3 = nn.Linear(84, num_classes)  # output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _fixed_size_check("lenet5", self.input_size, x)
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.act3(self.fc1(x))
        x = self.act4(self.fc2(x))
        return self.fc3(x)


def _conv_group(c_in: int, c_out: int) -> nn.Sequential:
    """airbench's ConvGroup: conv → max-pool 2 → BN → GELU → conv → BN → GELU (convs 3×3, no bias)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class FastCIFAR(nn.Module):
    """The airbench94 network (Keller Jordan, 2024: 94 % on CIFAR-10 in 3.3 s on an A100) in plain
    torch modules: a 2×2 stem conv (24 channels) + GELU, three conv groups of ``widths`` channels
    that each halve the map, a global max-pool and a bias-free linear head.

    airbench takes MaxPool(3) of the 3×3 map a 32×32 image leaves; the global (adaptive) max-pool
    here is the same there and lets any size work. Left out, as training tricks rather than
    architecture: the data-whitened frozen stem, identity-initialised convs, BatchNorm without
    scale, the 1/9 output scale, label smoothing, lookahead and test-time flipping.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: Size = (32, 32),
                 widths: Iterable[int] = (64, 256, 256)):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ModelError(f"FastCIFAR needs three positive group widths, got {widths!r}.")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 2, padding=0, bias=True), nn.GELU())
        self.group1 = _conv_group(24, widths[0])
        self.group2 = _conv_group(widths[0], widths[1])
        self.group3 = _conv_group(widths[1], widths[2])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.stem(x))))
        return self.head(self.flatten(self.pool(x)))


class RectViT(VisionTransformer):
    """torchvision's VisionTransformer for one fixed (h, w) that need not be square (torchvision's
    asserts one square size).

    Made by switching the class of a ``get_model("vit_b_16")`` instance (see ``_vit_finish``),
    so parameters and state-dict keys are torchvision's.
    """

    grid: Size

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        if (h, w) != (self.grid[0] * p, self.grid[1] * p):
            _fixed_size_check("this ViT", (self.grid[0] * p, self.grid[1] * p), x)
        x = self.conv_proj(x)
        return x.reshape(n, self.hidden_dim, self.grid[0] * self.grid[1]).permute(0, 2, 1)


# ---------------------------------------------------------------------------------------------
# Per-family knowledge: head, first conv, small-input stem, stages
# ---------------------------------------------------------------------------------------------

def _get(model: nn.Module, qualname: str) -> nn.Module:
    return model.get_submodule(qualname)


def _set(model: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, child = qualname.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _new_conv(old: nn.Conv2d, in_channels: int | None = None, **changes: Any) -> nn.Conv2d:
    """A conv like ``old`` with some hyper-parameters changed (fresh weights, old device/dtype)."""
    kw = dict(in_channels=old.in_channels if in_channels is None else in_channels,
              out_channels=old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
              padding=old.padding, dilation=old.dilation, groups=old.groups,
              bias=old.bias is not None, padding_mode=old.padding_mode)
    kw.update(changes)
    return nn.Conv2d(**kw, device=old.weight.device, dtype=old.weight.dtype)


def _kaiming_fan_out(w: torch.Tensor) -> None:
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")


def _trunc_normal_002(w: torch.Tensor) -> None:
    nn.init.trunc_normal_(w, std=0.02)


def _vit_patch_init(w: torch.Tensor) -> None:
    nn.init.trunc_normal_(w, std=math.sqrt(1 / (w.shape[1] * w.shape[2] * w.shape[3])))


def _replace_stem_conv(model: nn.Module, qualname: str, init: Callable[[torch.Tensor], None],
                       **changes: Any) -> None:
    old = _get(model, qualname)
    new = _new_conv(old, **changes)
    init(new.weight)  # the family's own initialisation, as torchvision would have done it
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    _set(model, qualname, new)


def _first_pool_to_identity(seq: nn.Sequential) -> int:
    for i, m in enumerate(seq):
        if isinstance(m, nn.MaxPool2d):
            seq[i] = nn.Identity()
            return i
    raise RuntimeError("no pooling layer found")  # a bug in a family table


def _strides_to_one(seq: nn.Module, count: int) -> list[str]:
    """Set the first ``count`` stride-2 convs in ``seq`` to stride 1 (padding keeps the size)."""
    changed = []
    for name, m in seq.named_modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.stride = (1, 1)
            changed.append(name)
            if len(changed) == count:
                break
    return changed


def _split_at_pools(seq: nn.Sequential, prefix: str, label: str) -> list[tuple[str, list[str]]]:
    """Stages of a plain Sequential: each ends with a pooling layer (VGG, AlexNet, SqueezeNet)."""
    stages, cur = [], []
    for i, m in enumerate(seq):
        cur.append(f"{prefix}.{i}")
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            stages.append((f"{label}{len(stages) + 1}", cur))
            cur = []
    if cur:
        stages.append((f"{label}{len(stages) + 1}", cur))
    return stages


def _out_channels(m: nn.Module) -> int:
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return convs[-1].out_channels if convs else -1


def _group_features(seq: nn.Sequential, prefix: str) -> list[tuple[str, list[str]]]:
    """MobileNet/EfficientNet ``features``: stem, then blocks grouped by output width, final conv."""
    stages = [("stem", [f"{prefix}.0"])]
    last = len(seq) - 1
    groups: list[list[int]] = []
    for i in range(1, last):
        if groups and _out_channels(seq[i]) == _out_channels(seq[groups[-1][-1]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    for k, g in enumerate(groups, 1):
        stages.append((f"stage{k} ({_out_channels(seq[g[0]])} ch)", [f"{prefix}.{i}" for i in g]))
    stages.append(("final 1×1 conv", [f"{prefix}.{last}"]))
    return stages


def _classifier_rest(model: nn.Module, head: str) -> list[str]:
    """Parametrised layers of ``classifier`` other than the head (e.g. VGG's fc6/fc7)."""
    parent, _, idx = head.rpartition(".")
    seq = _get(model, parent)
    return [f"{parent}.{i}" for i, m in enumerate(seq)
            if str(i) != idx and any(True for _ in m.parameters())]


@dataclass(frozen=True)
class _Family:
    """What differs between architectures; every callable works on a built model."""

    display: str
    head: str | Callable[[str], str]          # qualified name of the classification layer
    first_conv: str                           # qualified name of the first conv
    small_stem: Callable[[nn.Module, int], list[str]]  # (model, in_channels) → notes; in place
    stages: Callable[[nn.Module, str], list[tuple[str, list[str]]]]  # (model, head) → stages
    size_dependent: bool = False              # builder output depends on the input size
    size_multiple: Callable[[bool], int] = lambda small: 1  # input must be a multiple of this
    # Grad-CAM's target (core.explain): the last module whose output is still a spatial map
    # (N×C×h×w), or for a ViT ("tokens") the last block's first LayerNorm, whose patch tokens
    # are the last ones the class token attends to (reshaped to the patch grid).
    cam_layer: str = ""
    cam_kind: str = "conv"                    # "conv" or "tokens"

    def head_name(self, name: str) -> str:
        return self.head(name) if callable(self.head) else self.head


def _no_stem(label: str) -> Callable[[nn.Module, int], list[str]]:
    return lambda m, c: [f"small-input stem: {label} is a small-image network already; nothing changed."]


def _alexnet_stem(m: nn.Module, c: int) -> list[str]:
    conv = m.features[0]
    conv.stride, conv.padding = (1, 1), (5, 5)
    return ["small-input stem: conv1 (11×11) uses stride 1 instead of 4 (downsampling 32 → 8)."]


def _vgg_stem(m: nn.Module, c: int) -> list[str]:
    i = _first_pool_to_identity(m.features)
    return [f"small-input stem: the first max-pool (features.{i}) is removed (downsampling 32 → 16)."]


def _resnet_stem(m: nn.Module, c: int) -> list[str]:
    _replace_stem_conv(m, "conv1", _kaiming_fan_out, in_channels=c, kernel_size=(3, 3),
                       stride=(1, 1), padding=(1, 1))
    m.maxpool = nn.Identity()
    return ["small-input stem: conv1 is 3×3 stride 1 and the max-pool is removed, as in CIFAR "
            "ResNets (downsampling 32 → 8)."]


def _densenet_stem(m: nn.Module, c: int) -> list[str]:
    _replace_stem_conv(m, "features.conv0", _kaiming_fan_out, in_channels=c, kernel_size=(3, 3),
                       stride=(1, 1), padding=(1, 1))
    m.features.pool0 = nn.Identity()
    return ["small-input stem: conv0 is 3×3 stride 1 and pool0 is removed, as in CIFAR DenseNets "
            "(downsampling 32 → 8)."]


def _mobile_stem(m: nn.Module, c: int) -> list[str]:
    changed = _strides_to_one(m.features, 2)
    return [f"small-input stem: stride 2 → 1 in the stem conv and the first downsampling block "
            f"({', '.join('features.' + n for n in changed)}; downsampling 32 → 8)."]


def _shufflenet_stem(m: nn.Module, c: int) -> list[str]:
    m.conv1[0].stride = (1, 1)
    m.maxpool = nn.Identity()
    return ["small-input stem: conv1 uses stride 1 and the max-pool is removed (downsampling 32 → 8)."]


def _squeezenet_stem(m: nn.Module, c: int) -> list[str]:
    conv = m.features[0]
    conv.stride, conv.padding = (1, 1), (1, 1)
    return ["small-input stem: conv1 (3×3) uses stride 1 and padding 1 (downsampling 16 → 8)."]


def _convnext_stem(m: nn.Module, c: int) -> list[str]:
    _replace_stem_conv(m, "features.0.0", _trunc_normal_002, in_channels=c, kernel_size=(3, 3),
                       stride=(1, 1), padding=(1, 1))
    return ["small-input stem: the 4×4 stride-4 patchify stem is a 3×3 stride-1 conv "
            "(downsampling 32 → 8)."]


_VIT_SMALL_PATCH = 4


def _vit_stem(m: nn.Module, c: int) -> list[str]:
    p = _VIT_SMALL_PATCH
    _replace_stem_conv(m, "conv_proj", _vit_patch_init, in_channels=c, kernel_size=(p, p), stride=(p, p))
    m.patch_size = p
    return [f"small-input stem: {p}×{p} patches instead of 16×16 (a 32×32 image gives 8×8 tokens)."]


def _resnet_stages(m: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]


def _densenet_stages(m: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    st = [("stem", ["features.conv0", "features.norm0"])]
    for i in range(1, 5):
        mods = [f"features.denseblock{i}"]
        mods.append(f"features.transition{i}" if i < 4 else "features.norm5")
        st.append((f"denseblock{i}", mods))
    return st


def _pool_stages(label: str, with_fc: bool) -> Callable[[nn.Module, str], list[tuple[str, list[str]]]]:
    def stages(m: nn.Module, head: str) -> list[tuple[str, list[str]]]:
        st = _split_at_pools(m.features, "features", label)
        rest = _classifier_rest(m, head) if with_fc else []
        return st + ([("fc layers before the head", rest)] if rest else [])
    return stages


def _mobile_stages(m: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    st = _group_features(m.features, "features")
    rest = _classifier_rest(m, head)
    return st + ([("classifier layers before the head", rest)] if rest else [])


def _shufflenet_stages(m: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    return [("stem", ["conv1"])] + [(f"stage{i}", [f"stage{i}"]) for i in (2, 3, 4)] + [("conv5", ["conv5"])]


def _convnext_stages(m: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    return [("stem", ["features.0"]), ("stage1", ["features.1"]),
            ("stage2", ["features.2", "features.3"]), ("stage3", ["features.4", "features.5"]),
            ("stage4", ["features.6", "features.7"]), ("final norm", ["classifier.0"])]


def _vit_stages(m: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    st = [("patch embedding", ["conv_proj", "class_token", "encoder.pos_embedding"])]
    st += [(f"block{i + 1}", [f"encoder.layers.{n}"]) for i, (n, _) in enumerate(m.encoder.layers.named_children())]
    return st + [("final norm", ["encoder.ln"])]


def _small_net_stages(m: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    return [(n, [n]) for n, mod in m.named_children()
            if n != head and any(True for _ in mod.parameters())]


_TUTORIAL = _Family("TutorialNet", "fc3", "conv1", _no_stem("tutorial_net"), _small_net_stages, size_dependent=True,
                    cam_layer="conv2")
_LENET = _Family("LeNet", "fc3", "conv1", _no_stem("lenet5"), _small_net_stages, size_dependent=True,
                 cam_layer="act2")
_FAST = _Family("FastCIFAR", "head", "stem.0", _no_stem("FastCIFAR"), _small_net_stages, cam_layer="group3")
_ALEXNET = _Family("AlexNet", "classifier.6", "features.0", _alexnet_stem, _pool_stages("conv block", True),
                   cam_layer="features")
_VGG = _Family("VGG", "classifier.6", "features.0", _vgg_stem, _pool_stages("conv block", True), cam_layer="features")
_RESNET = _Family("ResNet", "fc", "conv1", _resnet_stem, _resnet_stages, cam_layer="layer4")
_DENSENET = _Family("DenseNet", "classifier", "features.conv0", _densenet_stem, _densenet_stages, cam_layer="features")
_MOBILENET_V2 = _Family("MobileNet", "classifier.1", "features.0.0", _mobile_stem, _mobile_stages, cam_layer="features")
_MOBILENET_V3 = _Family("MobileNet", "classifier.3", "features.0.0", _mobile_stem, _mobile_stages, cam_layer="features")
_EFFICIENTNET = _Family("EfficientNet", "classifier.1", "features.0.0", _mobile_stem, _mobile_stages,
                        cam_layer="features")
_SHUFFLENET = _Family("ShuffleNet", "fc", "conv1.0", _shufflenet_stem, _shufflenet_stages, cam_layer="conv5")
_SQUEEZENET = _Family("SqueezeNet", "classifier.1", "features.0", _squeezenet_stem, _pool_stages("block", False),
                      cam_layer="features")
_CONVNEXT = _Family("ConvNeXt", "classifier.2", "features.0.0", _convnext_stem, _convnext_stages, cam_layer="features")
_VIT = _Family("ViT", "heads.head", "conv_proj", _vit_stem, _vit_stages, size_dependent=True,
               size_multiple=lambda small: _VIT_SMALL_PATCH if small else 16,
               cam_layer="encoder.layers.encoder_layer_11.ln_1", cam_kind="tokens")


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

Builder = Callable[[int, int, Size, bool], "tuple[nn.Module, list[str]]"]


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry. ``min_input_size`` and ``imagenet_params`` are measured lazily (meta device).

    ``builder(num_classes, in_channels, (h, w), small_input_stem) -> (model, notes)`` returns the
    architecture with random weights. ``fixed_size``: the model only takes the size it was built
    for (flatten layer or position embedding), so data must be resized to ``CreatedModel.input_size``.
    """

    name: str
    family: str
    description: str
    builder: Builder = field(repr=False, compare=False)
    default_input_size: int
    tv_name: str | None
    fixed_size: bool = False
    _family: _Family = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def min_input_size(self) -> int:
        """Smallest side (pixels) the unmodified model accepts."""
        return min_input_size(self.name, small_input_stem=False)

    @property
    def imagenet_params(self) -> int | None:
        """Parameter count of the 1000-class ImageNet version (torchvision models only)."""
        return count_params(self.name, 1000) if self.tv_name else None

    @property
    def has_pretrained(self) -> bool:
        return self.tv_name is not None


MODELS: Registry[ModelSpec] = Registry("model", error=ModelError)


def _adapt_in_channels_random(model: nn.Module, qualname: str, in_channels: int) -> None:
    """Random stem for ``in_channels`` inputs, keeping torchvision's per-weight distribution."""
    old = _get(model, qualname)
    if old.in_channels == in_channels:
        return
    new = _new_conv(old, in_channels=in_channels)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, [i % old.in_channels for i in range(in_channels)]])
        if new.bias is not None:
            new.bias.copy_(old.bias)
    _set(model, qualname, new)


def _vit_finish(model: nn.Module, size: Size) -> None:
    """Turn a torchvision ViT into a RectViT whose position embedding fits the (h, w) grid."""
    p = model.patch_size
    grid = (size[0] // p, size[1] // p)
    if min(grid) < 1:
        raise ModelError(f"A ViT with {p}×{p} patches needs at least {p}×{p} input, got {_fmt(size)}.")
    model.__class__ = RectViT
    model.grid = grid
    model.image_size = (grid[0] * p, grid[1] * p)
    seq = grid[0] * grid[1] + 1
    model.seq_length = seq
    old = model.encoder.pos_embedding
    if old.shape[1] != seq:
        model.encoder.pos_embedding = nn.Parameter(
            torch.empty(1, seq, old.shape[2], device=old.device, dtype=old.dtype).normal_(std=0.02))


def _tv_builder(tv_name: str, family: _Family) -> Builder:
    def build(num_classes: int, in_channels: int, size: Size, small: bool) -> tuple[nn.Module, list[str]]:
        from torchvision.models import get_model

        model = get_model(tv_name, weights=None, num_classes=num_classes)
        notes = family.small_stem(model, in_channels) if small else []
        # Stems that were rebuilt already take in_channels; the others are adapted here.
        _adapt_in_channels_random(model, family.first_conv, in_channels)
        if family is _VIT:
            _vit_finish(model, size)
        return model, notes
    return build


def _small_builder(cls: Callable[..., nn.Module], family: _Family) -> Builder:
    def build(num_classes: int, in_channels: int, size: Size, small: bool) -> tuple[nn.Module, list[str]]:
        model = cls(num_classes=num_classes, in_channels=in_channels, input_size=size)
        return model, (family.small_stem(model, in_channels) if small else [])
    return build


def _add(name: str, family: _Family, description: str, tv_name: str | None = None,
         builder: Builder | None = None, default_input_size: int = 224) -> None:
    MODELS.add(name, ModelSpec(
        name=name, family=family.display, description=description,
        builder=builder or _tv_builder(tv_name, family), default_input_size=default_input_size,
        tv_name=tv_name, fixed_size=family.size_dependent, _family=family))


_add("tutorial_net", _TUTORIAL, "The PyTorch CIFAR-10 tutorial's Net: 2 conv + 3 fc layers (62k params).",
     builder=_small_builder(TutorialNet, _TUTORIAL), default_input_size=32)
_add("lenet5", _LENET, "LeNet-5 (1998): tanh, average pooling; for 32×32 or 28×28 digits.",
     builder=_small_builder(LeNet5, _LENET), default_input_size=32)
_add("cifar_fast", _FAST, "airbench94 (2024): 2×2 stem + 3 conv groups (64/256/256), GELU; "
     "94 % on CIFAR-10 in seconds on a GPU (2.0M params).",
     builder=_small_builder(FastCIFAR, _FAST), default_input_size=32)
_add("cifar_fast_small", _FAST, "airbench94 narrowed to 32/64/128 channels: fast on a CPU (0.3M params).",
     builder=_small_builder(partial(FastCIFAR, widths=(32, 64, 128)), _FAST), default_input_size=32)
_add("alexnet", _ALEXNET, "AlexNet (2012): 5 conv + 3 large fc layers.", "alexnet")
_add("vgg11", _VGG, "VGG-11 (2014): 8 conv 3×3 layers + 3 fc layers.", "vgg11")
_add("vgg11_bn", _VGG, "VGG-11 with batch normalisation.", "vgg11_bn")
_add("vgg16", _VGG, "VGG-16 (2014): 13 conv 3×3 layers + 3 fc layers; large (138M params).", "vgg16")
_add("vgg16_bn", _VGG, "VGG-16 with batch normalisation.", "vgg16_bn")
_add("resnet18", _RESNET, "ResNet-18 (2015): residual basic blocks; a strong default.", "resnet18")
_add("resnet34", _RESNET, "ResNet-34: deeper basic-block ResNet.", "resnet34")
_add("resnet50", _RESNET, "ResNet-50: bottleneck blocks.", "resnet50")
_add("densenet121", _DENSENET, "DenseNet-121 (2016): densely connected blocks; few params, much memory.", "densenet121")
_add("mobilenet_v2", _MOBILENET_V2, "MobileNetV2 (2018): inverted residuals for mobile devices.", "mobilenet_v2")
_add("mobilenet_v3_small", _MOBILENET_V3, "MobileNetV3-Small (2019): tiny and fast.", "mobilenet_v3_small")
_add("mobilenet_v3_large", _MOBILENET_V3, "MobileNetV3-Large (2019).", "mobilenet_v3_large")
_add("efficientnet_b0", _EFFICIENTNET, "EfficientNet-B0 (2019): compound-scaled MBConv network.", "efficientnet_b0")
_add("shufflenet_v2_x1_0", _SHUFFLENET, "ShuffleNetV2 1.0× (2018): channel shuffle, very cheap.", "shufflenet_v2_x1_0")
_add("squeezenet1_1", _SQUEEZENET, "SqueezeNet 1.1 (2016): fire modules, 1.2M params.", "squeezenet1_1")
_add("convnext_tiny", _CONVNEXT, "ConvNeXt-Tiny (2022): a modernised ResNet.", "convnext_tiny")
_add("vit_b_16", _VIT, "Vision Transformer B/16 (2020): needs a fixed input size; 86M params.", "vit_b_16")


def list_models() -> list[ModelSpec]:
    """All registered entries, in registry order."""
    return [MODELS.get(n) for n in MODELS.names()]


def get_model_spec(name: str) -> ModelSpec:
    """The entry called ``name``; an unknown name raises ModelError listing the valid ones."""
    return MODELS.get(name)


def _fam(name: str) -> _Family:
    return get_model_spec(name)._family


def cam_layer(name: str) -> tuple[str, str]:
    """(qualified module name, kind) Grad-CAM explains ``name`` at: kind "conv" for a spatial map
    (N×C×h×w), "tokens" for a ViT's patch tokens (N×(1+h·w)×D, reshaped to the patch grid)."""
    fam = _fam(name)
    return fam.cam_layer, fam.cam_kind


def first_conv_name(name: str) -> str:
    """Qualified name of the model's first convolution (a ViT's patch embedding)."""
    return _fam(name).first_conv


# ---------------------------------------------------------------------------------------------
# Measured facts (meta device, cached): parameter counts, minimum input sizes, stages
# ---------------------------------------------------------------------------------------------

def _build_meta(name: str, num_classes: int = 10, in_channels: int = 3, size: Size | None = None,
                small: bool = False) -> nn.Module:
    spec = get_model_spec(name)
    size = size or (spec.default_input_size, spec.default_input_size)
    with torch.device("meta"):
        return spec.builder(num_classes, in_channels, size, small)[0]


@lru_cache(maxsize=None)
def count_params(name: str, num_classes: int = 10, in_channels: int = 3, small_input_stem: bool = False) -> int:
    """Parameter count of ``name`` for ``num_classes`` classes (built on the meta device, cached)."""
    model = _build_meta(name, num_classes, in_channels, small=small_input_stem)
    return sum(p.numel() for p in model.parameters())


def _zero_size_guard(module: nn.Module, inputs: Any, output: Any) -> None:
    # Adaptive pooling happily turns a 0×0 map into a 1×1 one; a real forward would fail earlier.
    outs = output if isinstance(output, (tuple, list)) else (output,)
    for o in outs:
        if isinstance(o, torch.Tensor) and o.numel() == 0:
            raise RuntimeError("empty feature map")


def _forward_ok(model: nn.Module, size: Size, in_channels: int = 3) -> bool:
    handles = [m.register_forward_hook(_zero_size_guard) for m in model.modules()]
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, in_channels, *size, device="meta"))
        return out.ndim == 2 and out.shape[0] == 1
    except Exception:  # any failure at this size means "too small"; the largest size is checked
        return False
    finally:
        for h in handles:
            h.remove()


_SEARCH_LOCK = threading.Lock()  # one search per (model, stem) even when jobs start together
_SHAPE_PRESERVING = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _shape_only(model: nn.Module) -> nn.Module:
    """Drop normalisation layers from a meta model: they keep shapes, and their meta kernels are
    slow Python decompositions that would dominate the size search."""
    for name, m in list(model.named_modules()):
        if name and isinstance(m, _SHAPE_PRESERVING):
            _set(model, name, nn.Identity())
    return model


def _search_model(name: str, size: Size, small: bool) -> nn.Module:
    return _shape_only(_build_meta(name, size=size, small=small))


@lru_cache(maxsize=None)
def _measured_min(name: str, small: bool) -> int:
    spec = get_model_spec(name)
    fam = spec._family
    d = spec.default_input_size
    shared = None if fam.size_dependent else _search_model(name, (d, d), small)

    mult = fam.size_multiple(small)

    def ok(s: int) -> bool:
        s = s // mult * mult  # ViT: the patch grid covers this much of the image
        if s < 1:
            return False
        model = shared
        if model is None:
            try:
                model = _search_model(name, (s, s), small)
            except Exception:  # the builder itself refuses sizes that are too small
                return False
        return _forward_ok(model, (s, s))

    hi = spec.default_input_size
    if not ok(hi):
        raise RuntimeError(f"{name} does not run at its default size {hi}")  # a bug, not user input
    if ok(1):  # many torchvision models pad enough to take any size: one forward settles it
        return 1
    lo = 1  # invariant: ok(hi) and not ok(lo); sizes are monotone (strided ops only shrink maps)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def min_input_size(name: str, small_input_stem: bool = False) -> int:
    """Smallest height/width ``name`` accepts, found by forwarding on the meta device (cached).

    Height and width are independent (every op is separable by axis), so a rectangle is valid
    when both sides reach this value.
    """
    get_model_spec(name)
    with _SEARCH_LOCK:
        return _measured_min(name, bool(small_input_stem))


def _round_to(size: Size, multiple: int) -> Size:
    if multiple == 1:
        return size
    return tuple(max(multiple, int(round(s / multiple)) * multiple) for s in size)  # type: ignore[return-value]


def resolve_input_size(name: str, native_size: int | Iterable[int], small_input_stem: bool = False) -> Size:
    """(h, w) to feed ``name``: the native size when the model accepts it, else a resize target.

    Too-small images go to ``default_input_size`` (224 for ImageNet models), or with the small-input
    stem to the stem's minimum rounded up to 32. ViT sizes are rounded to a multiple of its patch.
    """
    spec = get_model_spec(name)
    size = _size2(native_size, "native_size")
    m = min_input_size(name, small_input_stem)
    if min(size) >= m:
        return _round_to(size, spec._family.size_multiple(small_input_stem))
    if small_input_stem:
        s = max(32, -(-m // 32) * 32)
        return s, s
    return spec.default_input_size, spec.default_input_size


def _check_size(spec: ModelSpec, size: Size, small: bool) -> None:
    m = min_input_size(spec.name, small)
    if min(size) >= m:
        return
    d = max(spec.default_input_size, m)
    ms = min_input_size(spec.name, True)
    if not small and ms < m:
        hint = f"turn on 'small-input stem' (minimum {ms}×{ms}) or resize to {d}×{d}"
    else:
        hint = f"resize the images to at least {m}×{m} (e.g. {d}×{d})"
    stem = " even with the small-input stem" if small and spec.tv_name else ""
    raise ModelError(f"{spec.name} needs at least {m}×{m} input{stem} (got {_fmt(size)}); {hint}.")


@lru_cache(maxsize=None)
def _stages(name: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    fam = _fam(name)
    model = _build_meta(name)
    return tuple((s, tuple(p)) for s, p in fam.stages(model, fam.head_name(name)))


def list_stages(name: str) -> list[str]:
    """Names of the stages ``apply_freeze(..., "stages", n)`` freezes, first to last (head excluded)."""
    return [s for s, _ in _stages(name)]


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

INITS: Registry[Callable[[torch.Tensor], None] | None] = Registry("initialisation", error=ModelError)
INITS.add("default", None)  # keep each layer's own initialisation (torchvision's per family)
INITS.add("xavier_uniform", nn.init.xavier_uniform_)
INITS.add("xavier_normal", nn.init.xavier_normal_)
INITS.add("kaiming_uniform", lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"))  # fan_in
INITS.add("kaiming_normal", lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
INITS.add("normal", lambda w: nn.init.normal_(w, 0.0, 0.01))  # torchvision's std for fc layers
INITS.add("uniform", lambda w: nn.init.uniform_(w, -0.05, 0.05))
INITS.add("constant", lambda w: nn.init.constant_(w, 0.01))  # every unit alike: shows why init matters
INITS.add("orthogonal", nn.init.orthogonal_)


def init_weights(modules: nn.Module | Iterable[nn.Module], scheme: str) -> int:
    """Apply ``scheme`` to the weights of every Conv/Linear in ``modules``; biases become zero.

    Returns the number of layers initialised ("default" leaves everything alone and returns 0).
    """
    fn = INITS.get(scheme)
    if fn is None:
        return 0
    mods = modules.modules() if isinstance(modules, nn.Module) else (
        s for m in modules for s in m.modules())
    n = 0
    with torch.no_grad():
        for m in mods:
            if isinstance(m, (_ConvNd, nn.Linear)):
                fn(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What a weights file filled. Adapted tensors (channels, kernel, position grid) count as matched."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # model tensors the file did not fill
    unexpected: list[str] = field(default_factory=list)     # file tensors the model has no place for
    mismatched_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    # (key, shape in file, shape in model): skipped, e.g. a head for another class count

    def summary(self) -> str:
        parts = [f"{len(self.matched)} tensors loaded"]
        if self.mismatched_shapes:
            parts.append(f"{len(self.mismatched_shapes)} skipped for a different shape "
                         f"({', '.join(k for k, _, _ in self.mismatched_shapes[:4])})")
        if self.missing:
            parts.append(f"{len(self.missing)} not taken from the file (kept their initial values)")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file but not in the model (ignored)")
        return "; ".join(parts)


@dataclass(frozen=True)
class WeightsStatus:
    """Whether ImageNet weights for a model are on disk, for the UI (nothing is downloaded)."""

    available: bool
    file_name: str | None
    folder: str | None
    message: str


_STATE_KEYS = ("model_state_dict", "model_state", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
# torchvision's DenseNet checkpoints predate the ban on '.' in module names ("norm.1" → "norm1").
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _read_state_dict(path: Path, model_name: str,
                     hint: str = "Use a .pth/.pt file saved with torch.save(model.state_dict(), ...) "
                                 "or a lab checkpoint.") -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` a plain state dict or a checkpoint dict holding one.

    weights_only refuses any pickled callable or class outside torch's tensor types, so a
    malicious file is rejected before anything in it runs.
    """
    if not path.is_file():
        raise MissingFileError(
            f"Weights file {path} for {model_name} does not exist; check the path or choose another file.",
            files=[path.name], folder=str(path.parent))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            why = (f"it contains Python objects ({found.group(1)}), not just tensors, and was refused "
                   "for safety (nothing in it was run)")
        else:
            why = "it is corrupt, truncated or not a PyTorch weights file"
        raise ModelError(f"Weights file {path.name} could not be loaded for {model_name}: {why}. {hint}") from None
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, Mapping) else {}
    if not tensors:
        raise ModelError(
            f"Weights file {path.name} holds no weight tensors (found {type(obj).__name__}); "
            f"expected a state dict or a checkpoint with a 'model'/'state_dict' entry for {model_name}.")
    out = {}
    for k, v in tensors.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        m = _DENSENET_OLD_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights: how much of input cell j lies in output cell i, the output cells
    splitting the same extent into n_out parts. Columns sum to 1, so resampling keeps sums."""
    step = n_in / n_out
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        lo, hi = i * step, (i + 1) * step
        for j in range(math.floor(lo), min(n_in, math.ceil(hi))):
            m[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    return m


def _adapt_conv_weight(w: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """First-conv weights for another channel count and/or kernel size.

    Channels: the filters are summed over the file's channels and spread evenly over the model's
    (1 channel = RGB summed, the standard grayscale adaptation), so a gray image gives the same
    response as before. Kernel: area-resampled so that each filter keeps its sum (its response
    to a flat patch); the spatial detail is an approximation that fine-tuning corrects.
    """
    if w.shape[1] != target[1]:
        w = w.sum(dim=1, keepdim=True).repeat(1, target[1], 1, 1) / target[1]
    if w.shape[2:] != target[2:]:
        rh = _area_matrix(w.shape[2], target[2])
        rw = _area_matrix(w.shape[3], target[3])
        w = torch.einsum("ik,ockl,jl->ocij", rh, w.double(), rw).to(w.dtype)
    return w


def _resize_pos_embedding(pe: torch.Tensor, grid: Size) -> torch.Tensor | None:
    """ViT position embedding (1, 1 + g*g, D) → (1, 1 + gh*gw, D), bicubic like torchvision."""
    n = pe.shape[1] - 1
    g = int(math.isqrt(n))
    if g * g != n:
        return None
    cls_tok, img = pe[:, :1], pe[:, 1:]
    img = img.permute(0, 2, 1).reshape(1, -1, g, g)
    img = F.interpolate(img.float(), size=grid, mode="bicubic", align_corners=True).to(pe.dtype)
    return torch.cat([cls_tok, img.reshape(1, pe.shape[2], -1).permute(0, 2, 1)], dim=1)


def _load_state(model: nn.Module, name: str, state: Mapping[str, torch.Tensor], source: str,
                skip: tuple[str, ...] = ()) -> tuple[LoadReport, list[str]]:
    """Copy matching tensors of ``state`` into ``model``; adapt first conv and ViT grid; report."""
    fam = _fam(name)
    target = model.state_dict()
    first_w = fam.first_conv + ".weight"
    report, notes, load = LoadReport(), [], {}

    def skipped(k: str) -> bool:
        return any(k == p or k.startswith(p + ".") for p in skip)

    # BatchNorm batch counters are not weights, and files older than PyTorch 0.4 lack them.
    counters = {k for k in target if k.endswith("num_batches_tracked") and k not in state}
    considered = [k for k in target if not skipped(k) and k not in counters]
    for k in target:
        if k in counters:
            continue
        if skipped(k) or k not in state:
            report.missing.append(k)
            continue
        v, t = state[k], target[k]
        if v.shape != t.shape and k == first_w and v.ndim == 4 and t.ndim == 4 and v.shape[0] == t.shape[0]:
            v = _adapt_conv_weight(v, t.shape)
            notes.append(f"{source}: first conv {fam.first_conv} adapted from {tuple(state[k].shape)} "
                         f"to {tuple(t.shape)} (RGB filters summed for 1 channel; kernels resampled).")
        if v.shape != t.shape and k == "encoder.pos_embedding" and hasattr(model, "grid"):
            resized = _resize_pos_embedding(v, model.grid)
            if resized is not None and resized.shape == t.shape:
                notes.append(f"{source}: position embedding interpolated to the {_fmt(model.grid)} patch grid.")
                v = resized
        if v.shape != t.shape:
            report.mismatched_shapes.append((k, tuple(state[k].shape), tuple(t.shape)))
            continue
        load[k] = v
        report.matched.append(k)
    report.unexpected = [k for k in state if k not in target]
    if not report.matched or len(report.matched) < MIN_MATCH_FRACTION * len(considered):
        example = ", ".join(list(state)[:3])
        raise ModelError(
            f"{source} does not fit {name}: only {len(report.matched)} of {len(considered)} weight "
            f"tensors match by name and shape (the file has e.g. {example}). It was probably saved "
            f"from another architecture; choose the model it was trained with, or another file.")
    model.load_state_dict(load, strict=False)
    return report, notes


def load_weights_file(model: nn.Module, name: str, path: str | os.PathLike) -> tuple[LoadReport, list[str]]:
    """Load a user's .pth into a built ``name`` model; shape-mismatched tensors are skipped."""
    path = Path(path)
    report, notes = _load_state(model, name, _read_state_dict(path, name), f"weights file {path.name}")
    return report, notes + [f"weights file {path.name}: {report.summary()}."]


def _hub_folder(weights_dir: str | os.PathLike | None) -> Path:
    return Path(weights_dir) if weights_dir else Path(torch.hub.get_dir()) / "checkpoints"


def _imagenet_candidates(spec: ModelSpec) -> list[Any]:
    """torchvision weight enums to look for: DEFAULT first, then other IMAGENET1K_V* files."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(spec.tv_name)
    out = [enum.DEFAULT]
    # IMAGENET1K_FEATURES (VGG16 backbone only) and SWAG (other resolutions) are left out.
    out += [w for w in enum if w.name.startswith("IMAGENET1K_V") and w not in out]
    return out


def _file_name(weights: Any) -> str:
    from urllib.parse import urlparse

    return os.path.basename(urlparse(weights.url).path)


def pretrained_status(name: str, weights_dir: str | os.PathLike | None = None) -> WeightsStatus:
    """Whether ImageNet weights for ``name`` are on disk (torch hub cache or ``weights_dir``)."""
    spec = get_model_spec(name)
    if not spec.tv_name:
        return WeightsStatus(False, None, None, f"{name} has no pretrained weights; it trains from random initialisation.")
    folder = _hub_folder(weights_dir)
    cands = _imagenet_candidates(spec)
    for w in cands:
        if (folder / _file_name(w)).is_file():
            return WeightsStatus(True, _file_name(w), str(folder),
                                 f"ImageNet weights for {name} found: {folder / _file_name(w)}.")
    f = _file_name(cands[0])
    return WeightsStatus(False, f, str(folder), _missing_message(name, f, folder, cands[0].url))


def _missing_message(name: str, file_name: str, folder: Path, url: str, why: str = "") -> str:
    return (f"ImageNet weights for {name} are not on this machine{why}. Download {url} and put "
            f"{file_name} in {folder} (torch's hub cache; TORCH_HOME moves it), then try again; "
            f"or untick 'Start from ImageNet weights' to go on from random weights.")


def _download_blocked(url: str) -> str | None:
    """Why ``url`` cannot be downloaded now, as the end of a sentence (" (downloads are off: ...)",
    " and cannot be downloaded (...)"), or None when a download may start."""
    off = offline.downloads_off()
    if off:
        return f" ({off})"
    reason = offline.probe_network(url)   # a short probe: urllib alone may hang offline
    return None if reason is None else f" and cannot be downloaded ({reason})"


def check_pretrained(name: str, weights_dir: str | os.PathLike | None = None) -> None:
    """Raise MissingFileError (naming the file and the folder) when ImageNet weights for ``name``
    are neither on disk nor downloadable now: downloads are off, or the download host does not
    answer a short probe. Cheap when the file is there; used before a run is queued, so an offline
    user hears it at once instead of from a failed run."""
    status = pretrained_status(name, weights_dir)
    if status.available or status.file_name is None:
        return
    spec = get_model_spec(name)
    best = _imagenet_candidates(spec)[0]
    why = _download_blocked(best.url)
    if why is None:
        return   # the run will download it
    folder = _hub_folder(weights_dir)
    raise MissingFileError(_missing_message(name, status.file_name, folder, best.url, why),
                           files=[status.file_name], folder=str(folder))


def _download(url: str, dst: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download to a temporary file, then rename: a cut download never leaves a bad cache file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _bad_cache_hint(path: Path, url: str) -> str:
    return (f"Delete {path} and download it again from {url}, or turn off 'pretrained' to go on "
            "from random weights.")


def _imagenet_state(spec: ModelSpec, weights_dir: str | os.PathLike | None) -> tuple[dict, str, Path]:
    folder = _hub_folder(weights_dir)
    cands = _imagenet_candidates(spec)
    for w in cands:
        path = folder / _file_name(w)
        if path.is_file():
            return _read_state_dict(path, spec.name, _bad_cache_hint(path, w.url)), w.name, path
    best = cands[0]
    path = folder / _file_name(best)
    why = _download_blocked(best.url)
    if why is None:
        try:
            _download(best.url, path)
            return _read_state_dict(path, spec.name, _bad_cache_hint(path, best.url)), best.name, path
        except (OSError, ValueError) as err:  # timeouts, a cut connection, an unwritable cache
            why = f" and could not be downloaded ({getattr(err, 'reason', None) or err})"
    raise MissingFileError(_missing_message(spec.name, path.name, folder, best.url, why),
                           files=[path.name], folder=str(folder))


# ---------------------------------------------------------------------------------------------
# create_model
# ---------------------------------------------------------------------------------------------

@dataclass
class CreatedModel:
    """A built model and what was done to it. ``input_size`` is the (h, w) to feed it."""

    model: nn.Module
    spec: ModelSpec
    notes: list[str]
    load_report: LoadReport | None
    input_size: Size


def create_model(name: str, num_classes: int, in_channels: int = 3, input_size: int | Iterable[int] = 32,
                 pretrained: bool = False, weights_path: str | os.PathLike | None = None,
                 small_input_stem: bool = False, init: str = "default",
                 weights_dir: str | os.PathLike | None = None) -> CreatedModel:
    """Build ``name`` for ``num_classes`` classes and ``in_channels``×``input_size`` images.

    Order: architecture (head for ``num_classes``, stem, channels) → ``init`` on every Conv/Linear
    → ImageNet weights (``pretrained``; all but the head) → the user's ``weights_path`` (all that
    fits). So ``init`` ends up on exactly the layers no file filled. ``load_report`` describes the
    user's file when given, else the ImageNet weights, else it is None.
    """
    spec = get_model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"{name} needs at least 2 classes, got num_classes={num_classes!r}; "
                         "check that the dataset has two or more classes.")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ModelError(f"in_channels must be a positive int (1 for grayscale, 3 for RGB), got {in_channels!r}.")
    INITS.get(init)  # unknown scheme: list the valid ones before any work
    if pretrained and not spec.tv_name:
        raise ModelError(f"{name} has no pretrained weights; turn off 'pretrained' (it trains from random weights).")
    fam = spec._family
    size = _size2(input_size)
    _check_size(spec, size, small_input_stem)
    rounded = _round_to(size, fam.size_multiple(small_input_stem))

    model, notes = spec.builder(num_classes, in_channels, rounded, small_input_stem)
    if rounded != size:
        notes.append(f"input size {_fmt(size)} rounded to {_fmt(rounded)} (a multiple of the patch size); "
                     "resize the images to it.")
    if small_input_stem and min(rounded) >= 128 and spec.tv_name:
        notes.append("the small-input stem on large images multiplies compute and memory; it is "
                     "meant for images of about 64 pixels or less.")
    if in_channels != 3:
        notes.append(f"first conv ({fam.first_conv}) takes {in_channels} input channel(s).")
    head = fam.head_name(name)
    notes.append(f"head {head}: {num_classes} classes, newly initialised.")
    # Every Conv/Linear gets the scheme; the files loaded next overwrite the layers they fill.
    n_init = init_weights(model, init)
    if n_init:
        where = "layers not filled by pretrained weights" if pretrained or weights_path else f"{n_init} conv/linear layers"
        notes.append(f"'{init}' initialisation on {where}; biases zero.")

    report: LoadReport | None = None
    if pretrained:
        state, tag, path = _imagenet_state(spec, weights_dir)
        report, more = _load_state(model, name, state, f"ImageNet weights {path.name}", skip=(head,))
        notes += more
        notes.append(f"pretrained: ImageNet weights ({tag}) from {path}: {report.summary()}. "
                     "They expect ImageNet normalisation (the 'imagenet' preset).")
    if weights_path:
        report, more = load_weights_file(model, name, weights_path)
        notes += more
    model.train()
    return CreatedModel(model=model, spec=spec, notes=notes, load_report=report, input_size=rounded)


# ---------------------------------------------------------------------------------------------
# Freezing, train mode, param groups
# ---------------------------------------------------------------------------------------------

FREEZE_MODES = ("none", "features", "stages")


def _in(pname: str, prefixes: Iterable[str]) -> bool:
    return any(pname == p or pname.startswith(p + ".") for p in prefixes)


def _head_prefix(name: str) -> str:
    return _fam(name).head_name(name)


def head_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Parameters of the classification head (the layer sized by ``num_classes``)."""
    head = _head_prefix(name)
    return [p for n, p in model.named_parameters() if _in(n, (head,))]


def apply_freeze(model: nn.Module, name: str, mode: str = "none", stages: int = 0) -> tuple[int, int]:
    """Set ``requires_grad``: "none" trains all, "features" only the head, "stages" freezes the
    first ``stages`` entries of ``list_stages(name)``. Returns (trainable, total) parameter counts.
    """
    if mode not in FREEZE_MODES:
        raise ModelError(f"Unknown freeze mode {mode!r}. Choose one of: {', '.join(FREEZE_MODES)}.")
    head = _head_prefix(name)
    frozen: tuple[str, ...] = ()
    if mode == "stages":
        table = _stages(name)
        if isinstance(stages, bool) or not isinstance(stages, int) or not 0 <= stages <= len(table):
            raise ModelError(f"{name} has {len(table)} stages ({', '.join(s for s, _ in table)}); "
                             f"cannot freeze {stages!r}. Choose 0 to {len(table)}.")
        frozen = tuple(p for _, ps in table[:stages] for p in ps)
    for n, p in model.named_parameters():
        if mode == "features":
            p.requires_grad_(_in(n, (head,)))
        else:
            p.requires_grad_(not _in(n, frozen))
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def set_train_mode(model: nn.Module, train: bool = True) -> nn.Module:
    """``model.train(train)``, but BatchNorm layers whose parameters are all frozen stay in eval
    mode, so their running statistics (part of the frozen backbone) do not drift.
    BatchNorm without affine parameters follows ``train``.
    """
    model.train(train)
    if train:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                ps = list(m.parameters(recurse=False))
                if ps and not any(p.requires_grad for p in ps):
                    m.eval()
    return model


_NO_DECAY_NAMES = ("class_token", "pos_embedding")


def param_groups(model: nn.Module, name: str, lr: float, head_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimizer param groups over trainable parameters: backbone at ``lr``, head at ``head_lr``.

    Weight decay is not applied to 1-D parameters (biases and BatchNorm/LayerNorm scales and
    shifts: decaying them only fights normalisation) nor to ViT's class token and position
    embedding. Each group carries a "name" key for display; empty groups are left out.
    """
    head = _head_prefix(name)
    head_lr = lr if head_lr is None else head_lr
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or n.rsplit(".", 1)[-1] in _NO_DECAY_NAMES
        buckets.setdefault((_in(n, (head,)), no_decay and weight_decay > 0), []).append(p)
    if not buckets:
        raise ModelError(f"Every parameter of {name} is frozen: there is nothing to train. "
                         "Freeze fewer stages or choose 'none'.")
    groups = []
    for is_head in (False, True):
        for nd in (False, True):
            ps = buckets.get((is_head, nd))
            if ps:
                groups.append({"params": ps, "lr": head_lr if is_head else lr,
                               "weight_decay": 0.0 if nd else weight_decay,
                               "name": ("head" if is_head else "backbone") + (" (no decay)" if nd else "")})
    return groups


# ---------------------------------------------------------------------------------------------
# Layer table
# ---------------------------------------------------------------------------------------------

def _shape_str(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(list(x.shape))
    if isinstance(x, (tuple, list)):
        return ", ".join(_shape_str(v) for v in x if v is not None)
    return type(x).__name__


def layer_table(model: nn.Module, input_shape: Iterable[int]) -> pd.DataFrame:
    """One row per leaf module (and per module owning parameters directly, e.g. ViT's embeddings):
    layer, type, output_shape (batch of 1; several shapes when a module is reused), params, and
    trainable (its trainable parameter count). ``params`` sums to the model's total.

    The forward runs on the meta device (no memory, no math) and falls back to a real CPU batch
    of 1 for an op without a meta kernel. The model is left as it was.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ModelError(f"input_shape must be (channels, height, width), got {shape}.")
    rows = _layer_rows(model)
    order, shapes = _output_shapes(model, shape, list(rows))
    names = order + [n for n in rows if n not in shapes]  # never-called modules last
    for n in names:
        rows[n]["output_shape"] = "; ".join(shapes.get(n, [])) or "(not called)"
    return pd.DataFrame([rows[n] for n in names], columns=["layer", "type", "output_shape", "params", "trainable"])


def _layer_rows(model: nn.Module) -> dict[str, dict]:
    """The rows of :func:`layer_table` by module name, output shapes not yet filled in: every leaf
    module and every module that owns parameters directly (the model itself as "(model)")."""
    rows: dict[str, dict] = {}
    for n, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if own or (n and not any(True for _ in m.children())):
            rows[n] = {"layer": n or "(model)", "type": type(m).__name__, "output_shape": "",
                       "params": sum(p.numel() for p in own),
                       "trainable": sum(p.numel() for p in own if p.requires_grad)}
    return rows


def _output_shapes(model: nn.Module, shape: tuple[int, ...],
                   names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Run a batch of 1 through ``model`` in eval mode, on the meta device or (an op without a
    meta kernel) on the CPU, and return the ``names`` of the modules in the order they were first
    called, and the distinct output shapes of each. The model's training flags are restored."""
    shapes: dict[str, list[str]] = {}
    order: list[str] = []

    def hook_for(n: str) -> Callable:
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            if n not in shapes:
                order.append(n)
            s = _shape_str(out)
            if s not in shapes.setdefault(n, []):
                shapes[n].append(s)
        return hook

    def run(device: str) -> None:
        shapes.clear()
        order.clear()
        x = torch.zeros((1, *shape), device=device)
        if device == "meta":
            tensors = {k: torch.empty_like(v, device="meta") for k, v in
                       list(model.named_parameters()) + list(model.named_buffers())}
            torch.func.functional_call(model, tensors, (x,))
        else:
            model(x.to(next(model.parameters()).device))

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout, no BatchNorm statistics update
    try:
        with torch.no_grad():
            try:
                run("meta")
            except ModelError:
                raise
            except Exception:  # an op with no meta kernel: do the real thing, once
                run("cpu")
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"The model does not run on {shape[0]}×{shape[1]}×{shape[2]} input: {err}") from None
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return order, shapes
