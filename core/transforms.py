"""Augmentation specs → ``torchvision.transforms.v2`` pipelines.

A spec is a JSON-serialisable list of steps, e.g.::

    [{"name": "RandomCrop", "params": {"size": 32, "padding": 4}},
     {"name": "RandomHorizontalFlip", "params": {"p": 0.5}}]

Params left out take the step's defaults from ``list_steps()`` (the values the UI builder starts
with). ``build_transform`` appends ToImage → ToDtype(float32, scale=True) → Normalize, and starts
with a conversion to the dataset mode so any input image (RGBA, palette, 16-bit...) fits.
"""
from __future__ import annotations

import copy
import json
import math
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from core.datasets import GRAYSCALE_MODES, LabDataset, convert_image
from core.errors import ConfigError, DataError
from core.registry import Registry

TRANSFORM_STATE_VERSION = 1
# Tutorial ImageNet eval: Resize(256) → CenterCrop(224); 224 / 256 = 0.875.
EVAL_CROP_RATIO = 0.875
# From this size on the default train spec is the ImageNet recipe (RandomResizedCrop); below it the
# CIFAR recipe (RandomCrop with padding), since random-resized crops of 32-px images lose too much.
LARGE_IMAGE_SIZE = 64

# Limits of a spec.
# A spec comes from untrusted users (the Data tab's JSON box and its API) and the preview runs in
# the server process, so ``normalize_spec`` checks all of this before any image is touched; the
# preview (``augment_preview``) and training (``build_transform``) both go through it:
# * Image size. A step that sets the size (Resize, the crops) sets at most MAX_SIDE px a side;
#   padding (Pad, RandomCrop's padding) and expanding rotations may then add at most MAX_SIDE px to
#   the image a pipeline gets and at most double it (MAX_GROWTH), worst case over RandomApply,
#   RandomChoice and every RandomOrder order. 4,096² px is 16.8 Mpx: 50 MB as RGB bytes, 201 MB as
#   float32. Resize with one number (the shorter side) also caps the longer side at MAX_SIDE
#   (torchvision's max_size), so an extreme aspect ratio cannot blow an image up.
# * Nesting: at most MAX_NESTING levels of RandomApply/RandomChoice/RandomOrder, MAX_STEPS steps in
#   all, MAX_ORDER_STEPS in one RandomOrder. The shape is checked without recursion first.
# * Numbers: finite; angles within ±MAX_DEGREES; scales, ratios and jitter factors bounded; fill a
#   pixel value (0-255).

MAX_SIDE = 4096
MAX_GROWTH = 2.0
MAX_NESTING = 8
MAX_STEPS = 64
MAX_ORDER_STEPS = 6
MAX_DEGREES = 360
MAX_JITTER = 10.0
MAX_AFFINE_SCALE = 10.0
MAX_RATIO = 100.0
MAX_PREVIEW_SEED = 2**32 - 1  # NumPy's seeds stop here (as config.MAX_SEED); torch's a bit later


# --------------------------------------------------------------------------------------------------
# Small transforms of our own (module level so DataLoader workers can pickle them)
# --------------------------------------------------------------------------------------------------

class ToMode(v2.Transform):
    """PIL image of any mode → ``mode`` ("RGB"/"L"), with 16-bit scaling and transparency on white."""

    _transformed_types = (PIL.Image.Image,)

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return convert_image(inpt, self.mode)


class EnsureChannels(v2.Transform):
    """Image tensor → ``channels`` channels (1 ↔ 3), for tensor inputs that skipped ``ToMode``."""

    _transformed_types = (torch.Tensor,)

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        c = inpt.shape[-3] if inpt.ndim >= 3 else 1
        if c == self.channels:
            return inpt
        if c == 1 and self.channels == 3:
            return inpt.expand(*inpt.shape[:-3], 3, *inpt.shape[-2:]).clone()
        if c in (3, 4) and self.channels == 1:
            return F.rgb_to_grayscale(inpt[..., :3, :, :], num_output_channels=1)
        if c == 4 and self.channels == 3:
            return inpt[..., :3, :, :]
        raise DataError(f"An image tensor with {c} channels cannot be used where {self.channels} are expected.")


class ToNormalizedTensor(v2.Transform):
    """PIL image or image tensor → float32 C×H×W in [0, 1], with ``channels`` channels, normalised:
    ToImage → ToDtype(float32, scale=True) → EnsureChannels → Normalize as one step, with the same
    values: four v2 steps would cost about twice the tutorial's ToTensor + Normalize, mostly in
    per-step dispatch."""

    _transformed_types = (PIL.Image.Image, torch.Tensor)

    def __init__(self, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.ensure = EnsureChannels(channels)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            x = F.pil_to_tensor(inpt).to(torch.float32).mul_(1.0 / 255)   # as ToDtype(scale=True) does
        else:
            x = F.to_dtype(inpt.as_subclass(torch.Tensor), torch.float32, scale=True)
        x = self.ensure.transform(x, params)
        if self.mean is None:
            return x
        return x.sub(self.mean).div_(self.std)   # sub, not sub_: x may be the caller's tensor


class StackCrops(nn.Module):
    """Apply ``post`` to each crop of Five/TenCrop and stack them: N_crops×C×H×W."""

    def __init__(self, post: Callable):
        super().__init__()
        self.post = post

    def forward(self, crops: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.post(c) for c in crops])


