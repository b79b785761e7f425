"""Honest numbers in Compare (issue 14): McNemar's paired test of Run A and B in words, and every
test accuracy with its 95 % interval, through the tab's handlers on real tiny runs (no browser),
and the same from the command line ``python -m core.compare``."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from core import compare, events as ev, rundir, stats
from core.config import RunConfig
from core.runrecord import load_run
from tests.conftest import SAMPLE_ZIP, TINY_CLASSES
from tests.test_follow_run import Page, lab_context
from ui import tab_compare
from ui.common import md_text

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")



@pytest.fixture(scope="module")
def other_folder(tiny_folder, tmp_path_factory) -> Path:
    """tiny_folder's training images, but another, smaller test split (6 other images a class)."""
    root = tmp_path_factory.mktemp("other") / "other"
    shutil.copytree(tiny_folder / "train", root / "train")
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(zf.namelist())
        for cls in TINY_CLASSES:
            prefix = f"cifar10-sample/test/{cls}/"
            files = [n for n in names if n.startswith(prefix) and n.endswith(".jpg")][10:16]
            (root / "test" / cls).mkdir(parents=True)
            for n in files:
                (root / "test" / cls / Path(n).name).write_bytes(zf.read(n))
    return root


def _train(ctx, page: Page, folder: Path, seed: int, lr: float) -> str:
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(folder), "batch_size": 16,
                                           "num_workers": 0}, "optim": {"lr": lr},
                                  "model": {"name": "tutorial_net"}, "epochs": 1, "device": "cpu", "seed": seed})
    job = ctx.manager.submit(config, owner=page.owner)
    ctx.manager.wait(job.job_id, timeout=180)
    assert job.status == ev.FINISHED, job.message
    return job.job_id


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_folder, other_folder):
    """Browser A trains two runs on the same images and one on other test images; B trains one."""
    ctx, _, _ = lab_context(tmp_path_factory.mktemp("cmpstats"))
    manager = ctx.manager
    a, b = Page("A", "a1a1"), Page("B", "b2b2")
    ids = {"a1": _train(ctx, a, tiny_folder, 1, 0.01), "a2": _train(ctx, a, tiny_folder, 2, 0.05),
           "other": _train(ctx, a, other_folder, 3, 0.01), "b1": _train(ctx, b, tiny_folder, 4, 0.02)}
    yield {"ctx": ctx, "tab": tab_compare.CompareTab(ctx), "a": a, "b": b, **ids}
    manager.shutdown(timeout=10)


def _dir(lab, key) -> Path:
    return lab["ctx"].history.run_dir(lab[key])


def _counted_interval(run_dir: Path) -> stats.Interval:
    """The Wilson interval from the run's own per-image predictions: correct images out of n."""
    p = rundir.read_predictions(run_dir)
    correct = int(np.sum(np.asarray(p["predicted"]) == np.asarray(p["target"])))
    return stats.wilson_interval(correct, len(p["target"]))


def test_side_by_side_says_mcnemars_test_in_words_with_its_counts(lab):
    a = lab["a"]
    cm_a, cm_b, summary, table, paired = lab["tab"].show_pair(lab["a1"], lab["a2"], True, a.token, a.request)
    expected = stats.compare_runs(_dir(lab, "a1"), _dir(lab, "a2"), names=("A", "B"))
    assert expected.n == 30
    assert paired.startswith("**Paired test (McNemar, on the same 30 test images):** ")
    assert md_text(expected.sentence) in paired
    # the counts that decide it: A right & B wrong, and the reverse
    assert f"A alone got {expected.a_only} of the 30 images right, B alone {expected.b_only}" in paired
    assert ("is better than" in paired) == (expected.p_value < stats.ALPHA)
    # the summary: each accuracy with the Wilson interval of its counts, the F1 with its bootstrap one
    for key in ("a1", "a2"):
        assert f"(95 % CI {_counted_interval(_dir(lab, key)).span()})" in summary
        assert f"({stats.run_macro_f1_interval(_dir(lab, key)).span(percent=False)})" in summary
    assert "This run was trained by another browser" not in summary


def test_runs_on_other_test_images_get_one_sentence_why_there_is_no_paired_test(lab):
    a = lab["a"]
    paired = lab["tab"].show_pair(lab["a1"], lab["other"], True, a.token, a.request)[4]
    assert paired.startswith("**No paired test:** ")
    assert md_text("tested on different images (30 and 18") in paired and "same test split" in paired
    assert "/" not in paired   # no server path
    assert "same run" in lab["tab"].show_pair(lab["a1"], lab["a1"], True, a.token, a.request)[4]


