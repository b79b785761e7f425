"""Classification metrics from collected predictions.

Everything here works on predictions already gathered for a whole evaluation set: ``probs``
(N×K class probabilities, a torch tensor, a numpy array or nested lists), ``targets`` (N class
indices), ``class_names`` (K names) and optionally ``sample_ids`` (N labels such as file paths).
During evaluation the trainer feeds batches of logits to an :class:`Accumulator`, which applies the
softmax once at the end in float64 and returns an :class:`EvalReport`.

Conventions (the same as scikit-learn's, which is not a dependency):

* The predicted class is the arg-max; a tie goes to the lowest class index (``np.argmax`` and
  ``torch.argmax`` both return the first maximum). Top-k uses the same order: classes sorted by
  decreasing probability, ties broken by lower index, so top-1 always equals accuracy.
* ``zero_division=0``: a class that is never predicted has precision 0, a class with no samples has
  recall 0, and F1 is 0 when precision + recall is 0. Nothing is NaN.
* Macro averages are taken over the classes that occur in the targets *or* the predictions
  (scikit-learn's default label set when ``labels`` is not given): a class absent from both has no
  meaningful score and would only drag the average down. Weighted averages weight by support, so
  such classes have weight 0 anyway; weighted recall equals accuracy.
* The averages are a separate DataFrame (``average_metrics``), so the per-class table keeps exactly
  one row per class, in class order, ready for a bar chart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from core.errors import DataError

#: Version of the dictionary written by ``EvalReport.to_dict``; bumped when the layout changes.
REPORT_VERSION = 1
#: Top-k values reported by default (clipped to the number of classes).
DEFAULT_TOPK = (1, 5)
#: Tolerance for "rows sum to 1" when checking that an array holds probabilities: float32
#: softmax rows over 1000 classes sum to 1 within ~1e-6; 1e-3 also accepts rounded saved values.
PROB_SUM_TOL = 1e-3

PER_CLASS_COLUMNS = ["class", "precision", "recall", "f1", "support"]
AVERAGE_COLUMNS = ["average", "precision", "recall", "f1", "support"]
MISCLASSIFIED_COLUMNS = ["index", "sample", "true", "predicted", "confidence", "true_prob"]


# --------------------------------------------------------------------------------------------
# Input conversion and checks
# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _scores(scores: Any) -> np.ndarray:
    """N×K float64 array of logits or probabilities."""
    a = _to_numpy(scores, np.float64)
    if a.ndim != 2:
        raise DataError(f"Expected scores of shape (samples, classes), got shape {a.shape}.")
    return a


def _targets(targets: Any, n: int | None = None, num_classes: int | None = None) -> np.ndarray:
    t = _to_numpy(targets)
    if t.ndim != 1:
        raise DataError(f"Expected a 1-D list of class indices as targets, got shape {t.shape}.")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        if not np.all(np.mod(t, 1) == 0):
            raise DataError("Targets must be whole class indices (0, 1, 2, ...), got fractions.")
    t = t.astype(np.int64)
    if n is not None and t.shape[0] != n:
        raise DataError(f"Got {n} predictions but {t.shape[0]} targets; they must match one to one.")
    if num_classes is not None and t.size and (t.min() < 0 or t.max() >= num_classes):
        raise DataError(
            f"Targets must lie in 0..{num_classes - 1} for {num_classes} classes, found "
            f"{int(t.min())}..{int(t.max())}. Was the model trained on a different dataset?")
    return t


def _class_names(class_names: Sequence[str] | None, k: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(k)]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise DataError(f"The predictions have {k} classes but {len(names)} class names were given.")
    return names


def _check_probs(p: np.ndarray) -> None:
    if p.size == 0:
        return
    if not np.all(np.isfinite(p)) or p.min() < -1e-9 or p.max() > 1 + 1e-9:
        raise DataError("These scores are not probabilities (values outside 0..1 or not finite). "
                        "Pass logits with from_logits=True, or apply softmax first.")
    worst = float(np.max(np.abs(p.sum(axis=1) - 1.0)))
    if worst > PROB_SUM_TOL:
        raise DataError(f"Probability rows must sum to 1 (one row is off by {worst:.3g}). "
                        "Pass logits with from_logits=True, or apply softmax first.")


def _nonempty(n: int) -> None:
    if n == 0:
        raise DataError("There are no predictions to evaluate: the evaluation set is empty.")


def softmax(logits: Any) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64. Returns an N×K numpy array."""
    z = _scores(logits)
    z = z - z.max(axis=1, keepdims=True) if z.size else z
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Basic metrics
# --------------------------------------------------------------------------------------------
def predictions(scores: Any) -> np.ndarray:
    """Arg-max class of each row of logits or probabilities (ties → lowest index). int64 (N,)."""
    s = _scores(scores)
    return s.argmax(axis=1).astype(np.int64) if s.shape[0] else np.zeros(0, np.int64)