# --------------------------------------------------------------------------------------------------
# Step registry
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepDef:
    """One step the builder offers: defaults (all params it takes) and how to build it."""
    name: str
    defaults: dict
    build: Callable[[dict, str], Callable]  # (params merged with defaults, dataset mode) → transform
    doc: str
    tta_only: bool = False


STEPS: Registry[StepDef] = Registry("augmentation step", error=ConfigError)
TTA_ONLY_STEPS = ("FiveCrop", "TenCrop")
NESTED_STEPS = ("RandomApply", "RandomChoice", "RandomOrder")

_TUPLE_PARAMS = {"scale", "ratio", "translate", "size", "padding", "degrees", "shear", "fill"}


def _tv(cls_name: str) -> Callable[[dict, str], Callable]:
    def build(params: dict, mode: str) -> Callable:
        kwargs = {k: tuple(v) if k in _TUPLE_PARAMS and isinstance(v, list) else v for k, v in params.items()}
        return getattr(v2, cls_name)(**kwargs)
    return build


def _step(name: str, defaults: dict, doc: str, build: Callable | None = None, tta_only: bool = False) -> None:
    STEPS.add(name, StepDef(name, defaults, build or _tv(name), doc, tta_only))


def _build_resize(params: dict, mode: str) -> Callable:
    """Resize; with one number (the shorter side) the longer side stops at MAX_SIDE (torchvision's
    max_size, which must exceed the shorter side: at MAX_SIDE itself the longer side is set)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    size = kwargs["size"]
    short = size if isinstance(size, int) else size[0] if len(size) == 1 else None
    if isinstance(short, int) and not isinstance(short, bool):
        if short < MAX_SIDE:
            kwargs["max_size"] = MAX_SIDE
        else:
            kwargs["size"], kwargs["max_size"] = None, MAX_SIDE
    return v2.Resize(**kwargs)


_step("Resize", {"size": 32, "interpolation": "bilinear", "antialias": True},
      f"Resize; an int sets the shorter side (the longer one stops at {MAX_SIDE:,} px), [h, w] the exact size.",
      build=_build_resize)
_step("RandomCrop", {"size": 32, "padding": 4, "padding_mode": "constant", "pad_if_needed": False, "fill": 0},
      "Pad, then crop a random size×size window (the CIFAR recipe).")
_step("CenterCrop", {"size": 32}, "Crop the centre.")
_step("RandomResizedCrop", {"size": 224, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                            "interpolation": "bilinear", "antialias": True},
      "Crop a random area and aspect ratio, resize to size (the ImageNet recipe).")
_step("FiveCrop", {"size": 28}, "Four corners and the centre (test-time augmentation only).", tta_only=True)
_step("TenCrop", {"size": 28, "vertical_flip": False},
      "FiveCrop plus its flipped copies (test-time augmentation only).", tta_only=True)
_step("RandomHorizontalFlip", {"p": 0.5}, "Mirror left-right with probability p.")
_step("RandomVerticalFlip", {"p": 0.5}, "Mirror top-bottom with probability p.")
_step("RandomRotation", {"degrees": 15, "interpolation": "nearest", "expand": False, "fill": 0},
      "Rotate by a random angle in [-degrees, degrees].")
_step("Pad", {"padding": 4, "fill": 0, "padding_mode": "constant"}, "Pad every border.")
_step("ColorJitter", {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.0},
      "Random brightness, contrast, saturation and hue changes.")
_step("Grayscale", {},
      "Convert to grayscale, keeping the pipeline's channel count (3 in an RGB pipeline).",
      build=lambda params, mode: v2.Grayscale(num_output_channels=3 if mode == "RGB" else 1))
_step("RandomGrayscale", {"p": 0.1}, "Grayscale with probability p (channel count kept).")
_step("RandomAffine", {"degrees": 0, "translate": [0.1, 0.1], "scale": [0.9, 1.1], "shear": 0,
                       "interpolation": "nearest", "fill": 0},
      "Random rotation, translation (fraction of size), scale and shear.")


def _nested(cls_name: str, with_p: bool) -> Callable[[dict, str], Callable]:
    def build(params: dict, mode: str) -> Callable:
        children = [_build_step(s, mode, where=f"{cls_name}.steps[{k}]") for k, s in enumerate(params["steps"])]
        if cls_name == "RandomApply":
            return v2.RandomApply(children, p=params["p"])
        return getattr(v2, cls_name)(children)
    return build


_step("RandomApply", {"p": 0.5, "steps": [{"name": "ColorJitter", "params": {
      "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}}]},
      "Apply the nested steps (all of them) with probability p.", build=_nested("RandomApply", True))
_step("RandomChoice", {"steps": [{"name": "RandomRotation", "params": {"degrees": 15}},
                                 {"name": "RandomAffine", "params": {"degrees": 0, "translate": [0.1, 0.1]}}]},
      "Apply one of the nested steps, picked at random.", build=_nested("RandomChoice", False))
_step("RandomOrder", {"steps": [{"name": "ColorJitter", "params": {}},
                                {"name": "RandomRotation", "params": {"degrees": 10}}]},
      "Apply all nested steps in a random order.", build=_nested("RandomOrder", False))


def list_steps() -> dict[str, dict]:
    """Step name → default params (a copy), for the UI builder. Five/TenCrop are TTA-only."""
    return {name: copy.deepcopy(STEPS.get(name).defaults) for name in STEPS}


def describe_steps() -> dict[str, dict]:
    """Step name → {"params": defaults, "doc": one line, "tta_only": bool}."""
    return {name: {"params": copy.deepcopy(s.defaults), "doc": s.doc, "tta_only": s.tta_only}
            for name, s in ((n, STEPS.get(n)) for n in STEPS)}


# --------------------------------------------------------------------------------------------------
# Spec validation and building (limits: see MAX_SIDE at the top)
# --------------------------------------------------------------------------------------------------

_SCALARS = (str, bool, int, float, type(None))
_SQRT2 = math.sqrt(2.0)


def _show(value: Any) -> str:
    """A user's value in a message: short, even when huge or deeply nested."""
    try:
        return reprlib.repr(value)
    except ValueError:  # an int of more digits than Python prints
        return "<a number too long to print>"


