"""Honest numbers: how sure a test accuracy is, and whether two runs really differ.

* ``wilson_interval(correct, n)`` — the Wilson score 95 % interval of an accuracy (Wilson 1927;
  Newcombe 1998 method 3). Unlike "p ± 1.96·√(p(1−p)/n)" it stays inside [0, 1] and is honest at
  0 % or 100 % and for small n.
* ``bootstrap_macro_f1(targets, preds, num_classes)`` — a percentile bootstrap 95 % interval of
  the macro F1 (the test images resampled with replacement, seeded, so the same call gives the
  same interval). Macro F1 follows core.metrics (classes present in the resample's targets or
  predictions; zero_division=0).
* ``precision_sentence(n, accuracy)`` — "Accuracy 41.0%, ±4.3 points on 500 images (95 % interval
  36.8–45.4%). The test split is small: ...": what the test split's size allows one to conclude.
* ``mcnemar(correct_a, correct_b)`` — McNemar's test for two models on the same images: only
  the images one got right and the other wrong (b and c) count. Exact two-sided binomial test
  when b + c < ``EXACT_BELOW`` (25), else the chi-square statistic with continuity correction,
  (|b − c| − 1)² / (b + c), on 1 degree of freedom.
* ``run_accuracy_interval(run_dir)`` / ``compare_runs(run_a, run_b)`` — the same for run folders,
  from their per-image predictions (``rundir.read_predictions``).

Pure numpy and the standard library: no scipy.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import rundir
from core.errors import DataError

log = logging.getLogger(__name__)

Z95 = 1.959963984540054        # the 97.5 % point of the standard normal distribution
EXACT_BELOW = 25               # McNemar: exact binomial test when b + c is below this
ALPHA = 0.05                   # "better" means p < ALPHA
BOOTSTRAP_RESAMPLES = 2000
WIDE_HALF_WIDTH = 0.02         # a half-width above 2 points gets a warning in the sentence


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95 % interval, all fractions 0..1."""
    estimate: float
    low: float
    high: float
    n: int
    method: str

    @property
    def half_width(self) -> float:
        """Half the interval's width (the "±" of a sentence), a fraction."""
        return (self.high - self.low) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n,
                "method": self.method, "half_width": self.half_width}

    def span(self, percent: bool = True) -> str:
        """'36.7–45.4 %' (an accuracy), or '0.412–0.488' (percent=False: an F1 score)."""
        if percent:
            return f"{100 * self.low:.1f}–{100 * self.high:.1f} %"
        return f"{self.low:.3f}–{self.high:.3f}"


def accuracy_interval(accuracy, n) -> Interval | None:
    """The Wilson interval of an accuracy measured on ``n`` images; None when either is unknown
    (a run without a test evaluation, an index row from before the count was kept)."""
    try:
        accuracy, n = float(accuracy), int(n)
    except (TypeError, ValueError):
        return None
    if n <= 0 or accuracy != accuracy or not 0 <= accuracy <= 1:
        return None
    return wilson_interval(round(accuracy * n), n)


