"""python -m core.clean: `labels` writes the documented CSV (every examined image, most suspicious
first); bad input is one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from core import clean
from tests.conftest import ROOT

COLUMNS = ["index", "file", "split", "given", "suggested", "given_prob", "suggested_prob", "quality",
           "flagged", "cleanlab", "fold"]


def test_labels_writes_the_ranking_as_csv(tiny_folder, tmp_path, capsys):
    out = tmp_path / "ranking.csv"
    code = clean.main(["labels", "--source", "folder", "--location", str(tiny_folder), "--data-dir",
                       str(tmp_path), "--folds", "3", "--method", "cnn", "--epochs", "1", "--csv", str(out)])
    assert code == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == COLUMNS
    assert frame["quality"].is_monotonic_increasing                 # most suspicious first
    assert set(frame["split"]) == {"train", "val"}                  # --parts default: train,val
    assert len(frame) == 120 and frame["index"].is_unique          # 40 per class: train 105 + val 15
    assert frame["flagged"].dtype == bool and set(frame["fold"]) == {0, 1, 2}
    assert frame["file"].str.match(r"^train/(airplane|cat|ship)/").all()
    printed = capsys.readouterr().out
    assert "images look mislabelled" in printed and f"written to {out}" in printed


def test_labels_parts_picks_the_images(tiny_folder, tmp_path):
    out = tmp_path / "train.csv"
    assert clean.main(["labels", "--source", "folder", "--location", str(tiny_folder), "--parts", "train",
                       "--folds", "3", "--method", "cnn", "--epochs", "1", "--csv", str(out)]) == 0
    assert set(pd.read_csv(out)["split"]) == {"train"}


@pytest.mark.parametrize("argv, message", [
    (["labels", "--source", "nowhere", "--location", "x"], "--source must be one of"),
    (["labels", "--source", "folder", "--location", "/no/such/folder"], "/no/such/folder"),
    (["labels", "--source", "folder", "--location", "{tiny}", "--parts", "train,everything"], "--parts takes"),
    (["labels", "--source", "folder", "--location", "{tiny}", "--folds", "1"], "folds must be"),
    (["labels", "--source", "folder", "--location", "{tiny}", "--method", "magic"], "method must be one of"),
    (["labels", "--source", "folder", "--location", "{tiny}", "--csv", "/no/such/dir/r.csv"], "does not exist"),
    (["labels", "--source", "folder", "--location", "{tiny}", "--folds", "50"], "at least 50 images of each class"),
    (["revise", "--new", "x"], "--new needs the dataset"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tiny_folder, capsys):
    code = clean.main([a.replace("{tiny}", str(tiny_folder)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_help_lists_the_subcommands():
    done = subprocess.run([sys.executable, "-m", "core.clean", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert "{labels,health,revise}" in done.stdout and "--revision REF" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "core.clean", "labels"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--source" in bad.stderr