def _fail(where: str, name: str | None, message: str) -> ConfigError:
    return ConfigError(f"Augmentation {where}{f' ({name})' if name else ''}: {message}")


def _bad_step(where: str, step: Any) -> ConfigError:
    return _fail(where, None, f"expected {{'name': <step>, 'params': {{...}}}}, got {_show(step)}. "
                              f"Valid steps: {', '.join(STEPS)}.")


def _check_value(value: Any, where: str, name: str, key: Any) -> None:
    """A param value is a JSON scalar or a flat list of them, and every number is finite."""
    for x in value if isinstance(value, (list, tuple)) else [value]:
        if not isinstance(x, _SCALARS):
            raise _fail(where, name, f"params.{key} must be a number, text, true/false, null or a flat list "
                                     f"of them, got {_show(value)}.")
        if isinstance(x, float) and not math.isfinite(x):
            raise _fail(where, name, f"params.{key} must hold finite numbers, got {_show(value)}.")


def _check_structure(spec: list) -> None:
    """Shape, depth and count of a spec without recursion (a 3,000-deep spec must be refused before
    any recursive code sees it): every step a dict with a text name and params of scalars or flat
    lists, at most MAX_NESTING levels, MAX_STEPS steps and MAX_ORDER_STEPS in one RandomOrder."""
    todo = [(step, f"step {k + 1}", 1) for k, step in enumerate(spec)]
    count = 0
    while todo:
        step, where, depth = todo.pop()
        count += 1
        if count > MAX_STEPS:
            raise ConfigError(f"The augmentation spec has more than {MAX_STEPS} steps (nested ones included); "
                              f"the limit is {MAX_STEPS}. Remove some steps.")
        if depth > MAX_NESTING:
            raise _fail(where, None, f"steps are nested {depth} levels deep in RandomApply/RandomChoice/"
                                     f"RandomOrder; the limit is {MAX_NESTING} levels. Flatten the pipeline "
                                     f"(a RandomApply inside a RandomApply can be one step with p multiplied).")
        if not isinstance(step, dict) or not isinstance(step.get("name"), str):
            raise _bad_step(where, step)
        name, params = step["name"], step.get("params") or {}
        if not isinstance(params, dict):
            raise _fail(where, name, f"params must be a dict, got {_show(params)}.")
        for key, value in params.items():
            if key == "steps" and name in NESTED_STEPS and isinstance(value, list):
                if name == "RandomOrder" and len(value) > MAX_ORDER_STEPS:
                    raise _fail(where, name, f"{len(value)} nested steps; the limit is {MAX_ORDER_STEPS} in "
                                             f"one RandomOrder. Split it into several RandomOrder steps.")
                todo.extend((s, f"{where}.{k + 1}", depth + 1) for k, s in enumerate(value))
            else:
                _check_value(value, where, name, key)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numbers(value: Any, lengths: tuple[int, ...], whole: bool = False) -> list | None:
    """``value`` (a number, or a list of ``lengths`` numbers) as a list; None when it is not one."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(items) not in lengths:
        return None
    if not all(_is_number(x) and (not whole or isinstance(x, int)) for x in items):
        return None
    return items


def _ranges_ok(value: Any, lo: float, hi: float, lengths: tuple[int, ...] = (2,),
               scalar: tuple[float, float] | None = None) -> bool:
    """A number within ``scalar``, or a list of ``lengths`` numbers within [lo, hi] as ordered
    [min, max] pairs."""
    if not isinstance(value, (list, tuple)):
        return scalar is not None and _is_number(value) and scalar[0] <= value <= scalar[1]
    v = _numbers(value, lengths)
    return v is not None and all(lo <= x <= hi for x in v) and all(v[i] <= v[i + 1] for i in range(0, len(v), 2))


def _check_geometry(name: str, p: dict, where: str) -> None:
    """Ranges of the spatial params: sizes, padding, angles, scales, ratios."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise _fail(where, name, message)

    if "size" in p:
        v = _numbers(p["size"], (1, 2), whole=True)
        use = f"Use a whole number of pixels from 1 to {MAX_SIDE:,}, or [height, width] each from 1 to {MAX_SIDE:,}."
        need(v is not None and min(v) >= 1, f"size {_show(p['size'])}: {use}")
        need(max(v) <= MAX_SIDE, f"size {_show(p['size'])} would make images {max(v):,} px a side; the limit is "
                                 f"{MAX_SIDE:,} px a side. {use}")
    if p.get("padding") is not None:
        v = _numbers(p["padding"], (1, 2, 4), whole=True)
        need(v is not None and all(x >= 0 for x in v),  # how much it may add: _padded
             f"padding {_show(p['padding'])}: use a whole number of pixels (0 or more), or a list of 2 "
             f"([left and right, top and bottom]) or 4 ([left, top, right, bottom]) of them.")
    for key in ("degrees", "shear"):
        if p.get(key) is not None:
            need(_ranges_ok(p[key], -MAX_DEGREES, MAX_DEGREES, (2, 4) if key == "shear" else (2,),
                            scalar=(0, MAX_DEGREES)),
                 f"{key} {_show(p[key])}: use a number from 0 to {MAX_DEGREES} (a random angle in [-{key}, {key}]) "
                 f"or [min, max] with -{MAX_DEGREES} <= min <= max <= {MAX_DEGREES}"
                 f"{' (4 values: x range, then y range)' if key == 'shear' else ''}.")
    if p.get("scale") is not None:
        crop = name == "RandomResizedCrop"
        lo, hi = (0.0, 1.0) if crop else (1 / MAX_AFFINE_SCALE, MAX_AFFINE_SCALE)
        need(_ranges_ok(p["scale"], lo, hi) and p["scale"][0] > 0,
             f"scale {_show(p['scale'])}: use [min, max] {'fractions of the image area' if crop else 'zoom factors'} "
             f"with {lo:g} {'<' if crop else '<='} min <= max <= {hi:g}.")
    if p.get("ratio") is not None:
        need(_ranges_ok(p["ratio"], 1 / MAX_RATIO, MAX_RATIO),
             f"ratio {_show(p['ratio'])}: use [min, max] aspect ratios (width / height) with "
             f"{1 / MAX_RATIO:g} <= min <= max <= {MAX_RATIO:g}.")


