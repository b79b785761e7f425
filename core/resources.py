"""What a training run may use: the memory free for it now, a per-run cap, and whether it fits.

The job manager asks this module before it queues a run (``JobManager.submit``): the run's
training memory comes from the exact estimator (``core.memory``: weights, gradients, optimiser
state and saved activations for the batch and input size), what is free from the operating system
(``/proc/meminfo`` and the cgroup limit on the CPU, the driver on CUDA), and a run that cannot fit
is refused with the largest batch that does. The readers take their file paths as arguments, so
tests point them at files they write. Nothing here imports Gradio.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from core.config import RunConfig
from core.errors import ConfigError
from core.storage import format_size   # the one size format of messages; re-exported here

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")   # a container's own cgroup is mounted here (v2; v1 under memory/)
PROC = Path("/proc")
# Kept free for the dashboard itself when a run is admitted on the CPU: the server process
# (Gradio, a PyTorch for predictions and the memory calculator) grows to 0.5-0.8 GiB RSS.
SERVER_RESERVE_BYTES = 1 * GiB
# Kept free on a GPU: the training process's CUDA context and cuDNN workspace, which the
# estimator leaves out (under 1 GB; benchmarks/check_gpu_jobs.py measures it on a GPU).
CUDA_RESERVE_BYTES = 1 * GiB
# cgroup v1 writes a number near 2**63 (PAGE_COUNTER_MAX pages) for "no limit".
_V1_UNLIMITED = 1 << 60

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


# ---------------------------------------------------------------------------------------------
# Sizes as people write them
# ---------------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """Bytes from a size such as ``512MiB``, ``4GiB``, ``3G``, ``1.5 GiB``, ``2GB`` or ``1024``.

    K/M/G/T alone and KiB/MiB/GiB/TiB are powers of 1024 (as ``docker --memory 3g`` and systemd
    read them); KB/MB/GB/TB with a B and no i are powers of 1000. Case does not matter. Raises
    ConfigError for anything else, or for a size of 0.
    """
    match = _SIZE.match(str(text))
    if match is None:
        raise ConfigError(f"Could not read {text!r} as a memory size. Write a number with a unit, "
                          "e.g. 512MiB, 4GiB or 3G (K/M/G/T and KiB/MiB/GiB/TiB count in 1024s, KB/MB/GB in 1000s).")
    number, prefix, binary, byte = match.groups()
    base = 1000 if byte and not binary and prefix else 1024
    n_bytes = int(float(number) * base ** _POWERS[prefix.lower()])
    if n_bytes <= 0:
        raise ConfigError(f"A memory size must be more than 0 bytes, got {text!r}.")
    return n_bytes


# ---------------------------------------------------------------------------------------------
# Free memory
# ---------------------------------------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_field(path: Path, name: str) -> int:
    """A field of a cgroup memory.stat file (0 when missing)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0   # no stat file: count no reclaimable cache, the cautious answer
    for line in lines:
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


