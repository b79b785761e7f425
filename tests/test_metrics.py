"""core.metrics against values worked out by hand, edge cases, and an independent loop-based
implementation on a bigger random example."""
from __future__ import annotations

import json
from fractions import Fraction as F

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import DataError, LabError
from core.metrics import (
    Accumulator, EvalReport, accuracy, average_metrics, confusion_matrix, cross_entropy,
    evaluate_predictions, misclassified, normalize_confusion, per_class_metrics, predictions,
    softmax, target_ranks, topk_accuracy,
)

# ---------------------------------------------------------------------------------------------
# Hand-made example: 3 classes, 8 samples.
#   sample  true  probs (cat, dog, bird)   predicted
#   0       cat   .70 .20 .10              cat
#   1       cat   .50 .30 .20              cat
#   2       cat   .30 .60 .10              dog    error, confidence .60, true_prob .30
#   3       dog   .10 .80 .10              dog
#   4       dog   .20 .50 .30              dog
#   5       dog   .90 .04 .06              cat    error, confidence .90, true_prob .04 (dog ranks 3rd)
#   6       bird  .10 .20 .70              bird
#   7       bird  .20 .45 .35              dog    error, confidence .45, true_prob .35
# ---------------------------------------------------------------------------------------------
NAMES = ["cat", "dog", "bird"]
PROBS = np.array([
    [.70, .20, .10], [.50, .30, .20], [.30, .60, .10],
    [.10, .80, .10], [.20, .50, .30], [.90, .04, .06],
    [.10, .20, .70], [.20, .45, .35],
])
TARGETS = [0, 0, 0, 1, 1, 1, 2, 2]
PREDS = [0, 0, 1, 1, 1, 0, 2, 1]
IDS = [f"img/{i}.png" for i in range(8)]

# rows = true class, columns = predicted class
CM = [[2, 1, 0],
      [1, 2, 0],
      [0, 1, 1]]
# predicted column sums: cat 3, dog 4, bird 1; supports 3, 3, 2
EXPECTED = {  # class: (precision, recall, f1, support)
    "cat": (F(2, 3), F(2, 3), F(2, 3), 3),
    "dog": (F(2, 4), F(2, 3), F(4, 7), 3),     # F1 = 2·(1/2)(2/3)/(1/2+2/3) = 4/7
    "bird": (F(1, 1), F(1, 2), F(2, 3), 2),    # F1 = 2·1·(1/2)/(3/2) = 2/3
}
MACRO = (F(13, 18), F(11, 18), F(40, 63))      # (2/3+1/2+1)/3, (2/3+2/3+1/2)/3, (2/3+4/7+2/3)/3
WEIGHTED = (F(11, 16), F(5, 8), F(53, 84))     # (3·2/3+3·1/2+2·1)/8, = accuracy, (2+12/7+4/3)/8


def _check_row(row, expected):
    p, r, f, s = expected
    assert row["precision"] == pytest.approx(float(p), abs=1e-12)
    assert row["recall"] == pytest.approx(float(r), abs=1e-12)
    assert row["f1"] == pytest.approx(float(f), abs=1e-12)
    assert row["support"] == s


def test_predictions_and_accuracy_by_hand():
    assert predictions(PROBS).tolist() == PREDS
    assert accuracy(PROBS, TARGETS) == pytest.approx(5 / 8)
    # logits give the same arg-max
    assert accuracy(np.log(PROBS), TARGETS) == pytest.approx(5 / 8)
    assert accuracy(torch.tensor(PROBS, dtype=torch.float32), torch.tensor(TARGETS)) == pytest.approx(5 / 8)


def test_topk_by_hand():
    assert topk_accuracy(PROBS, TARGETS, 1) == pytest.approx(5 / 8)
    assert topk_accuracy(PROBS, TARGETS, 2) == pytest.approx(7 / 8)   # only sample 5 misses top-2
    assert topk_accuracy(PROBS, TARGETS, 3) == 1.0
    assert topk_accuracy(PROBS, TARGETS, 5) == 1.0                    # k clipped to K=3
    assert target_ranks(PROBS, TARGETS).tolist() == [0, 0, 1, 0, 0, 2, 0, 1]
    with pytest.raises(DataError):
        topk_accuracy(PROBS, TARGETS, 0)


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(TARGETS, PREDS, 3)
    assert cm.tolist() == CM
    assert cm.dtype == np.int64
    norm = normalize_confusion(cm)
    expected = [[2 / 3, 1 / 3, 0], [1 / 3, 2 / 3, 0], [0, 1 / 2, 1 / 2]]
    np.testing.assert_allclose(norm, expected, atol=1e-12)