def test_a_run_without_per_image_predictions_says_so(lab, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(_dir(lab, "a2"), old)
    (old / rundir.PREDICTIONS_FILE).unlink()   # a run from before predictions.json was kept
    text = tab_compare.paired_test(_dir(lab, "a1"), old, same_run=False)
    assert text.startswith("**No paired test:** ") and md_text("no per-image predictions") in text
    assert str(tmp_path) not in text


def test_another_browsers_run_is_compared_and_says_whose_it_is(lab):
    a, b = lab["a"], lab["b"]
    _, _, summary, _, paired = lab["tab"].show_pair(lab["b1"], lab["a1"], True, b.token, b.request)
    assert "Run B: This run was trained by another browser" in summary
    assert md_text(stats.compare_runs(_dir(lab, "b1"), _dir(lab, "a1"), names=("A", "B")).sentence) in paired
    assert a.token not in summary + paired and a.owner not in summary + paired


def test_history_and_leaderboard_show_the_wilson_interval_of_each_runs_counts(lab):
    a = lab["a"]
    table = lab["tab"].refresh_history("", "(all)", a.token, a.request)
    assert "test acc 95 % CI" in table.columns
    board = tab_compare.leaderboard_display(compare.leaderboard(lab["ctx"].history,
                                                                [lab[k] for k in ("a1", "a2", "other")]))
    for key in ("a1", "a2", "other"):
        span = _counted_interval(_dir(lab, key)).span()
        assert table.loc[table["run id"] == lab[key], "test acc 95 % CI"].item() == span
        assert span in set(board["test acc 95 % CI"])
    n = table.loc[table["run id"] == lab["other"], "test acc 95 % CI"].item()
    assert n == _counted_interval(_dir(lab, "other")).span() and _counted_interval(_dir(lab, "other")).n == 18


def test_a_changed_pair_is_a_limited_heavy_event_and_has_its_own_box(lab):
    with gr.Blocks() as demo:
        lab["ctx"].session = gr.State({})
        lab["ctx"].browser_id = gr.BrowserState(None)
        tab_compare.build(lab["ctx"])
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for elem_id in ("cmp_run_a", "cmp_run_b"):
        fns = [fn for fn in demo.fns.values() if (by_id[elem_id]._id, "change") in [tuple(t) for t in fn.targets]]
        pair = [fn for fn in fns if by_id["cmp_mcnemar"]._id in {o._id for o in fn.outputs}]
        assert len(pair) == 1 and pair[0].concurrency_limit == 2, elem_id


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "core.compare", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_command_line_prints_intervals_and_mcnemars_sentence(lab):
    dirs = [_dir(lab, k) for k in ("a1", "a2", "other")]
    proc = _cli(str(dirs[0]), lab["a2"], str(dirs[2]), "--runs-dir", str(lab["ctx"].runs_dir))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for run_dir in dirs:
        acc, f1 = _counted_interval(run_dir), stats.run_macro_f1_interval(run_dir)
        assert f"(95 % CI {acc.span()})" in out and f"({f1.span(percent=False)})" in out
    ranked = sorted(dirs, key=lambda d: -rundir.read_eval(d)["accuracy"])
    labels = {d: load_run(d).label for d in dirs}   # its name, else its id
    best = ranked[0]
    for other in ranked[1:]:
        try:
            sentence = stats.compare_runs(best, other, names=(labels[best], labels[other])).sentence
            assert f"paired test (McNemar): {sentence}" in out
        except stats.DataError:
            assert f"no paired test of {labels[best]} and {labels[other]}: " in out
    assert "test split is small" in out   # 30 images at most
    # two runs on the same test images: McNemar's sentence, best first (ties keep the order given)
    two = _cli(lab["a1"], lab["a2"], "--runs-dir", str(lab["ctx"].runs_dir))
    assert two.returncode == 0, two.stderr
    first, second = sorted(dirs[:2], key=lambda d: -rundir.read_eval(d)["accuracy"])
    result = stats.compare_runs(first, second, names=(labels[first], labels[second]))
    assert two.stdout.strip().splitlines()[-1] == f"paired test (McNemar): {result.sentence}"


def test_the_command_line_refuses_a_folder_that_is_no_run(tmp_path):
    proc = _cli(str(tmp_path), "--runs-dir", str(tmp_path))
    assert proc.returncode == 2 and "is not a run folder" in proc.stderr and "Traceback" not in proc.stderr
