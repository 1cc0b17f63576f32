"""Classification metrics computed from labels, probabilities and confusion matrices.

Pure numpy (no torch) so reports can be rebuilt from saved arrays or JSON files
on any machine. Conventions follow scikit-learn so numbers can be compared with
other tools: confusion-matrix rows are true classes, columns are predicted
classes, and undefined ratios (0 / 0) are reported as 0 (``zero_division=0``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.errors import InputError
from cifarlab.fileio import atomic_write
from cifarlab.schema import read_json_file

__all__ = [
    "confusion_matrix",
    "save_confusion_json",
    "load_confusion_json",
    "per_class_metrics",
    "top_k_accuracy",
    "most_confused_pairs",
    "coarse_confusion",
    "classification_report",
    "format_report",
    # Input validators, shared with plots and the diagnosis so every entry point refuses
    # bad arrays with the same messages.
    "as_class_ids",
    "as_count_matrix",
    "as_probabilities",
    "check_class_names",
    "check_num_classes",
    "as_array",
    "is_probability",
    "softmax",
]

# Softmax outputs in float16/float32 do not sum to exactly 1; this is loose enough
# for those and still catches logits or unnormalised scores passed by mistake.
PROB_SUM_TOLERANCE = 1e-2
# The largest count a confusion-matrix cell may hold: sums of such cells must stay exact in
# float64 and far from int64 overflow.
MAX_COUNT = 2**53
# The most classes any function here accepts: a (C, C) int64 confusion matrix of 10,000
# classes takes 800 MB. Class ids in the billions are a wrong column, not a dataset.
MAX_CLASSES = 10_000


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _preview(values: np.ndarray, limit: int = 5) -> str:
    """A short, readable list of (at most ``limit``) offending values."""
    shown = ", ".join(repr(v.item()) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _is_real_number_dtype(dtype: np.dtype) -> bool:
    """Integer or float, but not bool (True/False labels or counts are almost always a bug)."""
    return dtype.kind != "b" and (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))


def as_array(value: Any, name: str) -> np.ndarray:
    """np.asarray, with an InputError for nested lists of unequal lengths (a ragged matrix)."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name} must be a rectangular array of numbers; got {type(value).__name__} "
                         f"that numpy cannot stack ({exc}); every row needs the same length.") from None


