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
    values. Four v2 steps cost 193 µs an image against 111 µs for the tutorial's ToTensor +
    Normalize (benchmarks/bench_speed.py profile, 32×32 RGB); most of it is per-step dispatch."""

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


_step("Resize", {"size": 32, "interpolation": "bilinear", "antialias": True},
      "Resize; an int sets the shorter side, [h, w] the exact size.")
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
# Spec validation and building
# --------------------------------------------------------------------------------------------------

def _check_step(step: Any, where: str) -> tuple[StepDef, dict]:
    if not isinstance(step, dict) or not isinstance(step.get("name"), str):
        raise ConfigError(f"Augmentation {where}: expected {{'name': <step>, 'params': {{...}}}}, got {step!r}. "
                          f"Valid steps: {', '.join(STEPS)}.")
    extra = set(step) - {"name", "params"}
    if extra:
        raise ConfigError(f"Augmentation {where} ({step['name']}): unknown keys {sorted(extra)}; "
                          f"a step has only 'name' and 'params'.")
    if step["name"] not in STEPS:
        raise ConfigError(f"Augmentation {where}: unknown step {step['name']!r}. Valid steps: {', '.join(STEPS)}.")
    sdef = STEPS.get(step["name"])
    params = step.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"Augmentation {where} ({sdef.name}): params must be a dict, got {params!r}.")
    unknown = sorted(set(params) - set(sdef.defaults))
    if unknown:
        valid = ", ".join(sdef.defaults) or "none"
        raise ConfigError(f"Augmentation {where} ({sdef.name}): unknown params {', '.join(unknown)}. "
                          f"Valid params: {valid}.")
    try:
        json.dumps(params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Augmentation {where} ({sdef.name}): params must be JSON values ({e}).") from None
    merged = {**copy.deepcopy(sdef.defaults), **copy.deepcopy(params)}
    if sdef.name in NESTED_STEPS:
        if not isinstance(merged["steps"], list) or not merged["steps"]:
            raise ConfigError(f"Augmentation {where} ({sdef.name}): 'steps' must be a non-empty list of steps.")
    return sdef, merged


def _build_step(step: Any, mode: str, where: str, allow_tta: bool = False) -> Callable:
    sdef, params = _check_step(step, where)
    if sdef.tta_only and not allow_tta:
        raise ConfigError(f"Augmentation {where}: {sdef.name} returns several crops per image and is for "
                          f"test-time augmentation only (build_tta_transform); remove it from this spec.")
    try:
        return sdef.build(params, mode)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"Augmentation {where} ({sdef.name}): invalid params {params}: {e}. "
                          f"Valid params: {', '.join(sdef.defaults) or 'none'}.") from None


def _check_spec(spec: Any) -> list:
    if spec is None:
        return []
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"An augmentation spec must be a list of steps, got {type(spec).__name__}.")
    return list(spec)


def normalize_spec(spec: Sequence[dict] | None) -> list[dict]:
    """Validate ``spec`` (building every step once) and return it with all params filled in."""
    out = []
    for k, step in enumerate(_check_spec(spec)):
        _build_step(step, "RGB", where=f"step {k + 1}", allow_tta=True)
        sdef, params = _check_step(step, f"step {k + 1}")
        if sdef.name in NESTED_STEPS:
            params["steps"] = normalize_spec(params["steps"])
        out.append({"name": sdef.name, "params": params})
    return out


def spec_to_json(spec: Sequence[dict]) -> str:
    """The spec as JSON text (validated)."""
    return json.dumps(normalize_spec(spec))


def spec_from_json(text: str) -> list[dict]:
    """Parse and validate a JSON spec."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
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
    """The spec's steps as transforms (no conversion, no tensor tail)."""
    _check_mode(mode)
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

    Below 64 px: RandomCrop(size, padding=size//8) + RandomHorizontalFlip (the CIFAR recipe), with
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
        spec.append({"name": "RandomCrop", "params": {"size": size, "padding": min(h, w) // 8}})
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
    """
    mode = mode or ("L" if image.mode in GRAYSCALE_MODES else "RGB")
    pipeline = v2.Compose([ToMode(mode), *build_steps(spec, mode)])
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n):
            img = pipeline(image)
            if isinstance(img, torch.Tensor):
                img = F.to_pil_image(img)
            out.append(img)
    return out
