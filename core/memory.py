"""Training and inference memory of a classifier, counted from what PyTorch really holds.

No gradient, activation or optimiser buffer is modelled by a formula where it can be counted:

* **Weights, gradients, optimiser state** come from the model itself: every parameter (once,
  even when tied), gradients only for parameters with ``requires_grad`` (freezing done by the
  factory is reflected), optimiser state as ``multiplier × trainable bytes`` from the small
  registry :data:`OPTIMIZERS` (``core.choices``, shared with the trainer: SGD with momentum 1×,
  without 0; Adam/AdamW 2×, 3× with amsgrad; RMSprop 1× + 1 with momentum + 1 when centered;
  Adagrad 1×) plus the 4-byte ``step`` counter some keep per parameter tensor. The tests check these against real optimisers.
* **Saved activations** are counted: the model is built by the factory with
  ``torch.device("meta")`` as default device (shapes only, no memory), re-bound to *fake* CPU
  tensors (``torch._subclasses.FakeTensorMode``: meta storage underneath, but the tensors say
  ``device="cpu"``), and a training forward pass plus the cross-entropy loss run under
  ``torch.autograd.graph.saved_tensors_hooks``. Every tensor autograd saves for backward is
  recorded once per untyped storage (``data_ptr()`` is 0 on meta, so the storage's identity is
  the key). Parameters and buffers (which autograd also "saves"), the input batch, the logits and
  half-precision weight copies are set apart; the rest is attributed to the module whose forward
  was running (a stack kept by per-module forward pre/post hooks). On the CPU this equals the bytes
  saved by a real forward pass exactly (every family of the zoo tested), and so does what the CPU
  allocator holds after a real forward and loss, less the logits and the loss (tests/test_memory.py
  checks both independently of this module).
  Why fake rather than plain meta tensors: device-dependent dispatch must follow the real path.
  (1) ``torch.autocast("meta")`` raises and ``torch.autocast("cpu")`` ignores meta tensors, so a
  meta forward under autocast silently stays fp32; fake CPU tensors are autocast like real ones.
  (2) ``scaled_dot_product_attention`` picks the math backend on meta (saving the whole
  attention matrix: +31 % for ViT-B/16 at 224²) but the fused CPU kernel on fake CPU tensors, like
  a real run. Plain meta tensors remain the fallback for fp32 if a model cannot run on fake ones.
* **Mixed precision** (``fp16``/``bf16``): the forward runs under ``torch.autocast("cpu", dtype)``.
  Master weights, gradients and optimiser state stay fp32; saved activations are what autocast
  produces. The half-precision weight copies are recorded separately (a ``TorchDispatchMode``
  sees every ``_to_copy`` of a parameter): autocast caches the copy of every trainable leaf
  weight until the autocast region exits, and autograd keeps the ones conv/linear save until
  backward, so they are part of the training footprint (½ the weight bytes of conv/linear
  layers; frozen weights' copies count only where autograd saves them). Meta kernels return
  half-precision BatchNorm/LayerNorm/GroupNorm statistics where the real kernels return fp32;
  this is corrected on the fly.
* **Simulated step peak** (``step_peak_bytes`` = ``required_bytes``): the same fake model runs a
  whole steady-state training step (forward, loss, backward, ``optimizer.step()`` with optimiser
  state already present; the forward is the one whose saved tensors are counted) while a
  ``TorchDispatchMode`` adds the bytes of every new tensor storage and a weak-reference callback
  on the storage subtracts them when it is freed (PyTorch keeps a storage's Python object alive
  exactly as long as the storage). This is the tensor-level peak an allocator sees, optimiser
  temporaries included, and it matched torch.profiler's CPU peak to within 1–2 % (to the byte
  for several models) on every zoo model. It leaves out backend scratch space that is not a
  tensor: oneDNN on the CPU (in convolution backward up to 4× the conv weight per thread:
  +43 % for ResNet-18 at 32×32, batch 32, 2 threads), im2col buffers of the non-oneDNN CPU
  convolution, cuDNN workspace on a GPU. A few backward ops whose fake/meta implementation is
  a slow Python decomposition are replaced by direct allocation of their outputs
  (``_SHAPE_ONLY_BACKWARD``; each checked to give the same peak).
  The sum of components (``training_total_bytes``) counts saved activations and gradients as
  if they coexisted, which they never fully do: it is above the measured peak (more so for ViT
  than for CNNs), and below it when the optimiser makes temporaries (Adam's for-loop on the CPU,
  foreach with weight decay on CUDA); benchmarks/bench_memory.py prints both, side by side.
* **Inference** is measured the same way: an eval-mode ``no_grad`` forward with live-tensor
  tracking; weights + input + that peak is the inference total (again without conv workspace).

Weights, gradients and optimiser state do not depend on the batch; activations, input and logits
grow linearly with it, which :func:`max_batch_size` uses to solve for the largest batch in a
budget (then verifies by estimating). An estimate runs every op through fake tensors, so models
of thousands of small ops (DenseNet, MobileNetV3) take longest; max_batch_size takes a handful of
estimates; results are cached per :class:`ZooFactory` / ``cache_key``. Nothing here imports Gradio.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from core import choices, models
from core.choices import OPTIMIZERS, OptimizerSpec
from core.errors import ConfigError, LabError, ModelError

__all__ = [
    "MEMORY_BUDGETS_GB",
    "PRECISIONS",
    "OPTIMIZERS",
    "OptimizerSpec",
    "MemoryEstimate",
    "MaxBatch",
    "ZooFactory",
    "estimate_memory",
    "max_batch_size",
    "measure_training_step_memory",
    "optimizer_state_multiplier",
    "clear_cache",
    "gib",
    "mib",
]

MiB = 1 << 20
GiB = 1 << 30

#: Memory budgets (GB of accelerator memory) offered by the UI.
MEMORY_BUDGETS_GB: tuple[int, ...] = (4, 8, 16, 24, 80)

#: precision name → autocast dtype (``None``: plain fp32 training), from the one registry
#: (core.choices.PRECISIONS), in its order.
PRECISIONS: dict[str, torch.dtype | None] = {name: choices.PRECISIONS.get(name).dtype for name in choices.PRECISIONS}


def mib(n_bytes: float) -> float:
    return n_bytes / MiB


def gib(n_bytes: float) -> float:
    return n_bytes / GiB


# --------------------------------------------------------------------------------------------
# Optimisers: how much state each keeps per trainable parameter. The registry (name → torch class,
# state size, what a run passes it) is core.choices.OPTIMIZERS, shared with the trainer and the run
# configuration; OPTIMIZERS and OptimizerSpec are re-exported here.
# --------------------------------------------------------------------------------------------

def optimizer_state_multiplier(optimizer: str = "sgd", momentum: float = 0.9, **options: Any) -> int:
    """Parameter-sized state buffers per trainable parameter, e.g. 2 for Adam."""
    spec = OPTIMIZERS.get(_norm_name(optimizer))
    return spec.state_multiplier(momentum if spec.uses_momentum else 0.0, options)


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------

_COMPONENTS = [
    # (field, label, in training total, in inference total)
    ("param_bytes", "parameters", True, True),
    ("buffer_bytes", "buffers (BatchNorm statistics)", True, True),
    ("gradient_bytes", "gradients (trainable parameters)", True, False),
    ("optimizer_bytes", "optimiser state", True, False),
    ("activation_bytes", "saved activations", True, False),
    ("weight_copy_bytes", "half-precision weight copies", True, False),
    ("input_bytes", "input batch (images + labels)", True, False),
    ("output_bytes", "logits + loss", True, False),
    ("overhead_bytes", "device overhead (given)", True, True),
]


@dataclass
class MemoryEstimate:
    """Bytes one training step (and one inference batch) needs, by component.

    ``training_total_bytes`` is the sum of the training components: weights, buffers, gradients,
    optimiser state, saved activations, half-precision weight copies, input and logits. It counts
    saved activations and gradients as if they coexisted, which they never fully do (backward
    frees activations as gradients appear), and it has no optimiser temporaries.
    ``step_peak_bytes`` is the simulated tensor-level peak of a whole step (``step_phase_peaks``:
    the peak of the forward, backward and optimiser-step phases), which tracks exactly which
    tensors coexist: 0–10 % below the sum for CNNs (29 % for ViT-B/16), above it when the
    optimiser's ``step`` makes temporaries (Adam's for-loop on the CPU, foreach with weight decay
    on CUDA). ``required_bytes`` is the simulated peak (the sum where no step was simulated):
    what to budget. None includes backend scratch space (oneDNN/cuDNN workspaces) or the CUDA
    context beyond ``device_overhead_bytes``.
    ``accumulation_steps`` > 1 (gradient accumulation): the simulated step is a later micro-batch
    of a group, which holds the earlier ones' gradients from before its forward to after its
    backward (backward adds into them). The components are the same; then they all coexist at the
    end of the forward pass, so the peak is the sum plus backward's temporaries (the new gradient
    of a layer before it is added in, the gradients flowing between layers).
    """

    model: str
    input_shape: tuple[int, int, int]
    batch_size: int
    optimizer: str
    momentum: float
    precision: str
    num_params: int
    trainable_params: int
    optimizer_multiplier: int
    param_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    weight_copy_bytes: int
    input_bytes: int
    output_bytes: int
    overhead_bytes: int
    training_total_bytes: int
    step_peak_bytes: int | None
    step_phase_peaks: dict[str, int] | None
    inference_activation_bytes: int | None
    inference_total_bytes: int | None
    layers: pd.DataFrame = field(repr=False)
    output_shape: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list, repr=False)
    accumulation_steps: int = 1       # batches a step accumulates; > 1: the peak holds the gradients all along

    @property
    def required_bytes(self) -> int:
        """What to budget for training: the simulated step peak (the sum of components when the
        step was not simulated)."""
        return self.step_peak_bytes if self.step_peak_bytes is not None else self.training_total_bytes

    @property
    def peak_phase(self) -> str | None:
        """The phase of the step (``step_phase_peaks`` key) where the simulated peak is; None
        when no step was simulated."""
        if not self.step_phase_peaks:
            return None
        return max(self.step_phase_peaks, key=self.step_phase_peaks.__getitem__)

    @property
    def training_total_mib(self) -> float:
        return mib(self.training_total_bytes)

    @property
    def required_mib(self) -> float:
        return mib(self.required_bytes)

    def fits(self, budget_bytes: float, total: str = "required") -> bool:
        return _pick_total(self, total) <= budget_bytes

    def as_table(self) -> pd.DataFrame:
        """Components in bytes and MiB, then the totals (rows left out when not computed)."""
        rows = [(label, getattr(self, name)) for name, label, _, _ in _COMPONENTS]
        rows.append(("training total (sum of the above)", self.training_total_bytes))
        if self.step_phase_peaks:
            for phase, value in self.step_phase_peaks.items():
                rows.append((f"step peak in {phase} (simulated)", value))
            rows.append(("training step peak (simulated) = required", self.step_peak_bytes))
        if self.inference_total_bytes is not None:
            rows.append(("inference activations (peak live)", self.inference_activation_bytes))
            rows.append(("inference total", self.inference_total_bytes))
        df = pd.DataFrame(rows, columns=["component", "bytes"])
        df["bytes"] = df["bytes"].astype("int64")
        df["MiB"] = (df["bytes"] / MiB).round(2)
        return df

    def to_dict(self) -> dict:
        """JSON-able: every field (the layer table as a list of records) plus the MiB totals."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, pd.DataFrame):
                value = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in rec.items()}
                         for rec in value.to_dict(orient="records")]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, (list, dict)):
                value = type(value)(value)
            out[f.name] = value
        out["required_bytes"] = self.required_bytes
        out["training_total_mib"] = round(self.training_total_mib, 3)
        out["required_mib"] = round(self.required_mib, 3)
        return out

    def summary(self) -> str:
        """One line for logs and the UI."""
        peak = f", step peak {mib(self.step_peak_bytes):,.1f} MiB" if self.step_peak_bytes is not None else ""
        inf = (f"; inference {mib(self.inference_total_bytes):,.1f} MiB"
               if self.inference_total_bytes is not None else "")
        return (f"{self.model} batch {self.batch_size} {self.precision} {self.optimizer}: training "
                f"{mib(self.training_total_bytes):,.1f} MiB{peak} (weights {mib(self.param_bytes):,.1f}, "
                f"saved activations {mib(self.activation_bytes):,.1f}){inf}")


