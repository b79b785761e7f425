"""The run configuration: one object shared by the dashboard, the command line and saved runs.

``RunConfig`` nests ``DataConfig``, ``ModelConfig`` and ``OptimConfig``. Every field has a
commented default; ``RunConfig.from_dict`` rejects unknown fields and invalid values with a message
that names the field, and ``to_dict``/``from_dict`` round-trip through JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from core.choices import OPTIMIZERS, PRECISIONS   # the one list of each (also read by core.train)
from core.datasets import SOURCES
from core.errors import ConfigError
from core.revisions import REF_EXAMPLE, REF_RE
from core.storage import atomic_write_text

NORMALIZE_CHOICES = ("auto", "tutorial", "imagenet", "dataset", "none")
IN_MEMORY_CHOICES = ("auto", "on", "off")
FREEZE_CHOICES = ("none", "features", "stages")
SCHEDULERS = ("none", "step", "multistep", "exponential", "cosine", "onecycle", "plateau")
MONITORS = ("val_accuracy", "val_loss")
DEVICES_HINT = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


@dataclass
class DataConfig:
    source: str = "sample"            # a core.datasets.SOURCES name: sample, folder, torchvision...
    location: str | None = None       # torchvision set name, or a folder / .zip / index-file path
    val_fraction: float = 0.1         # of the whole dataset (ignored where the source has a val split)
    test_fraction: float = 0.1        # of the whole dataset (ignored where the source has a test split)
    split_seed: int = 0               # the split is a function of this seed only
    image_size: int | None = None     # None: what the model needs (native size with small-input stem)
    train_augment: list[dict] | None = None  # transforms spec; None: the tutorials' crop + flip
    normalize: str = "auto"           # auto: imagenet for pretrained weights, else tutorial [-1, 1]
    batch_size: int = 32              # with lr 0.02 and cosine: the tutorials' recipe, scaled up
    num_workers: int | str = "auto"   # "auto": the tutorials' rule, 0 on machines with <= 2 cores
    in_memory: str = "auto"           # hold small splits as one uint8 tensor (auto: when it fits)
    revision: str | None = None       # label decisions to train with ("r0123456789@7", core.revisions);
                                      # None: the dataset's own labels


@dataclass
class ModelConfig:
    name: str = "tutorial_net"        # a name from core.models.list_models()
    pretrained: bool = False          # torchvision ImageNet weights (local file or download)
    weights_path: str | None = None   # a user's own .pth (state_dict or checkpoint)
    small_input_stem: bool = True     # adapt the first layers for small images instead of resizing
    freeze: str = "none"              # none | features (train the head only) | stages
    freeze_stages: int = 0            # with freeze="stages": how many leading stages to freeze
    init: str = "default"             # initialisation of layers that are not pretrained


@dataclass
class OptimConfig:
    optimizer: str = "sgd"            # a core.choices.OPTIMIZERS name: sgd, adam, adamw...
    lr: float = 0.02                  # backbone (and head, unless head_lr is set) learning rate
    head_lr: float | None = None      # a separate learning rate for the classifier head
    momentum: float = 0.9             # SGD / RMSprop momentum (the tutorials use 0.9)
    nesterov: bool = False
    weight_decay: float = 5e-4        # not applied to biases and normalisation parameters
    scheduler: str = "cosine"         # none | step | multistep | exponential | cosine | onecycle | plateau
    step_size: int = 10               # StepLR: epochs between decays
    milestones: list[int] = field(default_factory=lambda: [30, 60])  # MultiStepLR epochs
    gamma: float = 0.1                # decay factor (Step, MultiStep, Exponential, Plateau)
    plateau_patience: int = 2         # Plateau: epochs without improvement before the rate is cut
    warmup_epochs: int = 0            # linear warm-up from lr/warmup_steps to lr (not with onecycle)
    onecycle_warmup: float = 0.25     # onecycle: the fraction of the steps spent rising to the peak rate
    label_smoothing: float = 0.0
    class_weights: str | list[float] | None = None  # None | "balanced" (inverse frequency) | list
    accumulation_steps: int = 1       # gradient accumulation: a bigger batch on a small card
    grad_clip: float | None = None    # max gradient norm; None: no clipping


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 20                  # short on the sample (benchmarks/bench_speed.py times an epoch)
    device: str = "auto"              # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"           # a core.choices.PRECISIONS name: fp32, or bf16/fp16 mixed
    seed: int = 0                     # Python, NumPy and torch seeds
    deterministic: bool = False       # torch.use_deterministic_algorithms + cudnn.deterministic
    early_stopping_patience: int | None = None  # epochs without improvement before stopping
    monitor: str = "val_accuracy"     # what "best" means: val_accuracy (max) or val_loss (min)
    multi_gpu: bool = False           # DataParallel over all visible GPUs, as the tutorials show
    tensorboard: bool = False         # this run also writes a TensorBoard log into its folder (needs the
                                      # tensorboard package), even when the server logs no run by default
    record_distributions: bool = False  # per epoch, weight quantiles and gradient norms of every layer
                                      # (core.gradstats; distributions.jsonl in the run folder)
    time_budget_s: float | None = None  # seconds the whole run may take: the epochs (and the schedule that
                                      # ends with them) are planned from a measured speed (core.cost);
                                      # None: train the configured epochs
    compile: bool = False             # torch.compile the model (pays for long runs of bigger models only)
    name: str | None = None           # a label for the run; None: model name and time

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        """Build and validate a configuration; unknown fields raise ConfigError naming them."""
        if not isinstance(raw, dict):
            raise ConfigError(f"A run configuration must be a JSON object, got {type(raw).__name__}.")
        raw = dict(raw)
        sections = {}
        for key, sub in (("data", DataConfig), ("model", ModelConfig), ("optim", OptimConfig)):
            sections[key] = _build(sub, raw.pop(key, {}) or {}, prefix=f"{key}.")
        cfg = _build(cls, raw, prefix="", extra=sections)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"The configuration is not valid JSON: {err}.") from None
        return cls.from_dict(raw)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"Cannot read the configuration file {path}: {err.strerror}.") from None
        try:
            return cls.from_json(text)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        # Atomic: a resumed run rewrites its config.json, and a full disk must not leave it empty.
        atomic_write_text(path, self.to_json())

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Check types, ranges and choices; raise ConfigError naming the field and what is allowed.

        Also run on configurations built in Python (not only through ``from_dict``), so every
        field's type is checked here too: a wrong type must give this message, not a TypeError
        from a comparison further down.
        """
        d, m, o = self.data, self.model, self.optim
        for section, prefix in ((d, "data."), (m, "model."), (o, "optim."), (self, "")):
            for f in dataclasses.fields(section):
                _coerce(prefix + f.name, f, getattr(section, f.name))
        _check_data(d)
        _choice("model.freeze", m.freeze, FREEZE_CHOICES)
        if m.freeze == "stages" and m.freeze_stages < 1:
            raise ConfigError("model.freeze_stages must be at least 1 with model.freeze='stages'.")
        _choice("optim.optimizer", o.optimizer, OPTIMIZERS)
        _choice("optim.scheduler", o.scheduler, SCHEDULERS)
        _check_rates_and_seeds(self)
        _check_optim(o)
        _positive_int("epochs", self.epochs)
        if self.time_budget_s is not None and not MIN_BUDGET_S <= self.time_budget_s <= MAX_BUDGET_S:
            raise ConfigError(f"time_budget_s must be empty (train the epochs set) or between {MIN_BUDGET_S:g} s "
                              f"and {MAX_BUDGET_S // 3600:g} hours, got {self.time_budget_s:g}.")
        if o.warmup_epochs >= self.epochs:
            # the warm-up would take the whole run: the schedule would never start
            raise ConfigError(f"optim.warmup_epochs must be less than epochs ({self.epochs}), "
                              f"got {o.warmup_epochs}.")
        _choice("precision", self.precision, PRECISIONS)
        _choice("monitor", self.monitor, MONITORS)
        if self.early_stopping_patience is not None:
            _positive_int("early_stopping_patience", self.early_stopping_patience)
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be {DEVICES_HINT}, got {self.device!r}.")
        return self