def _check_colors(name: str, p: dict, where: str) -> None:
    """Ranges of the colour params: jitter factors and fill."""
    for key in ("brightness", "contrast", "saturation"):
        if p.get(key) is not None and not _ranges_ok(p[key], 0, MAX_JITTER, scalar=(0, MAX_JITTER)):
            raise _fail(where, name, f"{key} {_show(p[key])}: use a number from 0 to {MAX_JITTER:g} or [min, max] "
                                     f"factors with 0 <= min <= max <= {MAX_JITTER:g}.")
    if p.get("fill") is not None:
        v = _numbers(p["fill"], (1, 3))
        if v is None or not all(0 <= x <= 255 for x in v):
            raise _fail(where, name, f"fill {_show(p['fill'])}: use a pixel value from 0 to 255, or "
                                     f"[red, green, blue] values from 0 to 255.")


def _check_step(step: Any, where: str) -> tuple[StepDef, dict]:
    if not isinstance(step, dict) or not isinstance(step.get("name"), str):
        raise _bad_step(where, step)
    extra = set(step) - {"name", "params"}
    if extra:
        raise ConfigError(f"Augmentation {where} ({step['name']}): unknown keys {_show(sorted(map(str, extra)))}; "
                          f"a step has only 'name' and 'params'.")
    if step["name"] not in STEPS:
        raise ConfigError(f"Augmentation {where}: unknown step {_show(step['name'])}. Valid steps: {', '.join(STEPS)}.")
    sdef = STEPS.get(step["name"])
    params = step.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"Augmentation {where} ({sdef.name}): params must be a dict, got {_show(params)}.")
    unknown = sorted(map(str, set(params) - set(sdef.defaults)))
    if unknown:
        valid = ", ".join(sdef.defaults) or "none"
        raise ConfigError(f"Augmentation {where} ({sdef.name}): unknown params {', '.join(unknown)}. "
                          f"Valid params: {valid}.")
    try:
        json.dumps(params)
    except (TypeError, ValueError, RecursionError) as e:
        raise ConfigError(f"Augmentation {where} ({sdef.name}): params must be JSON values ({e}).") from None
    merged = {**copy.deepcopy(sdef.defaults), **copy.deepcopy(params)}
    if sdef.name in NESTED_STEPS and (not isinstance(merged["steps"], list) or not merged["steps"]):
        raise ConfigError(f"Augmentation {where} ({sdef.name}): 'steps' must be a non-empty list of steps.")
    _check_geometry(sdef.name, merged, where)
    _check_colors(sdef.name, merged, where)
    return sdef, merged


