"""The classroom server's job isolation on a GPU: a run in its own process, admission by free GPU memory.

    python benchmarks/check_gpu_jobs.py [--data-dir DIR] [--epochs 1]

Prints, on a machine with CUDA (skips with one line otherwise):
  1. a tutorial-net run on the embedded sample, trained in a child process on cuda:0 through the
     job manager: status, seconds, test accuracy, the child's pid next to the server's;
  2. the free GPU memory the admission check reads (torch.cuda.mem_get_info), then a ResNet-50
     run (standard stem, 224x224) at a batch far too large for it: refused before it starts,
     with the message (the largest batch that fits), and nothing queued;
  3. that suggested batch, submitted: admitted, trained for a few batches and stopped, with the
     child's peak GPU memory (torch.cuda.max_memory_allocated, read by the child) beside the
     estimate the admission used.
Figures only: no assertion decides a pass; read them.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _config(model: str, batch: int, epochs: int, stem: bool, data_dir: str = ""):
    from core.config import RunConfig
    return RunConfig.from_dict({
        "data": {"source": "sample", "batch_size": batch, **({} if stem else {"image_size": 224})},
        "model": {"name": model, **({} if stem else {"small_input_stem": False})},
        "optim": {"lr": 0.01}, "epochs": epochs, "device": "cuda", "seed": 1,
    })


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="data folder (default: a temporary one)")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("skipped: no CUDA device here (this check needs one)")
        return 0
    from core import events as ev, resources
    from core.errors import ConfigError
    from core.jobs import JobManager
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="lab-data-")
    runs = Path(tempfile.mkdtemp(prefix="lab-runs-"))
    manager = JobManager(runs_dir=runs, data_dir=data_dir, max_jobs=1)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; server pid {os.getpid()}")
    try:
        _small_run(manager, _config("tutorial_net", 64, args.epochs, True, data_dir), ev)
        big = _refused_run(manager, data_dir, resources, ConfigError)
        if big:
            _admitted_run(manager, data_dir, big, ev, resources)
    finally:
        manager.shutdown()
    return 0


def _small_run(manager, config, ev) -> None:
    t0 = time.time()
    job = manager.submit(config, owner="check")
    while job.pid is None and not job.done:
        time.sleep(0.05)
    print(f"1. tutorial_net run {job.job_id}: child pid {job.pid}")
    manager.wait(job.job_id, timeout=600)
    acc = next((e.accuracy for e in job.events if isinstance(e, ev.Evaluated)), None)
    print(f"   status {job.status} in {time.time() - t0:.1f} s; {job.message!s:.200}"
          + (f"; test accuracy {acc:.3f}" if acc is not None else ""))


def _refused_run(manager, data_dir, resources, ConfigError) -> int | None:
    import torch
    free, total = torch.cuda.mem_get_info(0)
    print(f"2. GPU memory free {resources.format_size(free)} of {resources.format_size(total)}")
    config = _config("resnet50", 32768, 1, False, data_dir)
    need = resources.training_memory(config, 10, (3, 224, 224), "cuda")
    print(f"   resnet50 224x224 batch 32768: estimate {resources.format_size(need)}")
    try:
        job = manager.submit(config, owner="check")
    except ConfigError as err:
        print(f"   refused before it started: {err}")
        print(f"   jobs queued or running: {len(manager.jobs())}")
        found = re.search(r"batch (\d+) fits", str(err))
        return int(found.group(1)) if found else None
    print(f"   NOT refused: job {job.job_id} queued; stopping it")
    manager.stop(job.job_id)
    return None


def _admitted_run(manager, data_dir, batch: int, ev, resources) -> None:
    config = _config("resnet50", batch, 1, False, data_dir)
    need = resources.training_memory(config, 10, (3, 224, 224), "cuda")
    job = manager.submit(config, owner="check")
    print(f"3. resnet50 batch {batch}: admitted (estimate {resources.format_size(need)}); training...")
    deadline = time.time() + 240
    while not job.done and sum(isinstance(e, ev.BatchEnded) for e in job.events) < 3 and time.time() < deadline:
        time.sleep(0.2)
    manager.stop(job.job_id)
    manager.wait(job.job_id, timeout=300)
    batches = sum(isinstance(e, ev.BatchEnded) for e in job.events)
    print(f"   {batches} batches, then status {job.status}: {job.message!s:.300}")


if __name__ == "__main__":
    sys.exit(main())