class MaxBatch(int):
    """The answer of :func:`max_batch_size`: an ``int`` that also carries ``reason`` (why it
    stops there, or why nothing fits) and ``estimate`` (the :class:`MemoryEstimate` at that batch,
    or at batch 1 when the answer is 0)."""

    reason: str
    estimate: "MemoryEstimate | None"
    per_sample_bytes: int
    fixed_bytes: int

    def __new__(cls, value: int, reason: str, estimate: "MemoryEstimate | None" = None,
                per_sample_bytes: int = 0, fixed_bytes: int = 0) -> "MaxBatch":
        obj = super().__new__(cls, int(value))
        obj.reason = reason
        obj.estimate = estimate
        obj.per_sample_bytes = int(per_sample_bytes)
        obj.fixed_bytes = int(fixed_bytes)
        return obj

    def __repr__(self) -> str:
        return f"MaxBatch({int(self)}, reason={self.reason!r})"

    def __str__(self) -> str:
        return str(int(self))


@dataclass(frozen=True)
class ZooFactory:
    """A hashable factory for a model of the zoo (``core.models``): also its own cache key.

    ``freeze`` and ``stages`` are passed to ``core.models.apply_freeze`` so the estimate sees the
    same ``requires_grad`` flags as training.
    """

    name: str
    num_classes: int
    in_channels: int = 3
    input_size: int | tuple[int, int] = 32
    small_input_stem: bool = False
    freeze: str = "none"
    stages: int = 0

    def __post_init__(self):
        if isinstance(self.input_size, list):
            object.__setattr__(self, "input_size", tuple(self.input_size))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) this factory's model is built for."""
        size = self.input_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.in_channels, int(h), int(w))

    def __call__(self) -> nn.Module:
        model = models.create_model(self.name, self.num_classes, in_channels=self.in_channels,
                                    input_size=self.input_size, pretrained=False,
                                    small_input_stem=self.small_input_stem).model
        if self.freeze != "none":
            models.apply_freeze(model, self.name, self.freeze, self.stages)
        return model


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _norm_name(name: Any) -> str:
    return str(name).strip().lower() if name is not None else ""