def _build_step(step: Any, mode: str, where: str, allow_tta: bool = False) -> Callable:
    sdef, params = _check_step(step, where)
    if sdef.tta_only and not allow_tta:
        raise ConfigError(f"Augmentation {where}: {sdef.name} returns several crops per image and is for "
                          f"test-time augmentation only (build_tta_transform); remove it from this spec.")
    channels = 1 if mode == "L" else 3
    if isinstance(params.get("fill"), (list, tuple)) and len(params["fill"]) not in (1, channels):
        raise ConfigError(f"Augmentation {where} ({sdef.name}): fill {_show(params['fill'])} has "
                          f"{len(params['fill'])} values; these {mode} images have {channels} channel(s). "
                          f"Use one number or {channels} values.")
    try:
        return sdef.build(params, mode)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"Augmentation {where} ({sdef.name}): invalid params {_show(params)}: {e}. "
                          f"Valid params: {', '.join(sdef.defaults) or 'none'}.") from None


# ---- the image sizes a spec can make --------------------------------------------------------------
# A bound (a, b): the longest side is at most a × (the pipeline's input side) + b; a = 0 once a
# step has set the size.

def _describe_bound(bound: tuple[float, int]) -> str:
    a, b = bound
    if a == 0:
        return f"{b:,} px a side"
    times = "their size" if a == 1 else f"{a:.3g} × their size"
    return f"{times}{f' + {b:,} px' if b else ''} a side ({math.ceil(a * 32 + b):,} px for a 32-px image)"


def _within(bound: tuple[float, int], where: str, name: str, what: str, fix: str) -> tuple[float, int]:
    a, b = bound
    if b > MAX_SIDE or a > MAX_GROWTH + 1e-9:
        raise _fail(where, name, f"{what} would make images {_describe_bound(bound)}; the limit is {MAX_SIDE:,} px "
                                 f"a side (at most {MAX_SIDE:,} px added to an image, at most {MAX_GROWTH:g} × its "
                                 f"size). {fix}")
    return bound


def _padded(bound: tuple[float, int], padding: Any, where: str, name: str) -> tuple[float, int]:
    v = list(padding) if isinstance(padding, (list, tuple)) else [padding]
    left, top, right, bottom = (v * 4)[:4] if len(v) == 1 else (v * 2 if len(v) == 2 else v)
    a, b = bound
    room = max(MAX_SIDE - b, 0)
    return _within((a, b + max(left + right, top + bottom)), where, name, f"padding {_show(padding)}",
                   f"Use a padding of at most {room // 2:,} (it is added on both sides: left + right and "
                   f"top + bottom at most {room:,} px).")


def _bound_after(step: dict, bound: tuple[float, int], where: str) -> tuple[float, int]:
    """The bound after one normalized step (its params already checked)."""
    name, p = step["name"], step["params"]
    if name in NESTED_STEPS:
        return _nested_bound(name, p["steps"], bound, where)
    if name in ("Pad", "RandomCrop") and p.get("padding"):
        padded = _padded(bound, p["padding"], where, name)
        if name == "Pad":
            return padded
    if "size" in p:
        return 0.0, max(_numbers(p["size"], (1, 2), whole=True))
    if name == "RandomRotation" and p.get("expand"):
        a, b = bound
        return _within((a * _SQRT2, math.ceil(b * _SQRT2)), where, name, "expand=true",
                       "Set expand to false (the corners are cut, the size kept), or Resize or crop to a "
                       "smaller size before the rotation.")
    return bound


def _nested_bound(name: str, steps: list[dict], bound: tuple[float, int], where: str) -> tuple[float, int]:
    def worst(bounds):
        return max(x[0] for x in bounds), max(x[1] for x in bounds)

    if name == "RandomChoice":
        return worst([_bound_after(s, bound, f"{where}.{k + 1}") for k, s in enumerate(steps)])
    if name == "RandomApply":
        out = bound
        for k, s in enumerate(steps):
            out = _bound_after(s, out, f"{where}.{k + 1}")
        return worst([bound, out])
    # RandomOrder: the worst order, over the subsets of steps already applied (2^n, n <= MAX_ORDER_STEPS)
    done = {0: bound}
    for mask in range(1, 1 << len(steps)):
        done[mask] = worst([_bound_after(s, done[mask & ~(1 << k)], f"{where}.{k + 1}")
                            for k, s in enumerate(steps) if mask >> k & 1])
    return done[(1 << len(steps)) - 1]