def wilson_interval(correct: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval for ``correct`` successes out of ``n`` (95 % by default)."""
    correct, n = int(correct), int(n)
    if n <= 0:
        raise DataError("An accuracy interval needs at least one test image; the test split is empty.")
    if not 0 <= correct <= n:
        raise DataError(f"Correct predictions must lie between 0 and the number of images ({n}); got {correct}.")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n, "Wilson score")


def _macro_f1_batch(t: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """Macro F1 of each row of ``t``/``p`` (R×n index arrays), as core.metrics computes it."""
    rows = t.shape[0]
    flat = (np.arange(rows)[:, None] * k * k + t * k + p).ravel()
    cm = np.bincount(flat, minlength=rows * k * k).reshape(rows, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    denom = (support + predicted).astype(np.float64)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0                       # in the targets or the predictions
    return (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def macro_f1(targets, preds, num_classes: int) -> float:
    """Macro F1 (core.metrics' convention) of one set of predictions."""
    t, p = _pair(targets, preds, num_classes)
    return float(_macro_f1_batch(t[None], p[None], num_classes)[0])


def _pair(targets, preds, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(targets, dtype=np.int64).ravel(), np.asarray(preds, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise DataError(f"Got {t.size} targets but {p.size} predictions; they must match one to one.")
    if t.size == 0:
        raise DataError("There are no predictions: the test split is empty.")
    for name, a in (("targets", t), ("predictions", p)):
        if a.min() < 0 or a.max() >= num_classes:
            raise DataError(f"The {name} must lie in 0..{num_classes - 1} for {num_classes} classes.")
    return t, p


def bootstrap_macro_f1(targets, preds, num_classes: int, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0, chunk: int = 200) -> Interval:
    """Percentile bootstrap 95 % interval of the macro F1: ``resamples`` resamples of the test
    images with replacement (numpy Generator seeded with ``seed``: the same call, the same interval)."""
    t, p = _pair(targets, preds, num_classes)
    if resamples < 100:
        raise DataError(f"A bootstrap interval needs at least 100 resamples, got {resamples}.")
    rng = np.random.default_rng(seed)
    n, values = t.size, []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        values.append(_macro_f1_batch(t[idx], p[idx], num_classes))
    dist = np.concatenate(values)
    low, high = np.quantile(dist, [0.025, 0.975])
    return Interval(macro_f1(t, p, num_classes), float(low), float(high), n,
                    f"percentile bootstrap, {resamples} resamples, seed {seed}")


def precision_sentence(n: int, accuracy: float | None = None, correct: int | None = None) -> str:
    """What the test split's size allows: "Accuracy 41.0%, ±4.3 points on 500 images (95 % interval
    36.8–45.4%)." plus a warning when the interval is wider than ±2 points (WIDE_HALF_WIDTH)."""
    if correct is None:
        if accuracy is None:
            raise DataError("Give the accuracy or the number of correct images.")
        correct = round(accuracy * n)
    iv = wilson_interval(correct, n)
    text = (f"Accuracy {iv.estimate:.1%}, ±{100 * iv.half_width:.1f} points on {n:,} images "
            f"(95 % interval {100 * iv.low:.1f}–{iv.high:.1%}).")
    warning = small_split_warning(iv)
    return f"{text} {warning}" if warning else text


def small_split_warning(iv: Interval) -> str:
    """The warning of an accuracy interval wider than ±2 points (WIDE_HALF_WIDTH), else ''."""
    if iv.half_width <= WIDE_HALF_WIDTH:
        return ""
    return (f"The test split is small: runs whose accuracies differ by less than about "
            f"{100 * iv.half_width:.0f} points may not really differ; compare them with McNemar's test.")


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k (or fewer, or as extreme on the other side) of n at p = 1/2."""
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class McNemar:
    """McNemar's test of runs A and B on the same n images."""
    p_value: float
    method: str               # "exact binomial" or "chi-square with continuity correction"
    a_only: int               # b: images A got right and B wrong
    b_only: int               # c: images B got right and A wrong
    n: int
    statistic: float | None   # the chi-square value (None for the exact test)
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mcnemar(correct_a, correct_b, names: tuple[str, str] = ("A", "B")) -> McNemar:
    """McNemar's test from per-image correctness (booleans, same images in the same order)."""
    a, b = np.asarray(correct_a, dtype=bool).ravel(), np.asarray(correct_b, dtype=bool).ravel()
    if a.shape != b.shape or a.size == 0:
        raise DataError(f"McNemar's test needs both runs' results on the same images; got {a.size} and {b.size}.")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return mcnemar_counts(only_a, only_b, a.size, names)


def mcnemar_counts(only_a: int, only_b: int, n: int, names: tuple[str, str] = ("A", "B")) -> McNemar:
    """McNemar's test from the discordant counts: exact below EXACT_BELOW, else chi-square (cc)."""
    m = only_a + only_b
    if m == 0:
        p, method, stat = 1.0, "exact binomial", None
    elif m < EXACT_BELOW:
        p, method, stat = binomial_two_sided(only_a, m), "exact binomial", None
    else:
        stat = (abs(only_a - only_b) - 1) ** 2 / m
        p, method = math.erfc(math.sqrt(stat / 2)), "chi-square with continuity correction"
    return McNemar(p, method, only_a, only_b, n, stat, _mcnemar_sentence(p, only_a, only_b, n, names))


def _fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _mcnemar_sentence(p: float, only_a: int, only_b: int, n: int, names: tuple[str, str]) -> str:
    a, b = names
    detail = (f"{a} alone got {only_a} of the {n:,} images right, {b} alone {only_b}")
    if p < ALPHA:
        better, worse = (a, b) if only_a > only_b else (b, a)
        return f"{better} is better than {worse} ({_fmt_p(p)}): {detail}."
    return f"These two cannot be told apart on {n:,} images ({_fmt_p(p)}): {detail}."


# ---- run folders -----------------------------------------------------------------------------
def _predictions(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    data = rundir.read_predictions(run_dir)
    if data is None:
        raise DataError(f"Run {run_dir.name} has no per-image predictions ({rundir.PREDICTIONS_FILE}): it was "
                        "evaluated before they were saved, or it has not finished. Train it again (or resume "
                        "it for one more epoch) to get them.")
    return data


def run_accuracy_interval(run_dir: str | Path) -> Interval:
    """The Wilson interval of a run's test accuracy (eval.json's image count and accuracy)."""
    run_dir = Path(run_dir)
    ev = rundir.read_eval(run_dir)
    if not ev:
        raise DataError(f"Run {run_dir.name} has no test evaluation ({rundir.EVAL_FILE}) yet: let it finish first.")
    n = int(ev["num_samples"])
    return wilson_interval(round(float(ev["accuracy"]) * n), n)


def run_macro_f1_interval(run_dir: str | Path, seed: int = 0) -> Interval:
    """The bootstrap interval of a run's macro F1, from its per-image predictions. Kept per run
    folder while its predictions file is unchanged (seeded: the same file, the same interval), so a
    view that thirty pages refresh computes it once."""
    path = Path(run_dir) / rundir.PREDICTIONS_FILE
    try:
        st = path.stat()
    except OSError:
        return _run_macro_f1_interval(run_dir, seed)   # no predictions: _predictions says so
    return _cached_macro_f1_interval(str(Path(run_dir).resolve()), st.st_mtime_ns, st.st_size, seed)


def kept_macro_f1_interval(run_dir: str | Path) -> Interval | None:
    """``run_macro_f1_interval``, or None for a run without per-image predictions (evaluated before
    they were saved, or not finished)."""
    try:
        return run_macro_f1_interval(run_dir)
    except DataError:
        return None


@functools.lru_cache(maxsize=64)
def _cached_macro_f1_interval(run_dir: str, mtime_ns: int, size: int, seed: int) -> Interval:
    return _run_macro_f1_interval(run_dir, seed)


def _run_macro_f1_interval(run_dir: str | Path, seed: int) -> Interval:
    data = _predictions(run_dir)
    k = len((rundir.read_eval(run_dir) or {}).get("class_names") or []) or int(max(max(data["target"]),
                                                                                max(data["predicted"])) + 1)
    return bootstrap_macro_f1(data["target"], data["predicted"], k, seed=seed)


def compare_runs(run_a: str | Path, run_b: str | Path, names: tuple[str, str] | None = None) -> McNemar:
    """McNemar's test for two runs tested on the same images (matched by dataset index)."""
    names = names or (Path(run_a).name, Path(run_b).name)
    pair = paired_predictions(run_a, run_b, names)
    return mcnemar(pair["correct_a"], pair["correct_b"], names)


def paired_predictions(run_a: str | Path, run_b: str | Path, names: tuple[str, str] | None = None) -> dict:
    """Two runs' per-image predictions on the same test images, in A's order: {"index", "target",
    "pred_a", "pred_b", "conf_a", "conf_b", "correct_a", "correct_b"} (numpy arrays). Runs tested on
    other images, other files or other labels → DataError saying why (McNemar and the image diff)."""
    pa, pb = _predictions(run_a), _predictions(run_b)
    names = names or (Path(run_a).name, Path(run_b).name)
    ia, ib = list(pa["index"]), list(pb["index"])
    if sorted(ia) != sorted(ib):
        shared = len(set(ia) & set(ib))
        raise DataError(f"Runs {names[0]} and {names[1]} were tested on different images ({len(ia)} and "
                        f"{len(ib)}, {shared} in common): comparing them image by image needs the same test "
                        "split (same dataset, test fraction and split seed).")
    _check_same_files(run_a, run_b, ia, names)
    order_b = {idx: k for k, idx in enumerate(ib)}
    perm = np.array([order_b[i] for i in ia], dtype=np.int64)
    ta, tb = np.asarray(pa["target"]), np.asarray(pb["target"])[perm]
    if not np.array_equal(ta, tb):
        raise DataError(f"Runs {names[0]} and {names[1]} label the same test images differently: they were "
                        "trained on different datasets (or one edited its test labels).")
    pred_a, pred_b = np.asarray(pa["predicted"]), np.asarray(pb["predicted"])[perm]
    return {"index": np.asarray(ia), "target": ta, "pred_a": pred_a, "pred_b": pred_b,
            "conf_a": np.asarray(pa["confidence"], dtype=float), "conf_b": np.asarray(pb["confidence"], dtype=float)[perm],
            "correct_a": pred_a == ta, "correct_b": pred_b == tb}


def _check_same_files(run_a: str | Path, run_b: str | Path, indices, names: tuple[str, str]) -> None:
    """Two datasets of one size share their indices: the file names of the test images (eval.json's
    "files", where both runs have them) must also match."""
    fa = (rundir.read_eval(run_a) or {}).get("files") or {}
    fb = (rundir.read_eval(run_b) or {}).get("files") or {}
    if not fa or not fb:
        return
    differ = sum(fa.get(str(i)) != fb.get(str(i)) for i in indices)
    if differ:
        raise DataError(f"Runs {names[0]} and {names[1]} were tested on different images ({differ} of "
                        f"{len(indices):,} test files differ): they were trained on different datasets, so "
                        "McNemar's test does not apply.")