def _check_shape(input_shape: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
        ok = len(shape) == 3 and all(v >= 1 for v in shape) and all(
            not isinstance(v, bool) and float(v) == int(v) for v in input_shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"Input shape must be (channels, height, width) with three positive integers, "
                          f"e.g. (3, 32, 32); got {input_shape!r}.")
    return shape  # type: ignore[return-value]


def _check_batch(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) and not (
            isinstance(batch_size, float) and batch_size.is_integer()):
        raise ConfigError(f"Batch size must be a whole number ≥ 1; got {batch_size!r}.")
    if int(batch_size) < 1:
        raise ConfigError(f"Batch size must be at least 1; got {batch_size}.")
    return int(batch_size)


def _check_accumulation(steps: Any) -> int:
    """``accumulation_steps``: batches whose gradients add up before each optimiser step."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) and not (
            isinstance(steps, float) and steps.is_integer()) or int(steps) < 1:
        raise ConfigError(f"accumulation_steps (gradient accumulation) must be a whole number of batches, 1 or "
                          f"more (1: none); got {steps!r}.")
    return int(steps)


def _check_precision(precision: Any) -> str:
    name = _norm_name(precision)
    aliases = {"float32": "fp32", "32": "fp32", "float16": "fp16", "half": "fp16", "16": "fp16",
               "bfloat16": "bf16"}
    name = aliases.get(name, name)
    if name not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}. Choose one of: {', '.join(PRECISIONS)}.")
    return name


def _check_optimizer(optimizer: Any, momentum: Any, options: dict | None) -> tuple[OptimizerSpec, float, dict]:
    spec = OPTIMIZERS.get(_norm_name(optimizer))
    try:
        momentum = float(momentum)
    except (TypeError, ValueError):
        raise ConfigError(f"Momentum must be a number ≥ 0; got {momentum!r}.") from None
    if not math.isfinite(momentum) or momentum < 0:
        raise ConfigError(f"Momentum must be a number ≥ 0; got {momentum!r}.")
    options = dict(options or {})
    if "momentum" in options:
        raise ConfigError("Pass momentum as the momentum= argument, not inside optimizer_options.")
    return spec, (momentum if spec.uses_momentum else 0.0), options


def _check_bytes(value: Any, what: str, allow_zero: bool) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        need = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(f"{what} must be a number of bytes {need}; got {value!r}.")
    return int(v)


def _check_factory(model_factory: Any) -> None:
    if isinstance(model_factory, nn.Module) or not callable(model_factory):
        raise ConfigError("model_factory must be a zero-argument function that builds the model, "
                          "e.g. lambda: create_model('resnet18', 10).model (not a model instance).")


# --------------------------------------------------------------------------------------------
# Building the shape-only model
# --------------------------------------------------------------------------------------------


def _build_meta(model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Run the factory with meta as the default device; move anything it made elsewhere."""
    try:
        with torch.device("meta"):
            model = model_factory()
    except LabError:
        raise
    except Exception as err:  # noqa: BLE001 - a factory failing is a model problem
        raise ModelError(f"Could not build the model for the memory estimate: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # a CreatedModel was returned
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model_factory must return a torch.nn.Module; it returned {type(model).__name__}.")
    if any(t.device.type != "meta" for t in _tensors_of(model)):
        # made on another device (e.g. an existing model returned by the factory): copy its
        # structure with meta tensors, leaving the caller's model untouched
        model = _twin(model, lambda t: torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype,
                                                           device="meta"))
    return model


def _twin(model: nn.Module, make: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``make(tensor)`` (never copied);
    ``requires_grad`` flags and tied parameters are preserved."""
    import copy

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(make(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = make(b)
    return copy.deepcopy(model, memo)


def _tensors_of(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _fake_twin(meta_model: nn.Module):
    """A copy of ``meta_model`` whose parameters and buffers are fake CPU tensors.

    Returns ``(model, fake_mode)``; ``requires_grad`` flags and tied parameters are preserved.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:  # entered once: entering a FakeTensorMode per tensor is slow
        twin = _twin(meta_model, lambda t: torch.empty_strided(tuple(t.shape), tuple(t.stride()),
                                                               dtype=t.dtype, device="cpu"))
    return twin, mode


# --------------------------------------------------------------------------------------------
# Tracing helpers
# --------------------------------------------------------------------------------------------


def _skey(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (works on meta and fake tensors, where data_ptr is 0)."""
    return t.untyped_storage()._cdata


def _snbytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def _flat_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flat_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flat_tensors(item)


def _logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, the first of a tuple, or ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    for t in _flat_tensors(out):
        return t
    raise ModelError(f"The model returned {type(out).__name__}, not a tensor of logits.")


def _loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 2:
        return F.cross_entropy(logits, targets)
    return logits.float().mean()  # not a classifier output: a scalar keeps backward possible


_aten = torch.ops.aten
#: Normalisation ops whose real CPU/CUDA kernels return fp32 statistics (mean, inverse std) for
#: half-precision inputs, while their meta kernels return the input dtype.
_NORM_STATS_OPS = {
    _aten.native_batch_norm.default,
    _aten._native_batch_norm_legit.default,
    _aten._native_batch_norm_legit.no_stats,
    _aten._native_batch_norm_legit_no_training.default,
    _aten._batch_norm_with_update.default,
    _aten.native_layer_norm.default,
    _aten.native_group_norm.default,
}
_HALF = (torch.float16, torch.bfloat16)


def _fix_norm_stats(func, out):
    """On fake tensors, give normalisation statistics the fp32 dtype the real kernels use."""
    if func in _NORM_STATS_OPS and isinstance(out, tuple) and len(out) >= 3 \
            and any(isinstance(o, torch.Tensor) and o.dtype in _HALF for o in out[1:3]):
        out = (out[0], *(o.float() if isinstance(o, torch.Tensor) and o.dtype in _HALF else o
                         for o in out[1:3]), *out[3:])
    return out


def _empty_like(t: torch.Tensor | None, cond: bool = True) -> torch.Tensor | None:
    return torch.empty_like(t) if (cond and t is not None) else None


def _norm_backward_outputs(grad_input_like, weight, bias, mask):
    """(grad_input, grad_weight, grad_bias) as ``output_mask`` asks, like the real kernels."""
    return (_empty_like(grad_input_like, mask[0]), _empty_like(weight, mask[1]),
            _empty_like(bias if bias is not None else weight, mask[2]))


#: Backward ops whose meta/fake implementation is a slow Python decomposition (with temporaries the
#: real kernels do not make): on shape-only tensors their outputs are allocated directly, with the
#: shapes, dtypes and memory formats the real kernels give them. Only the live-tensor tracker of
#: the simulated step uses this, and only on fake/meta tensors. Each entry was checked to give the
#: same simulated peak as the decomposition (layer_norm's backward was not: it is left out).
_SHAPE_ONLY_BACKWARD: dict[Any, Callable[..., Any]] = {
    _aten.native_batch_norm_backward.default:
        lambda g, x, w, rm, rv, sm, si, train, eps, mask: _norm_backward_outputs(x, w, None, mask),
    **{op: (lambda g, *rest, **kw: torch.empty_like(g)) for op in (
        _aten.threshold_backward.default, _aten.hardswish_backward.default,
        _aten.hardsigmoid_backward.default, _aten.silu_backward.default, _aten.gelu_backward.default,
        _aten.sigmoid_backward.default, _aten.tanh_backward.default, _aten.leaky_relu_backward.default)},
}


class _CastRecorder(TorchDispatchMode):
    """Records the storages of ``_to_copy`` results whose source is a parameter.

    Under autocast these are the half-precision weight copies. Each is forgotten when its storage
    is freed (weak-reference callback), so a later storage at the same address is not mistaken
    for one; ``alive()`` lists those still alive. ``fix_norm_stats`` applies
    :func:`_fix_norm_stats`.
    """

    def __init__(self, param_keys: set[int], fix_norm_stats: bool = False):
        super().__init__()
        self.param_keys = param_keys
        self.fix = fix_norm_stats
        self.casts: dict[int, tuple[int, bool, Any]] = {}  # key → (bytes, of a trainable weight, weakref)

    def _forget(self, key: int) -> Callable[[Any], None]:
        return lambda _ref: self.casts.pop(key, None)

    def alive(self) -> dict[int, tuple[int, bool]]:
        return {k: (n, trainable) for k, (n, trainable, _) in self.casts.items()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.fix:
            out = _fix_norm_stats(func, out)
        if func is torch.ops.aten._to_copy.default and args and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor) and _skey(args[0]) in self.param_keys:
            storage = out.untyped_storage()
            key = storage._cdata
            self.casts[key] = (int(storage.nbytes()), bool(args[0].requires_grad),
                               weakref.ref(storage, self._forget(key)))
        return out


class _LiveTracker(TorchDispatchMode):
    """Tracks the bytes of every live tensor storage created while it is active.

    Storages that existed before (weights, optimiser state, the input) are listed in
    ``exclude``. Each new storage gets a weak reference whose callback subtracts its bytes when
    the storage is freed: PyTorch keeps a storage's Python object alive for as long as the
    storage itself (also when only C++ holds it, e.g. a tensor saved by autograd), so the
    callback fires exactly when the memory would be released. ``peak`` is the largest sum of live
    storages while any operator ran (its inputs and outputs included); ``phase(name)`` starts a
    new phase and ``peaks`` holds the peak of each.
    """

    def __init__(self, exclude: set[int], fix_norm_stats: bool = False, shape_only: bool = True):
        super().__init__()
        self.exclude = exclude
        self.fix = fix_norm_stats
        self.shape_only = shape_only  # tensors carry no data: see _SHAPE_ONLY_BACKWARD
        self.live: dict[int, Any] = {}  # storage key → weakref (kept so its callback can fire)
        self.current = 0
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self._phase = "main"

    def phase(self, name: str) -> None:
        self._phase = name
        self.peaks[name] = max(self.peaks.get(name, 0), self.current)

    def _freed(self, key: int, n: int) -> Callable[[Any], None]:
        def callback(_ref) -> None:
            if self.live.pop(key, None) is not None:
                self.current -= n
        return callback

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fast = _SHAPE_ONLY_BACKWARD.get(func) if self.shape_only else None
        out = fast(*args, **(kwargs or {})) if fast is not None else func(*args, **(kwargs or {}))
        if self.fix:
            out = _fix_norm_stats(func, out)
        for t in _flat_tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.exclude or key in self.live:
                continue  # pre-existing, or a view / in-place result of a live storage
            n = int(storage.nbytes())
            self.live[key] = weakref.ref(storage, self._freed(key, n))
            self.current += n
        if self.current > self.peak:
            self.peak = self.current
        if self.current > self.peaks.get(self._phase, 0):
            self.peaks[self._phase] = self.current
        return out


class _ModuleStack:
    """Forward pre/post hooks that keep the stack of running modules (per-instance hooks, so
    other threads' models are not affected)."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.info: dict[str, dict] = {}
        self.order: list[str] = []
        self.tick = 0  # number of module calls so far: orders the layer table
        self.handles = []
        for name, module in model.named_modules():
            leaf = next(module.children(), None) is None
            self.handles.append(module.register_forward_pre_hook(self._pre(name or "(model)", module, leaf)))
            self.handles.append(module.register_forward_hook(self._post(name or "(model)")))

    def _pre(self, name: str, module: nn.Module, leaf: bool):
        def hook(mod, args):
            self.stack.append(name)
            self.tick += 1
            if name not in self.info:
                self.info[name] = {"type": type(module).__name__, "leaf": leaf, "calls": 0,
                                   "output_shape": None, "first": float(self.tick)}
                self.order.append(name)
            self.info[name]["calls"] += 1
        return hook

    def _post(self, name: str):
        def hook(mod, args, output):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            elif name in self.stack:  # an exception unwound part of the stack earlier
                del self.stack[self.stack.index(name):]
            info = self.info.get(name)
            if info is not None and info["output_shape"] is None:
                tensors = list(_flat_tensors(output))
                if len(tensors) == 1:
                    info["output_shape"] = tuple(tensors[0].shape)
                elif tensors:
                    info["output_shape"] = tuple(tuple(t.shape) for t in tensors)
        return hook

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "(model)"

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@dataclass
class _SavedTrace:
    activation_bytes: int
    weight_copy_bytes: int
    param_saved_bytes: int
    input_saved_bytes: int
    output_bytes: int
    output_shape: tuple[int, ...]
    layers: pd.DataFrame


def _autocast_ctx(precision: str, device_type: str = "cpu"):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def _trace_saved(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str,
                 device_type: str = "cpu", fake: bool = False) -> tuple[_SavedTrace, torch.Tensor, torch.Tensor]:
    """One training forward + loss, recording what autograd saves. Returns the trace, the loss
    (the caller runs backward on it or drops it) and the logits (a training loop holds them until
    the next step, as ``outputs = net(inputs)`` does)."""
    param_keys = {_skey(p) for p in model.parameters()}
    buffer_keys = {_skey(b) for b in model.buffers()}
    input_keys = {_skey(x), _skey(y)}
    stack = _ModuleStack(model)
    try:
        saved, first_save, casts, loss, logits = _forward_saving(model, x, y, precision, device_type, fake,
                                                                 param_keys, stack)
    finally:
        stack.remove()
    output_keys = {_skey(logits), _skey(loss)}
    (act, wcopy, psaved, isaved), per_layer = _sort_saved(saved, casts, param_keys | buffer_keys, input_keys,
                                                          output_keys)
    out_bytes = _snbytes(logits) + _snbytes(loss)
    layers = _saved_by_layer(stack, per_layer, first_save, tuple(loss.shape))
    trace = _SavedTrace(act, wcopy, psaved, isaved, out_bytes, tuple(logits.shape), layers)
    return trace, loss, logits


def _forward_saving(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, device_type: str,
                    fake: bool, param_keys: set[int], stack: _ModuleStack):
    """The forward + loss of :func:`_trace_saved` under autocast. Returns ``saved`` (storage →
    (bytes, layer that saved it first)), ``first_save`` (layer → when it first saved, on the
    ``stack``'s clock), the weight casts alive at the end of the region, the loss and the logits."""
    saved: dict[int, tuple[int, str]] = {}
    in_loss = [False]
    first_save: dict[str, float] = {}

    def pack(t: torch.Tensor):
        key = _skey(t)
        if key not in saved:
            layer = "(loss)" if in_loss[0] else stack.current
            saved[key] = (_snbytes(t), layer)
            first_save.setdefault(layer, stack.tick + 0.5)
        return t

    recorder = _CastRecorder(param_keys, fix_norm_stats=fake)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
        with _autocast_ctx(precision, device_type):
            out = model(x)
            logits = _logits_of(out)
            in_loss[0] = True
            loss = _loss_of(logits, y)
            del out
            # still inside autocast: its cache of weight copies is alive
            casts = recorder.alive()
    return saved, first_save, casts, loss, logits


def _sort_saved(saved: dict[int, tuple[int, str]], casts: dict[int, tuple[int, bool]], weight_keys: set[int],
                input_keys: set[int], output_keys: set[int]) -> tuple[tuple[int, int, int, int], dict[str, int]]:
    """What autograd saved, by kind: (activations, half-precision weight copies, saved weights and
    buffers, saved input) in bytes, and the activation bytes of each layer."""
    act = wcopy = psaved = isaved = 0
    per_layer: dict[str, int] = {}
    for key, (n, layer) in saved.items():
        if key in weight_keys:
            psaved += n
        elif key in input_keys:
            isaved += n
        elif key in casts:
            continue  # counted below from the recorder
        elif key in output_keys:
            continue
        else:
            act += n
            per_layer[layer] = per_layer.get(layer, 0) + n
    # half-precision weight copies: those autograd saved (alive until backward) plus those
    # autocast caches (trainable leaf weights; alive until the autocast region exits).
    for key, (n, trainable) in casts.items():
        if key in saved or trainable:
            wcopy += n
    return (act, wcopy, psaved, isaved), per_layer


def _saved_by_layer(stack: _ModuleStack, per_layer: dict[str, int], first_save: dict[str, float],
                    loss_shape: tuple[int, ...]) -> pd.DataFrame:
    """The trace's layer table: leaf modules in call order, and a container where its own forward
    saved something (at its first save), then the loss when it saved something."""
    rows = []
    for name in stack.order:
        info = stack.info[name]
        if info["leaf"]:
            rows.append((info["first"], name, info["type"], per_layer.get(name, 0), info["output_shape"],
                         info["calls"]))
        elif per_layer.get(name, 0) > 0:
            rows.append((first_save.get(name, info["first"]), name, info["type"], per_layer[name],
                         info["output_shape"], info["calls"]))
    if per_layer.get("(loss)", 0):
        rows.append((float("inf"), "(loss)", "CrossEntropyLoss", per_layer["(loss)"], loss_shape, 1))
    rows.sort(key=lambda r: r[0])
    layers = pd.DataFrame([r[1:] for r in rows], columns=["layer", "type", "saved_bytes", "output_shape", "calls"])
    layers["saved_bytes"] = layers["saved_bytes"].astype("int64")
    return layers


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, set[int]]:
    keys: set[int] = set()
    total = 0
    for t in tensors:
        key = _skey(t)
        if key not in keys:
            keys.add(key)
            total += _snbytes(t)
    return total, keys


def _optimizer_state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _set_train(model: nn.Module, train: bool) -> None:
    """Train/eval mode as training sets it: frozen BatchNorm layers stay in eval mode, so the
    estimate and the ground truth see the same BatchNorm behaviour (and what it saves)."""
    models.set_train_mode(model, train)


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """The measurements of one (model, shape, batch, precision, optimiser) combination."""

    saved: _SavedTrace
    step_baseline: int | None  # weights + buffers + optimiser state + input of the steady state
    step_phase_peaks: dict[str, int] | None  # peak above the baseline in each phase of a step
    inference_peak: int | None


class _ShapeError(ModelError):
    """The model cannot run on this input (too small, batch of 1 with BatchNorm, ...)."""


def _tracer_limitation(err: BaseException) -> bool:
    """An error of the shape-only tracing itself (an op fake/meta tensors cannot run), as opposed
    to an error the model would also raise on real tensors of this shape."""
    from torch._subclasses import fake_tensor as ft

    kinds = tuple(getattr(ft, n) for n in (
        "DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedFakeTensorException",
        "UnsupportedOperatorException", "MetadataMismatchError", "FakeTensorDeviceMismatchError",
        "UnsupportedMutationAliasingException") if hasattr(ft, n))
    return isinstance(err, kinds + (NotImplementedError,))


_CACHE: "OrderedDict[Hashable, tuple[_Run, dict]]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 256


def clear_cache() -> None:
    """Forget cached estimates (they are keyed by ``cache_key``/:class:`ZooFactory`)."""
    with _CACHE_LOCK:
        _CACHE.clear()


class _Prepared:
    """A factory's model built once (meta, plus a fake-CPU twin on demand) for several runs."""

    def __init__(self, model_factory: Callable[[], nn.Module]):
        self.factory = model_factory
        self.meta = _build_meta(model_factory)
        self._fake = None
        self._optimizers: dict[Hashable, torch.optim.Optimizer] = {}  # with state, per model twin
        params = list(self.meta.parameters())
        self.info = dict(
            name=str(getattr(model_factory, "name", None) or type(self.meta).__name__),
            num_params=sum(p.numel() for p in params),
            trainable_params=sum(p.numel() for p in params if p.requires_grad),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            trainable_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            trainable_tensors=sum(1 for p in params if p.requires_grad),
            buffer_bytes=sum(b.numel() * b.element_size() for b in self.meta.buffers()),
        )

    def model_for(self, use_fake: bool):
        """(model, fake_mode or None): the fake-CPU twin, or the meta model itself."""
        if not use_fake:
            return self.meta, None
        if self._fake is None:
            self._fake = _fake_twin(self.meta)
        return self._fake

    def run(self, input_shape, batch: int, precision: str, spec: OptimizerSpec, momentum: float,
            options: dict, simulate_step: bool, inference: bool, target_device: str,
            accumulate: bool = False) -> _Run:
        # Fake CPU tensors by default: device-dependent dispatch (autocast, the attention backend
        # of scaled_dot_product_attention) then follows the real CPU path. Plain meta tensors are
        # the fallback for fp32 if the fake run fails for a reason other than the model's own.
        args = (input_shape, batch, precision, spec, momentum, options, simulate_step, inference, target_device,
                accumulate)
        try:
            return self._run_on(True, *args)
        except LabError:
            raise
        except Exception as err:  # noqa: BLE001 - an op fake tensors cannot run
            if PRECISIONS[precision] is not None:
                raise ModelError(f"Could not trace {self.info['name']!r} with fake tensors for the {precision} "
                                 f"estimate: {type(err).__name__}: {err}. Try fp32.") from err
            fake_err = err
        try:
            return self._run_on(False, *args)
        except LabError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ModelError(f"Could not trace {self.info['name']!r} for the memory estimate "
                             f"(fake tensors: {type(fake_err).__name__}: {fake_err}; meta device: "
                             f"{type(err).__name__}: {err}).") from err

    def _run_on(self, use_fake: bool, input_shape, batch, precision, spec, momentum, options,
                simulate_step, inference, target_device, accumulate) -> _Run:
        model, mode = self.model_for(use_fake)
        with (mode if mode is not None else torch.device("meta")):
            x = torch.empty((batch, *input_shape), dtype=torch.float32)
            y = torch.zeros((batch,), dtype=torch.long)
        try:
            return self._run(model, mode, x, y, precision, spec, momentum, options, simulate_step,
                             inference, target_device, accumulate)
        except LabError:
            raise
        except Exception as err:  # noqa: BLE001 - shape checks of the model's own ops
            if _tracer_limitation(err):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            hint = ("BatchNorm cannot train on a single value per channel: use a batch of at least 2"
                    if "more than 1 value per channel" in first else
                    "a too-small image for this architecture is the usual cause: use a larger input size "
                    "or a small-input stem")
            raise _ShapeError(f"The model {self.info['name']!r} cannot train on input {tuple(input_shape)} "
                              f"at batch {batch}: {type(err).__name__}: {first} ({hint}).") from err
        finally:
            for p in model.parameters():
                p.grad = None

    def _optimizer_for(self, model, ctx, spec: OptimizerSpec, momentum: float, options: dict, target_device: str):
        """The simulated step's optimiser with its state present, made once per model twin and
        optimiser settings (later batch sizes reuse it): a step on stand-in gradients creates the
        state (free on fake/meta tensors)."""
        opts = dict(options)
        if target_device == "cuda":
            opts.setdefault("foreach", True)  # PyTorch's default on CUDA; the CPU default is the for-loop
        opt_key = (id(model), spec.name, momentum, tuple(sorted((k, repr(v)) for k, v in opts.items())))
        opt = self._optimizers.get(opt_key)
        if opt is None:  # made once per model twin and reused by later batch sizes
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = spec.build(trainable, momentum, opts)
            with ctx():
                for p in trainable:
                    p.grad = torch.zeros_like(p)
            opt.step()  # outside the fake mode: optimisers read their 'step' counters with .item()
            opt.zero_grad(set_to_none=True)
            self._optimizers[opt_key] = opt
        return opt

    def _run(self, model, mode, x, y, precision, spec, momentum, options, simulate_step, inference,
             target_device, accumulate=False) -> _Run:
        fake = mode is not None
        ctx = (lambda: mode) if fake else contextlib.nullcontext
        _set_train(model, True)
        base = peaks = None
        if not simulate_step:
            # training forward + loss: what autograd saves, per layer
            with ctx():
                saved, loss, logits = _trace_saved(model, x, y, precision, fake=fake)
            del loss, logits
        else:
            # One steady-state training step with live-tensor tracking; its forward is also the
            # one whose saved tensors are counted.
            opt = self._optimizer_for(model, ctx, spec, momentum, options, target_device)
            if accumulate:
                # Gradient accumulation, from the second micro-batch of a group on: the gradients of
                # the earlier ones are held through the whole forward and backward (which adds into
                # them), on top of what a single-batch step holds.
                with ctx():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.grad = torch.zeros_like(p)
            held = [p.grad for p in model.parameters() if p.grad is not None]
            base, keys = _unique_bytes([*model.parameters(), *model.buffers(), x, y,
                                        *_optimizer_state_tensors(opt), *held])
            del held
            tracker = _LiveTracker(keys, fix_norm_stats=fake)
            with tracker:
                tracker.phase("forward")
                with ctx():
                    saved, loss, logits = _trace_saved(model, x, y, precision, fake=fake)
                tracker.phase("backward")
                with ctx():
                    loss.backward()
                tracker.phase("optimizer step")
                opt.step()
                del loss, logits
            peaks = dict(tracker.peaks)
            opt.zero_grad(set_to_none=True)
            del tracker
        inf_peak = None
        if inference:
            # eval mode, no_grad, peak of live tensors
            _set_train(model, False)
            _, keys = _unique_bytes([*model.parameters(), *model.buffers(), x, y])
            tracker = _LiveTracker(keys, fix_norm_stats=fake)
            with tracker, torch.no_grad():
                with ctx(), _autocast_ctx(precision):
                    out = model(x)
                del out
            inf_peak = tracker.peak
            _set_train(model, True)
        return _Run(saved, base, peaks, inf_peak)


def _factory_key(model_factory, cache_key):
    if cache_key is not None:
        return cache_key
    if isinstance(model_factory, ZooFactory):
        return model_factory
    return None


def _estimate(prep: "_Prepared | None", model_factory, input_shape, batch, spec, momentum, precision,
              overhead, options, simulate_step, inference, target_device, key,
              accumulation: int = 1) -> tuple[MemoryEstimate, "_Prepared | None"]:
    opt_sig = (spec.name, momentum, tuple(sorted((k, repr(v)) for k, v in options.items())))
    accumulate = accumulation > 1
    full_key = None if key is None else (key, input_shape, batch, precision, opt_sig, simulate_step,
                                         inference, target_device, accumulate)
    hit = None
    if full_key is not None:
        with _CACHE_LOCK:
            hit = _CACHE.get(full_key)
            if hit is not None:
                _CACHE.move_to_end(full_key)
    if hit is None:
        if prep is None:
            prep = _Prepared(model_factory)
        run = prep.run(input_shape, batch, precision, spec, momentum, options, simulate_step, inference,
                       target_device, accumulate)
        hit = (run, prep.info)
        if full_key is not None:
            with _CACHE_LOCK:
                _CACHE[full_key] = hit
                while len(_CACHE) > _CACHE_SIZE:
                    _CACHE.popitem(last=False)
    run, info = hit
    est = _assemble(info, run, input_shape, batch, spec, momentum, precision, overhead, options)
    if accumulate:
        est.accumulation_steps = accumulation
        est.notes.append(f"gradient accumulation over {accumulation} batches: the step peak is that of the "
                         "second and later batches of a group, which hold the earlier ones' gradients through "
                         "their forward and backward")
    return est, prep


def _assemble(info: dict, run: _Run, input_shape, batch, spec, momentum, precision, overhead, options) -> MemoryEstimate:
    mult = spec.state_multiplier(momentum, options)
    opt_bytes = mult * info["trainable_bytes"]
    if spec.step_counter:
        opt_bytes += 4 * info["trainable_tensors"]
    c, h, w = input_shape
    image_bytes = batch * c * h * w * 4  # fp32 images
    s = run.saved
    parts = dict(param_bytes=info["param_bytes"], buffer_bytes=info["buffer_bytes"],
                 gradient_bytes=info["trainable_bytes"], optimizer_bytes=opt_bytes,
                 activation_bytes=s.activation_bytes, weight_copy_bytes=s.weight_copy_bytes,
                 input_bytes=image_bytes + batch * 8, output_bytes=s.output_bytes, overhead_bytes=overhead)
    training_total = sum(parts.values())
    step_peak = phases = None
    if run.step_phase_peaks is not None:
        phases = {k: run.step_baseline + v + overhead for k, v in run.step_phase_peaks.items()}
        step_peak = max(phases.values())
    inference_act = run.inference_peak
    inference_total = None
    if inference_act is not None:
        inference_total = info["param_bytes"] + info["buffer_bytes"] + image_bytes + inference_act + overhead
    half = PRECISIONS[precision] is not None
    notes = [("saved activations counted with saved_tensors_hooks on a "
              + ("fake-CPU-tensor forward under CPU autocast" if half else "meta-device forward pass")),
             "backend workspace (oneDNN/cuDNN scratch space) and the CUDA context are not included: "
             "pass them as device_overhead_bytes"]
    if half:
        notes.append(f"{precision}: CPU autocast op lists; master weights, gradients and optimiser state stay fp32")
    return MemoryEstimate(
        model=info["name"], input_shape=tuple(input_shape), batch_size=batch, optimizer=spec.name,
        momentum=momentum, precision=precision, num_params=info["num_params"],
        trainable_params=info["trainable_params"], optimizer_multiplier=mult, **parts,
        training_total_bytes=training_total, step_peak_bytes=step_peak, step_phase_peaks=phases,
        inference_activation_bytes=inference_act, inference_total_bytes=inference_total,
        layers=s.layers.copy(), output_shape=s.output_shape, notes=notes)


def estimate_memory(model_factory: Callable[[], nn.Module], input_shape: tuple[int, int, int], batch_size: int,
                    optimizer: str = "sgd", momentum: float = 0.9, precision: str = "fp32",
                    device_overhead_bytes: int = 0, *, optimizer_options: dict | None = None,
                    simulate_step: bool = True, inference: bool = True, target_device: str = "cuda",
                    cache_key: Hashable | None = None, accumulation_steps: int = 1) -> MemoryEstimate:
    """Memory of training (and inference) ``model_factory()`` on ``batch_size`` images of ``input_shape``.

    ``model_factory`` is a zero-argument callable returning an ``nn.Module`` (or a
    ``CreatedModel``); freezing it does is respected. It is called with ``torch.device("meta")``
    as the default device, so nothing real is allocated. ``optimizer`` is one of
    :data:`OPTIMIZERS`; ``optimizer_options`` (e.g. ``{"centered": True}``, ``{"amsgrad": True}``,
    ``{"weight_decay": 5e-4}``) are passed to it and change its state size where they do.
    ``precision`` is one of :data:`PRECISIONS`. ``simulate_step=False`` skips the simulated step
    peak and ``inference=False`` the inference pass (faster; those fields are then ``None``).
    ``target_device`` only picks the optimiser implementation simulated (``"cuda"``: foreach,
    PyTorch's default there; ``"cpu"``: the for-loop). ``cache_key``: a hashable naming the
    factory's model; results are then cached per (key, shape, batch, precision, optimiser).
    :class:`ZooFactory` instances are their own key; other factories are not cached.
    ``accumulation_steps`` > 1 (gradient accumulation, ``batch_size`` images a micro-batch): the
    simulated step holds the gradients of the earlier micro-batches through forward and backward,
    as every micro-batch after a group's first does (the CPU allocator peak of a real one at 32×32,
    above a plain step's: tutorial Net +0 %, MobileNet-V3-small +2.5 %, ResNet-18 +8.9 %,
    ResNet-18 small stem +10.8 %).
    """
    _check_factory(model_factory)
    shape = _check_shape(input_shape)
    batch = _check_batch(batch_size)
    precision = _check_precision(precision)
    spec, momentum, options = _check_optimizer(optimizer, momentum, optimizer_options)
    overhead = _check_bytes(device_overhead_bytes, "device_overhead_bytes", allow_zero=True)
    target_device = _check_target(target_device)
    accumulation = _check_accumulation(accumulation_steps)
    est, _ = _estimate(None, model_factory, shape, batch, spec, momentum, precision, overhead, options,
                       bool(simulate_step), bool(inference), target_device, _factory_key(model_factory, cache_key),
                       accumulation)
    return est


def _check_target(target_device: str) -> str:
    name = _norm_name(target_device).split(":")[0]
    if name not in ("cuda", "cpu"):
        raise ConfigError(f"Unknown target device {target_device!r}. Choose one of: cuda, cpu.")
    return name


#: what :func:`max_batch_size` can fit: total name → the affine pieces whose maximum it is.
_TOTALS: dict[str, Callable[[MemoryEstimate], list[int]]] = {
    "required": lambda e: (list(e.step_phase_peaks.values()) if e.step_phase_peaks else [e.training_total_bytes]),
    "training": lambda e: [e.training_total_bytes],
    "step_peak": lambda e: list((e.step_phase_peaks or {}).values()),
    "inference": lambda e: [e.inference_total_bytes],
}


def _pick_total(est: MemoryEstimate, total: str) -> int:
    if total not in _TOTALS:
        raise ConfigError(f"Unknown total {total!r}. Choose one of: {', '.join(_TOTALS)}.")
    pieces = _TOTALS[total](est)
    if not pieces or any(p is None for p in pieces):
        raise ConfigError(f"This estimate was made without what the {total!r} total needs "
                          f"(simulate_step/inference).")
    return int(max(pieces))


def max_batch_size(model_factory: Callable[[], nn.Module], input_shape: tuple[int, int, int], budget_bytes: float,
                   optimizer: str = "sgd", momentum: float = 0.9, precision: str = "fp32",
                   device_overhead_bytes: int = 0, *, total: str = "required",
                   optimizer_options: dict | None = None, target_device: str = "cuda",
                   cache_key: Hashable | None = None, limit: int = 1 << 20, accumulation_steps: int = 1) -> MaxBatch:
    """The largest batch whose estimated memory fits in ``budget_bytes``: an ``int`` (a
    :class:`MaxBatch` that also carries ``reason``, ``estimate``, ``per_sample_bytes``, ``fixed_bytes``).

    ``total`` is what must fit: ``"required"`` (default; same as ``"step_peak"``: the simulated
    peak of a training step), ``"training"`` (the sum of components; faster, as no step is
    simulated) or ``"inference"``. Activations and the input grow linearly with the batch,
    so each total is affine in the batch (the sum of components exactly) or the maximum of a
    few affine pieces (the step peak: where in the backward pass the peak falls moves with the
    batch). The line through batches 2 and 4 is solved for the budget and the answer verified by
    estimating it and the next batch; when they disagree, secant and chord steps (exact for
    convex piecewise-affine functions) continue. So ``value(answer) <= budget < value(answer + 1)``.
    Returns 0 with the reason when even batch 1 does not fit (or cannot train at all).
    """
    _check_factory(model_factory)
    shape = _check_shape(input_shape)
    budget = _check_bytes(budget_bytes, "The memory budget", allow_zero=False)
    precision = _check_precision(precision)
    spec, momentum, options = _check_optimizer(optimizer, momentum, optimizer_options)
    overhead = _check_bytes(device_overhead_bytes, "device_overhead_bytes", allow_zero=True)
    target_device = _check_target(target_device)
    if total not in _TOTALS:
        raise ConfigError(f"Unknown total {total!r}. Choose one of: {', '.join(_TOTALS)}.")
    limit = _check_batch(limit)
    accumulation = _check_accumulation(accumulation_steps)
    key = _factory_key(model_factory, cache_key)
    simulate = total in ("required", "step_peak")
    inference = total == "inference"
    prep: _Prepared | None = None

    def estimate_at(b: int) -> MemoryEstimate:
        nonlocal prep
        est, prep = _estimate(prep, model_factory, shape, b, spec, momentum, precision, overhead,
                              options, simulate, inference, target_device, key, accumulation)
        return est

    curve = _BatchCurve(estimate_at, total, budget)
    # Batch 1 cannot train models whose BatchNorm sees a 1x1 feature map, so the search starts
    # at 2; batch 1 is looked at only when 2 does not fit.
    if not curve.fits(2):
        return _below_two(curve)
    return _answer(curve, _largest_fitting(curve, limit), limit)


class _BatchCurve:
    """The chosen ``total`` of the estimate as a function of the batch, each batch estimated once."""

    def __init__(self, estimate_at: Callable[[int], MemoryEstimate], total: str, budget: int):
        self._estimate_at = estimate_at
        self._memo: dict[int, MemoryEstimate] = {}
        self.total = total
        self.budget = budget

    def est(self, b: int) -> MemoryEstimate:
        if b not in self._memo:
            self._memo[b] = self._estimate_at(b)
        return self._memo[b]

    def value(self, b: int) -> int:
        return _pick_total(self.est(b), self.total)

    def fits(self, b: int) -> bool:
        return self.value(b) <= self.budget


def _below_two(curve: _BatchCurve) -> MaxBatch:
    """The answer when batch 2 does not fit: 1, or 0 with the reason."""
    value, budget, total = curve.value, curve.budget, curve.total
    try:
        e1 = curve.est(1)
    except ModelError as err:
        return MaxBatch(0, f"Batch 1 cannot train this model ({err}); batch 2 needs "
                           f"{mib(value(2)):,.1f} MiB, more than the budget of {mib(budget):,.1f} MiB.",
                        curve.est(2))
    if not curve.fits(1):
        return MaxBatch(0, (
            f"Even batch 1 needs {mib(value(1)):,.1f} MiB ({total}), more than the budget of "
            f"{mib(budget):,.1f} MiB: weights, gradients and optimiser state alone take "
            f"{mib(e1.param_bytes + e1.buffer_bytes + e1.gradient_bytes + e1.optimizer_bytes):,.1f} MiB. "
            f"Use a smaller model, freeze layers, a lighter optimiser, mixed precision or a smaller "
            f"input size."), e1)
    return MaxBatch(1, f"batch 1 needs {mib(value(1)):,.1f} MiB of the {mib(budget):,.1f} MiB budget; "
                       f"batch 2 would need {mib(value(2)):,.1f} MiB", e1,
                    per_sample_bytes=value(2) - value(1), fixed_bytes=2 * value(1) - value(2))


def _largest_fitting(curve: _BatchCurve, limit: int) -> int:
    """The largest batch from 2 to ``limit`` that fits (batch 2 does).

    Each total is the maximum of a few affine functions of the batch (convex, increasing), so
    the secant through the last two fitting batches never stops short of the answer and the
    chord between a fitting and a non-fitting batch never overshoots it: alternating the two
    brackets the answer within a few estimates (exact on the last affine piece)."""
    value, fits, budget = curve.value, curve.fits, curve.budget
    lo_prev, lo, hi = 2, 4, None
    if not fits(4):
        lo, hi = 2, 4
    for _ in range(64):
        if hi is not None and hi - lo <= 1:
            break
        if lo >= limit:
            break
        slope = (value(lo) - value(lo_prev)) / (lo - lo_prev) if lo != lo_prev else 0
        cand = limit if slope <= 0 else lo + int((budget - value(lo)) // slope)
        cand = min(cand, limit if hi is None else hi - 1)
        cand = max(cand, lo + 1)
        if fits(cand):
            lo_prev, lo = lo, cand
            if cand < limit and not fits(cand + 1):
                hi = cand + 1
        else:
            hi = cand
            # chord between lo and hi: lies above a convex function, so its crossing fits
            span = value(hi) - value(lo)
            c2 = lo + int((budget - value(lo)) * (hi - lo) // span) if span > 0 else lo
            c2 = min(max(c2, lo + 1), hi - 1) if hi - lo > 1 else lo
            if c2 > lo and fits(c2):
                lo_prev, lo = lo, c2
            elif c2 > lo:
                hi = c2
            if hi - lo > 1 and not fits(lo + 1):
                hi = lo + 1
    else:  # pragma: no cover - the secant/chord search converges in a handful of steps
        while hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return min(lo, limit)


def _answer(curve: _BatchCurve, answer: int, limit: int) -> MaxBatch:
    """``answer`` (at least 2) with its reason and the affine fit through batch 2."""
    value, budget, total = curve.value, curve.budget, curve.total
    e = curve.est(answer)
    slope = (value(answer) - value(2)) / (answer - 2) if answer > 2 else value(4) - value(2)
    fixed = int(value(answer) - slope * answer)
    per = f"about {mib(slope):,.3f} MiB per image"
    if answer >= limit:
        reason = f"capped at the search limit of {limit} images ({per}); the budget allows more"
    else:
        reason = (f"batch {answer} needs {mib(value(answer)):,.1f} MiB of the {mib(budget):,.1f} MiB budget "
                  f"({total}, {per}); batch {answer + 1} would need {mib(value(answer + 1)):,.1f} MiB")
    return MaxBatch(answer, reason, e, per_sample_bytes=int(slope), fixed_bytes=fixed)


# --------------------------------------------------------------------------------------------
# Ground truth: one real training step
# --------------------------------------------------------------------------------------------


def _profiler_peak(step: Callable[[], Any]) -> tuple[int, int]:
    """(peak, net) of the CPU allocator during ``step()``, from ``torch.profiler`` memory events
    (relative to the start; blocks allocated earlier are not in the events)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak, current


def measure_training_step_memory(model: nn.Module, input_shape: tuple[int, int, int], batch_size: int,
                                 optimizer: str = "sgd", momentum: float = 0.9, precision: str = "fp32", *,
                                 device: str | torch.device = "cpu", optimizer_options: dict | None = None,
                                 onednn: bool | None = None, measure_peak: bool = True, seed: int = 0,
                                 accumulation_steps: int = 1) -> dict:
    """Ground truth for :func:`estimate_memory`: memory of one real training step of ``model``.

    Runs two steps (forward, cross-entropy, backward, ``optimizer.step()``) on random data; the
    first counts what autograd saves (same hook as the estimate, real tensors) and creates the
    optimiser state; after ``zero_grad(set_to_none=True)`` the second is measured:

    * CPU: the allocator peak from ``torch.profiler`` with ``profile_memory=True`` (not the process
      RSS) plus the steady-state baseline that existed before the step (weights, buffers,
      optimiser state, input, labels), which the profiler does not see being allocated.
      ``onednn=False`` disables oneDNN (mkldnn) for the step: its convolution-backward scratch
      space (several × the weight size per thread) is not a tensor and not in the estimate.
    * CUDA: the same baseline plus ``torch.cuda.max_memory_allocated() - memory_allocated()``,
      both read around the step after ``reset_peak_memory_stats()`` (so other allocations on
      the GPU do not count). This includes cuDNN workspace, not the CUDA context.

    Either way ``peak_bytes = baseline_bytes + step_delta_bytes``: what the model, its data and
    its optimiser hold before the step plus the highest the allocator climbed during it.

    ``measure_peak=False`` runs only the first step (saved activations, gradients and optimiser
    state are still counted; ``peak_bytes`` is then ``None``).
    ``accumulation_steps`` > 1: the second step is a later micro-batch of an accumulation group:
    the first step's gradients are kept (in the baseline) and its backward adds into them.

    The model's weights are updated by the two steps and it is moved to ``device``. Background
    training in other threads pollutes the CPU profile: measure when nothing else runs.
    """
    shape = _check_shape(input_shape)
    batch = _check_batch(batch_size)
    precision = _check_precision(precision)
    spec, momentum, options = _check_optimizer(optimizer, momentum, optimizer_options)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but no CUDA GPU is available.")
    g = torch.Generator().manual_seed(seed)
    model = model.to(device)
    x = torch.randn((batch, *shape), generator=g).to(device)
    opt = spec.build([p for p in model.parameters() if p.requires_grad], momentum, options)
    y = _random_labels(model, x, g, device)
    ac_device = device.type if device.type in ("cuda", "cpu") else "cpu"

    accumulate = _check_accumulation(accumulation_steps) > 1

    def step(trace: bool) -> _SavedTrace | None:
        return _training_step(model, opt, x, y, precision, ac_device, trace, keep_grads=accumulate and not trace)

    with _onednn(onednn):
        used_onednn = bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                           and device.type != "cuda")
        report, method = _measured_steps(step, model, opt, x, y, device, measure_peak, accumulate)
    return {**report, "device": str(device), "precision": precision, "threads": torch.get_num_threads(),
            "onednn": used_onednn, "method": method}


def _random_labels(model: nn.Module, x: torch.Tensor, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Labels drawn from ``g`` for the classes the model outputs (counted on one image in eval mode:
    a batch of 1 must not trip BatchNorm's batch-size check); the model is left in train mode."""
    _set_train(model, False)
    with torch.no_grad():
        num_out = _logits_of(model(x[:1])).shape[-1]
    _set_train(model, True)
    return torch.randint(0, int(num_out), (x.shape[0],), generator=g).to(device)


def _training_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str,
                   ac_device: str, trace: bool, keep_grads: bool = False) -> _SavedTrace | None:
    """One real step (forward, cross-entropy, backward, ``opt.step()``); with ``trace`` it records
    what autograd saves, as the estimate does, and returns that trace. ``keep_grads``: backward adds
    into the gradients already there (a later micro-batch of gradient accumulation)."""
    if not keep_grads:
        opt.zero_grad(set_to_none=True)
    if trace:
        tr, loss, logits = _trace_saved(model, x, y, precision, ac_device)
    else:
        with _autocast_ctx(precision, ac_device):
            logits = _logits_of(model(x))  # held through the step, like `outputs = net(inputs)`
            loss = _loss_of(logits, y)
        tr = None
    loss.backward()
    opt.step()
    return tr


_ONEDNN_TF32_WARNING = ".*TF32 acceleration on top of oneDNN.*"


@contextlib.contextmanager
def _onednn(enabled: bool | None):
    """``torch.backends.mkldnn.flags(enabled=...)`` around the block (nothing when None), without
    the warning about Intel-GPU TF32 that those flags give on every call."""
    flags = torch.backends.mkldnn.flags(enabled=enabled) if enabled is not None else contextlib.nullcontext()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONEDNN_TF32_WARNING)
        flags.__enter__()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ONEDNN_TF32_WARNING)
            flags.__exit__(None, None, None)


def _measured_steps(step: Callable[[bool], _SavedTrace | None], model: nn.Module, opt: torch.optim.Optimizer,
                    x: torch.Tensor, y: torch.Tensor, device: torch.device, measure_peak: bool,
                    accumulate: bool = False) -> tuple[dict, str]:
    """The two steps of :func:`measure_training_step_memory`: the first traced (saved activations,
    gradients, optimiser state), the second measured. Returns the report's byte counts and layers,
    and how the peak was measured."""
    trace = step(True)
    grad_bytes, _ = _unique_bytes([p.grad for p in model.parameters() if p.grad is not None])
    if not accumulate:   # else the next step adds into these gradients, held from before it
        opt.zero_grad(set_to_none=True)
    held = [p.grad for p in model.parameters() if p.grad is not None]
    param_bytes, _ = _unique_bytes(model.parameters())
    buffer_bytes, _ = _unique_bytes(model.buffers())
    state_bytes, _ = _unique_bytes(_optimizer_state_tensors(opt))
    input_bytes, _ = _unique_bytes([x, y])
    baseline, _ = _unique_bytes([*model.parameters(), *model.buffers(), *_optimizer_state_tensors(opt), x, y, *held])
    peak, delta, net, method = _step_peak(lambda: step(False), baseline, device, measure_peak)
    return {
        "peak_bytes": None if peak is None else int(peak),
        "baseline_bytes": int(baseline),
        "step_delta_bytes": None if delta is None else int(delta),
        "net_bytes_after_step": None if net is None else int(net),
        "param_bytes": int(param_bytes),
        "buffer_bytes": int(buffer_bytes),
        "gradient_bytes": int(grad_bytes),
        "optimizer_state_bytes": int(state_bytes),
        "input_bytes": int(input_bytes),
        "saved_activation_bytes": int(trace.activation_bytes),
        "weight_copy_bytes": int(trace.weight_copy_bytes),
        "output_bytes": int(trace.output_bytes),
        "layers": trace.layers,
    }, method


def _step_peak(step: Callable[[], Any], baseline: int, device: torch.device, measure_peak: bool):
    """(peak, delta, net, method) of one ``step()`` above the steady-state ``baseline``: the CUDA
    allocator's peak around it, or the CPU allocator's from the profiler; all None without ``measure_peak``."""
    if not measure_peak:
        return None, None, None, "first step only (no peak measured)"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        at_start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak_abs = torch.cuda.max_memory_allocated(device)
        delta, net = peak_abs - at_start, torch.cuda.memory_allocated(device) - at_start
        return baseline + delta, delta, net, ("steady-state baseline + torch.cuda.max_memory_allocated() - "
                                              "memory_allocated() around one step (after reset_peak_memory_stats())")
    delta, net = _profiler_peak(step)
    return baseline + delta, delta, net, "torch.profiler(profile_memory=True) allocator peak + steady-state baseline"
