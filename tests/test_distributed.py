"""Distributed data-parallel training under torchrun (issue 17), on the CPU with Gloo.

The runs are real: ``python -m torch.distributed.run --nproc_per_node=2 -m core.train ...`` as a
subprocess (one torch thread per process) on the tiny set cut from the embedded sample, against
``python -m core.train`` in one process with the same global batch and seed. The tutorial Net has
no BatchNorm, so the two must end with the same weights up to float rounding.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import distributed, loaders, tensorloader, trainer
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "core.train"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
            "--master-port", str(_free_port()), "-m", "core.train"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LAB_DIST_TIMEOUT_S": "120"}


def _args(folder: Path, tmp: Path, epochs: int, in_memory: str) -> list[str]:
    # 105 training images in global batches of 16: the last one has 9, so the two ranks' shares differ
    return ["--source", "folder", "--location", str(folder), "--model", "tutorial_net", "--epochs", str(epochs),
            "--batch-size", "16", "--device", "cpu", "--seed", "3", "--no-recipe", "--quiet",
            "--data-dir", str(tmp / "data"), "--set", "optim.scheduler=step", "--set", f"data.in_memory={in_memory}"]


def _train(procs: int, args: list[str], runs: Path) -> Path:
    proc = subprocess.run(_command(procs) + args + ["--runs-dir", str(runs)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pth", weights_only=True, map_location="cpu")["model"]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    """Training runs by (processes, epochs, data path), each made once for the module."""
    tmp, made = tmp_path_factory.mktemp("ddp"), {}

    def get(procs: int, epochs: int, in_memory: str = "on") -> Path:
        key = (procs, epochs, in_memory)
        if key not in made:
            made[key] = _train(procs, _args(tiny_folder, tmp, epochs, in_memory), tmp / f"runs-{procs}-{epochs}-{in_memory}")
        return made[key]
    get.args = lambda epochs, in_memory="on": _args(tiny_folder, tmp, epochs, in_memory)
    get.tmp = tmp
    return get


def _only_rank_0_wrote(run_dir: Path, epochs: int) -> None:
    """One run folder, and in its event log one start, one end and each epoch once: a second rank
    writing anything would add a folder or repeat events."""
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]
    kinds = [e["kind"] for e in _events(run_dir)]
    assert kinds.count("RunStarted") == 1 and kinds.count("RunFinished") == 1
    assert [e["epoch"] for e in _events(run_dir) if e["kind"] == "EpochEnded"] == list(range(1, epochs + 1))


@pytest.mark.parametrize("in_memory", ["on", "off"])
def test_two_processes_train_the_same_weights_as_one(runs, in_memory):
    one, two = runs(1, 2, in_memory), runs(2, 2, in_memory)
    torch.testing.assert_close(_weights(two), _weights(one))
    h1 = json.loads((one / "status.json").read_text())
    h2 = json.loads((two / "status.json").read_text())
    assert h1["status"] == h2["status"] == "finished"
    _only_rank_0_wrote(two, 2)
    started = next(e for e in _events(two) if e["kind"] == "RunStarted")
    note = next(n for n in started["notes"] if n.startswith("distributed:"))
    assert "batch 16 in all = 2 processes × 8" in note and "for the global batch of 16" in note
    # the epoch's train loss is the global one (all-reduced), as one process reports it
    loss = [[e["train_loss"] for e in _events(r) if e["kind"] == "EpochEnded"] for r in (one, two)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)


def test_a_checkpoint_resumes_across_world_sizes(runs):
    """2 → 1 and 1 → 2 processes: the third epoch after a resume gives the weights of 3 epochs in one go."""
    three = _weights(runs(1, 3))
    for made_by, resumed_in in ((2, 1), (1, 2)):
        run_dir = runs(made_by, 2)
        proc = subprocess.run(_command(resumed_in) + ["--resume", str(run_dir), "--epochs", "3", "--quiet"], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((run_dir / "status.json").read_text())["epochs_completed"] == 3
        torch.testing.assert_close(_weights(run_dir), three)


def _rank_pid(torchrun: subprocess.Popen, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker of ``rank`` (from /proc: its environment says RANK)."""
    while time.time() < deadline:
        for child in Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split():
            with contextlib.suppress(OSError):   # a child that has just ended
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in environ:
                    return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} found")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through /proc")
