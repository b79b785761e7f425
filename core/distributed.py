"""The one home for process-group facts: distributed data-parallel training under ``torchrun``.

``torchrun --nproc_per_node=N -m core.train ...`` starts N processes (ranks) and tells each, in its
environment, who it is: RANK (0..WORLD_SIZE-1 over all nodes), WORLD_SIZE, LOCAL_RANK (its index on
its node: the GPU it drives), LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (where rank 0's store
listens). ``init`` joins the process group with torch.distributed: NCCL when the run trains on CUDA
(each rank on cuda:LOCAL_RANK), Gloo on the CPU, with a timeout so a rank that died never leaves
the others waiting forever.

Without torchrun's environment (or WORLD_SIZE=1) nothing here does anything: ``rank()`` is 0,
``world_size()`` 1, ``is_main()`` True, the reductions return their input, and the trainer behaves
exactly as in one process.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

# A collective waits at most this long for the other ranks (the final test evaluation on rank 0
# is one such wait for the others); LAB_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun put in this process's environment (defaults: a single plain process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_env(environ: dict | None = None) -> LaunchEnv:
    """Read torchrun's variables; a process started without torchrun gets the single-process defaults."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    return LaunchEnv(rank=int(env.get("RANK", "0") or 0), world_size=world,
                     local_rank=int(env.get("LOCAL_RANK", "0") or 0),
                     local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world)) or world),
                     master_addr=env.get("MASTER_ADDR"), master_port=env.get("MASTER_PORT"))


def active() -> bool:
    """True inside a process group of more than one process (after ``init``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run folder, events, status, checkpoints and evaluation."""
    return rank() == 0


def timeout_s() -> float:
    return float(os.environ.get("LAB_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))


_state: dict[str, Any] = {"device": torch.device("cpu")}   # where the collectives' tensors live


def init(cuda: bool) -> bool:
    """Join torchrun's process group (NCCL with ``cuda``, else Gloo); True when this call joined it.
    A no-op (False) without torchrun's environment, with WORLD_SIZE=1, or when already joined."""
    env = launch_env()
    if not env.distributed or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("torchrun started this process, but this PyTorch build has no torch.distributed.")
    if cuda:
        torch.cuda.set_device(env.local_rank)
        _state["device"] = torch.device("cuda", env.local_rank)
    else:
        _state["device"] = torch.device("cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s()))
    return True


def destroy() -> None:
    """Leave the process group (after a last barrier, so no rank tears it down under another)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):   # another rank already gone: nothing left to wait for
            if dist.get_world_size() > 1:
                dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(cuda: bool):
    """``init`` for the duration of the block, and ``destroy`` after it, when the block joined."""
    joined = init(cuda)
    try:
        yield
    finally:
        if joined:
            destroy()


def local_device(device: torch.device) -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK under torchrun on GPUs, else ``device``."""
    if active() and device.type == "cuda":
        return torch.device("cuda", launch_env().local_rank)
    return device


def sum_all(values: Sequence[float]) -> list[float]:
    """The sums over all ranks of ``values`` (one all-reduce, in float64); the values themselves
    in one process."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_state["device"])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: a stop request reaches all ranks at the
    same batch."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_state["device"])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def agreed_stop(should_stop: Callable[[], bool]) -> Callable[[], bool]:
    """``should_stop`` asked on this rank and all-reduced: every rank gets the same answer. Every
    rank must call it at the same points (the trainer does: before each batch and each epoch)."""
    if not active():
        return should_stop
    return lambda: any_rank(should_stop())


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable value); ``obj`` itself in one process."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_state["device"])
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on rank 0 only, its result given to every rank."""
    return broadcast(fn() if is_main() else None)


def barrier() -> None:
    if active():
        dist.barrier()


def describe(global_batch: int, lr: float) -> str:
    """The batch and learning-rate rule in words, for the run's notes and card."""
    n = world_size()
    return (f"distributed: {n} processes ({'NCCL' if _state['device'].type == 'cuda' else 'Gloo'}); batch "
            f"{global_batch} in all = {n} processes × {global_batch // n}; learning rate {lr:g} for the "
            f"global batch of {global_batch} (the same as one process training batches of {global_batch})")