def _check_data(d: DataConfig) -> None:
    _choice("data.source", d.source, SOURCES)
    if d.source != "sample" and not d.location:
        raise ConfigError(f"data.location is needed for the {d.source!r} source "
                          "(a torchvision set name, or a folder, .zip or index-file path).")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(d, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{name} must be in [0, 1), got {value}.")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError("data.val_fraction + data.test_fraction must leave images to train on "
                          f"(sum < 1), got {d.val_fraction + d.test_fraction:.2f}.")
    if d.image_size is not None and d.image_size < 8:
        raise ConfigError(f"data.image_size must be empty (the model's own size) or a whole number "
                          f"of at least 8 pixels, got {d.image_size}.")
    _check_augment(d.train_augment)
    _positive_int("data.batch_size", d.batch_size)
    if not (d.num_workers == "auto" or (isinstance(d.num_workers, int) and not isinstance(d.num_workers, bool)
                                        and d.num_workers >= 0)):
        raise ConfigError(f"data.num_workers must be 'auto' or an integer >= 0, got {d.num_workers!r}.")
    _choice("data.normalize", d.normalize, NORMALIZE_CHOICES)
    _choice("data.in_memory", d.in_memory, IN_MEMORY_CHOICES)
    if d.revision is not None and not REF_RE.fullmatch(d.revision):
        raise ConfigError(f"data.revision must be a revision reference such as {REF_EXAMPLE} (a revision id, "
                          f"'@' and its version), or empty for the dataset's own labels; got {d.revision!r:.60}.")


