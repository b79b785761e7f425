"""Training speed: the engine against the tutorial's hand-written loop, side by side, end to end.

    python benchmarks/bench_speed.py [--reps 3] [--epochs 2] [--resnet-reps N]
                                     [--cases all|tutorial4,tutorial128,resnet18] [--threads 2]

For each case (model, batch size, augmentation) it trains, interleaved in one process (in an
order rotated from one repetition to the next) so machine noise hits all of them alike, --epochs
epochs over the same images with the same model, batch size, normalisation ((0.5, 0.5, 0.5) mean
and std), optimiser (SGD, momentum 0.9, no weight decay, no scheduler) and loss:
  plain      the PyTorch CIFAR-10 tutorial's loop: ImageFolder + ToTensor/Normalize (+ crop/flip)
             + DataLoader(shuffle, num_workers=0) + SGD, written out by hand below;
  engine/DL  core.trainer.fit with the same per-image PIL pipeline through a DataLoader
             (data.in_memory="off");
  engine     core.trainer.fit as a user gets it (in_memory="auto": the split decoded once into a
             uint8 tensor, crop/flip done per batch).

Two figures per variant, both images/s, median of the repetitions:
  end to end     images trained ÷ (end of the last training epoch − start). The start is the call
                 of fit() for the engine (so its data preparation is inside: scanning the folder,
                 decoding every JPEG into the uint8 tensor, building the model, and the checkpoint
                 it writes after each epoch but the last), and, for the plain loop, the line before
                 its ImageFolder/DataLoader/model are built. The same work either way: from image
                 files on disk to N trained epochs.
  training loop  images trained ÷ time inside the epochs only (the engine's own per-epoch timer;
                 the plain loop's for-loops). For the in-memory path this leaves the JPEG decode
                 out (it happened before, in prepare()), so only the end-to-end figure compares
                 the data pipelines fairly; the loop figure shows where the time goes.
The goal is engine ÷ plain >= 1.0 end to end for every case; "in-memory ÷ DataLoader" is the
engine's in-memory path against its own DataLoader-and-PIL path, end to end.
Data: the shared CIFAR-10 subset (../shared/data, 5,000 train images) when present, else the
embedded sample (2,000). Figures are comparable only within one run.
ResNet-18 runs with its small-input stem (no early downsampling, so 32×32 maps in the first stage:
about 8× the compute of the ImageNet stem, some 60 images/s on 2 cores, ~3 minutes a run of all
three variants); --resnet-reps gives it fewer repetitions than the rest.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
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
MEAN = STD = (0.5, 0.5, 0.5)   # the tutorial's normalisation; the engine's "tutorial" preset is the same
MOMENTUM = 0.9

# case name → (model, batch size, augment with crop+flip?); every model uses its small-input stem
CASES = {
    "tutorial4": ("tutorial_net", 4, False),      # the tutorial exactly: batch 4, no augmentation
    "tutorial128": ("tutorial_net", 128, True),
    "resnet18": ("resnet18", 128, True),
}


@dataclass
class Timing:
    end_to_end: float   # images/s from the start to the end of the last training epoch
    loop: float         # images/s inside the training epochs only


def lr_for(batch: int) -> float:
    return 0.001 if batch == 4 else 0.05   # the tutorial's rate at batch 4; a usual one at 128


def extract_train_folder(tmp: Path) -> Path:
    src = SHARED_ZIP if SHARED_ZIP.exists() else SAMPLE_ZIP
    with zipfile.ZipFile(src) as zf:
        zf.extractall(tmp)
    top = next(p for p in tmp.iterdir() if p.is_dir())
    return top / "train"


def plain_tutorial(folder: Path, model_name: str, batch: int, augment: bool, seed: int, epochs: int) -> Timing:
    """The tutorial's loop, by hand, building its dataset, loader and model inside the timing."""
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    steps = [torchvision.transforms.RandomCrop(32, padding=4), torchvision.transforms.RandomHorizontalFlip()] if augment else []
    tf = torchvision.transforms.Compose(steps + [torchvision.transforms.ToTensor(),
                                                 torchvision.transforms.Normalize(MEAN, STD)])
    data = torchvision.datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=0)
    net = create_model(model_name, num_classes=len(data.classes), input_size=32, small_input_stem=True).model
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr_for(batch), momentum=MOMENTUM)
    net.train()
    t_loop = time.perf_counter()
    images = 0
    for _ in range(epochs):
        running_loss = 0.0
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()   # the tutorial prints it every 2,000 batches
            images += labels.shape[0]
    t_end = time.perf_counter()
    return Timing(images / (t_end - t_start), images / (t_end - t_loop))