def read_meminfo_available(path: Path = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo in bytes (the kernel's estimate of what can be allocated
    without swapping, page cache it can drop included); None when the file has no such line."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * (KiB if parts[2:3] == ["kB"] else 1)
    return None


def read_cgroup_free(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this cgroup may still allocate: its limit less what it uses, or None without a limit.

    cgroup v2: ``memory.max`` ("max" = no limit) less ``memory.current``; v1:
    ``memory/memory.limit_in_bytes`` less ``memory.usage_in_bytes``. Usage counts the page cache,
    which the kernel reclaims before it kills anything, so the inactive file cache
    (``memory.stat``) is added back, as ``docker stats`` does.
    """
    v2_limit = _read_int(root / "memory.max")
    if v2_limit is not None:
        used = _read_int(root / "memory.current") or 0
        cache = _stat_field(root / "memory.stat", "inactive_file")
        return max(0, v2_limit - max(0, used - cache))
    v1 = root / "memory"
    v1_limit = _read_int(v1 / "memory.limit_in_bytes")
    if v1_limit is None or v1_limit >= _V1_UNLIMITED:
        return None
    used = _read_int(v1 / "memory.usage_in_bytes") or 0
    cache = _stat_field(v1 / "memory.stat", "total_inactive_file")
    return max(0, v1_limit - max(0, used - cache))


def free_cpu_memory(meminfo: Path = MEMINFO, cgroup: Path = CGROUP_ROOT) -> int | None:
    """Memory a new process can take now: the smaller of MemAvailable and the cgroup's room
    (None when neither can be read, e.g. not on Linux)."""
    known = [v for v in (read_meminfo_available(meminfo), read_cgroup_free(cgroup)) if v is not None]
    return min(known) if known else None


def read_process_rss(pid: int, proc: Path = PROC) -> int | None:
    """Resident memory of process ``pid`` (VmRSS of /proc/<pid>/status) in bytes; None if gone."""
    try:
        lines = (proc / str(pid) / "status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            parts = line.split()
            return int(parts[1]) * KiB if len(parts) >= 2 and parts[1].isdigit() else None
    return None


def free_cuda_memory(device) -> int:
    """Free memory of a CUDA device as the driver reports it (``torch.cuda.mem_get_info``; this
    creates a CUDA context in the calling process the first time, as predictions on the GPU do)."""
    import torch
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


# ---------------------------------------------------------------------------------------------
# A run's memory
# ---------------------------------------------------------------------------------------------
def _factory(config: RunConfig, num_classes: int, input_shape: Sequence[int]):
    from core.memory import ZooFactory
    c, h, w = (int(v) for v in input_shape)
    m = config.model
    # freeze_stages only matters with freeze="stages"; left at 0 otherwise so equal models share
    # one cache entry of the estimator.
    return ZooFactory(m.name, int(num_classes), c, (h, w), m.small_input_stem, m.freeze,
                      m.freeze_stages if m.freeze == "stages" else 0)


def _target(device_type: str) -> str:
    # The estimator simulates the optimiser as PyTorch runs it on CUDA (foreach) or the CPU (for-loop).
    return "cpu" if device_type == "cpu" else "cuda"


def training_memory(config: RunConfig, num_classes: int, input_shape: Sequence[int],
                    device_type: str = "cuda") -> int:
    """Bytes one training step of ``config`` needs (the estimator's simulated step peak) for a
    model with ``num_classes`` outputs fed ``input_shape`` = (C, H, W) images."""
    from core.memory import estimate_memory
    factory = _factory(config, num_classes, input_shape)
    est = estimate_memory(factory, factory.input_shape, config.data.batch_size, optimizer=config.optim.optimizer,
                          momentum=config.optim.momentum, precision=config.precision, inference=False,
                          target_device=_target(device_type), accumulation_steps=config.optim.accumulation_steps)
    return int(est.required_bytes)


def largest_fitting_batch(config: RunConfig, num_classes: int, input_shape: Sequence[int], budget_bytes: float,
                          device_type: str = "cuda", limit: int = 1 << 20,
                          accumulation_steps: int | None = None) -> int:
    """The largest batch (at most ``limit``) whose training step the estimator says fits in
    ``budget_bytes``; 0 when not even batch 1 does. Activations grow linearly with the batch, so
    ``core.memory.max_batch_size`` finds it in a handful of estimates. ``accumulation_steps``:
    the gradient accumulation to size it for (default: the run's own)."""
    from core.memory import max_batch_size
    factory = _factory(config, num_classes, input_shape)
    steps = config.optim.accumulation_steps if accumulation_steps is None else accumulation_steps
    return int(max_batch_size(factory, factory.input_shape, budget_bytes, optimizer=config.optim.optimizer,
                              momentum=config.optim.momentum, precision=config.precision,
                              target_device=_target(device_type), limit=max(1, int(limit)),
                              accumulation_steps=steps))


def training_budget(free_bytes: int | None, cap_bytes: int | None, device_type: str) -> tuple[int | None, str]:
    """What a run may use and the words for it: the free memory less the reserve for the server
    (CPU) or the CUDA context (GPU), or the per-run cap when that is smaller. (None, "") when
    neither is known."""
    reserve = CUDA_RESERVE_BYTES if device_type == "cuda" else SERVER_RESERVE_BYTES
    free = None if free_bytes is None else max(0, free_bytes - reserve)
    where = "GPU memory" if device_type == "cuda" else "memory"
    if cap_bytes is not None and (free is None or cap_bytes <= free):
        return cap_bytes, f"this server allows {format_size(cap_bytes)} per training run (--max-job-memory)"
    if free is None:
        return None, ""
    return free, f"{format_size(free)} of {where} is free for training now"


def refusal_message(config: RunConfig, input_shape: Sequence[int], need_bytes: int, budget_words: str,
                    fitting_batch: int | None, accumulated_batch: int | None = None) -> str:
    """Why a run is refused and what to change, e.g. "This run needs about 9.3 GiB (resnet50,
    batch 4096, 224×224) but 2.8 GiB of memory is free for training now. Batch 256 fits; ...".
    ``fitting_batch`` fits with the run's own accumulation; ``accumulated_batch`` (None: the same)
    fits with gradient accumulation, whose peak is higher (the 2nd and later batches of a group
    hold the gradients all step long): the batch the message pairs with accumulation."""
    _, h, w = (int(v) for v in input_shape)
    text = (f"This run needs about {format_size(need_bytes)} ({config.model.name}, batch "
            f"{config.data.batch_size}, {w}×{h}) but {budget_words}.")
    if fitting_batch is None:
        return text + " Lower the batch size (or pick a smaller input size / model)."
    if fitting_batch < 1:
        return text + (" Not even batch 1 fits: pick a smaller model or input size, freeze layers, or "
                       "use bf16 mixed precision.")
    text += f" Batch {fitting_batch} fits; lower the batch size (or pick a smaller input size / model)."
    batch = fitting_batch if accumulated_batch is None else accumulated_batch
    if batch < 1:
        return text
    accumulate = math.ceil(config.data.batch_size * config.optim.accumulation_steps / batch)
    if batch == fitting_batch:
        return text + f" To keep the effective batch, use gradient accumulation over {accumulate} steps."
    return text + (f" To keep the effective batch, use batch {batch} with gradient accumulation over {accumulate} "
                   "steps (from a group's 2nd batch on the gradients are held all step long, so less fits).")
