"""The named choices a run is made of, one registry each: ``OPTIMIZERS`` and ``PRECISIONS``.

This is their one home: the trainer builds from these entries, the memory calculator sizes from
them, ``RunConfig.validate`` checks names against them and the dashboard lists them, so a new
optimiser or precision is one ``add`` here. An unknown name raises ConfigError naming it and the
valid ones (``Registry.get``). Dataset sources live beside their loaders, in
``core.datasets.SOURCES``.

Importing this module does not import torch (``core.config`` reads it): an entry names its torch
class or dtype, looked up when it is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from core.errors import ConfigError
from core.registry import Registry

__all__ = ["OPTIMIZERS", "PRECISIONS", "OptimizerSpec", "PrecisionSpec"]


def _no_options(optim: Any) -> dict:
    return {}


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimiser: its torch class, what a run passes it, and how much state it keeps.

    ``state_multiplier(momentum, options)`` is the number of parameter-sized fp32 buffers the
    optimiser keeps per trainable parameter; ``step_counter`` says whether it also keeps a 0-dim
    fp32 ``step`` tensor per parameter (4 bytes each). ``run_options(optim)`` takes the keyword
    arguments (besides the learning rate) a run gives it from its ``OptimConfig``.
    """

    name: str
    class_name: str                                  # in torch.optim
    state_multiplier: Callable[[float, dict], int]
    step_counter: bool
    uses_momentum: bool
    description: str
    run_options: Callable[[Any], dict] = _no_options

    @property
    def cls(self) -> type:
        import torch
        return getattr(torch.optim, self.class_name)

    def build(self, params: Iterable[Any], momentum: float, options: dict):
        """An instance for the memory calculator: ``options`` as given, lr 1e-3 unless set."""
        kwargs = dict(options)
        kwargs.setdefault("lr", 1e-3)
        if self.uses_momentum:
            kwargs.setdefault("momentum", momentum)
        try:
            return self.cls(params, **kwargs)
        except TypeError as err:
            raise ConfigError(f"Optimiser {self.name!r} does not accept these options {options}: {err}") from None

    def for_run(self, param_groups: list[dict], optim: Any):
        """The optimiser a run trains with: its parameter groups, ``optim.lr`` and ``run_options``."""
        return self.cls(param_groups, lr=optim.lr, **self.run_options(optim))


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optimizer", ConfigError)
OPTIMIZERS.add("sgd", OptimizerSpec(
    "sgd", "SGD", lambda m, o: 1 if m > 0 else 0, False, True,
    "SGD: one momentum buffer when momentum > 0, no state without momentum",
    lambda o: {"momentum": o.momentum, "nesterov": o.nesterov and o.momentum > 0}))
OPTIMIZERS.add("adam", OptimizerSpec(
    "adam", "Adam", lambda m, o: 3 if o.get("amsgrad") else 2, True, False,
    "Adam: exp_avg and exp_avg_sq (+ max_exp_avg_sq with amsgrad)"))
OPTIMIZERS.add("adamw", OptimizerSpec(
    "adamw", "AdamW", lambda m, o: 3 if o.get("amsgrad") else 2, True, False,
    "AdamW: exp_avg and exp_avg_sq (+ max_exp_avg_sq with amsgrad)"))
OPTIMIZERS.add("rmsprop", OptimizerSpec(
    "rmsprop", "RMSprop", lambda m, o: 1 + (1 if m > 0 else 0) + (1 if o.get("centered") else 0), True, True,
    "RMSprop: square_avg, + momentum_buffer when momentum > 0, + grad_avg when centered",
    lambda o: {"momentum": o.momentum}))
OPTIMIZERS.add("adagrad", OptimizerSpec(
    "adagrad", "Adagrad", lambda m, o: 1, True, False, "Adagrad: one running sum"))


@dataclass(frozen=True)
class PrecisionSpec:
    """A training precision: the autocast dtype (None: plain fp32), whether it needs a CUDA GPU
    and whether the loss is scaled (fp16 gradients underflow without a GradScaler)."""

    name: str
    dtype_name: str | None                           # in torch
    description: str
    cuda_only: bool = False
    grad_scaler: bool = False

    @property
    def dtype(self):
        import torch
        return None if self.dtype_name is None else getattr(torch, self.dtype_name)


PRECISIONS: Registry[PrecisionSpec] = Registry("precision", ConfigError)
PRECISIONS.add("fp32", PrecisionSpec("fp32", None, "plain float32"))
PRECISIONS.add("bf16", PrecisionSpec("bf16", "bfloat16", "bfloat16 mixed precision (autocast)"))
PRECISIONS.add("fp16", PrecisionSpec("fp16", "float16", "float16 mixed precision (autocast, loss scaling; CUDA only)",
                                     cuda_only=True, grad_scaler=True))