def engine(folder: Path, model_name: str, batch: int, augment: bool, seed: int, epochs: int, in_memory: str,
           runs_dir: Path) -> Timing:
    """``epochs`` epochs through core.trainer.fit, timed from the call of fit() to the last batch."""
    spec = [{"name": "RandomCrop", "params": {"size": 32, "padding": 4}},
            {"name": "RandomHorizontalFlip", "params": {"p": 0.5}}] if augment else []
    cfg = RunConfig.from_dict({
        "data": {"source": "folder", "location": str(folder), "batch_size": batch, "train_augment": spec,
                 "val_fraction": 0.0, "test_fraction": 0.0, "in_memory": in_memory, "num_workers": 0,
                 "normalize": "tutorial"},
        "model": {"name": model_name, "small_input_stem": True},
        "optim": {"optimizer": "sgd", "lr": lr_for(batch), "momentum": MOMENTUM, "weight_decay": 0.0,
                  "scheduler": "none"},
        "epochs": epochs, "device": "cpu", "seed": seed})
    marks: dict[str, float] = {}

    def on_event(event: ev.Event) -> None:
        # BatchEnded is always emitted after an epoch's last batch: the last one seen for the last
        # epoch marks the end of training (the final checkpoint and evaluation come after it).
        if isinstance(event, ev.BatchEnded) and event.epoch == epochs:
            marks["end"] = time.perf_counter()

    t_start = time.perf_counter()
    result = fit(cfg, on_event=on_event, runs_dir=runs_dir)
    if result.status != ev.FINISHED:
        raise SystemExit(f"engine run failed: {result.message}")
    shutil.rmtree(result.run_dir, ignore_errors=True)   # checkpoints: ResNet-18 writes ~90 MB a run
    images = sum(round(row["images_per_sec"] * row["seconds"]) for row in result.history)
    loop_seconds = sum(row["seconds"] for row in result.history)
    return Timing(images / (marks["end"] - t_start), images / loop_seconds)


def warm_up(model_name: str, batch: int, steps: int = 3) -> None:
    """A few untimed steps, so one-off start-up costs (thread pool, kernel selection, allocator)
    fall on none of the timed variants."""
    net = create_model(model_name, num_classes=10, input_size=32, small_input_stem=True).model.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=MOMENTUM)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per case (median reported)")
    parser.add_argument("--resnet-reps", type=int, default=None,
                        help="repetitions for the ResNet-18 case (default: --reps); it is the slow one")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per timed run")
    parser.add_argument("--cases", default="all", help=f"all, or a comma list of {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = extract_train_folder(tmp / "data")
        n_images = sum(1 for _ in folder.rglob("*.jpg"))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n_images} train images "
              f"from {'shared CIFAR-10 subset' if SHARED_ZIP.exists() else 'embedded sample'}, "
              f"{args.epochs} epoch(s) per run, images/s, median of the repetitions; "
              f"load average {os.getloadavg()[0]:.1f} at the start\n", flush=True)
        for case in cases:
            model, batch, augment = CASES[case]
            reps = args.resnet_reps if (case == "resnet18" and args.resnet_reps) else args.reps
            warm_up(model, batch)
            variants = {
                "plain": lambda rep: plain_tutorial(folder, model, batch, augment, rep, args.epochs),
                "dl": lambda rep: engine(folder, model, batch, augment, rep, args.epochs, "off", tmp / "runs"),
                "mem": lambda rep: engine(folder, model, batch, augment, rep, args.epochs, "auto", tmp / "runs"),
            }
            runs = {key: [] for key in variants}
            order = list(variants)
            for rep in range(reps):  # interleaved: noise hits every variant alike
                for key in order[rep % 3:] + order[:rep % 3]:   # rotated, so no variant is always first
                    gc.collect()
                    runs[key].append(variants[key](rep))
            med = {k: (statistics.median(t.end_to_end for t in v), statistics.median(t.loop for t in v))
                   for k, v in runs.items()}
            label = f"{model}, batch {batch}{', crop+flip' if augment else ', no augmentation'} ({reps} reps)"
            rows.append((label, med))
            # progress, with every repetition's end-to-end figure, to show the spread behind each median
            print(f"done: {label}: end to end / loop medians " +
                  ", ".join(f"{k} {e:,.0f}/{lp:,.0f}" for k, (e, lp) in med.items()) + "; end to end per rep: " +
                  ", ".join(f"{k} " + " ".join(f"{t.end_to_end:,.0f}" for t in v) for k, v in runs.items()),
                  file=sys.stderr, flush=True)

    print(f"load average {os.getloadavg()[0]:.1f} at the end (other processes on these cores slow "
          "every variant, and small parallel tensor ops the most)")
    for title, i in (("End to end (data preparation + model + all epochs)", 0),
                     ("Training loop only (inside the epochs; the in-memory decode is outside it)", 1)):
        print(f"\n{title}\n")
        print("| case | plain tutorial loop | engine, DataLoader | engine, default (in-memory) | "
              "engine/DL ÷ plain | engine ÷ plain | in-memory ÷ DataLoader |")
        print("|---|---|---|---|---|---|---|")
        for label, med in rows:
            p, d, e = med["plain"][i], med["dl"][i], med["mem"][i]
            print(f"| {label} | {p:,.0f} | {d:,.0f} | {e:,.0f} | {d / p:.2f} | {e / p:.2f} | {e / d:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