def test_per_class_and_averages_by_hand():
    df = per_class_metrics(TARGETS, PREDS, NAMES)
    assert list(df.columns) == ["class", "precision", "recall", "f1", "support"]
    assert df["class"].tolist() == NAMES
    for _, row in df.iterrows():
        _check_row(row, EXPECTED[row["class"]])
    avg = average_metrics(TARGETS, PREDS, 3).set_index("average")
    assert list(avg.index) == ["macro", "weighted"]
    for name, exp in (("macro", MACRO), ("weighted", WEIGHTED)):
        for col, value in zip(("precision", "recall", "f1"), exp):
            assert avg.loc[name, col] == pytest.approx(float(value), abs=1e-12)
        assert avg.loc[name, "support"] == 8
    assert avg.loc["weighted", "recall"] == pytest.approx(accuracy(PROBS, TARGETS))


def test_misclassified_by_hand():
    df = misclassified(PROBS, TARGETS, NAMES, IDS)
    assert list(df.columns) == ["index", "sample", "true", "predicted", "confidence", "true_prob"]
    assert df["index"].tolist() == [5, 2, 7]                      # most confident error first
    assert df["sample"].tolist() == ["img/5.png", "img/2.png", "img/7.png"]
    assert df["true"].tolist() == ["dog", "cat", "bird"]
    assert df["predicted"].tolist() == ["cat", "dog", "dog"]
    np.testing.assert_allclose(df["confidence"], [.90, .60, .45])
    np.testing.assert_allclose(df["true_prob"], [.04, .30, .35])
    # no ids: the sample column is the index; limit keeps the first rows
    df2 = misclassified(PROBS, TARGETS, NAMES, limit=2)
    assert df2["sample"].tolist() == [5, 2]


def test_evaluate_predictions_by_hand():
    r = evaluate_predictions(PROBS, TARGETS, NAMES, IDS, topk=(1, 2, 5))
    assert r.num_samples == 8 and r.num_classes == 3
    assert r.accuracy == pytest.approx(5 / 8)
    assert r.topk == pytest.approx({1: 5 / 8, 2: 7 / 8, 3: 1.0})    # 5 clipped to 3
    assert r.confusion.tolist() == CM
    assert r.loss == pytest.approx(-np.mean(np.log(PROBS[np.arange(8), TARGETS])))
    for _, row in r.per_class.iterrows():
        _check_row(row, EXPECTED[row["class"]])
    assert r.misclassified["index"].tolist() == [5, 2, 7]
    assert "acc 62.5 %" in r.summary() and "top-2 87.5 %" in r.summary()
    assert r.macro_f1 == pytest.approx(float(MACRO[2])) and r.weighted_f1 == pytest.approx(float(WEIGHTED[2]))


def test_report_json_round_trip():
    r = evaluate_predictions(PROBS, TARGETS, NAMES, IDS)
    text = json.dumps(r.to_dict())                       # plain JSON: no numpy types left
    d = json.loads(text)
    assert d["confusion"] == CM                          # nested lists
    r2 = EvalReport.from_dict(d)
    assert r2.class_names == NAMES and r2.num_samples == 8
    assert r2.accuracy == r.accuracy and r2.loss == r.loss and r2.topk == r.topk
    np.testing.assert_array_equal(r2.confusion, r.confusion)
    for name in ("per_class", "averages", "misclassified"):
        pd.testing.assert_frame_equal(getattr(r2, name), getattr(r, name), check_dtype=False)
        assert list(getattr(r2, name).columns) == list(getattr(r, name).columns)
    assert json.dumps(r2.to_dict()) == text
    with pytest.raises(DataError, match="version"):
        EvalReport.from_dict({**d, "version": 99})