def test_ctrl_c_on_one_rank_stops_every_rank_and_the_run_resumes_in_one_process(runs):
    """SIGINT to rank 1 only: all ranks stop after the same batch, rank 0 writes the checkpoint,
    every process ends; one process resumes the run and finishes it."""
    runs_dir = runs.tmp / "runs-stop"
    torchrun = subprocess.Popen(_command(2) + runs.args(500) + ["--runs-dir", str(runs_dir)], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        pid = _rank_pid(torchrun, 1, deadline)
        while time.time() < deadline and not any(runs_dir.glob("*/last.pth")):
            time.sleep(0.1)   # the first epoch's checkpoint is there: training is under way
        os.kill(pid, signal.SIGINT)
        out, err = torchrun.communicate(timeout=120)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    (run_dir,) = runs_dir.iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped", err[-3000:]
    ckpt = torch.load(run_dir / "last.pth", weights_only=True)
    assert 1 <= ckpt["epoch"] < 500
    # each rank ended with the CLI's status for a stop (torchrun then reports its children as failed)
    assert len(re.findall(r"exitcode\s+:\s*130 \(pid", err)) == 2, err[-3000:]   # the failure report's two blocks
    kinds = [e["kind"] for e in _events(run_dir)]
    assert kinds.count("RunStarted") == 1 and kinds.count("RunFinished") == 1
    target = ckpt["epoch"] + 1
    proc = subprocess.run(_command(1) + ["--resume", str(run_dir), "--epochs", str(target), "--quiet"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["epochs_completed"] == target


# ---------------------------------------------------------------------------------------------
# In one process: the shards, the batch rule, the no-op without torchrun
# ---------------------------------------------------------------------------------------------
def test_tensor_loader_shards_are_the_global_batch_with_its_crops():
    images = torch.randint(0, 256, (21, 3, 8, 8), dtype=torch.uint8)
    make = lambda rank, world: tensorloader.TensorLoader(images, list(range(21)), 6, True, [0.5] * 3, [0.5] * 3,
                                                         padding=2, flip_p=0.5, seed=4, rank=rank, world_size=world)
    whole, parts = make(0, 1), [make(r, 2) for r in (0, 1)]
    for loader in (whole, *parts):
        loader.set_epoch(3)
    assert len(parts[0]) == len(whole) == 4 and parts[1].num_samples() == 21
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)


def test_dataloader_shards_and_per_image_augmentation(tiny_folder):
    from core import datasets, transforms
    ds = datasets.load_dataset("folder", str(tiny_folder))
    norm = transforms.make_normalization("tutorial", ds.mode, ds, list(range(len(ds))))
    tf = transforms.build_transform(transforms.default_train_spec((32, 32), native_size=(32, 32)), norm, ds.mode)
    idx = list(range(0, 40))
    make = lambda rank, world: loaders.make_loader(ds, idx, tf, 8, train=True, num_workers=0, seed=0,
                                                   rank=rank, world_size=world)
    whole, parts = make(0, 1), [make(r, 2) for r in (0, 1)]
    for loader in (whole, *parts):
        loaders.set_epoch(loader, 11)
    torch.manual_seed(0)   # the caller's RNG plays no part in the crops: a different state per loader
    batches = list(whole)
    torch.manual_seed(1)
    shards = [list(p) for p in parts]
    for (x, y), (x0, y0), (x1, y1) in zip(batches, *shards):
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)


def test_the_global_batch_must_be_shared_evenly(monkeypatch):
    from core.config import RunConfig
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    config = RunConfig.from_dict({"data": {"batch_size": 30}})
    with pytest.raises(ConfigError, match=r"batch_size 30 .*4 processes"):
        trainer._check_distributed_batch(config, 100, [])
    config = RunConfig.from_dict({"data": {"batch_size": 32}})
    with pytest.raises(ConfigError, match="last batch has 2 training image"):
        trainer._check_distributed_batch(config, 98, [])
    notes = []
    trainer._check_distributed_batch(config, 97, notes)   # a last batch of 1 is not trained (see _batches_used)
    assert "batch 32 in all = 4 processes × 8" in notes[0]


def test_without_torchrun_everything_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_env().world_size == 1 and not distributed.init(cuda=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.sum_all([1.5, 2]) == [1.5, 2] and distributed.broadcast("x") == "x"
    assert distributed.any_rank(True) and not distributed.any_rank(False)