def _check_spec(spec: Any) -> list:
    if spec is None:
        return []
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"An augmentation spec must be a list of steps, got {type(spec).__name__}.")
    return list(spec)


def _normalize_steps(steps: list, prefix: str) -> list[dict]:
    out = []
    for k, step in enumerate(steps):
        where = f"{prefix}{k + 1}"
        _build_step(step, "RGB", where=where, allow_tta=True)
        sdef, params = _check_step(step, where)
        if sdef.name in NESTED_STEPS:
            params["steps"] = _normalize_steps(params["steps"], f"{where}.")
        out.append({"name": sdef.name, "params": params})
    return out


def normalize_spec(spec: Sequence[dict] | None) -> list[dict]:
    """Validate ``spec`` and return it with all params filled in: its shape and size (without
    recursion), every step's params and ranges (building every step once), then the image sizes it
    can make (see MAX_SIDE). Nothing here touches an image."""
    steps = _check_spec(spec)
    _check_structure(steps)
    out = _normalize_steps(steps, "step ")
    bound = (1.0, 0)
    for k, step in enumerate(out):
        bound = _bound_after(step, bound, f"step {k + 1}")
    return out


def spec_to_json(spec: Sequence[dict]) -> str:
    """The spec as JSON text (validated)."""
    return json.dumps(normalize_spec(spec))


def spec_from_json(text: str) -> list[dict]:
    """Parse and validate a JSON spec."""
    try:
        spec = json.loads(text)
    except RecursionError:
        raise ConfigError(f"The augmentation spec is nested too deeply to read; the limit is {MAX_NESTING} "
                          f"levels of RandomApply/RandomChoice/RandomOrder.") from None
    except ValueError as e:  # JSONDecodeError, or a number of more than 4,300 digits
        raise ConfigError(f"The augmentation spec is not valid JSON: {e}.") from None
    return normalize_spec(spec)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std for ``Normalize``; preset "none" adds no Normalize (values stay in [0, 1])."""
    preset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def for_mode(self, mode: str) -> "Normalization":
        """Same statistics with 1 channel for "L" (mean of the three) or 3 for "RGB" (repeated)."""
        want = 1 if mode == "L" else 3
        if len(self.mean) == want:
            return self
        if len(self.mean) == 3 and want == 1:
            return Normalization(self.preset, (float(np.mean(self.mean)),), (float(np.mean(self.std)),))
        if len(self.mean) == 1 and want == 3:
            return Normalization(self.preset, self.mean * 3, self.std * 3)
        raise ConfigError(f"Normalization {self.preset!r} has {len(self.mean)} channels; mode {mode!r} needs {want}.")

    def to_dict(self) -> dict:
        return {"preset": self.preset, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        try:
            mean, std = tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"])
            preset = str(d.get("preset", "custom"))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"A normalization needs 'mean' and 'std' lists of numbers, got {d!r} ({e}).") from None
        if len(mean) != len(std) or len(mean) not in (1, 3) or any(s <= 0 for s in std):
            raise ConfigError(f"Normalization {d!r}: mean and std need 1 or 3 values each, std > 0.")
        return cls(preset, mean, std)


NORMALIZE_PRESETS: dict[str, Normalization | None] = {
    "tutorial": Normalization("tutorial", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # maps [0, 1] to [-1, 1]
    "imagenet": Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "dataset": None,  # computed from the training images: make_normalization("dataset", ds=..., indices=...)
    "none": Normalization("none", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def compute_mean_std(ds: LabDataset, indices: Sequence[int] | None = None,
                     max_images: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (pixels in [0, 1]) over up to ``max_images`` of ``indices``.

    The images are picked evenly spaced (deterministic) and counted per pixel, at native size.
    """
    idx = list(range(len(ds))) if indices is None else [int(i) for i in indices]
    if not idx:
        raise DataError(f"Cannot compute mean/std of {ds.name}: no images selected.")
    if len(idx) > max_images:
        idx = [idx[int(k)] for k in np.linspace(0, len(idx) - 1, max_images)]
    channels = 1 if ds.mode == "L" else 3
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    data = getattr(ds, "data", None)
    chunks = ([np.asarray(ds.to_uint8_array(idx[k:k + 512])) for k in range(0, len(idx), 512)]
              if isinstance(data, np.ndarray) else None)
    for a in (chunks if chunks is not None else (np.asarray(ds.load_image(i)) for i in idx)):
        x = a.reshape(-1, channels).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel: avoid dividing by zero
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def make_normalization(preset: str, mode: str = "RGB", ds: LabDataset | None = None,
                       indices: Sequence[int] | None = None, max_images: int = 2000) -> Normalization:
    """A ``Normalization`` for a preset name, with the channel count of ``mode``.

    "dataset" needs ``ds`` (and the training ``indices``, so no val/test statistics leak in).
    """
    if preset not in NORMALIZE_PRESETS:
        raise ConfigError(f"Unknown normalization {preset!r}. Choose one of: {', '.join(NORMALIZE_PRESETS)}.")
    if preset == "dataset":
        if ds is None:
            raise ConfigError("Normalization 'dataset' needs the dataset to compute its mean and std.")
        mean, std = compute_mean_std(ds, indices, max_images=max_images)
        return Normalization("dataset", mean, std).for_mode(mode)
    return NORMALIZE_PRESETS[preset].for_mode(mode)


