"""Honest numbers (core/stats.py): intervals against published values and a coverage simulation,
McNemar's test against hand computations, and per-image predictions of real runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core import metrics, rundir, stats
from core.config import RunConfig
from core.errors import DataError
from core.trainer import fit

ROOT = Path(__file__).resolve().parent.parent


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in
# Medicine 17:857-872, Table II, method 3 (Wilson score, no continuity correction).
NEWCOMBE = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)),
            ((0, 20), (0.0000, 0.1611)), ((1, 29), (0.0061, 0.1718))]


@pytest.mark.parametrize(("counts", "expected"), NEWCOMBE)
def test_wilson_interval_matches_newcombes_published_values(counts, expected):
    iv = stats.wilson_interval(*counts)
    assert (round(iv.low, 4), round(iv.high, 4)) == expected
    assert iv.estimate == counts[0] / counts[1] and iv.n == counts[1]


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(DataError, match="test split is empty"):
        stats.wilson_interval(0, 0)
    with pytest.raises(DataError, match="between 0 and the number of images"):
        stats.wilson_interval(11, 10)


def test_precision_sentence_says_how_wide_the_interval_is():
    small = stats.precision_sentence(500, correct=205)
    assert small.startswith("Accuracy 41.0%, ±4.3 points on 500 images (95 % interval 36.8–45.4%).")
    assert "test split is small" in small
    big = stats.precision_sentence(10_000, accuracy=0.9)
    assert big == "Accuracy 90.0%, ±0.6 points on 10,000 images (95 % interval 89.4–90.6%)."


def test_vectorised_macro_f1_is_core_metrics_macro_f1():
    rng = np.random.default_rng(3)
    for _ in range(20):
        k = int(rng.integers(2, 6))
        t = rng.integers(0, k, size=int(rng.integers(5, 60)))
        p = np.where(rng.random(t.size) < 0.6, t, rng.integers(0, k, size=t.size))
        expected = metrics.average_metrics(t, p, k).set_index("average").loc["macro", "f1"]
        assert stats.macro_f1(t, p, k) == pytest.approx(expected, abs=1e-12)


def _population_macro_f1(priors, accuracy):
    """Macro F1 of an infinite test set: class i is right with probability accuracy[i], else
    predicted uniformly among the other classes."""
    k = len(priors)
    joint = np.array([[priors[i] * (accuracy[i] if j == i else (1 - accuracy[i]) / (k - 1)) for j in range(k)]
                      for i in range(k)])
    tp = np.diag(joint)
    return float(np.mean(2 * tp / (joint.sum(1) + joint.sum(0))))


def test_bootstrap_interval_of_macro_f1_covers_the_truth_about_95_percent_of_the_time():
    priors, accuracy = np.array([0.5, 0.3, 0.2]), np.array([0.85, 0.6, 0.7])
    truth = _population_macro_f1(priors, accuracy)
    rng = np.random.default_rng(0)
    covered, reps, n = 0, 150, 300
    for rep in range(reps):
        t = rng.choice(3, size=n, p=priors)
        wrong = (t + rng.integers(1, 3, size=n)) % 3
        p = np.where(rng.random(n) < accuracy[t], t, wrong)
        iv = stats.bootstrap_macro_f1(t, p, 3, resamples=400, seed=rep)
        covered += iv.low <= truth <= iv.high
    assert 0.88 <= covered / reps <= 0.99, f"covered {covered}/{reps}"


def test_bootstrap_is_seeded_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 4, size=2000)
    p = np.where(rng.random(2000) < 0.7, t, rng.integers(0, 4, size=2000))
    a, b = stats.bootstrap_macro_f1(t, p, 4, seed=5), stats.bootstrap_macro_f1(t, p, 4, seed=5)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.low < a.estimate < a.high
    small = stats.bootstrap_macro_f1(t[:125], p[:125], 4, seed=5)
    assert small.half_width > 2.5 * a.half_width   # √16 = 4× in theory


def test_mcnemar_exact_p_value_matches_a_hand_computation():
    # b = 10, c = 2: P = 2·(C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2·79/4096
    result = stats.mcnemar_counts(10, 2, 500)
    assert result.method == "exact binomial"
    assert result.p_value == pytest.approx(158 / 4096, rel=1e-12)
    assert result.sentence.startswith("A is better than B (p = 0.039)")


def test_mcnemar_chi_square_p_value_matches_a_hand_computation():
    # b = 30, c = 12: χ² = (|30 − 12| − 1)² / 42 = 6.881; p = 2·(1 − Φ(√6.881 = 2.6232)) = 0.00871
    # (Φ(2.62) = 0.99560, Φ(2.63) = 0.99573 from a normal table, interpolated).
    result = stats.mcnemar_counts(30, 12, 500)
    assert result.method == "chi-square with continuity correction"
    assert result.statistic == pytest.approx(289 / 42)
    assert result.p_value == pytest.approx(0.00871, abs=1e-4)
    assert result.sentence.startswith("A is better than B (p = 0.009)")


def test_mcnemar_says_when_two_models_cannot_be_told_apart():
    a = np.array([True] * 60 + [False] * 40)
    b = a.copy()
    b[:7] = False                  # B misses 7 that A gets
    b[60:65] = True                # and gets 5 that A misses
    result = stats.mcnemar(a, b, names=("resnet", "vgg"))
    assert (result.a_only, result.b_only, result.n) == (7, 5, 100)
    assert result.p_value == pytest.approx(2 * sum(math.comb(12, i) for i in range(6)) / 2 ** 12)
    assert result.sentence.startswith("These two cannot be told apart on 100 images (p = 0.774)")


@pytest.fixture(scope="module")
def two_runs(tiny_folder, tmp_path_factory):
    runs = tmp_path_factory.mktemp("stats-runs")
    out = []
    for seed, lr in ((1, 0.02), (2, 0.005)):
        cfg = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                                   "model": {"name": "tutorial_net"}, "optim": {"lr": lr}, "epochs": 2,
                                   "device": "cpu", "seed": seed})
        result = fit(cfg, runs_dir=runs)
        assert result.status == "finished", result.message
        out.append(result.run_dir)
    return out


def test_the_final_evaluation_stores_each_test_images_prediction(two_runs):
    run_dir = two_runs[0]
    preds = rundir.read_predictions(run_dir)
    ev = json.loads((run_dir / "eval.json").read_text())
    assert preds["split"] == "test" and len(preds["index"]) == ev["num_samples"] == 30
    assert sorted(map(str, preds["index"])) == sorted(ev["files"])
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (preds["target"], preds["predicted"]), 1)
    assert cm.tolist() == ev["confusion"]          # the same predictions as the report
    assert all(0 < c <= 1 for c in preds["confidence"]) and all(0 <= p <= 1 for p in preds["true_prob"])
    right = np.array(preds["target"]) == np.array(preds["predicted"])
    assert np.allclose(np.array(preds["confidence"])[right], np.array(preds["true_prob"])[right])


def test_run_intervals_and_mcnemar_between_two_real_runs(two_runs):
    a, b = two_runs
    ev = rundir.read_eval(a)
    iv = stats.run_accuracy_interval(a)
    assert iv.n == 30 and iv.low <= ev["accuracy"] <= iv.high
    f1 = stats.run_macro_f1_interval(a)
    assert f1.estimate == pytest.approx(next(r["f1"] for r in ev["averages"] if r["average"] == "macro"))
    pa, pb = rundir.read_predictions(a), rundir.read_predictions(b)
    order = {i: k for k, i in enumerate(pb["index"])}
    right_a = [t == p for t, p in zip(pa["target"], pa["predicted"])]
    right_b = [pb["target"][order[i]] == pb["predicted"][order[i]] for i in pa["index"]]
    expected = stats.mcnemar(right_a, right_b)
    result = stats.compare_runs(a, b, names=("A", "B"))
    assert (result.a_only, result.b_only, result.p_value) == (expected.a_only, expected.b_only, expected.p_value)
    assert "30 images" in result.sentence


def test_a_runs_f1_interval_is_kept_until_its_predictions_change(two_runs, tmp_path):
    """Compare's side-by-side asks for it on each change of pair: one bootstrap per predictions file."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(two_runs[0], run)
    first = stats.run_macro_f1_interval(run)
    hits = stats._cached_macro_f1_interval.cache_info().hits
    assert stats.run_macro_f1_interval(run) == first
    assert stats._cached_macro_f1_interval.cache_info().hits == hits + 1
    preds = rundir.read_predictions(run)
    perfect = list(preds["target"])   # every image right now: a new file, a new interval
    rundir.write_predictions(run, "test", preds["index"], preds["target"], perfect, preds["confidence"],
                             preds["true_prob"])
    assert stats.run_macro_f1_interval(run) == stats.bootstrap_macro_f1(preds["target"], perfect, 3)
    (run / rundir.PREDICTIONS_FILE).unlink()
    with pytest.raises(DataError, match="no per-image predictions"):
        stats.run_macro_f1_interval(run)