def _check_optim(o: OptimConfig) -> None:
    """Ranges of the optimiser and schedule fields (names and rates are checked before)."""
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}.")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
    if not 0.0 < o.onecycle_warmup < 1.0:
        raise ConfigError(f"optim.onecycle_warmup must be a fraction of the steps in (0, 1), e.g. 0.25; "
                          f"got {o.onecycle_warmup}.")
    if not 0.0 <= o.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}.")
    if not 0.0 < o.gamma <= 1.0:
        raise ConfigError(f"optim.gamma must be in (0, 1], got {o.gamma}.")
    _positive_int("optim.step_size", o.step_size)
    if o.plateau_patience < 0:
        raise ConfigError(f"optim.plateau_patience must be a whole number >= 0 (epochs without improvement "
                          f"before the plateau schedule cuts the rate), got {o.plateau_patience}.")
    if not isinstance(o.milestones, list) or any(isinstance(e, bool) or not isinstance(e, int) or e < 1
                                                 for e in o.milestones):
        raise ConfigError(f"optim.milestones must be a list of epoch numbers (whole numbers >= 1), "
                          f"e.g. [30, 60]; got {o.milestones!r}.")
    _positive_int("optim.accumulation_steps", o.accumulation_steps)
    if o.warmup_epochs < 0:
        raise ConfigError(f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}.")
    if o.grad_clip is not None and not o.grad_clip > 0:
        raise ConfigError(f"optim.grad_clip must be > 0 or empty, got {o.grad_clip}.")
    _check_class_weights(o.class_weights)


MAX_LR = 100.0        # far above any useful rate: a typo (1e308) is told so, not trained into NaN
MAX_SEED = 2**32 - 1  # NumPy's seeds stop here
MIN_BUDGET_S = 5.0    # below this the speed measurement and data preparation take the whole budget
MAX_BUDGET_S = 7 * 24 * 3600.0


