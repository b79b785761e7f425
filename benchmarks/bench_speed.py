"""Training speed: the engine against the tutorial's hand-written loop, side by side, end to end.

    python benchmarks/bench_speed.py [--reps 3] [--epochs 2] [--resnet-reps N]
                                     [--cases all|tutorial4,tutorial128,resnet18] [--threads 2]
    python benchmarks/bench_speed.py --zoo [--models a,b,...] [--reps 3] [--seconds 1.5] [--batch 64]

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

--zoo: the model's own speed against the machine's ceiling, for one representative of every zoo
family at 32×32 with its small-input stem (ZOO_MODELS; vit_b_16 only when named: ~35 GFLOP an
image, a few images/s). Input is a random tensor batch (no data pipeline), SGD momentum 0.9 and
cross-entropy. At the start the peak GFLOP/s of a 2048² matrix multiply is measured in fp32 and
in bf16 (the best of 1 s of them; bf16 runs on AMX where the CPU has it, several times fp32). Per model: its training FLOPs per image (FlopCounterMode over one forward + backward;
it counts matmuls and convolutions, not element-wise ops, BatchNorm or the optimiser step), then
images/s in fp32 and in bf16 autocast, each with channels_last off and on, interleaved in one
process (rotated per repetition), each timing --seconds long, median of --reps. A model whose
step is slow gets a smaller batch (a power of two up to --batch, at least 8) so that one fp32 step
takes at most half a timing. The ceiling is peak GFLOP/s ÷ training FLOPs per image (fp32 rows against the
fp32 peak, bf16 against the bf16 peak), and "% of ceiling" is the best of the two memory formats.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import events as ev  # noqa: E402
from core.config import RunConfig  # noqa: E402
from core.models import create_model, get_model_spec, min_input_size  # noqa: E402
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


# ---------------------------------------------------------------------------------------------
# --zoo: every family's training speed against the FLOP ceiling
# ---------------------------------------------------------------------------------------------

# one representative of each family of the zoo, small to large within the families
ZOO_MODELS = ["tutorial_net", "lenet5", "cifar_fast", "cifar_fast_small", "resnet18", "vgg11_bn",
              "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0", "squeezenet1_1", "densenet121",
              "convnext_tiny", "alexnet"]
ZOO_SIZE = 32
PEAK_N = 2048
# (label, autocast dtype or None, channels_last), the four variants timed side by side
ZOO_VARIANTS = [("fp32", None, False), ("fp32 CL", None, True),
                ("bf16", torch.bfloat16, False), ("bf16 CL", torch.bfloat16, True)]


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0) -> tuple[float, float]:
    """(best, median) GFLOP/s of PEAK_N² matrix multiplies in ``dtype`` over ``seconds``. The best is
    the ceiling; a median far below it says other processes share the cores."""
    a, b = torch.randn(PEAK_N, PEAK_N).to(dtype), torch.randn(PEAK_N, PEAK_N).to(dtype)
    torch.mm(a, b)   # untimed: thread pool, kernel choice
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * PEAK_N ** 3 / (time.perf_counter() - t) / 1e9)
    return max(rates), statistics.median(rates)


def zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, input_size=ZOO_SIZE, small_input_stem=True).model.train()


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """FlopCounterMode's formula for a convolution's backward with the grouped weight gradient
    counted right. torch 2.14's formula leaves the groups out of the weight gradient, so a
    depthwise conv's backward counts channels× too much (MobileNet-V3-small 36× its forward,
    EfficientNet-B0 45×; fixed upstream in pytorch/pytorch#183405). Each gradient costs what the
    forward costs: the input gradient (a transposed conv of grad_out with the weight) as torch
    counts it, the weight gradient as the forward itself (w_shape already holds c_in / groups)."""
    from torch.utils.flop_counter import conv_flop_count

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def training_flops_per_image(name: str, batch: int = 2) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image counted by FlopCounterMode, on the meta device
    (no memory, no arithmetic) or, for an op without a meta kernel, on a real CPU batch."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(device: str) -> tuple[float, float]:
        with torch.device(device):
            model = zoo_model(name)
            x, y = torch.randn(batch, 3, ZOO_SIZE, ZOO_SIZE), torch.randint(0, 10, (batch,))
        fixed = {torch.ops.aten.convolution_backward: _conv_backward_flop}
        with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
            loss = nn.functional.cross_entropy(model(x), y)
            forward = counter.get_total_flops()
            loss.backward()
        return forward / batch, counter.get_total_flops() / batch

    try:
        return count("meta")
    except Exception:   # noqa: BLE001 - no meta kernel for some op: count on the CPU instead
        return count("cpu")


def _step_fn(model: nn.Module, batch: int, dtype: torch.dtype | None, channels_last: bool) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=MOMENTUM)
    x, y = torch.randn(batch, 3, ZOO_SIZE, ZOO_SIZE), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return step


def _images_per_s(step: Callable[[], None], batch: int, seconds: float) -> float:
    """Steps until ``seconds`` have passed (two at least): images/s over them."""
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def _pow2_at_most(n: float, low: int, high: int) -> int:
    return max(low, min(high, 2 ** int(math.floor(math.log2(max(n, 1.0))))))


def _zoo_batch(model: nn.Module, batch: int, seconds: float, train_flops: float, peak_fp32: float) -> int:
    """The largest power of two up to ``batch`` (at least 8) whose fp32 step takes at most half of
    ``seconds``: guessed from the FLOPs at 40 % of the matmul peak, then corrected by the faster of
    two timed steps (one step slowed by another process must not shrink the batch)."""
    guess = _pow2_at_most(seconds / 2 * 0.4 * peak_fp32 * 1e9 / train_flops, 8, batch)
    step = _step_fn(model, guess, None, False)
    step()   # untimed: first-call costs
    took = math.inf
    for _ in range(2):
        t = time.perf_counter()
        step()
        took = min(took, time.perf_counter() - t)
    return guess if took <= seconds / 2 else _pow2_at_most(guess * seconds / 2 / took, 8, guess)


def time_zoo_model(name: str, batch: int, reps: int, seconds: float, train_flops: float,
                   peak_fp32: float) -> tuple[int, dict[str, list[float]]]:
    """(batch used, images/s of each ZOO_VARIANTS label per repetition), interleaved and rotated."""
    plain = zoo_model(name)
    batch = _zoo_batch(plain, batch, seconds, train_flops, peak_fp32)
    last = zoo_model(name).to(memory_format=torch.channels_last)
    steps = {label: _step_fn(last if cl else plain, batch, dtype, cl) for label, dtype, cl in ZOO_VARIANTS}
    for step in steps.values():
        step()   # untimed: each variant's kernels chosen once
    runs: dict[str, list[float]] = {label: [] for label in steps}
    order = list(steps)
    for rep in range(reps):
        k = rep % len(order)
        for label in order[k:] + order[:k]:
            runs[label].append(_images_per_s(steps[label], batch, seconds))
    return batch, runs


def _zoo_names(arg: str | None) -> tuple[list[str], list[str]]:
    """(models to time, notes on the ones left out)."""
    names = arg.split(",") if arg else list(ZOO_MODELS)
    for n in names:
        get_model_spec(n)   # an unknown name stops here, listing the valid ones
    notes = [] if arg else ["vit_b_16 left out (86M parameters, ~35 GFLOP an image at 32×32 with 4×4 "
                            "patches: a few images/s); --models vit_b_16 times it"]
    keep = []
    for n in names:
        m = min_input_size(n, small_input_stem=True)
        if m > ZOO_SIZE:
            notes.append(f"{n} skipped: it needs at least {m}×{m} input even with the small-input stem")
        else:
            keep.append(n)
    return keep, notes


def zoo_main(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    names, notes = _zoo_names(args.models)
    mm = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    peak = {k: best for k, (best, _) in mm.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {ZOO_SIZE}×{ZOO_SIZE} random input, "
          f"small-input stem, SGD momentum, images/s median of {args.reps} reps of {args.seconds:g} s each; "
          f"matmul ({PEAK_N}²) best / median GFLOP/s: " + ", ".join(f"{k} {b:.0f} / {m:.0f}" for k, (b, m) in mm.items())
          + f"; load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    for note in notes:
        print(f"note: {note}")
    rows = []
    for name in names:
        fwd, train = training_flops_per_image(name)
        batch, runs = time_zoo_model(name, args.batch, args.reps, args.seconds, train, peak["fp32"])
        med = {k: statistics.median(v) for k, v in runs.items()}
        rows.append((name, batch, fwd, train, med))
        print(f"done: {name} (batch {batch}): " + ", ".join(
            f"{k} " + " ".join(f"{v:,.0f}" for v in runs[k]) for k in runs), file=sys.stderr, flush=True)
        gc.collect()
    print_zoo_table(rows, peak)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; whole run {time.perf_counter() - t_start:.0f} s")


def print_zoo_table(rows: list, peak: dict[str, float]) -> None:
    print("\nTraining images/s (CL = channels_last); ceiling = matmul peak ÷ training FLOPs per image; "
          "% = the better memory format's images/s ÷ the ceiling\n")
    print("| model | batch | fwd MFLOP/img | train MFLOP/img | fp32 | fp32 CL | bf16 | bf16 CL | "
          "ceiling fp32 | ceiling bf16 | % of fp32 ceiling | % of bf16 ceiling | CL ÷ plain fp32 / bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, fwd, train, med in rows:
        ceil = {p: peak[p] * 1e9 / train for p in peak}
        best = {p: max(med[p], med[p + " CL"]) for p in peak}
        print(f"| {name} | {batch} | {fwd / 1e6:,.1f} | {train / 1e6:,.1f} | {med['fp32']:,.0f} | "
              f"{med['fp32 CL']:,.0f} | {med['bf16']:,.0f} | {med['bf16 CL']:,.0f} | {ceil['fp32']:,.0f} | "
              f"{ceil['bf16']:,.0f} | {100 * best['fp32'] / ceil['fp32']:.0f} % | "
              f"{100 * best['bf16'] / ceil['bf16']:.0f} % | {med['fp32 CL'] / med['fp32']:.2f} / "
              f"{med['bf16 CL'] / med['bf16']:.2f} |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per case (median reported)")
    parser.add_argument("--resnet-reps", type=int, default=None,
                        help="repetitions for the ResNet-18 case (default: --reps); it is the slow one")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per timed run")
    parser.add_argument("--cases", default="all", help=f"all, or a comma list of {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zoo", action="store_true",
                        help="time one model of every zoo family against the FLOP ceiling instead of the cases")
    parser.add_argument("--models", default=None, help=f"--zoo: comma list of zoo names (default {','.join(ZOO_MODELS)})")
    parser.add_argument("--seconds", type=float, default=1.5, help="--zoo: length of one timing")
    parser.add_argument("--batch", type=int, default=64, help="--zoo: batch size (smaller for slow models, at least 8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.zoo:
        zoo_main(args)
        return
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