def check_num_classes(num_classes: Any, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise InputError(f"{name} must be an int, got {type(num_classes).__name__} {num_classes!r}.")
    if num_classes < 1:
        raise InputError(f"{name} must be at least 1, got {num_classes}.")
    if num_classes > MAX_CLASSES:  # a (C, C) matrix of that size would not fit in memory
        raise InputError(f"{name} must be at most {MAX_CLASSES:,}, got {num_classes:,}; "
                         "are these class ids (0..C-1) and not some other numbers?")
    return int(num_classes)


def as_class_ids(labels: Any, num_classes: int, name: str) -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array of class ids in [0, num_classes).

    Float arrays are accepted when every value is a whole number, because labels
    often round-trip through float tensors or CSV files; anything else is refused
    rather than silently truncated.
    """
    arr = as_array(labels, name)
    if arr.ndim != 1:
        raise InputError(
            f"{name} must be a 1-D array of class ids, got shape {arr.shape}; "
            "flatten it or pass one label per sample."
        )
    if not _is_real_number_dtype(arr.dtype):
        raise InputError(
            f"{name} must contain integer class ids, got dtype {arr.dtype}; "
            "convert class names to ids first."
        )
    _reject_non_integers(arr, f"{name} must contain integer class ids",
                         "if these are probabilities or scores, take argmax over classes first.")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise InputError(
            f"{name} must contain class ids in [0, {num_classes}), got out-of-range values "
            f"{_preview(np.unique(bad))}; check num_classes or the label encoding."
        )
    return arr


def _reject_non_integers(arr: np.ndarray, expected: str, hint: str) -> None:
    """Float arrays are fine when every value is whole (labels and counts often round-trip
    through float tensors or CSV files); anything else is refused, not truncated."""
    if np.issubdtype(arr.dtype, np.floating):
        bad = arr[~np.isfinite(arr) | (arr != np.round(arr))]
        if bad.size:
            raise InputError(f"{expected}, got non-integer values {_preview(bad)}; {hint}")


def as_count_matrix(cm: Any, name: str = "confusion matrix") -> np.ndarray:
    """Return ``cm`` as a square int64 matrix of non-negative counts (>= 2 classes)."""
    arr = as_array(cm, name)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise InputError(f"{name} must be a square 2-D array (classes x classes), got shape {arr.shape}.")
    if arr.shape[0] < 2:
        raise InputError(f"{name} must cover at least 2 classes, got {arr.shape[0]}.")
    if not _is_real_number_dtype(arr.dtype):
        raise InputError(f"{name} must contain integer counts, got dtype {arr.dtype}.")
    _reject_non_integers(arr, f"{name} must contain integer counts", "pass raw counts, not a normalised matrix.")
    if (arr < 0).any():
        raise InputError(f"{name} must contain non-negative counts, got {_preview(arr[arr < 0])}.")
    if arr.size and arr.max() > MAX_COUNT:  # int64 sums would overflow
        raise InputError(f"{name} holds counts up to {float(arr.max()):.3g}, more than any real count "
                         f"(at most {MAX_COUNT:.3g}); pass raw counts of samples.")
    return _bounded_total(arr.astype(np.int64), name)


def _bounded_total(counts: np.ndarray, name: str) -> np.ndarray:
    """`counts` once their total is at most MAX_COUNT: every row, column and grand total then
    fits int64 (and float64 exactly), so no count is ever printed negative or as a wrapped sum."""
    total = float(counts.sum(dtype=np.float64))  # float: the int64 sum itself could wrap
    if total > MAX_COUNT:
        raise InputError(f"{name} holds {total:,.0f} samples in all, more than any real evaluation "
                         f"(at most {MAX_COUNT:,}); the counts are damaged or are not counts of samples.")
    return counts


def as_probabilities(probs: Any, num_samples: int | None = None) -> np.ndarray:
    """Return ``probs`` as a finite float64 (N, C) array, checking N if given."""
    arr = as_array(probs, "probs")
    if arr.ndim != 2:
        raise InputError(f"probs must be a 2-D array (samples x classes), got shape {arr.shape}.")
    if arr.shape[1] == 0:
        raise InputError(f"probs must have one column per class, got shape {arr.shape} (no classes).")
    if not _is_real_number_dtype(arr.dtype):
        raise InputError(f"probs must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InputError(
            f"probs contains {int((~np.isfinite(arr)).sum())} NaN or infinite values; "
            "check the model output (e.g. a diverged checkpoint)."
        )
    if num_samples is not None and arr.shape[0] != num_samples:
        raise InputError(
            f"probs has {arr.shape[0]} rows but y_true has {num_samples} labels; "
            "they must describe the same samples in the same order."
        )
    return arr


def check_class_names(class_names: list[str], num_classes: int, name: str = "class_names") -> None:
    if len(class_names) != num_classes:
        raise InputError(
            f"{name} must have one name per class: expected {num_classes}, got {len(class_names)}."
        )


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den == 0 (sklearn's zero_division=0)."""
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den != 0)
    return out