def _check_rates_and_seeds(config: "RunConfig") -> None:
    o = config.optim
    for name in ("lr",) + (("head_lr",) if o.head_lr is not None else ()):
        value = getattr(o, name)
        if not 0 < value <= MAX_LR:
            raise ConfigError(f"optim.{name} must be a number > 0 and at most {MAX_LR:g} (typical: 0.0001 to 0.1), "
                              f"got {value}.")
    for name, value in (("seed", config.seed), ("data.split_seed", config.data.split_seed)):
        if not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{name} must be a whole number from 0 to {MAX_SEED:,}, got {value}.")


def _build(cls, raw: dict, prefix: str, extra: dict | None = None):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'configuration'} must be an object, got {raw!r}.")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        valid = ", ".join(prefix + n for n in names)
        raise ConfigError(f"Unknown configuration field(s): {', '.join(prefix + u for u in unknown)}. "
                          f"Valid fields: {valid}.")
    kwargs = dict(extra or {})
    for key, value in raw.items():
        kwargs[key] = _coerce(prefix + key, names[key], value)
    return cls(**kwargs)


# What a text field holds, for the type error message.
_TEXT_HINTS = {
    "data.location": "a torchvision set name, or a folder, .zip or index-file path",
    "data.revision": "a revision reference such as r0123456789@7",
    "model.name": "a model name such as 'tutorial_net'; python -m core.train --list-models lists them",
    "device": DEVICES_HINT,
}


def _coerce(label: str, f: dataclasses.Field, value: Any) -> Any:
    """Type checking by the field's annotation (a string here, see the __future__ import): true/false
    for bool, finite numbers for float (ints become floats), whole numbers for int (whole floats
    such as 3.0 become ints), text for str; None only where the annotation allows it. Fields of
    other types (lists, num_workers, class_weights) are checked in ``validate``."""
    kind = f.type
    optional = kind.endswith("| None")
    if value is None and optional:
        return None
    empty = " or empty" if optional else ""
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r}.")
    elif kind in ("float", "float | None"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{label} must be a number{empty}, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number{empty}, got {value!r}.")
        return float(value)
    elif kind in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{label} must be a whole number{empty}, got {value!r}.")
        return int(value)
    elif kind in ("str", "str | None"):
        if not isinstance(value, str):
            hint = f" ({_TEXT_HINTS[label]})" if label in _TEXT_HINTS else ""
            raise ConfigError(f"{label} must be text{hint}{empty}, got {value!r}.")
    return value


def _check_augment(spec: Any) -> None:
    """data.train_augment: its shape here, then every step, parameter and the image sizes it can
    make (core.transforms.normalize_spec, which knows them), so a run is refused before it is queued."""
    example = '[{"name": "RandomHorizontalFlip", "params": {"p": 0.5}}]'
    if spec is None:
        return
    if not isinstance(spec, list):
        raise ConfigError(f"data.train_augment must be a list of transform steps such as {example}, "
                          f"or empty for the default augmentation; got {reprlib.repr(spec)}.")
    for k, step in enumerate(spec, start=1):
        if not (isinstance(step, dict) and isinstance(step.get("name"), str)
                and isinstance(step.get("params", {}), dict)):
            raise ConfigError(f"data.train_augment step {k} must be an object with a \"name\" (text) and "
                              f"optional \"params\" (an object), as in {example}; got {reprlib.repr(step)}.")
    from core import transforms   # here: core.config stays importable without torch
    transforms.normalize_spec(spec)


def _check_class_weights(cw: Any) -> None:
    allowed = "empty, 'balanced' (inverse class frequency) or a list of numbers >= 0, one per class"
    if cw is None or cw == "balanced":
        return
    if not isinstance(cw, list):
        raise ConfigError(f"optim.class_weights must be {allowed}; got {cw!r}.")
    for w in cw:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"optim.class_weights must be {allowed}; got {cw!r} ({w!r} is not a number >= 0).")


def _choice(label: str, value: Any, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{label} must be one of {', '.join(choices)}; got {value!r}.")


def _positive_int(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{label} must be a whole number >= 1, got {value!r}.")
