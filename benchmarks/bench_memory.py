"""Memory estimate against a measured training step, for every model of the zoo.

    python benchmarks/bench_memory.py [--quick] [--models resnet18,vgg11] [--device cpu|cuda]
                                      [--precision fp32|fp16|bf16] [--optimizer sgd]
                                      [--onednn on|off|both] [--threads 2] [--accumulation 1,4]

For each model, input size and batch it prints one row of a Markdown table:

  predicted  core.memory.estimate_memory: ``training_total_bytes`` (the sum of weights, buffers,
             gradients, optimiser state, saved activations, half-precision weight copies, input
             and logits) and ``step_peak_bytes`` (a simulated steady-state step that tracks every
             live tensor: ``required_bytes``, what the UI budgets).
  measured   core.memory.measure_training_step_memory on a real model (random init, random data):
             one warm-up step creates the optimiser state, then one step (zero_grad(set_to_none),
             forward, cross-entropy, backward, optimizer.step()) is measured.
             CPU: steady-state baseline (weights, buffers, optimiser state, input, labels: counted
             from the tensors) + the peak of the torch.profiler(profile_memory=True) allocation
             curve during the step. With ``--onednn both`` (CPU default) the step is measured with
             oneDNN on (PyTorch's default) and off: oneDNN's convolution scratch space (not a
             tensor, so not in the estimate) shows as the difference.
             CUDA: model, optimiser state and input already on the GPU; the same baseline +
             (torch.cuda.max_memory_allocated() after reset_peak_memory_stats() minus
             torch.cuda.memory_allocated() just before the step). That includes cuDNN workspace,
             not the CUDA context (which only nvidia-smi sees).
  peak/meas  simulated peak (= required) / measured; "ok" when within 10 %.
  sum/meas   sum of components / measured (for comparison: it counts activations and gradients
             as if they coexisted and leaves out optimiser temporaries).
  saved act  predicted saved-activation bytes / bytes saved by autograd in the real forward.
  acc        gradient accumulation steps. Above 1 the estimate simulates, and the measurement
             measures, a later micro-batch of a group: the first step's gradients are kept and
             held through the measured step's forward and backward (which adds into them), so
             the baseline includes them. Every later micro-batch holds the same tensors.

Inputs: 32×32 with the small-input stem for torchvision models (batches 1, 8, 32) and 224×224 with
the standard stem for the torchvision models (batches 1, 8); ``--quick``: 32×32 batch 4 for every
model plus ResNet-18 and VGG-11 at 224×224 batch 2. A model that cannot train at a batch (batch 1
with BatchNorm on a 1×1 map) gets a row saying so. ``--accumulation 1,4`` gives every case a row per
value (default 1; ``--quick`` adds ResNet-18 32×32 small stem batch 4 with accumulation 4).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.errors import LabError  # noqa: E402
from core.memory import ZooFactory, estimate_memory, measure_training_step_memory  # noqa: E402
from core.models import list_models  # noqa: E402

MiB = 1 << 20


def zoo_names() -> list[tuple[str, bool]]:
    """(name, is_torchvision) for every zoo entry, in registry order."""
    return [(s.name, s.tv_name is not None) for s in list_models()]


def cases(quick: bool, names: list[tuple[str, bool]], accumulation: list[int]) -> list[tuple[str, int, bool, int, int]]:
    """(name, input size, small stem, batch, accumulation steps) of every row."""
    out = []
    for name, tv in names:
        if quick:
            out.append((name, 32, tv, 4))
        else:
            out += [(name, 32, tv, b) for b in (1, 8, 32)]
    for name, tv in names:
        if not tv:
            continue
        if quick:
            if name in ("resnet18", "vgg11"):
                out.append((name, 224, False, 2))
        else:
            out += [(name, 224, False, b) for b in (1, 8)]
    rows = [(*case, acc) for case in out for acc in accumulation]
    if quick and 4 not in accumulation and any(n == "resnet18" for n, _ in names):
        rows.append(("resnet18", 32, True, 4, 4))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32x32 batch 4 for every model, two models at 224")
    ap.add_argument("--models", default="all", help="comma-separated zoo names (default: all)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--onednn", choices=("on", "off", "both"), default="both",
                    help="CPU only: measure with oneDNN on, off or both (default both)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--accumulation", default="1", help="comma-separated gradient accumulation steps (default 1)")
    args = ap.parse_args(argv)
    try:
        accumulation = [int(v) for v in args.accumulation.split(",") if v.strip()]
    except ValueError:
        accumulation = []
    if not accumulation or min(accumulation) < 1:
        ap.error(f"--accumulation {args.accumulation!r}: give whole numbers of batches, 1 or more, e.g. 1,4")

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is available")
    torch.set_num_threads(args.threads)
    names = zoo_names()
    if args.models != "all":
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        known = {n for n, _ in names}
        unknown = [m for m in wanted if m not in known]
        if unknown:
            ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        names = [(n, tv) for n, tv in names if n in wanted]

    cpu = args.device == "cpu"
    onednn_modes = {"on": [True], "off": [False], "both": [True, False]}[args.onednn] if cpu else [None]
    dev_name = torch.cuda.get_device_name() if not cpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# Memory: predicted vs measured, one training step ({args.precision}, {args.optimizer}, "
          f"{dev_name}, torch {torch.__version__})\n")
    meas_cols = []
    for mode in onednn_modes:
        label = "measured" if mode is None else f"measured oneDNN {'on' if mode else 'off'}"
        meas_cols += [f"{label} MiB", "peak/meas", "sum/meas", "≤10 %"]
    header = ["model", "input", "batch", "acc", "predicted sum MiB", "simulated peak MiB", *meas_cols,
              "saved act pred/real", "estimate s", "measure s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    ratios: dict[str, list[float]] = {str(m): [] for m in onednn_modes}
    t_all = time.perf_counter()
    for name, size, small, batch, acc in cases(args.quick, names, accumulation):
        shape = (3, size, size)
        label = f"{size}×{size}" + (" small stem" if small else "")
        f = ZooFactory(name, 10, input_size=size, small_input_stem=small)
        try:
            t0 = time.perf_counter()
            est = estimate_memory(f, shape, batch, optimizer=args.optimizer, precision=args.precision,
                                  target_device=args.device, inference=False, accumulation_steps=acc)
            t_est = time.perf_counter() - t0
        except LabError as err:
            print(f"| {name} | {label} | {batch} | {acc} | cannot train: {str(err)[:90]} |" + " |" * (len(header) - 5))
            sys.stdout.flush()
            continue
        cells, t_meas, saved_ratio = [], 0.0, ""
        for mode in onednn_modes:
            torch.manual_seed(0)
            model = f()
            t0 = time.perf_counter()
            real = measure_training_step_memory(model, shape, batch, optimizer=args.optimizer,
                                                precision=args.precision, device=args.device, onednn=mode,
                                                accumulation_steps=acc)
            t_meas += time.perf_counter() - t0
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            ratio = est.required_bytes / real["peak_bytes"]
            ratios[str(mode)].append(ratio)
            cells += [f"{real['peak_bytes'] / MiB:,.1f}", f"{ratio:.3f}",
                      f"{est.training_total_bytes / real['peak_bytes']:.3f}",
                      "ok" if abs(ratio - 1) <= 0.10 else "**no**"]
            saved_ratio = f"{est.activation_bytes / max(1, real['saved_activation_bytes']):.4f}"
        row = [name, label, str(batch), str(acc), f"{est.training_total_bytes / MiB:,.1f}", f"{est.step_peak_bytes / MiB:,.1f}",
               *cells, saved_ratio, f"{t_est:.2f}", f"{t_meas:.1f}"]
        print("| " + " | ".join(row) + " |")
        sys.stdout.flush()

    print()
    for mode, rs in ratios.items():
        if not rs:
            continue
        what = "measured" if mode == "None" else f"oneDNN {'on' if mode == 'True' else 'off'}"
        inside = sum(abs(r - 1) <= 0.10 for r in rs)
        print(f"- {what}: {inside}/{len(rs)} within 10 %; simulated peak/measured median {statistics.median(rs):.3f}, "
              f"min {min(rs):.3f}, max {max(rs):.3f}")
    print(f"- total time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
