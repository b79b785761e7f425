"""Training speed: the engine's loop against the tutorial's hand-written loop, side by side.

    python benchmarks/bench_speed.py [--reps 3] [--cases all|tutorial4,tutorial128,resnet18] [--threads 2]

For each case (model, batch size, augmentation) it times, interleaved in one process so machine
noise hits all of them alike, one training epoch over the same images:
  plain      the PyTorch CIFAR-10 tutorial's loop: ImageFolder + ToTensor/Normalize (+ crop/flip)
             + DataLoader(shuffle, num_workers=0) + SGD(momentum 0.9), written out by hand below;
  engine/DL  core.trainer with the same per-image PIL pipeline through a DataLoader (in_memory=off);
  engine     core.trainer as a user gets it (in_memory=auto: the split held as one uint8 tensor,
             crop/flip done per batch).
It prints images/s (median of --reps) and the ratios engine/plain; the goal is >= 1.0.
Data: the shared CIFAR-10 subset (../shared/data, 5,000 train images) when present, else the
embedded sample (2,000). Figures are comparable only within one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import events as ev  # noqa: E402
from core.config import RunConfig  # noqa: E402
from core.models import create_model  # noqa: E402
from core.trainer import fit  # noqa: E402

SHARED_ZIP = ROOT.parent / "shared" / "data" / "cifar10-jpg-mini.zip"
SAMPLE_ZIP = ROOT / "assets" / "cifar10-sample.zip"

# case name → (model, batch size, augment with crop+flip?, small-input stem)
CASES = {
    "tutorial4": ("tutorial_net", 4, False),      # the tutorial exactly: batch 4, no augmentation
    "tutorial128": ("tutorial_net", 128, True),
    "resnet18": ("resnet18", 128, True),
}


def extract_train_folder(tmp: Path) -> Path:
    src = SHARED_ZIP if SHARED_ZIP.exists() else SAMPLE_ZIP
    with zipfile.ZipFile(src) as zf:
        zf.extractall(tmp)
    top = next(p for p in tmp.iterdir() if p.is_dir())
    return top / "train"


def plain_tutorial_epoch(folder: Path, model_name: str, batch: int, augment: bool, seed: int) -> float:
    """The tutorial's loop, by hand. Returns images/s for one epoch (data loading included)."""
    torch.manual_seed(seed)
    steps = [torchvision.transforms.RandomCrop(32, padding=4), torchvision.transforms.RandomHorizontalFlip()] if augment else []
    tf = torchvision.transforms.Compose(steps + [torchvision.transforms.ToTensor(),
                                                 torchvision.transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    data = torchvision.datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=0)
    net = create_model(model_name, num_classes=len(data.classes), input_size=32, small_input_stem=True).model
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001 if batch == 4 else 0.05, momentum=0.9)
    net.train()
    t0 = time.perf_counter()
    for inputs, labels in loader:
        optimizer.zero_grad()
        loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()
    return len(data) / (time.perf_counter() - t0)


def engine_epoch(folder: Path, model_name: str, batch: int, augment: bool, seed: int, in_memory: str,
                 runs_dir: Path) -> float:
    """One epoch through core.trainer.fit; returns the train loop's images/s (from EpochEnded)."""
    spec = [{"name": "RandomCrop", "params": {"size": 32, "padding": 4}},
            {"name": "RandomHorizontalFlip", "params": {"p": 0.5}}] if augment else []
    cfg = RunConfig.from_dict({
        "data": {"source": "folder", "location": str(folder), "batch_size": batch, "train_augment": spec,
                 "val_fraction": 0.0, "test_fraction": 0.0, "in_memory": in_memory, "num_workers": 0,
                 "normalize": "tutorial"},
        "model": {"name": model_name, "small_input_stem": True},
        "optim": {"lr": 0.001 if batch == 4 else 0.05, "weight_decay": 0.0},
        "epochs": 1, "device": "cpu", "seed": seed})
    out = []
    result = fit(cfg, on_event=lambda e: out.append(e) if isinstance(e, ev.EpochEnded) else None, runs_dir=runs_dir)
    if result.status != ev.FINISHED:
        raise SystemExit(f"engine run failed: {result.message}")
    return out[0].images_per_sec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = extract_train_folder(tmp / "data")
        n_images = sum(1 for _ in folder.rglob("*.jpg"))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n_images} train images "
              f"from {'shared CIFAR-10 subset' if SHARED_ZIP.exists() else 'embedded sample'}, median of {args.reps}\n")
        print("| case | plain tutorial loop | engine, DataLoader | engine, default (in-memory) | "
              "engine/DL ÷ plain | engine ÷ plain | in-memory ÷ DataLoader |")
        print("|---|---|---|---|---|---|---|")
        for case in cases:
            model, batch, augment = CASES[case]
            plain, eng_dl, eng = [], [], []
            for rep in range(args.reps):  # interleaved: noise hits every variant alike
                plain.append(plain_tutorial_epoch(folder, model, batch, augment, seed=rep))
                eng_dl.append(engine_epoch(folder, model, batch, augment, rep, "off", tmp / "runs"))
                eng.append(engine_epoch(folder, model, batch, augment, rep, "auto", tmp / "runs"))
            p, d, e = (statistics.median(v) for v in (plain, eng_dl, eng))
            label = f"{model}, batch {batch}{', crop+flip' if augment else ', no augmentation'}"
            print(f"| {label} | {p:,.0f} img/s | {d:,.0f} img/s | {e:,.0f} img/s | {d / p:.2f} | {e / p:.2f} | "
                  f"{e / d:.2f} |", flush=True)


if __name__ == "__main__":
    main()