# ------------------------------------------------------------------- edge cases ---------------
def test_class_never_predicted():
    # class 2 has two samples and is never predicted
    t, p = [0, 1, 2, 2], [0, 1, 1, 1]
    cm = confusion_matrix(t, p, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 2, 0]]
    df = per_class_metrics(t, p, ["a", "b", "c"]).set_index("class")
    _check_row(df.loc["a"], (1, 1, 1, 1))
    _check_row(df.loc["b"], (F(1, 3), 1, F(1, 2), 1))   # F1 = 2·(1/3)·1/(4/3) = 1/2
    _check_row(df.loc["c"], (0, 0, 0, 2))               # precision 0 by zero_division=0
    assert not df.isna().any().any()
    avg = average_metrics(t, p, 3).set_index("average")
    assert avg.loc["macro", "precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert avg.loc["macro", "f1"] == pytest.approx((1 + 1 / 2 + 0) / 3)


def test_class_with_no_samples():
    # class 2 has no samples but is predicted once; class 3 neither occurs nor is predicted
    t, p = [0, 0, 1, 1], [0, 2, 1, 1]
    cm = confusion_matrix(t, p, 4)
    assert cm.tolist() == [[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    norm = normalize_confusion(cm)
    assert norm.tolist() == [[.5, 0, .5, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert not np.isnan(norm).any()
    df = per_class_metrics(t, p, list("abcd")).set_index("class")
    _check_row(df.loc["a"], (1, F(1, 2), F(2, 3), 2))
    _check_row(df.loc["b"], (1, 1, 1, 2))
    _check_row(df.loc["c"], (0, 0, 0, 0))   # recall 0 by zero_division=0
    _check_row(df.loc["d"], (0, 0, 0, 0))
    avg = average_metrics(t, p, 4).set_index("average")
    # macro over a, b, c (present in targets or predictions); d is left out
    assert avg.loc["macro", "precision"] == pytest.approx((1 + 1 + 0) / 3)
    assert avg.loc["macro", "recall"] == pytest.approx((.5 + 1 + 0) / 3)
    assert avg.loc["macro", "f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # weighted by support 2, 2, 0, 0
    assert avg.loc["weighted", "precision"] == pytest.approx(1.0)
    assert avg.loc["weighted", "recall"] == pytest.approx(.75)
    assert avg.loc["weighted", "f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_binary_k2():
    probs = np.array([[.8, .2], [.4, .6], [.3, .7], [.1, .9], [.55, .45]])
    t = [0, 0, 1, 1, 1]
    r = evaluate_predictions(probs, t, ["neg", "pos"], topk=(1, 5))
    assert r.confusion.tolist() == [[1, 1], [1, 2]]
    assert r.topk == {1: pytest.approx(3 / 5), 2: 1.0}
    df = r.per_class.set_index("class")
    _check_row(df.loc["neg"], (F(1, 2), F(1, 2), F(1, 2), 2))
    _check_row(df.loc["pos"], (F(2, 3), F(2, 3), F(2, 3), 3))


def test_ties_go_to_lowest_index():
    probs = np.array([[.4, .4, .2],     # target 1: arg-max is 0 (tie), so wrong; rank 1 → top-2 hit
                      [.2, .4, .4],     # target 2: arg-max is 1, rank 1 (class 1 ties, lower index)
                      [.2, .4, .4],     # target 1: arg-max 1, right
                      [1 / 3, 1 / 3, 1 / 3]])  # target 2: all tied, rank 2
    t = [1, 2, 1, 2]
    assert predictions(probs).tolist() == [0, 1, 1, 0]
    assert target_ranks(probs, t).tolist() == [1, 1, 0, 2]
    assert topk_accuracy(probs, t, 1) == accuracy(probs, t) == pytest.approx(1 / 4)
    assert topk_accuracy(probs, t, 2) == pytest.approx(3 / 4)
    assert topk_accuracy(probs, t, 3) == 1.0
    # equal confidences keep evaluation order in the misclassified table
    assert misclassified(probs, t)["index"].tolist() == [0, 1, 3]


def test_input_errors_are_lab_errors():
    with pytest.raises(DataError, match="8 predictions but 3 targets"):
        accuracy(PROBS, [0, 1, 2])
    with pytest.raises(DataError, match="0..2"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(DataError, match="class names"):
        evaluate_predictions(PROBS, TARGETS, ["a", "b"])
    with pytest.raises(DataError, match="from_logits"):
        evaluate_predictions(np.log(PROBS), TARGETS, NAMES)
    with pytest.raises(DataError, match="empty"):
        evaluate_predictions(np.zeros((0, 3)), [], NAMES)
    with pytest.raises(LabError):
        evaluate_predictions(PROBS, TARGETS, NAMES, sample_ids=["x"])
    with pytest.raises(DataError, match="empty"):
        Accumulator().report(NAMES)


def test_from_logits_matches_probs():
    logits = np.log(PROBS) + 3.0     # softmax(log p + c) = p
    r1 = evaluate_predictions(logits, TARGETS, NAMES, from_logits=True)
    r2 = evaluate_predictions(PROBS, TARGETS, NAMES)
    assert r1.confusion.tolist() == r2.confusion.tolist()
    assert r1.loss == pytest.approx(r2.loss)
    np.testing.assert_allclose(softmax(logits), PROBS, atol=1e-12)


# ------------------------------------------------------------------- accumulator --------------
def test_accumulator_matches_torch():
    g = torch.Generator().manual_seed(0)
    n, k = 103, 10
    logits = torch.randn(n, k, generator=g) * 3
    targets = torch.randint(0, k, (n,), generator=g)
    ids = [f"s{i}" for i in range(n)]
    acc = Accumulator()
    for start in range(0, n, 16):                       # uneven last batch
        stop = start + 16
        acc.add(logits[start:stop], targets[start:stop], ids[start:stop])
    assert len(acc) == n
    expected_loss = torch.nn.functional.cross_entropy(logits.double(), targets).item()
    assert acc.loss() == pytest.approx(expected_loss, rel=1e-12)
    np.testing.assert_allclose(acc.probs(), torch.softmax(logits.double(), 1).numpy(), rtol=1e-12)
    r = acc.report([f"c{i}" for i in range(k)], topk=(1, 5))
    assert r.accuracy == pytest.approx((logits.argmax(1) == targets).double().mean().item())
    top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(1).double().mean().item()
    assert r.topk[5] == pytest.approx(top5)
    assert r.loss == pytest.approx(expected_loss)
    assert set(r.misclassified["sample"]) <= set(ids)
    assert len(r.misclassified) == n - int((logits.argmax(1) == targets).sum())
    # the trainer's form: update() per batch without ids, all ids at report time
    acc2 = Accumulator()
    for start in range(0, n, 32):
        acc2.update(logits[start:start + 32], targets[start:start + 32])
    r2 = acc2.report([f"c{i}" for i in range(k)], sample_ids=ids)
    assert r2.misclassified["sample"].tolist() == r.misclassified["sample"].tolist()
    assert r2.macro_f1 == r.macro_f1 and r2.accuracy == r.accuracy
    with pytest.raises(DataError, match="sample ids"):
        acc2.report(["c"] * k, sample_ids=ids[:-1])


def test_accumulator_half_precision_and_id_rules():
    acc = Accumulator()
    acc.add(torch.zeros(2, 3, dtype=torch.float16), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="every batch or for none"):
        acc.add(torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(DataError, match="classes"):
        acc.add(torch.zeros(2, 4), torch.tensor([0, 1]))
    acc.add(torch.zeros(1, 3), torch.tensor([2]))
    assert acc.probs().dtype == np.float64
    assert acc.loss() == pytest.approx(np.log(3))
    assert acc.ids is None


# ------------------------------------------------------------------- random cross-check -------
def _reference(probs, targets, k):
    """Straightforward loops, written independently of core.metrics."""
    n = len(targets)
    preds = []
    for row in probs:
        best = 0
        for j in range(k):
            if row[j] > row[best]:
                best = j
        preds.append(best)
    cm = [[0] * k for _ in range(k)]
    for t, p in zip(targets, preds):
        cm[t][p] += 1
    rows = []
    for c in range(k):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(k)) - tp
        fn = sum(cm[c]) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        rows.append((prec, rec, f1, tp + fn))
    topk = {}
    for kk in (1, 3, 5):
        hits = 0
        for row, t in zip(probs, targets):
            order = sorted(range(k), key=lambda j: (-row[j], j))
            hits += t in order[:kk]
        topk[kk] = hits / n
    present = [c for c in range(k) if rows[c][3] > 0 or any(cm[r][c] for r in range(k))]
    macro = [sum(rows[c][i] for c in present) / len(present) for i in range(3)]
    weighted = [sum(rows[c][i] * rows[c][3] for c in range(k)) / n for i in range(3)]
    errors = [(i, probs[i][preds[i]]) for i in range(n) if preds[i] != targets[i]]
    errors.sort(key=lambda e: -e[1])   # sort is stable: equal confidences keep their order
    return cm, rows, topk, macro, weighted, [i for i, _ in errors]


def test_random_example_against_loops():
    rng = np.random.default_rng(42)
    n, k = 600, 7
    probs = rng.dirichlet(np.full(k, 0.7), size=n)
    probs[:20] = np.round(probs[:20], 1)                  # some ties
    probs[:20] /= probs[:20].sum(1, keepdims=True)
    targets = rng.integers(0, k - 1, size=n)              # class k-1 never occurs
    r = evaluate_predictions(probs, targets, [f"c{i}" for i in range(k)], topk=(1, 3, 5))
    cm, rows, topk, macro, weighted, errors = _reference(probs.tolist(), targets.tolist(), k)
    assert r.confusion.tolist() == cm
    np.testing.assert_allclose(r.per_class[["precision", "recall", "f1", "support"]].to_numpy(float),
                               np.array(rows), atol=1e-12)
    assert r.topk == pytest.approx(topk)
    avg = r.averages.set_index("average")
    np.testing.assert_allclose(avg.loc["macro", ["precision", "recall", "f1"]].to_numpy(float), macro)
    np.testing.assert_allclose(avg.loc["weighted", ["precision", "recall", "f1"]].to_numpy(float), weighted)
    assert r.misclassified["index"].tolist() == errors
    assert r.loss == pytest.approx(cross_entropy(probs, targets))