def target_ranks(scores: Any, targets: Any) -> np.ndarray:
    """0-based rank of the true class in each row (0 = predicted class).

    Rank = number of classes with a strictly higher score + number of classes with an equal score
    and a lower index, so ties are broken exactly like ``argmax``.
    """
    s = _scores(scores)
    t = _targets(targets, s.shape[0], s.shape[1])
    if s.shape[0] == 0:
        return np.zeros(0, np.int64)
    true_score = s[np.arange(s.shape[0]), t][:, None]
    lower_index = np.arange(s.shape[1])[None, :] < t[:, None]
    return ((s > true_score) | ((s == true_score) & lower_index)).sum(axis=1)


def accuracy(scores: Any, targets: Any) -> float:
    """Fraction (0..1) of rows whose arg-max equals the target. Works on logits or probabilities."""
    s = _scores(scores)
    t = _targets(targets, s.shape[0], s.shape[1])
    _nonempty(s.shape[0])
    return float(np.mean(s.argmax(axis=1) == t))


def topk_accuracy(scores: Any, targets: Any, k: int) -> float:
    """Fraction of rows whose target is among the k highest scores; k is clipped to K.

    Ties are broken by lower class index (see ``target_ranks``), so ``k=1`` equals ``accuracy``.
    """
    if int(k) < 1:
        raise DataError(f"Top-k needs k ≥ 1, got k={k}.")
    s = _scores(scores)
    _nonempty(s.shape[0])
    k = min(int(k), s.shape[1])
    return float(np.mean(target_ranks(s, targets) < k))