def _as_normalization(normalization: Normalization | str | dict | None, mode: str) -> Normalization:
    if normalization is None:
        normalization = "none"
    if isinstance(normalization, str):
        return make_normalization(normalization, mode)
    if isinstance(normalization, dict):
        normalization = Normalization.from_dict(normalization)
    return normalization.for_mode(mode)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------

def _check_mode(mode: str) -> None:
    if mode not in ("RGB", "L"):
        raise ConfigError(f"Image mode must be 'RGB' or 'L', got {mode!r}.")


def _tensor_tail(normalization: Normalization, mode: str) -> list[Callable]:
    if normalization.preset == "none":
        mean = std = None
    else:
        mean, std = list(normalization.mean), list(normalization.std)
    return [ToNormalizedTensor(1 if mode == "L" else 3, mean, std)]


def build_steps(spec: Sequence[dict] | None, mode: str) -> list[Callable]:
    """The spec's steps as transforms (no conversion, no tensor tail), after every check of
    ``normalize_spec`` (sizes, nesting, ranges)."""
    _check_mode(mode)
    normalize_spec(spec)
    return [_build_step(step, mode, where=f"step {k + 1}") for k, step in enumerate(_check_spec(spec))]


def build_transform(spec: Sequence[dict] | None, normalization: Normalization | str | None,
                    mode: str) -> v2.Compose:
    """ToMode(mode) → spec steps → ToImage → ToDtype(float32, scale=True) → Normalize: C×H×W float."""
    norm = _as_normalization(normalization, mode)
    return v2.Compose([ToMode(mode), *build_steps(spec, mode), *_tensor_tail(norm, mode)])


def build_tta_transform(eval_spec: Sequence[dict] | None, normalization: Normalization | str | None,
                        mode: str, *, kind: str = "five", crop_size: int | Sequence[int]) -> v2.Compose:
    """Eval steps → FiveCrop/TenCrop(crop_size) → per-crop tensor tail, stacked: N_crops×C×H×W (5 or 10).

    ``crop_size`` should be the model's input size; give an eval spec that makes images a bit larger
    (e.g. Pad or Resize) so the crops differ.
    """
    if kind not in ("five", "ten"):
        raise ConfigError(f"TTA kind must be 'five' or 'ten', got {kind!r}.")
    norm = _as_normalization(normalization, mode)
    size = crop_size if isinstance(crop_size, int) else tuple(crop_size)
    crop = v2.FiveCrop(size) if kind == "five" else v2.TenCrop(size)
    return v2.Compose([ToMode(mode), *build_steps(eval_spec, mode), crop,
                       StackCrops(v2.Compose(_tensor_tail(norm, mode)))])


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _size_param(size: int | Sequence[int]) -> int | list[int]:
    h, w = _size_hw(size)
    return h if h == w else [h, w]


def _differs(image_size: int | Sequence[int], native_size: int | Sequence[int] | None) -> bool | None:
    """None when the native size is unknown, else whether it differs from ``image_size``."""
    if native_size is None:
        return None
    if isinstance(native_size, (int, np.integer)):
        native_hw = (int(native_size), int(native_size))
    else:
        native_hw = (int(native_size[1]), int(native_size[0]))  # (width, height) like PIL
    return native_hw != _size_hw(image_size)


