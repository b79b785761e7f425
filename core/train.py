"""Command line: train a configuration and write a run folder the dashboard can open.

    python -m core.train                                   # tutorial net on the embedded sample
    python -m core.train --model resnet18 --epochs 10 --lr 0.05 --scheduler cosine
    python -m core.train --config my_run.json --set optim.lr=0.001 --set data.batch_size=32
    python -m core.train --resume runs/<run-id> --epochs 20 # on from its last checkpoint
    python -m core.train --source folder --location pets/ --revision r0123456789@7  # a cleaned revision
    python -m core.train --time-budget 5m                  # as many epochs as fit in 5 minutes
    python -m core.train --no-recipe                       # the plain defaults, not the recipe for the data
    python -m core.train --print-config > my_run.json      # the full default configuration

Settings not given (by a flag, --set or --config) come from the recipe for the data and the model
(core.recipes: batch, epochs, optimiser, rate, schedule, label smoothing, precision); the line
"recipe: ..." says which.

Exit status: 0 finished, 1 failed, 130 stopped (Ctrl-C stops after the current batch and leaves
a checkpoint to resume from).

Distributed data-parallel on several GPUs or machines (docs/distributed.md):

    torchrun --nproc_per_node=4 -m core.train --model resnet18 --batch-size 512 --lr 0.2

data.batch_size is the global batch (here 4 processes × 128) and the learning rate is the one for
that global batch. Rank 0 prints the progress and writes the run folder; a Ctrl-C stops every
process after the same batch (each exits with 130; torchrun itself then reports a failed child).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from core import distributed, events as ev, recipes, rundir, stats
from core.cost import parse_duration
from core.config import OPTIMIZERS, PRECISIONS, SCHEDULERS, SOURCES, RunConfig
from core.datasets import DEFAULT_DATA_DIR
from core.errors import LabError
from core.resume import ResumePlan, plan_resume
from core.trainer import DEFAULT_RUNS_DIR, fit

# flag → dotted config field (one table, so a new flag is one line)
FLAGS = {
    "source": ("data.source", str, f"dataset source: {', '.join(SOURCES)}"),
    "location": ("data.location", str, "torchvision set name, or folder / .zip / index path"),
    "batch_size": ("data.batch_size", int, "batch size"),
    "image_size": ("data.image_size", int, "input size fed to the model (default: what it needs)"),
    "workers": ("data.num_workers", int, "DataLoader workers (default: auto)"),
    "revision": ("data.revision", str, "train with a revision's label decisions: its id, '@' and "
                                       "its version, e.g. r0123456789@7"),
    "model": ("model.name", str, "model name (see --list-models)"),
    "freeze": ("model.freeze", str, "none | features | stages"),
    "weights": ("model.weights_path", str, "your own .pth weights to start from"),
    "optimizer": ("optim.optimizer", str, f"{', '.join(OPTIMIZERS)}"),
    "lr": ("optim.lr", float, "learning rate"),
    "scheduler": ("optim.scheduler", str, f"{', '.join(SCHEDULERS)}"),
    "weight_decay": ("optim.weight_decay", float, "weight decay"),
    "epochs": ("epochs", int, "number of epochs"),
    "device": ("device", str, "auto | cpu | cuda | cuda:N | mps"),
    "precision": ("precision", str, f"{', '.join(PRECISIONS)}"),
    "seed": ("seed", int, "random seed"),
    "time_budget": ("time_budget_s", "duration", "train for at most this long, e.g. 90s, 5m, 1h: the epochs "
                                                 "are planned from this machine's measured speed"),
    "name": ("name", str, "a label for the run"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", help=f"a JSON run configuration (as saved in runs/<id>/{rundir.CONFIG_FILE})")
    for flag, (_, typ, help_) in FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=_duration_arg if typ == "duration" else typ,
                       help=help_)
    p.add_argument("--pretrained", action="store_true", default=None, help="start from ImageNet weights")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (10-70 s of compiling; pays for long runs of bigger models)")
    p.add_argument("--no-recipe", action="store_true",
                   help="keep the plain defaults for settings not given, instead of the recipe for the data and model")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any field, e.g. optim.momentum=0.8 (value parsed as JSON when it can be)")
    p.add_argument("--resume", help=f"continue a run (its folder, or its {rundir.LAST_CKPT}) from its last checkpoint; "
                                    "with --epochs N a different length, cosine and onecycle schedules are "
                                    "re-planned over the epochs that remain (a finished run: N above its epochs)")
    p.add_argument("--runs-dir", default=str(DEFAULT_RUNS_DIR), help="where run folders go (default runs/)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="dataset cache folder (default data/)")
    p.add_argument("--run-id", help="the run folder's name under --runs-dir (default: model name and time; "
                                    "the dashboard names its torchrun runs so)")
    p.add_argument("--print-config", action="store_true", help="print the resulting configuration and exit")
    p.add_argument("--list-models", action="store_true", help="list the model zoo and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard logs into the run folder (sets the config's tensorboard "
                        "field; needs `pip install tensorboard`)")
    return p


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except LabError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def resume_plan(args: argparse.Namespace) -> ResumePlan | None:
    """--resume: what core.resume decides for the run (None without --resume). A run goes on from
    its last checkpoint, so the flag takes the run folder or that file."""
    if not args.resume:
        return None
    path = Path(args.resume)
    run_dir = path if path.is_dir() else path.parent
    if path.is_file() and path.name != rundir.LAST_CKPT:
        raise LabError(f"--resume takes a run folder or its {rundir.LAST_CKPT}, not {path.name}: a run goes on "
                       "from its last checkpoint.")
    if not rundir.is_run_dir(run_dir):
        raise LabError(f"--resume: {args.resume} is not a run folder or its {rundir.LAST_CKPT} "
                       f"(no {rundir.CONFIG_FILE} there).")
    return plan_resume(run_dir, epochs=_asked_epochs(args))


def _asked_epochs(args: argparse.Namespace) -> int | None:
    """The epochs asked for on the command line: --epochs, or a --set epochs=N (which wins)."""
    epochs = args.epochs
    for item in args.set:
        key, _, text = item.partition("=")
        if key.strip() == "epochs":
            try:
                epochs = int(json.loads(text))
            except (ValueError, TypeError):
                raise LabError(f"--set epochs needs a whole number, got {text!r}.") from None
    return epochs


def config_from_args(args: argparse.Namespace, plan: ResumePlan | None = None) -> RunConfig:
    """Merge: defaults < --config file (or the resumed run's configuration) < flags < --set. A
    resumed run trains up to the epochs its ``plan`` says."""
    if plan is not None:
        raw = plan.config.to_dict()
    elif args.config:
        raw = RunConfig.load(args.config).to_dict()
    else:
        raw = RunConfig().to_dict()
    for flag, (dotted, _, _) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            _assign(raw, dotted, value)
    if args.pretrained:
        _assign(raw, "model.pretrained", True)
    if getattr(args, "compile", None):
        _assign(raw, "compile", True)
    if getattr(args, "tensorboard", False):   # recorded in the run's config.json; the trainer does the logging
        _assign(raw, "tensorboard", True)
    for item in args.set:
        if "=" not in item:
            raise LabError(f"--set needs FIELD=VALUE, got {item!r}.")
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        _assign(raw, key.strip(), value)
    if plan is not None:
        raw["epochs"] = plan.config.epochs
    return RunConfig.from_dict(raw)


def given_fields(args: argparse.Namespace) -> set[str]:
    """The dotted fields the command line sets (flags and --set): a recipe leaves them alone."""
    given = {dotted for flag, (dotted, _, _) in FLAGS.items() if getattr(args, flag, None) is not None}
    given |= {item.split("=", 1)[0].strip() for item in args.set}
    if "epochs" in given or "time_budget_s" in given:
        given.add("epochs")
    return given


def with_recipe(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """A new run without --config: the recipe for its data and model fills the settings not given
    (--no-recipe: the plain defaults). A rate goes with its optimiser and batch: with --optimizer
    other than the recipe's, the recipe's rate, momentum and weight decay are not used; with a batch
    of your own and no rate, the recipe's rate is scaled to it. Says on stderr what it set."""
    if args.no_recipe or args.config or args.resume:
        return config
    try:
        recipe = recipes.for_config(config, args.data_dir)
    except LabError as err:   # e.g. a torchvision set not downloaded yet: the run itself will fetch or explain
        print(f"recipe: none ({err}); the plain defaults are used for the settings not given.", file=sys.stderr)
        return config
    keep = given_fields(args)
    if "optim.optimizer" in keep and config.optim.optimizer != recipe.fields.get("optim.optimizer"):
        keep |= {"optim.lr", "optim.head_lr", "optim.momentum", "optim.weight_decay"}
    out = recipes.apply(config, recipe, keep=keep)
    if "data.batch_size" in keep and "optim.lr" not in keep:
        out.optim.lr = recipe.fields["optim.lr"] * config.data.batch_size / recipe.fields["data.batch_size"]
    applied = [k for k in recipe.fields if k not in keep]
    print(f"recipe for {recipe.situation}: set {', '.join(applied) or 'nothing'}"
          f"{'; kept yours: ' + ', '.join(sorted(keep & set(recipe.fields))) if keep & set(recipe.fields) else ''}. "
          "--print-config shows every value; --no-recipe keeps the plain defaults.", file=sys.stderr)
    return out


def _assign(raw: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise LabError(f"Unknown configuration section {part!r} in {dotted!r} (sections: data, model, optim).")
        node = node[part]
    node[leaf] = value


class ProgressPrinter:
    """A one-line progress bar on stderr, plus a line per epoch."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream, self.quiet = stream, quiet
        self.run_dir: str | None = None   # from RunStarted: the finish line reads its predictions

    def __call__(self, event: ev.Event) -> None:
        s = self.stream
        if isinstance(event, ev.RunStarted):
            self.run_dir = event.run_dir
            print(f"run {event.run_id} on {event.device}: {event.split_sizes}, input {event.input_shape}, "
                  f"{event.params_trainable:,}/{event.params_total:,} trainable parameters", file=s)
            for note in event.notes:
                print(f"  note: {note}", file=s)
        elif isinstance(event, ev.BatchEnded) and not self.quiet:
            done = event.batch / event.batches
            bar = "#" * int(done * 30)
            print(f"\repoch {event.epoch} [{bar:<30}] {event.batch}/{event.batches} loss {event.loss:.4f} "
                  f"{event.images_per_sec:,.0f} img/s", end="", file=s, flush=True)
        elif isinstance(event, ev.EpochEnded):
            val = (f" val loss {event.val_loss:.4f} acc {event.val_accuracy:.1%}"
                   if event.val_loss is not None else "")
            print(f"\repoch {event.epoch}/{event.epochs}: train loss {event.train_loss:.4f} acc "
                  f"{event.train_accuracy:.1%}{val} ({event.seconds:.1f} s, ETA {event.eta_seconds:.0f} s)"
                  f"{' *best*' if event.is_best else ''}" + " " * 10, file=s)
        elif isinstance(event, ev.Evaluated):
            print(f"{event.split}: accuracy {event.accuracy:.1%}{_interval(event)}, macro F1 {event.macro_f1:.3f}"
                  + (f", top-5 {event.top5_accuracy:.1%}" if event.top5_accuracy is not None else ""), file=s)
            if event.num_samples and stats.wilson_interval(round(event.accuracy * event.num_samples),
                                                           event.num_samples).half_width > stats.WIDE_HALF_WIDTH:
                print(f"  note: {stats.precision_sentence(event.num_samples, event.accuracy)}", file=s)
        elif isinstance(event, ev.RunFinished):
            print(f"{event.status}: {event.message}", file=s)
            iv = stats.kept_macro_f1_interval(self.run_dir) if self.run_dir else None
            if iv is not None:
                print(f"  macro F1 {iv.estimate:.3f} (95 % bootstrap interval {iv.span(percent=False)}, "
                      f"n = {iv.n:,})", file=s)


def _interval(event: ev.Evaluated) -> str:
    """' (95 % interval 36.8–45.4%, n = 500)': the Wilson interval of the accuracy (core.stats)."""
    if not event.num_samples:
        return ""
    iv = stats.wilson_interval(round(event.accuracy * event.num_samples), event.num_samples)
    return f" (95 % interval {100 * iv.low:.1f}–{iv.high:.1%}, n = {event.num_samples:,})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_models:
            from core.models import list_models
            for spec in list_models():
                print(f"{spec.name:22s} {spec.family:14s} {spec.description}")
            return 0
        plan = resume_plan(args)
        config = with_recipe(config_from_args(args, plan), args)
        if args.print_config:
            print(config.to_json())
            return 0
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.tensorboard:   # --tensorboard, or "tensorboard": true in the configuration
        from core import tb
        try:
            tb.require()   # say so before training, not as a failed run
        except LabError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    on_event = ProgressPrinter(quiet=args.quiet)

    stop = threading.Event()
    box: dict = {}
    # fit runs in a worker thread so Ctrl-C (delivered to the main thread) becomes a clean stop
    # request: the run ends after the current batch and writes its last checkpoint to resume from.
    done = threading.Event()

    def train() -> None:
        try:
            box["result"] = fit(config, on_event=on_event, should_stop=stop.is_set, runs_dir=args.runs_dir,
                                data_dir=args.data_dir, run_id=args.run_id,
                                resume_from=plan.checkpoint if plan is not None else None)
        finally:
            done.set()
    threading.Thread(target=train, daemon=True).start()
    _wait_for(done, stop)
    result = box["result"]
    if distributed.launch_env().rank == 0:
        print(str(Path(result.run_dir)))
    elif result.status == ev.FAILED:   # rank 0 reports the run; another rank says why it failed itself
        print(f"rank {distributed.launch_env().rank}: {result.status}: {result.message}", file=sys.stderr)
    return {ev.FINISHED: 0, ev.STOPPED: 130}.get(result.status, 1)


def _wait_for(done: threading.Event, stop: threading.Event) -> None:
    """Wait for the training thread to be ``done``; the first Ctrl-C asks it to stop after the
    current batch. (An Event, not Thread.join: a KeyboardInterrupt inside join can leave CPython
    believing the thread has ended while it still runs.)
    Under torchrun the launcher passes Ctrl-C on to every process again at once, so there a second
    one is ignored: all ranks stop together, rank 0 saves the checkpoint (torchrun kills what has
    not ended 30 s later)."""
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        torchrun = distributed.launch_env().distributed
        if torchrun:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if distributed.launch_env().rank == 0:
            print("\nstopping after the current batch" + ("" if torchrun else " (Ctrl-C again to abort)") + "...",
                  file=sys.stderr)
        stop.set()
        while not done.wait(0.2):
            pass


if __name__ == "__main__":
    sys.exit(main())