def test_an_accuracy_interval_needs_a_known_accuracy_and_count():
    assert stats.accuracy_interval(0.41, 500) == stats.wilson_interval(205, 500)
    assert stats.accuracy_interval(0.41, 500).span() == "36.8–45.4 %"
    for accuracy, n in ((None, 500), (0.4, None), (float("nan"), 500), (0.4, 0), (1.2, 10)):
        assert stats.accuracy_interval(accuracy, n) is None


def test_mcnemar_refuses_runs_tested_on_different_images(two_runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    preds = rundir.read_predictions(two_runs[1])
    rundir.write_predictions(other, "test", [i + 1000 for i in preds["index"]], preds["target"],
                             preds["predicted"], preds["confidence"], preds["true_prob"])
    with pytest.raises(DataError, match="tested on different images"):
        stats.compare_runs(two_runs[0], other)
    # the same indices and labels, but other files (another dataset of the same size): refused too
    rundir.write_predictions(other, "test", preds["index"], preds["target"], preds["predicted"],
                             preds["confidence"], preds["true_prob"])
    ev = rundir.read_eval(two_runs[1])
    assert stats.compare_runs(two_runs[0], other).n == 30   # no eval.json here: nothing to check against
    renamed = {k: f"elsewhere/{v}" for k, v in list(ev["files"].items())[:3]}
    rundir.write_json(other / rundir.EVAL_FILE, {**ev, "files": {**ev["files"], **renamed}})
    with pytest.raises(DataError, match="3 of 30 test files differ"):
        stats.compare_runs(two_runs[0], other)
    (other / rundir.PREDICTIONS_FILE).unlink()
    with pytest.raises(DataError, match="no per-image predictions"):
        stats.compare_runs(two_runs[0], other)


def test_the_command_line_prints_the_accuracy_with_its_interval(tmp_path, tiny_folder):
    proc = subprocess.run([sys.executable, "-m", "core.train", "--source", "folder", "--location", str(tiny_folder),
                           "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet",
                           "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    ev = json.loads((run_dir / "eval.json").read_text())
    iv = stats.wilson_interval(round(ev["accuracy"] * 30), 30)
    assert f"test: accuracy {ev['accuracy']:.1%} (95 % interval {100 * iv.low:.1f}–{iv.high:.1%}, n = 30)" in proc.stderr
    assert "test split is small" in proc.stderr   # 30 images: ±15 points or so
    f1 = stats.run_macro_f1_interval(run_dir)   # the macro F1 with its bootstrap interval, at the end
    assert f"macro F1 {f1.estimate:.3f} (95 % bootstrap interval {f1.span(percent=False)}, n = 30)" in proc.stderr