def default_train_spec(image_size: int | Sequence[int], native_size: int | Sequence[int] | None = None,
                       hflip: bool = True) -> list[dict]:
    """The tutorials' training augmentation.

    Below 64 px: RandomCrop(size, padding=size//16, reflect) + RandomHorizontalFlip (the CIFAR recipe:
    ±2 px for 32×32, which trains to higher accuracy in 10 epochs than the tutorials' ±4 px of zeros), with
    Resize + CenterCrop first when ``native_size`` is given and differs. From 64 px:
    RandomResizedCrop + flip (the ImageNet recipe, any input size). ``image_size`` is an int or
    (height, width); ``native_size`` the images' common size as (width, height), like
    ``datasets.common_image_size``, or None (small sizes then assume the images already have it).
    ``hflip=False`` for data where mirroring changes the meaning (digits, text).
    """
    h, w = _size_hw(image_size)
    size = _size_param(image_size)
    if min(h, w) >= LARGE_IMAGE_SIZE:
        spec = [{"name": "RandomResizedCrop", "params": {"size": size}}]
    else:
        spec = [{"name": "Resize", "params": {"size": size}}, {"name": "CenterCrop", "params": {"size": size}}] \
            if _differs(image_size, native_size) else []
        spec.append({"name": "RandomCrop", "params": {"size": size, "padding": max(1, min(h, w) // 16),
                                                      "padding_mode": "reflect"}})
    if hflip:
        spec.append({"name": "RandomHorizontalFlip", "params": {"p": 0.5}})
    return normalize_spec(spec)


def default_eval_spec(image_size: int | Sequence[int], native_size: int | Sequence[int] | None = None) -> list[dict]:
    """Evaluation resizing: empty when the images already have ``image_size`` (``native_size`` equal,
    or None below 64 px); else Resize + CenterCrop — from 64 px the tutorial Resize(size / 0.875) →
    CenterCrop(size), e.g. 256 → 224."""
    differs = _differs(image_size, native_size)
    h, w = _size_hw(image_size)
    large = min(h, w) >= LARGE_IMAGE_SIZE
    if differs is False or (differs is None and not large):
        return []
    resize: int | list[int] = int(math.floor(min(h, w) / EVAL_CROP_RATIO + 0.5)) if large else _size_param(image_size)
    return normalize_spec([{"name": "Resize", "params": {"size": resize}},
                           {"name": "CenterCrop", "params": {"size": _size_param(image_size)}}])


def transform_state(eval_spec: Sequence[dict] | None, normalization: Normalization | str | None, mode: str,
                    image_size: int | Sequence[int]) -> dict:
    """Everything needed to rebuild the eval transform, as JSON-able data (stored in checkpoints)."""
    _check_mode(mode)
    norm = _as_normalization(normalization, mode)
    return {"version": TRANSFORM_STATE_VERSION, "eval_spec": normalize_spec(eval_spec),
            "normalization": norm.to_dict(), "mode": mode, "image_size": list(_size_hw(image_size))}


def eval_transform_from_state(state: dict) -> v2.Compose:
    """Rebuild the eval transform saved by ``transform_state``."""
    if not isinstance(state, dict) or not {"eval_spec", "normalization", "mode"} <= set(state):
        raise ConfigError(f"A transform state needs 'eval_spec', 'normalization' and 'mode'; got "
                          f"{sorted(state) if isinstance(state, dict) else type(state).__name__}.")
    if state.get("version", 1) > TRANSFORM_STATE_VERSION:
        raise ConfigError(f"Transform state version {state['version']} is newer than this lab understands "
                          f"({TRANSFORM_STATE_VERSION}); update Classifier Lab.")
    return build_transform(state["eval_spec"], Normalization.from_dict(state["normalization"]), state["mode"])


def tta_transform_from_state(state: dict, kind: str = "five") -> v2.Compose:
    """The saved eval transform with test-time crops: eval steps → Resize to image_size / 0.875 →
    Five/TenCrop(image_size), stacked N_crops×C×H×W (each crop sees ~87 % of the image)."""
    if not isinstance(state, dict) or "image_size" not in state:
        raise ConfigError("A transform state for test-time augmentation needs 'image_size'.")
    eval_transform_from_state(state)  # validates the state
    h, w = _size_hw(state["image_size"])
    grown = [int(math.floor(h / EVAL_CROP_RATIO + 0.5)), int(math.floor(w / EVAL_CROP_RATIO + 0.5))]
    spec = list(state["eval_spec"]) + [{"name": "Resize", "params": {"size": grown}}]
    return build_tta_transform(spec, Normalization.from_dict(state["normalization"]), state["mode"],
                               kind=kind, crop_size=(h, w))


def augment_preview(image: PIL.Image.Image, spec: Sequence[dict] | None, n: int = 8, seed: int = 0,
                    mode: str | None = None) -> list[PIL.Image.Image]:
    """``n`` augmented versions of one image (steps only, no tensor/normalise), reproducible for a seed.

    The global torch RNG (which v2 transforms use) is seeded inside ``fork_rng`` and restored after.
    The spec is checked in full (``normalize_spec``: sizes, nesting, ranges) before the image is.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_PREVIEW_SEED:
        raise ConfigError(f"The preview seed must be a whole number from 0 to {MAX_PREVIEW_SEED:,}, "
                          f"got {_show(seed)}.")
    mode = mode or ("L" if image.mode in GRAYSCALE_MODES else "RGB")
    pipeline = v2.Compose([ToMode(mode), *build_steps(spec, mode)])
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n):
            try:
                img = pipeline(image)
            except ValueError as e:  # e.g. a RandomCrop larger than this image (without pad_if_needed)
                raise ConfigError(f"The augmentation pipeline cannot run on this {image.width}×{image.height}-px "
                                  f"image: {e}") from None
            if isinstance(img, torch.Tensor):
                img = F.to_pil_image(img)
            out.append(img)
    return out