def confusion_matrix(targets: Any, preds: Any, num_classes: int) -> np.ndarray:
    """K×K int64 counts: ``cm[i, j]`` = samples of true class i predicted as class j (rows = true)."""
    t = _targets(targets, None, num_classes)
    p = _targets(preds, t.shape[0], num_classes)
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def normalize_confusion(cm: Any) -> np.ndarray:
    """Row-normalised confusion matrix (each row sums to 1); a row with no samples stays all 0."""
    m = _to_numpy(cm, np.float64)
    rows = m.sum(axis=1, keepdims=True)
    return np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1, support and predicted counts per class (zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    # 2PR/(P+R) written as 2TP/(2TP+FP+FN) = 2TP/(support+predicted): same value, no 0/0.
    denom = (support + predicted).astype(np.float64)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support, predicted


def per_class_metrics(targets: Any, preds: Any, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per class, in class order: ``class, precision, recall, f1, support``.

    ``preds`` are predicted class indices (use ``predictions(probs)``). Scores are fractions 0..1
    with the zero_division=0 convention (see the module docstring); ``support`` is the number of
    samples of the class. Averages come from ``average_metrics``.
    """
    names = [str(c) for c in class_names]
    cm = confusion_matrix(targets, preds, len(names))
    return _per_class_from_cm(cm, names)


def _per_class_from_cm(cm: np.ndarray, names: list[str]) -> pd.DataFrame:
    precision, recall, f1, support, _ = _prf(cm)
    return pd.DataFrame({"class": names, "precision": precision, "recall": recall, "f1": f1,
                         "support": support.astype(np.int64)}, columns=PER_CLASS_COLUMNS)


def average_metrics(targets: Any, preds: Any, num_classes: int) -> pd.DataFrame:
    """Two rows, ``macro`` and ``weighted``: ``average, precision, recall, f1, support``.

    Macro: plain mean over the classes present in the targets or the predictions. Weighted: mean
    weighted by support. ``support`` is the total number of samples in both rows.
    """
    return _averages_from_cm(confusion_matrix(targets, preds, num_classes))


def _averages_from_cm(cm: np.ndarray) -> pd.DataFrame:
    precision, recall, f1, support, predicted = _prf(cm)
    present = (support > 0) | (predicted > 0)
    total = int(support.sum())
    rows = []
    for name in ("macro", "weighted"):
        if name == "macro":
            w = present.astype(np.float64)
        else:
            w = support.astype(np.float64)
        wsum = w.sum()
        vals = [float(np.dot(w, m) / wsum) if wsum > 0 else 0.0 for m in (precision, recall, f1)]
        rows.append([name, *vals, total])
    df = pd.DataFrame(rows, columns=AVERAGE_COLUMNS)
    df["support"] = df["support"].astype(np.int64)
    return df


def misclassified(probs: Any, targets: Any, class_names: Sequence[str] | None = None,
                  sample_ids: Sequence[Any] | None = None, limit: int | None = None,
                  ) -> pd.DataFrame:
    """The wrongly predicted samples, most confident errors first.

    Columns: ``index`` (position in the evaluated set, to find the image again), ``sample`` (the
    sample id, or the index when no ids are given), ``true`` and ``predicted`` (class names),
    ``confidence`` (probability of the predicted class) and ``true_prob`` (probability given to the
    true class). Equal confidences keep the evaluation order. ``limit`` keeps the first rows only.
    """
    p = _scores(probs)
    names = _class_names(class_names, p.shape[1])
    t = _targets(targets, p.shape[0], p.shape[1])
    ids = _sample_ids(sample_ids, p.shape[0])
    pred = predictions(p)
    wrong = np.flatnonzero(pred != t)
    conf = p[wrong, pred[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")]
    if limit is not None:
        order = order[: max(0, int(limit))]
    name_arr = np.asarray(names, dtype=object)
    df = pd.DataFrame({
        "index": order.astype(np.int64),
        "sample": [ids[i] for i in order] if ids is not None else order.astype(np.int64),
        "true": name_arr[t[order]] if order.size else np.zeros(0, object),
        "predicted": name_arr[pred[order]] if order.size else np.zeros(0, object),
        "confidence": p[order, pred[order]],
        "true_prob": p[order, t[order]],
    }, columns=MISCLASSIFIED_COLUMNS)
    return df


def _sample_ids(sample_ids: Sequence[Any] | None, n: int) -> list[Any] | None:
    if sample_ids is None:
        return None
    ids = sample_ids.tolist() if isinstance(sample_ids, (torch.Tensor, np.ndarray)) else list(sample_ids)
    if len(ids) != n:
        raise DataError(f"Got {n} predictions but {len(ids)} sample ids; they must match one to one.")
    return ids


def cross_entropy(probs: Any, targets: Any) -> float:
    """Mean negative log-probability of the true class (nats). A probability of 0 is clipped to
    the smallest positive float64 (loss ≈ 708) so the result stays finite and JSON-safe."""
    p = _scores(probs)
    t = _targets(targets, p.shape[0], p.shape[1])
    _nonempty(p.shape[0])
    pt = np.clip(p[np.arange(p.shape[0]), t], np.finfo(np.float64).tiny, None)
    return float(-np.mean(np.log(pt)))


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
@dataclass
class EvalReport:
    """All metrics of one evaluation, JSON round-trippable with ``to_dict`` / ``from_dict``.

    ``accuracy`` and ``topk`` values are fractions 0..1; ``topk`` maps k (clipped to the number of
    classes, duplicates merged) to accuracy. ``loss`` is the mean cross-entropy in nats (None when
    unknown). ``confusion`` holds counts, rows = true class. ``extra`` is free JSON-able context
    that the caller may add (split name, epoch, checkpoint...); it is saved as it is.
    """
    class_names: list[str]
    num_samples: int
    accuracy: float
    topk: dict[int, float]
    confusion: np.ndarray
    per_class: pd.DataFrame
    averages: pd.DataFrame
    misclassified: pd.DataFrame
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def confusion_normalized(self) -> np.ndarray:
        """Row-normalised confusion matrix (rows with no samples are all 0)."""
        return normalize_confusion(self.confusion)

    @property
    def macro_f1(self) -> float:
        return float(self.averages.set_index("average").loc["macro", "f1"])

    @property
    def weighted_f1(self) -> float:
        return float(self.averages.set_index("average").loc["weighted", "f1"])

    def summary(self) -> str:
        """One line for logs and status boxes, e.g. ``"acc 87.5 % · top-5 99.0 % · loss 0.412"``."""
        parts = [f"acc {100 * self.accuracy:.1f} %"]
        parts += [f"top-{k} {100 * v:.1f} %" for k, v in sorted(self.topk.items()) if k != 1]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        return " · ".join(parts) + f" · {self.num_samples} samples"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists, str, int, float); DataFrames as lists of records."""
        return {
            "version": REPORT_VERSION,
            "class_names": list(self.class_names),
            "num_samples": int(self.num_samples),
            "accuracy": float(self.accuracy),
            "topk": {str(k): float(v) for k, v in sorted(self.topk.items())},
            "loss": None if self.loss is None else float(self.loss),
            "confusion": np.asarray(self.confusion, dtype=np.int64).tolist(),
            "per_class": _records(self.per_class),
            "averages": _records(self.averages),
            "misclassified": _records(self.misclassified),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalReport":
        """Inverse of ``to_dict``."""
        version = d.get("version")
        if version != REPORT_VERSION:
            raise DataError(f"This evaluation report has format version {version!r}; this version "
                            f"of the lab reads version {REPORT_VERSION}. Re-run the evaluation.")
        names = [str(c) for c in d["class_names"]]
        k = len(names)
        confusion = np.asarray(d["confusion"], dtype=np.int64).reshape(k, k)
        per_class = pd.DataFrame(d["per_class"], columns=PER_CLASS_COLUMNS)
        per_class = per_class.astype({"precision": np.float64, "recall": np.float64,
                                      "f1": np.float64, "support": np.int64})
        averages = pd.DataFrame(d["averages"], columns=AVERAGE_COLUMNS)
        averages = averages.astype({"precision": np.float64, "recall": np.float64,
                                    "f1": np.float64, "support": np.int64})
        mis = pd.DataFrame(d["misclassified"], columns=MISCLASSIFIED_COLUMNS)
        mis = mis.astype({"index": np.int64, "confidence": np.float64, "true_prob": np.float64})
        return cls(class_names=names, num_samples=int(d["num_samples"]),
                   accuracy=float(d["accuracy"]),
                   topk={int(key): float(v) for key, v in d["topk"].items()},
                   confusion=confusion, per_class=per_class, averages=averages,
                   misclassified=mis, loss=None if d.get("loss") is None else float(d["loss"]),
                   extra=dict(d.get("extra") or {}))


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    # to_dict("records") boxes numpy scalars to Python int/float/str, so json.dumps accepts it.
    return df.to_dict(orient="records")


def _topk_values(topk: Iterable[int], num_classes: int) -> list[int]:
    ks = sorted({min(int(k), num_classes) for k in topk})
    if ks and ks[0] < 1:
        raise DataError(f"Top-k values must be ≥ 1, got {list(topk)}.")
    return ks


def evaluate_predictions(probs: Any, targets: Any, class_names: Sequence[str],
                         sample_ids: Sequence[Any] | None = None,
                         topk: Iterable[int] = DEFAULT_TOPK, *, from_logits: bool = False,
                         max_misclassified: int | None = None) -> EvalReport:
    """Compute every metric for one evaluation set and bundle them in an ``EvalReport``.

    Args:
        probs: N×K class probabilities (rows sum to 1), or logits with ``from_logits=True``.
        targets: N true class indices.
        class_names: K names, index → name.
        sample_ids: optional N ids (file paths, ``ds.describe(i)``...) for the misclassified table.
        topk: k values to report, each clipped to K (duplicates merged).
        max_misclassified: keep only this many of the most confident errors (None = all).
    Raises:
        DataError: shapes that do not match, targets out of range, an empty set, or
            probabilities that do not sum to 1 (logits passed without ``from_logits``).
    """
    p = softmax(probs) if from_logits else _scores(probs)
    if not from_logits:
        _check_probs(p)
    n, k = p.shape
    names = _class_names(class_names, k)
    t = _targets(targets, n, k)
    _nonempty(n)
    pred = predictions(p)
    ranks = target_ranks(p, t)
    cm = confusion_matrix(t, pred, k)
    return EvalReport(
        class_names=names,
        num_samples=int(n),
        accuracy=float(np.mean(pred == t)),
        topk={kk: float(np.mean(ranks < kk)) for kk in _topk_values(topk, k)},
        confusion=cm,
        per_class=_per_class_from_cm(cm, names),
        averages=_averages_from_cm(cm),
        misclassified=misclassified(p, t, names, sample_ids, limit=max_misclassified),
        loss=cross_entropy(p, t),
    )


# --------------------------------------------------------------------------------------------
# Collecting batches during evaluation
# --------------------------------------------------------------------------------------------
class Accumulator:
    """Collects (logits, targets, ids) batch by batch; computes everything once at the end.

    Logits stay on their device (cast to float32) until ``probs()``/``report()``, so a GPU
    evaluation does not synchronise after every batch. At the end they are concatenated, moved to
    the CPU and turned into float64 log-probabilities with one ``log_softmax``; the loss is the mean
    of float64 values, so it does not drift with the number of samples.

    Usage::

        acc = Accumulator()
        with torch.inference_mode():
            for x, y, ids in loader:
                acc.add(model(x), y, ids)
        report = acc.report(class_names)
    """

    def __init__(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._ids: list[Any] | None = None
        self._n = 0
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._n

    def add(self, logits: torch.Tensor, targets: torch.Tensor | Sequence[int],
            ids: Sequence[Any] | torch.Tensor | None = None) -> None:
        """Add one batch: logits (B×K), targets (B), optional ids (B). Ids: all batches or none."""
        logits = torch.as_tensor(logits).detach()
        if logits.ndim != 2:
            raise DataError(f"Expected logits of shape (batch, classes), got {tuple(logits.shape)}.")
        targets = torch.as_tensor(targets).detach().reshape(-1)
        b = logits.shape[0]
        if targets.shape[0] != b:
            raise DataError(f"A batch has {b} rows of logits but {targets.shape[0]} targets.")
        if self._logits and logits.shape[1] != self._logits[0].shape[1]:
            raise DataError(f"A batch has {logits.shape[1]} classes, earlier batches had "
                            f"{self._logits[0].shape[1]}.")
        if ids is not None:
            batch_ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
            if len(batch_ids) != b:
                raise DataError(f"A batch has {b} rows of logits but {len(batch_ids)} ids.")
        if (ids is None) != (self._ids is None) and self._n > 0:
            raise DataError("Give sample ids for every batch or for none.")
        if ids is not None:
            self._ids = (self._ids or []) + batch_ids
        self._logits.append(logits.float())
        self._targets.append(targets)
        self._n += b
        self._cache = None

    #: Same as ``add`` (the name the trainer uses).
    update = add

    def _finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is None:
            _nonempty(self._n)
            logits = torch.cat(self._logits).to("cpu", torch.float64)
            log_probs = torch.log_softmax(logits, dim=1)
            targets = torch.cat(self._targets).to("cpu", torch.int64)
            self._cache = (log_probs.exp().numpy(), targets.numpy(), log_probs.numpy())
        return self._cache

    def probs(self) -> np.ndarray:
        """N×K float64 probabilities (softmax of all logits, computed once)."""
        return self._finish()[0]

    def targets(self) -> np.ndarray:
        return self._finish()[1]

    @property
    def ids(self) -> list[Any] | None:
        return None if self._ids is None else list(self._ids)

    def loss(self) -> float:
        """Mean cross-entropy (nats) from float64 log-softmax — same as F.cross_entropy."""
        _, t, log_probs = self._finish()
        return float(-np.mean(log_probs[np.arange(t.shape[0]), t]))

    def accuracy(self) -> float:
        p, t, _ = self._finish()
        return float(np.mean(p.argmax(axis=1) == t))

    def report(self, class_names: Sequence[str], topk: Iterable[int] = DEFAULT_TOPK,
               max_misclassified: int | None = None,
               sample_ids: Sequence[Any] | None = None) -> EvalReport:
        """The full ``EvalReport``; its loss comes from the logits (exact, not from clipped probs).

        ``sample_ids`` gives the ids of all samples at once, in the order they were added (for
        loaders that yield only images and labels); it replaces ids given with the batches.
        """
        p, t, _ = self._finish()
        ids = self._ids if sample_ids is None else _sample_ids(sample_ids, self._n)
        report = evaluate_predictions(p, t, class_names, ids, topk,
                                      max_misclassified=max_misclassified)
        report.loss = self.loss()
        return report


__all__ = [
    "Accumulator", "EvalReport", "accuracy", "average_metrics", "confusion_matrix", "cross_entropy",
    "evaluate_predictions", "misclassified", "normalize_confusion", "per_class_metrics",
    "predictions", "softmax", "target_ranks", "topk_accuracy",
]