# --------------------------------------------------------------------------- #
# Confusion matrices
# --------------------------------------------------------------------------- #


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Count (true, predicted) pairs into an int64 (C, C) matrix; row = true, column = predicted."""
    num_classes = check_num_classes(num_classes)
    t = as_class_ids(y_true, num_classes, "y_true")
    p = as_class_ids(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise InputError(
            f"y_true and y_pred must have the same length, got {t.size} and {p.size}; "
            "they must describe the same samples in the same order."
        )
    # One flat bincount is much faster than np.add.at for large N.
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def save_confusion_json(cm: np.ndarray, path: Path) -> None:
    """Write ``cm`` as a bare JSON list of rows of ints, e.g. ``[[5, 1], [0, 7]]``.

    This is exactly what ``json.dump(cm.tolist(), f)`` writes, so files are
    interchangeable with existing scripts that use that layout.
    """
    counts = as_count_matrix(cm)
    atomic_write(path, json.dumps(counts.tolist()).encode("utf-8"), what="confusion matrix")


def _parse_count(value: Any, row: int, col: int, path: Path) -> int:
    """One JSON cell as an int; integral floats (``3.0``) are accepted, anything else refused."""
    where = f"{path}: row {row}, column {col}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} must be an integer count, got {value!r}.")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InputError(
            f"{where} must be an integer count, got non-integer {value!r}; "
            "the file must hold raw counts, not a normalised matrix."
        )
    if value < 0:
        raise InputError(f"{where} must be a non-negative count, got {value!r}.")
    if value > MAX_COUNT:  # int64 would overflow (and no evaluation has 2**53 samples)
        raise InputError(f"{where} is {value:.3g}, more than any real count (at most {MAX_COUNT:.3g}); "
                         "the file is damaged or is not a confusion matrix.")
    return int(value)


def load_confusion_json(path: Path) -> np.ndarray:
    """Read a confusion matrix written as a JSON list of rows (see ``save_confusion_json``)."""
    path = Path(path)
    data = read_json_file(path, "a confusion matrix as a JSON list of rows like [[5, 1], [0, 7]]")
    if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
        raise InputError(
            f"{path} must hold a JSON list of rows like [[5, 1], [0, 7]], got {type(data).__name__} "
            "at the top level or a row that is not a list."
        )
    n = len(data)
    if n < 2:
        raise InputError(f"{path} must hold a matrix of at least 2 classes, got {n} row(s).")
    for i, row in enumerate(data):
        if len(row) != n:
            raise InputError(
                f"{path} must hold a square matrix: {n} rows, so every row needs {n} counts, "
                f"but row {i} has {len(row)}."
            )
    counts = np.array(
        [[_parse_count(v, i, j, path) for j, v in enumerate(row)] for i, row in enumerate(data)],
        dtype=np.int64,
    )
    return _bounded_total(counts, str(path))


def coarse_confusion(cm: np.ndarray, coarse_of_fine: list[int], num_coarse: int) -> np.ndarray:
    """Sum a fine (C, C) matrix into a coarse (K, K) one, e.g. CIFAR-100 classes into superclasses.

    The coarse prediction is the superclass of the predicted fine class.
    """
    counts = as_count_matrix(cm)
    num_coarse = check_num_classes(num_coarse, "num_coarse")
    mapping = as_class_ids(coarse_of_fine, num_coarse, "coarse_of_fine")
    if mapping.size != counts.shape[0]:
        raise InputError(
            f"coarse_of_fine must give one coarse id per fine class: the matrix has "
            f"{counts.shape[0]} classes but coarse_of_fine has {mapping.size} entries."
        )
    # onehot[i, a] = 1 when fine class i belongs to coarse class a; then
    # onehot.T @ cm @ onehot sums every block of fine cells into its coarse cell.
    onehot = np.zeros((counts.shape[0], num_coarse), dtype=np.int64)
    onehot[np.arange(counts.shape[0]), mapping] = 1
    return onehot.T @ counts @ onehot


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def per_class_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 (float64) and support (int64) per class; 0 where undefined."""
    counts = as_count_matrix(cm)
    tp = np.diag(counts)
    predicted = counts.sum(axis=0)
    support = counts.sum(axis=1)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def top_k_accuracy(probs: np.ndarray, y_true: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores.

    Ties are broken towards the lower class id, as ``np.argmax`` does, so
    ``top_k_accuracy(probs, y, 1)`` always equals the accuracy of ``probs.argmax(1)``.
    With ``k >= C`` every sample counts as correct (the result is 1.0).
    """
    k = check_num_classes(k, "k")
    labels = as_array(y_true, "y_true")
    scores = as_probabilities(probs, num_samples=labels.shape[0] if labels.ndim == 1 else None)
    labels = as_class_ids(labels, scores.shape[1], "y_true")
    if labels.size == 0:
        raise InputError("top_k_accuracy needs at least one sample, got 0.")
    true_score = scores[np.arange(labels.size), labels][:, None]
    ids = np.arange(scores.shape[1])[None, :]
    # Rank of the true class = classes scoring higher + equal-scoring classes with a lower id.
    rank = (scores > true_score).sum(axis=1) + ((scores == true_score) & (ids < labels[:, None])).sum(axis=1)
    return float((rank < k).mean())


def most_confused_pairs(cm: np.ndarray, class_names: list[str], k: int = 10) -> list[dict]:
    """The ``k`` largest non-zero off-diagonal cells, largest first.

    Each entry: ``{"true", "predicted", "true_id", "predicted_id", "count", "rate"}``
    where ``rate`` is the count divided by the true class's total. Equal counts are
    ordered by (true_id, predicted_id) so the output is deterministic.
    """
    counts = as_count_matrix(cm)
    check_class_names(class_names, counts.shape[0])
    k = max(0, int(k))
    off = counts.copy()
    np.fill_diagonal(off, 0)
    true_ids, pred_ids = np.nonzero(off)
    # lexsort sorts by the last key first: count descending, then true_id, predicted_id.
    order = np.lexsort((pred_ids, true_ids, -off[true_ids, pred_ids]))[:k]
    row_totals = counts.sum(axis=1)
    return [
        {
            "true": class_names[t],
            "predicted": class_names[p],
            "true_id": int(t),
            "predicted_id": int(p),
            "count": int(off[t, p]),
            "rate": float(off[t, p] / row_totals[t]),
        }
        for t, p in zip(true_ids[order], pred_ids[order])
    ]


# --------------------------------------------------------------------------- #
# Reports
# --------------------------------------------------------------------------- #


def is_probability(scores: np.ndarray) -> bool:
    """Every value of the (N, C) array in [0, 1] and every row summing to 1 (PROB_SUM_TOLERANCE)."""
    if scores.size == 0:
        return True
    return bool(scores.min() >= 0 and scores.max() <= 1
                and np.abs(scores.sum(axis=1) - 1).max() <= PROB_SUM_TOLERANCE)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, in their float dtype."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # minus the max: exp cannot overflow
    return shifted / shifted.sum(axis=1, keepdims=True)


def _check_is_probability(probs: np.ndarray) -> None:
    """Refuse logits or unnormalised scores: mean_confidence would be meaningless."""
    if not is_probability(probs):
        sums = probs.sum(axis=1)
        raise InputError(
            "probs must be probabilities (each value in [0, 1], each row summing to 1), got values in "
            f"[{probs.min():.3g}, {probs.max():.3g}] with row sums in [{sums.min():.3g}, {sums.max():.3g}]; "
            "if these are logits, apply softmax over the class axis first."
        )


def _coarse_section(cm: np.ndarray, coarse_of_fine: list[int], coarse_names: list[str]) -> dict:
    coarse_cm = coarse_confusion(cm, coarse_of_fine, len(coarse_names))
    return {
        "accuracy": float(np.trace(coarse_cm) / coarse_cm.sum()),
        "classes": list(coarse_names),
        "confusion_matrix": coarse_cm.tolist(),
        "most_confused": most_confused_pairs(coarse_cm, list(coarse_names), k=10),
    }


def classification_report(
    probs: np.ndarray,
    y_true: np.ndarray,
    class_names: list[str],
    *,
    coarse_of_fine: list[int] | None = None,
    coarse_names: list[str] | None = None,
    top_k: int = 5,
) -> dict:
    """A JSON-serialisable summary of predictions ``probs`` (N, C) against labels ``y_true`` (N,).

    Predictions are ``probs.argmax(1)``. Macro averages are unweighted means over
    all C classes. ``f"top{top_k}_accuracy"`` is omitted when C <= top_k (it would
    trivially be 1.0). The ``"coarse"`` section is present only when both
    ``coarse_of_fine`` and ``coarse_names`` are given.
    """
    labels = as_array(y_true, "y_true")
    scores = as_probabilities(probs, num_samples=labels.shape[0] if labels.ndim == 1 else None)
    num_classes = scores.shape[1]
    check_class_names(class_names, num_classes)
    if scores.shape[0] == 0:
        raise InputError("classification_report needs at least one sample, got 0.")
    _check_is_probability(scores)
    if (coarse_of_fine is None) != (coarse_names is None):
        raise InputError("pass both coarse_of_fine and coarse_names for a coarse report, or neither.")

    cm = confusion_matrix(labels, scores.argmax(axis=1), num_classes)
    stats = per_class_metrics(cm)
    n = int(cm.sum())
    report: dict[str, Any] = {
        "num_samples": n,
        "num_classes": num_classes,
        "accuracy": float(np.trace(cm) / n),
    }
    if num_classes > top_k:
        report[f"top{top_k}_accuracy"] = top_k_accuracy(scores, labels, top_k)
    report.update(
        {
            "macro_precision": float(stats["precision"].mean()),
            "macro_recall": float(stats["recall"].mean()),
            "macro_f1": float(stats["f1"].mean()),
            "mean_confidence": float(scores.max(axis=1).mean()),
            "per_class": [
                {
                    "class": class_names[i],
                    "id": i,
                    "precision": float(stats["precision"][i]),
                    "recall": float(stats["recall"][i]),
                    "f1": float(stats["f1"][i]),
                    "support": int(stats["support"][i]),
                }
                for i in range(num_classes)
            ],
            "most_confused": most_confused_pairs(cm, list(class_names), k=10),
        }
    )
    if coarse_of_fine is not None and coarse_names is not None:
        report["coarse"] = _coarse_section(cm, coarse_of_fine, coarse_names)
    report["confusion_matrix"] = cm.tolist()
    return report


def _top_k_entry(report: Mapping[str, Any]) -> tuple[str, float] | None:
    """The (key, value) of the top-k accuracy in a report, whatever k was."""
    for key, value in report.items():
        if key.startswith("top") and key.endswith("_accuracy"):
            return key, value
    return None


def _pair_line(pair: dict) -> str:
    return f"  {pair['true']} -> {pair['predicted']}: {pair['count']} ({pair['rate']:.1%} of {pair['true']})"


def format_report(report: Mapping[str, Any], max_rows: int = 10) -> str:
    """A short terminal summary of a ``classification_report`` dict (also one loaded from JSON).

    ``max_rows`` is the total number of table rows shown, split between the worst
    classes by F1 and the most confused pairs (5 + 5 by default).
    """
    worst_rows = (max_rows + 1) // 2
    pair_rows = max_rows - worst_rows
    lines = [f"samples: {report['num_samples']}  classes: {report['num_classes']}"]
    lines.append(f"accuracy: {report['accuracy']:.2%}")
    top = _top_k_entry(report)
    if top is not None:
        k = top[0][len("top") : -len("_accuracy")]
        lines.append(f"top-{k} accuracy: {top[1]:.2%}")
    lines.append(f"macro F1: {report['macro_f1']:.4f}  mean confidence: {report['mean_confidence']:.2%}")
    if "coarse" in report:
        lines.append(f"coarse accuracy: {report['coarse']['accuracy']:.2%}")

    worst = sorted(report["per_class"], key=lambda c: (c["f1"], c["id"]))[:worst_rows]
    if worst:
        lines.append(f"worst {len(worst)} classes by F1:")
        width = max(len(c["class"]) for c in worst)
        lines.extend(
            f"  {c['class']:<{width}}  F1 {c['f1']:.3f}  precision {c['precision']:.3f}  "
            f"recall {c['recall']:.3f}  support {c['support']}"
            for c in worst
        )
    pairs = report["most_confused"][:pair_rows]
    if pairs:
        lines.append(f"most confused (true -> predicted), top {len(pairs)}:")
        lines.extend(_pair_line(p) for p in pairs)
    return "\n".join(lines)
