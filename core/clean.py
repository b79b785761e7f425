"""Command line: find and fix the data (issue 15) without the dashboard.

    python -m core.clean labels --source zip --location photos.zip --csv suspects.csv
    python -m core.clean labels --source folder --location data/pets --method cnn --folds 5 --max-seconds 300
    python -m core.clean health --source zip --location photos.zip --csv health.csv
    python -m core.clean revise --new "cleaned 1" --source zip --location photos.zip \\
        --relabel train/cat/0001.jpg=dog --remove train/dog/0042.jpg
    python -m core.clean revise --revision r0123456789 --from-csv decisions.csv
    python -m core.clean revise --revision r0123456789 --undo

`labels` writes the ranking of every examined image as CSV (most suspicious first; columns index,
file, split, given, suggested, given_prob, suggested_prob, quality, flagged, cleanlab, fold). `revise` prints
the revision and the reference to train on: python -m core.train --revision REF.

The split (and so which images are "train", "val", "test") is the one a run with the same
--val-fraction, --test-fraction and --split-seed gets (the defaults are a run's defaults).
Exit status: 0 done, 2 bad input (one line on stderr saying what to change).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from core.config import SOURCES, DataConfig
from core.datasets import DEFAULT_DATA_DIR
from core.errors import ConfigError, DataError, LabError

PARTS = ("train", "val", "test")
DECISIONS = ("relabel", "remove", "keep")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.clean", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", metavar="{labels,health,revise}", required=True)
    lab = sub.add_parser("labels", help="rank the images by how likely their label is wrong (CSV)")
    _data_flags(lab)
    lab.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    lab.add_argument("--method", default="auto", help="auto | features | cnn (default auto: frozen pretrained "
                     "features when ImageNet weights are on disk, else a small CNN)")
    lab.add_argument("--parts", default="train,val", help="which parts to examine, e.g. train,val (default)")
    lab.add_argument("--csv", help="write the ranking here (CSV)")
    lab.add_argument("--max-seconds", type=float, help="plan the work to end in about this many seconds")
    lab.add_argument("--seed", type=int, default=0, help="folds and models seed (default 0)")
    lab.add_argument("--epochs", type=int, help="the small CNN's epochs per fold (default: its recipe's)")
    lab.add_argument("--weights-dir", help="where ImageNet weight files are (default: torch's hub cache)")
    lab.add_argument("--top", type=int, default=10, help="how many suspects to print (default 10)")
    hl = sub.add_parser("health", help="duplicates, train/val/test leaks, outliers and class balance")
    _data_flags(hl)
    hl.add_argument("--csv", help="write the duplicate/leak pairs here, and the outliers beside it "
                    "(<name>-outliers.csv)")
    hl.add_argument("--max-images", type=int, help="refuse a dataset with more images than this")
    rv = sub.add_parser("revise", help="record label decisions in a revision (the files are never changed)")
    _data_flags(rv, required=False)
    which = rv.add_mutually_exclusive_group(required=True)
    which.add_argument("--revision", help="an existing revision: its id, or REF (id@version)")
    which.add_argument("--new", metavar="NAME", help="start a new revision with this name")
    rv.add_argument("--relabel", action="append", default=[], metavar="FILE=CLASS", help="give FILE the class CLASS")
    rv.add_argument("--remove", action="append", default=[], metavar="FILE", help="leave FILE out of training")
    rv.add_argument("--keep", action="append", default=[], metavar="FILE", help="FILE's label is right")
    rv.add_argument("--undo", action="store_true", help="undo the latest decision (after the others)")
    rv.add_argument("--from-csv", help="decisions from a CSV: columns file, decision (relabel|remove|keep), "
                    "label (for relabel); a ranking CSV with an added decision column works")
    return p


def _data_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    d = DataConfig()
    p.add_argument("--source", required=required, help=f"dataset source: {', '.join(SOURCES)}")
    p.add_argument("--location", help="torchvision set name, or folder / .zip / index path")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="dataset cache folder (default data/)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help=f"default {d.val_fraction}")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction, help=f"default {d.test_fraction}")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help=f"default {d.split_seed}")


def load_split(args: argparse.Namespace):
    """(dataset, split) as a run with these flags would have them (no download)."""
    from core.datasets import load_dataset, split_dataset

    if args.source not in SOURCES:
        raise ConfigError(f"--source must be one of {', '.join(SOURCES)}, got {args.source!r}.")
    ds = load_dataset(args.source, args.location, data_dir=args.data_dir, download=False)
    split = split_dataset(ds, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                          seed=args.split_seed)
    return ds, split


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ConfigError(f"--parts takes a comma-separated list of {', '.join(PARTS)}, got {text!r}.")
    return list(dict.fromkeys(parts))


# -------------------------------------------------------------------------------------------------
# labels

def cmd_labels(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    from core.labelissues import find_label_issues

    parts = _parts(args.parts)
    if args.csv:
        _check_writable(args.csv)
    ds, split = load_split(args)
    splits = {i: part for part in parts for i in getattr(split, part)}
    indices = sorted(splits)
    print(f"{ds.name}: examining {len(indices):,} images ({', '.join(f'{p} {len(getattr(split, p)):,}' for p in parts)})"
          f" by {args.folds}-fold cross-validation...", file=out, flush=True)
    progress = _Progress()
    issues = find_label_issues(ds, indices, folds=args.folds, method=args.method, seed=args.seed,
                               progress=progress, max_seconds=args.max_seconds, weights_dir=args.weights_dir,
                               splits=splits, epochs=args.epochs)
    progress.done()
    print(issues.summary(), file=out)
    for note in issues.notes:
        print(f"  note: {note}", file=out)
    flagged = issues.flagged().head(max(0, args.top))
    if len(flagged):
        print(f"Most suspicious{' (first %d)' % len(flagged) if len(flagged) < len(issues.flagged()) else ''}:",
              file=out)
        for row in flagged.itertuples():
            print(f"  {row.file}: given '{row.given}' ({row.given_prob:.0%}), looks like '{row.suggested}' "
                  f"({row.suggested_prob:.0%})", file=out)
    if args.csv:
        issues.to_csv(args.csv)
        print(f"ranking of {len(issues.ranking):,} images written to {args.csv}", file=out)
    return 0


class _Progress:
    """A one-line progress display on stderr, only on a terminal."""

    def __init__(self, stream=None):
        self.stream, self.shown = stream or sys.stderr, False

    def __call__(self, fraction: float, text: str) -> None:
        if self.stream.isatty():
            print(f"\r{fraction:4.0%} {text[:70]:<70}", end="", file=self.stream, flush=True)
            self.shown = True

    def done(self) -> None:
        if self.shown:
            print(file=self.stream)


def _check_writable(path: str) -> None:
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"--csv {path}: the folder {folder} does not exist; create it or pick another path.")
    if Path(path).is_dir():
        raise ConfigError(f"--csv {path} is a folder; give a file name such as {Path(path) / 'ranking.csv'}.")


# -------------------------------------------------------------------------------------------------
# health

def cmd_health(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    health = _module("health")
    if args.csv:
        _check_writable(args.csv)
    ds, split = load_split(args)
    report = health.check_health(ds, split, max_images=args.max_images)
    print(report.summary(), file=out)
    if args.csv:
        report.pairs.to_csv(args.csv, index=False)
        outliers = Path(args.csv).with_name(Path(args.csv).stem + "-outliers.csv")
        report.outliers.to_csv(outliers, index=False)
        print(f"{len(report.pairs):,} pairs written to {args.csv}, {len(report.outliers):,} outliers to {outliers}",
              file=out)
    return 0


def _module(name: str):
    """core.health / core.revisions, or a clear error where this copy of the lab lacks them."""
    import importlib

    try:
        return importlib.import_module(f"core.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"core.{name}":
            raise
        raise ConfigError(f"This copy of the lab has no core/{name}.py, so '{name}' is not available; "
                          "update the lab.") from None


# -------------------------------------------------------------------------------------------------
# revise

def cmd_revise(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    if args.new and not args.source:
        raise ConfigError("--new needs the dataset: --source (and --location).")
    decisions = _decisions(args)
    revisions = _module("revisions")
    if args.new:
        ds, split = load_split(args)
        rev = revisions.create_revision(ds, args.data_dir, name=args.new, owner=None)
    else:
        rev, _ = revisions.load_revision(args.revision, args.data_dir)
        from core.datasets import load_from_source
        ds = load_from_source(rev.source, data_dir=args.data_dir)
        split = None
    by_file = {ds.describe(i): i for i in range(len(ds))}
    parts = _split_of(split)
    for op, file, label in decisions:
        if file not in by_file:
            raise DataError(f"{file!r} is not an image of {ds.name}; use the file column of the ranking CSV "
                            f"(e.g. {ds.describe(0)!r}).")
        i = by_file[file]
        if op == "relabel":
            rev.relabel(ds, i, label, split=parts.get(i, ""))
        else:
            getattr(rev, op)(ds, i, split=parts.get(i, ""))
    if args.undo and rev.undo() is None:
        print("nothing to undo", file=sys.stderr)
    rev.save(args.data_dir)
    print(rev.describe(), file=out)
    print(f"train on it: python -m core.train --revision {rev.ref()}", file=out)
    return 0


def _split_of(split) -> dict[int, str]:
    if split is None:
        return {}
    return {i: part for part in PARTS for i in getattr(split, part)}


def _decisions(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """(op, file, label) in the order given: --from-csv rows, then --relabel, --remove, --keep."""
    out: list[tuple[str, str, str | None]] = []
    if args.from_csv:
        out += _csv_decisions(args.from_csv)
    for item in args.relabel:
        file, sep, label = item.rpartition("=")
        if not sep or not file or not label:
            raise ConfigError(f"--relabel takes FILE=CLASS, got {item!r}.")
        out.append(("relabel", file, label))
    out += [("remove", f, None) for f in args.remove] + [("keep", f, None) for f in args.keep]
    if not out and not args.undo and not args.new:
        raise ConfigError("Nothing to do: give --relabel, --remove, --keep, --from-csv or --undo.")
    return out


def _csv_decisions(path: str) -> list[tuple[str, str, str | None]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--from-csv {path}: no such file.")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"--from-csv {path} is not a readable CSV file ({err}).") from None
    if rows and not {"file", "decision"} <= set(rows[0]):
        raise ConfigError(f"--from-csv {path} needs the columns file and decision (and label for relabel); "
                          f"it has {', '.join(rows[0])}.")
    out = []
    for n, row in enumerate(rows, start=2):
        op = (row.get("decision") or "").strip().lower()
        if not op:
            continue   # a ranking row nobody decided on
        if op not in DECISIONS:
            raise ConfigError(f"--from-csv {path} line {n}: decision must be one of {', '.join(DECISIONS)}, "
                              f"got {op!r}.")
        label = (row.get("label") or row.get("suggested") or "").strip() or None
        if op == "relabel" and not label:
            raise ConfigError(f"--from-csv {path} line {n}: relabel needs a label (or a suggested column).")
        out.append((op, row["file"].strip(), label))
    return out


COMMANDS = {"labels": cmd_labels, "health": cmd_health, "revise": cmd_revise}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
