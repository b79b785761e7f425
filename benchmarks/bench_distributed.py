"""Distributed data-parallel scaling: training images/s with 1 and 2 (or --procs) processes.

    python benchmarks/bench_distributed.py                      # CPU, Gloo: 1 vs 2 processes
    python benchmarks/bench_distributed.py --model resnet18 --epochs 3 --batch-size 256
    python benchmarks/bench_distributed.py --device cuda --procs 1 2 4   # NCCL, one GPU per process

Each count of processes trains the same run (the embedded sample, the same global batch and seed)
through ``torchrun -m core.train`` (1 process: plain ``python -m core.train``). On the CPU the cores
are shared out: each process gets cores // processes torch threads (--threads N fixes it), so the
comparison is the same machine used two ways. The speed is the training images/s of the epochs after the first (which
warms up), from the run's EpochEnded events; scaling efficiency = speed(N) / (N × speed(1)).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(procs: int, args: argparse.Namespace, runs_dir: Path) -> dict:
    launcher = ([sys.executable, "-m", "core.train"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                 "--master-port", str(_free_port()), "-m", "core.train"])
    cmd = launcher + ["--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                      "--device", args.device, "--precision", args.precision, "--seed", "0", "--no-recipe", "--quiet",
                      "--runs-dir", str(runs_dir), "--set", f"data.in_memory={args.in_memory}"]
    threads = args.threads or (max(1, (os.cpu_count() or 1) // procs) if args.device == "cpu" else 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    epochs = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "EpochEnded"]
    timed = epochs[1:] or epochs
    return {"procs": procs, "threads": threads, "images_per_s": sum(e["images_per_sec"] for e in timed) / len(timed),
            "epoch_s": sum(e["seconds"] for e in timed) / len(timed), "wall_s": wall,
            "train_loss": epochs[-1]["train_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="tutorial_net")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu (Gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (default: the CPU cores shared out, cores // processes)")
    p.add_argument("--in-memory", default="auto", help="data.in_memory: auto | on | off")
    args = p.parse_args()
    print(f"{args.model}, global batch {args.batch_size}, {args.epochs} epochs, {args.device}, {args.precision}, "
          f"{os.cpu_count()} CPU core(s); speed of epochs 2..{args.epochs}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_once(n, args, Path(tmp) / f"runs-{n}") for n in args.procs]
    base = rows[0]["images_per_s"] / rows[0]["procs"]
    print(f"{'processes':>9} {'threads each':>12} {'images/s':>10} {'epoch s':>8} {'wall s':>7} "
          f"{'efficiency':>10} {'final train loss':>16}")
    for r in rows:
        eff = r["images_per_s"] / (r["procs"] * base)
        print(f"{r['procs']:>9} {r['threads']:>12} {r['images_per_s']:>10,.0f} {r['epoch_s']:>8.2f} "
              f"{r['wall_s']:>7.1f} {eff:>10.0%} {r['train_loss']:>16.4f}")


if __name__ == "__main__":
    main()
