"""Diagnose a classifier from its outputs alone: collapse, label permutation, chance accuracy.

Input is a confusion matrix (rows = true class, columns = predicted class) or
predictions with optional probabilities and labels. Nothing here runs a model;
the model-probing diagnosis lives elsewhere and reuses ``prediction_stats``.

Symptoms and the causes they point to
-------------------------------------
* ``prediction-collapse``: a few classes receive most predictions although the
  labels are spread out. Most often evaluation preprocessing differs from
  training (missing ``/255``, wrong normalisation); otherwise the model never learned.
* ``label-permutation``: re-ordering the predicted classes makes the matrix
  largely diagonal, so the model is good but labels and predictions are
  misaligned (off-by-one label map, different class order).
* ``near-chance``: accuracy is not clearly above chance. With diverse
  predictions this usually means labels were shuffled relative to the images.
* ``train-eval-gap``: accuracy far below the one recorded at training time.
* ``confidently-wrong`` and ``calibration`` (info only): confidence statistics.

Thresholds (module constants) and why they have these values
------------------------------------------------------------
No false alarms is the first requirement: a weak but honest model, a model with
a few weak classes, and imbalanced data must all come out "healthy".

The collapse and permutation thresholds were chosen from real models, not simulations:
``python benchmarks/diagnosis_calibration.py`` trains keras-cnn and airbench-small on
CIFAR-10 (JPEG copy) and CIFAR-100, evaluates each correctly and with each classic bug on
500-10,000 test images, and tabulates the statistics below (README, "Calibration").

``TOP_SET_SHARE = 0.5``
    The "top classes" are the smallest set of most-predicted classes that
    together take at least half of all predictions. Half is the median split:
    it names the classes a user sees as "the bars" in a confusion plot.
``COLLAPSE_WARNING_DEFICIT = 0.13`` / ``COLLAPSE_ERROR_DEFICIT = 0.20`` (up to 10 classes),
``COLLAPSE_WARNING_DEFICIT_MANY = 0.305`` / ``COLLAPSE_ERROR_DEFICIT_MANY = 0.35`` (more)
    Collapse is measured as the entropy deficit: the normalised entropy of the
    true classes minus that of the predicted classes. It sees both halves of a
    partial collapse, the classes that take too many predictions and the ones
    starved of them, and is near 0 for predictions that follow imbalanced labels.
    The corpus has two parts: models trained on the whole training split, and
    weaker ones trained on 8,000 images. Honest models at the end of their
    training run reached at most 0.123 on CIFAR-10 (airbench-small after a
    1-epoch run on 8,000 images, 35%; on the whole split at most 0.03) and 0.300
    on CIFAR-100 (airbench-small after a 5-epoch run on 8,000 images, 13%; on
    the whole split 0.265). Weak models on 100 classes pile their errors on a few
    "sink" classes, hence the larger values there. The mildest mistakes above
    every honest model gave 0.137 on CIFAR-10 (planar rows reshaped without a
    transpose, fed to keras-cnn) and 0.309 on CIFAR-100 (the same on
    airbench-small); a missing /255 gave 0.21-0.88 and 0.35-0.98. The warning
    lines sit between the two, with thin margins: 0.007 above the worst honest
    model and 0.007 below the mildest mistake on CIFAR-10, 0.005 and 0.004 on
    CIFAR-100. One model's deficit moves by about that much between subsets of
    2,000 and 10,000 images, so a model near a line can land on either side of
    it; the detail of the finding names both readings. Outside the calibration:
    models that barely learned (less than 10% of the way from chance to perfect)
    and checkpoints taken in the middle of a decaying schedule (airbench-small at
    its peak learning rate) predict as unevenly as a broken pipeline and are
    reported as a collapse; from the outputs alone they cannot be told apart.
    Over- and under-predicted classes (``OVER_PREDICTED = 2``x and ``STARVED = 0.25``x
    their share of the labels) name the bars and the starved classes in the title,
    and the total variation distance between the two distributions is in the evidence.
``MIN_SAMPLES_PER_CLASS = 10``
    Collapse and re-mapping checks need at least 10 samples per class (a cyclic
    shift of the labels does not: see ``SHIFT_EXPLAINS``). With
    fewer, sampling noise alone makes some classes look over- or
    under-represented, and re-mapping noise gains accuracy (8.8 points at 5 per
    class on CIFAR-100 in the calibration; at most 3.6 points at 20 per class).
``PERMUTATION_MIN_GAIN = 0.10``, ``PERMUTATION_MIN_FACTOR = 2.0``
    The best re-mapping (``scipy.optimize.linear_sum_assignment`` maximising the
    diagonal) must add at least 10 accuracy points, at least double accuracy,
    and reach an accuracy clearly above chance (the ``near-chance`` test below).
    Honest models gained at most 3.6 points in the calibration (at 20+ samples
    per class); a misaligned model jumps from ~chance to its real accuracy (a
    random class order on a 42%-accurate CIFAR-10 model gains 25 points). With
    few samples per class, re-mapping noise gains more, so the gain must also
    reach ``PERMUTATION_NOISE = 0.50`` / sqrt(samples per class): 15.8 points at
    10 per class, 11.2 at 20, 10 from 25 on. Measured on CIFAR-100 with shuffled
    labels (no structure to find), re-mapping gained up to 12.5 points at 10 per
    class and 8.3 at 20 (0.40 and 0.37 / sqrt); a random class order on the
    weakest end-of-run model (13%) gained 12.75 at 20 per class and, on a 20%
    keras-cnn, 19.9 at 10 per class (0.57 and 0.63 / sqrt). 0.50 sits between the
    two, 1.3x above the noise measured.
    Limitation: two swapped classes out of 10 may cost less and go unreported.
``SHIFT_EXPLAINS = 0.95``
    The permutation is reported as a cyclic shift ``pred = (true + k) % C``
    when that single shift reaches 95% of the re-mapped accuracy (a few weak
    classes may be re-mapped differently by the optimiser without changing the story),
    or when what the re-mapping adds beyond the shift is within re-mapping noise.
    A cyclic shift (1-based labels, an off-by-one) is also tested on its own: it
    is one of C - 1 candidates, not one of C! re-mappings, so noise alone gives it
    little. Reading the predictions shifted must gain ``PERMUTATION_MIN_GAIN``, double
    accuracy and be clearly above chance; with shuffled labels the best shift gained
    at most 4.0 points (CIFAR-10) and 1.0 (CIFAR-100) in the calibration, where a
    shift on the weakest end-of-run CIFAR-100 model gains 13.5 points at 20 per class.
``MAX_LISTED = 20``
    At most 20 classes are listed in evidence, to keep reports readable.
``NEAR_CHANCE_Z = 3.0``, ``NEAR_CHANCE_MIN_LIFT = 0.02``
    Chance is the higher of 1/C and the share of the most frequent true class
    (1/C when every label is one class, where "always predict it" is degenerate).
    Accuracy is near chance when its one-sided z-score against chance is below
    3 (about a 0.1% false-alarm rate for a model truly at chance) or when it
    closes less than 2% of the gap between chance and perfect accuracy
    (``(acc - chance) / (1 - chance) < 0.02``), since with 10,000 samples even a
    useless 1.5% on 100 classes is "significant". A weak honest model at 5% on
    100 classes closes 4% of the gap and is not flagged. When accuracy is
    useful but too few samples make it insignificant, only an info finding is
    added.
``CONFIDENT_MEAN = 0.5``, ``CONFIDENT_MARGIN = 0.25``
    Predictions count as confident when mean confidence is at least 0.5 and at
    least 0.25 above uniform (1/C). A trained network run on shuffled labels is
    this confident; an untrained one stays near 1/C.
``NEAR_CHANCE_TRAINED_MARGIN = 0.2``
    When the model's recorded training-time accuracy beats chance by at least 20
    points, chance accuracy now cannot mean "never learned", however unconfident
    its predictions: labels misaligned with the images (shuffled) is the reading.
``TRAIN_EVAL_GAP_RATIO = 0.5``, ``TRAIN_EVAL_GAP_POINTS = 0.20``
    Measured accuracy below half of the accuracy recorded at training, or more
    than 20 points below it. Normal drift between a validation split and a test
    set is a few points. Pass validation accuracy: training-set accuracy of an
    over-fitted model can legitimately be 20+ points higher.
``CONFIDENTLY_WRONG = 0.9``, ``CONFIDENTLY_WRONG_INFO_SHARE = 0.10``
    A prediction is confidently wrong when it is wrong with confidence >= 0.9.
    An info finding is added when more than 10% of all predictions are: a
    well-trained model makes few confident mistakes, while shifted inputs or
    misaligned labels make many.
``ECE_BINS = 15``, ``ECE_INFO = 0.10``
    Expected calibration error over 15 equal-width confidence bins (the usual
    setting since Guo et al. 2017). An info finding is added above 0.10; modern
    networks are commonly this miscalibrated, which is worth knowing but is not a bug.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from cifarlab.data.cifar import CIFAR100_COARSE_OF_FINE
from cifarlab.diagnosis.report import Diagnosis, Finding
from cifarlab.errors import InputError
from cifarlab.metrics import (
    as_class_ids,
    as_count_matrix,
    as_probabilities,
    check_class_names,
    check_num_classes,
    confusion_matrix,
    is_probability,
    per_class_metrics,
    softmax,
)

__all__ = ["prediction_stats", "analyze_confusion", "analyze_predictions"]

TOP_SET_SHARE = 0.5
COLLAPSE_WARNING_DEFICIT, COLLAPSE_ERROR_DEFICIT = 0.13, 0.20  # 10 classes or fewer
COLLAPSE_WARNING_DEFICIT_MANY, COLLAPSE_ERROR_DEFICIT_MANY = 0.305, 0.35  # more than 10
OVER_PREDICTED = 2.0
STARVED = 0.25
MIN_SAMPLES_PER_CLASS = 10
PERMUTATION_MIN_GAIN = 0.10
PERMUTATION_NOISE = 0.50
PERMUTATION_MIN_FACTOR = 2.0
SHIFT_EXPLAINS = 0.95
MAX_LISTED = 20
NEAR_CHANCE_Z = 3.0
NEAR_CHANCE_MIN_LIFT = 0.02
CONFIDENT_MEAN = 0.5
CONFIDENT_MARGIN = 0.25
NEAR_CHANCE_TRAINED_MARGIN = 0.2
TRAIN_EVAL_GAP_RATIO = 0.5
TRAIN_EVAL_GAP_POINTS = 0.20
CONFIDENTLY_WRONG = 0.9
CONFIDENTLY_WRONG_INFO_SHARE = 0.10
ECE_BINS = 15
ECE_INFO = 0.10

# Ranking weights: within a severity, the most specific cause comes first. A label
# permutation explains the chance accuracy it causes; a collapse explains its own
# chance accuracy; a train/eval gap is the consequence of any of them.
_SCORE_PERMUTATION = 100.0
_SCORE_COLLAPSE = 90.0
_SCORE_NEAR_CHANCE = 80.0
_SCORE_GAP = 50.0
_SCORE_INFO = 10.0


# --------------------------------------------------------------------------- #
# Distribution statistics
# --------------------------------------------------------------------------- #


def _normalised_entropy(counts: np.ndarray) -> float:
    """Entropy of the distribution ``counts`` in [0, 1], 1 = uniform over all classes."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return max(0.0, float(-(p * np.log(p)).sum() / np.log(counts.size)))  # max: no "-0.0" for one class


def _top_set(counts: np.ndarray) -> np.ndarray:
    """Ids of the smallest set of most-counted classes holding >= TOP_SET_SHARE of the total."""
    # Stable sort on -counts keeps lower ids first among ties, so the result is deterministic.
    order = np.argsort(-counts, kind="stable")
    cumulative = np.cumsum(counts[order])
    size = int(np.searchsorted(cumulative, TOP_SET_SHARE * counts.sum(), side="left")) + 1
    return order[: min(size, counts.size)]


def _stats_from_counts(pred_counts: np.ndarray, true_counts: np.ndarray | None,
                       num_correct: int | None) -> dict[str, Any]:
    """The ``prediction_stats`` dict from per-class counts (shared by every entry point)."""
    n = int(pred_counts.sum())
    top = _top_set(pred_counts)
    stats: dict[str, Any] = {
        "num_samples": n,
        "num_classes": int(pred_counts.size),
        "pred_entropy": _normalised_entropy(pred_counts),
        "classes_predicted": int((pred_counts > 0).sum()),
        "never_predicted": int((pred_counts == 0).sum()),
        "top_classes": [int(i) for i in top],
        "top_classes_share": float(pred_counts[top].sum() / n),
    }
    # How far predictions are from the labels (a balanced set without labels); see _collapse_finding.
    reference = true_counts if true_counts is not None else np.ones(pred_counts.size)
    shift = _distribution_shift(pred_counts, reference / reference.sum())
    stats["prediction_tv"], stats["prediction_tv_excess"] = shift["tv"], shift["tv_excess"]
    if true_counts is not None and num_correct is not None:
        stats["true_entropy"] = _normalised_entropy(true_counts)
        stats["accuracy"] = float(num_correct / n)
        stats["chance_accuracy"] = float(true_counts.max() / n)
    return stats


def prediction_stats(y_pred: np.ndarray, num_classes: int, y_true: np.ndarray | None = None) -> dict:
    """Cheap, JSON-able statistics of predicted class ids (and labels, when given).

    Keys: num_samples, num_classes, pred_entropy (normalised, 1 = uniform over all
    classes), classes_predicted, never_predicted, top_classes (ids of the smallest
    set of most-predicted classes taking >= 50% of predictions), top_classes_share;
    with ``y_true`` also true_entropy, accuracy and chance_accuracy (accuracy of
    always predicting the most frequent true class).
    """
    num_classes = check_num_classes(num_classes)
    pred = as_class_ids(y_pred, num_classes, "y_pred")
    if pred.size == 0:
        raise InputError("y_pred is empty; prediction statistics need at least one prediction.")
    pred_counts = np.bincount(pred, minlength=num_classes)
    if y_true is None:
        return _stats_from_counts(pred_counts, None, None)
    cm = confusion_matrix(y_true, pred, num_classes)
    return _stats_from_counts(pred_counts, cm.sum(axis=1), int(np.trace(cm)))


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _validated_matrix(cm: Any) -> np.ndarray:
    counts = as_count_matrix(cm)
    if counts.sum() == 0:
        raise InputError(
            f"confusion matrix is all zeros ({counts.shape[0]}x{counts.shape[0]}); expected counts of "
            "(true, predicted) pairs. Check that the evaluation actually ran on some samples."
        )
    return counts


def _validated_names(class_names: list[str] | None, num_classes: int) -> list[str]:
    """Names to show; class ids as strings when none are given."""
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    check_class_names(list(class_names), num_classes)
    return [str(name) for name in class_names]


def _validated_trained_accuracy(trained_accuracy: float | None) -> float | None:
    if trained_accuracy is None:
        return None
    value = float(trained_accuracy)
    if not 0.0 <= value <= 1.0:
        raise InputError(
            f"trained_accuracy must be a fraction in [0, 1], got {trained_accuracy!r}; "
            "pass 0.9 for 90%."
        )
    return value


# --------------------------------------------------------------------------- #
# Findings
# --------------------------------------------------------------------------- #


def _pct(share: float) -> str:
    """A share as a percentage with enough digits to be non-zero for small values (0.5%)."""
    if share == 0 or share >= 0.095:
        return f"{share:.0%}"
    return f"{share * 100:.2g}%"


def _enough_samples(n: int, num_classes: int) -> bool:
    return n >= MIN_SAMPLES_PER_CLASS * num_classes


def _names_of(ids: np.ndarray, names: list[str]) -> list[str]:
    return [names[int(i)] for i in ids[:MAX_LISTED]]


def _listed(names: list[str]) -> str:
    """'a, b and c' for a short list; the count for a long one."""
    if len(names) > 5:
        return f"{', '.join(names[:5])} and {len(names) - 5} more"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


@dataclass
class _Confidence:
    """Confidence statistics of probabilistic predictions (labels optional)."""

    mean: float
    num_classes: int
    mean_correct: float | None = None
    mean_wrong: float | None = None
    confidently_wrong_share: float | None = None
    ece: float | None = None

    @property
    def confident(self) -> bool:
        # Compared with uniform too, because 0.5 is uninformative on a 2-class problem.
        return self.mean >= CONFIDENT_MEAN and self.mean >= 1.0 / self.num_classes + CONFIDENT_MARGIN

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mean_confidence": self.mean}
        if self.ece is not None:
            data.update({"mean_confidence_correct": self.mean_correct, "mean_confidence_wrong": self.mean_wrong,
                         "confidently_wrong_share": self.confidently_wrong_share,
                         "expected_calibration_error": self.ece})
        return data


# --------------------------------------------------------------------------- #
# Chance level and re-mapping
# --------------------------------------------------------------------------- #


def _chance_level(cm: np.ndarray) -> float:
    """The accuracy a model without information reaches: 1/C or always-the-majority-class.

    When every label is one class, "always predict it" is a degenerate baseline
    (100%) that no model could be expected to know about, so 1/C is used.
    """
    true_counts = cm.sum(axis=1)
    majority = float(true_counts.max() / true_counts.sum())
    return 1.0 / cm.shape[0] if majority >= 1.0 else max(1.0 / cm.shape[0], majority)


def _above_chance(accuracy: float, chance: float, n: int) -> tuple[bool, bool]:
    """(significantly above chance, by a useful margin): a one-sided z-test and the lift."""
    z = (accuracy - chance) / np.sqrt(chance * (1 - chance) / n)
    lift = (accuracy - chance) / (1 - chance)
    return bool(z >= NEAR_CHANCE_Z), bool(lift >= NEAR_CHANCE_MIN_LIFT)


def _best_remapping(cm: np.ndarray) -> tuple[np.ndarray, float]:
    """The predicted class matched to each true class that maximises the diagonal, and its accuracy."""
    rows, cols = linear_sum_assignment(cm, maximize=True)
    col_of_row = np.empty(cm.shape[0], dtype=np.int64)
    col_of_row[rows] = cols
    return col_of_row, float(cm[rows, cols].sum() / cm.sum())


def _shift_accuracies(cm: np.ndarray) -> np.ndarray:
    """accuracies[k] = accuracy if predictions were read as (true + k) mod C."""
    num_classes = cm.shape[0]
    ids = np.arange(num_classes)
    shifted_cols = (ids[None, :] + ids[:, None]) % num_classes  # [k, i] -> (i + k) % C
    return cm[ids[None, :], shifted_cols].sum(axis=1) / cm.sum()


# --------------------------------------------------------------------------- #
# Findings
# --------------------------------------------------------------------------- #

_PREPROCESSING_FIX = (
    "compare evaluation preprocessing with training (scaling such as /255, normalisation mean/std, "
    "channel order, resizing); run `cifarlab diagnose --model MODEL --images X` to probe it"
)


def collapse_thresholds(num_classes: int) -> tuple[float, float]:
    """(warning, error) entropy deficits for C classes (see the module docstring)."""
    many = num_classes > 10
    return ((COLLAPSE_WARNING_DEFICIT_MANY, COLLAPSE_ERROR_DEFICIT_MANY) if many
            else (COLLAPSE_WARNING_DEFICIT, COLLAPSE_ERROR_DEFICIT))


def tv_noise(num_classes: int, n: int) -> float:
    """The total variation distance sampling noise alone gives on n samples of C balanced classes.

    The expected 0.5 * sum |p_hat - p| of a multinomial sample is about sqrt(C / (2 pi n)):
    0.04 for 10 classes and 1,000 samples, 0.13 for 100 classes and 1,000 samples.
    """
    return float(np.sqrt(num_classes / (2 * np.pi * n)))


def _distribution_shift(pred_counts: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """How far the predicted-class distribution is from the label distribution, and where.

    `expected`: the share of labels per class (uniform when no labels are given).
    Over-predicted classes receive at least OVER_PREDICTED x their share; starved ones at
    most STARVED x their share (among classes holding labels).
    """
    n = int(pred_counts.sum())
    share = pred_counts / n
    tv = float(0.5 * np.abs(share - expected).sum())
    over = np.flatnonzero(share >= OVER_PREDICTED * expected)
    over = over[np.argsort(-share[over], kind="stable")]
    starved = np.flatnonzero((expected > 0) & (share <= STARVED * expected))
    starved = starved[np.argsort(-expected[starved], kind="stable")]
    return {"tv": tv, "tv_excess": tv - tv_noise(pred_counts.size, n), "over": over, "starved": starved,
            "over_share": float(share[over].sum()), "over_label_share": float(expected[over].sum()),
            "starved_share": float(share[starved].sum()), "starved_label_share": float(expected[starved].sum())}


def _shift_words(shift: dict[str, Any], names: list[str], num_classes: int, labelled: bool) -> str:
    """"dog and horse receive 60% of predictions (20% of the labels); bird, deer and frog receive 1% (30%)"."""
    of_what = "of the labels" if labelled else "of a balanced set"

    def group(ids: np.ndarray) -> str:
        listed = _listed(_names_of(ids, names))
        # "dog and horse" reads well on 10 classes; on 100, "2 of 100 classes (apple and bee)".
        return listed if ids.size <= 5 and num_classes <= 10 else f"{ids.size} of {num_classes} classes ({listed})"

    over, starved = shift["over"], shift["starved"]
    verb = "receives" if over.size == 1 else "receive"
    words = (f"{group(over)} {verb} {_pct(shift['over_share'])} of predictions "
             f"({_pct(shift['over_label_share'])} {of_what})")
    if starved.size:
        verb = "receives" if starved.size == 1 else "receive"
        words += (f"; {group(starved)} {verb} {_pct(shift['starved_share'])} "
                  f"({_pct(shift['starved_label_share'])} {of_what})")
    return words


def _collapse_finding(pred_counts: np.ndarray, cm: np.ndarray | None, names: list[str]) -> Finding | None:
    """Predictions concentrated on fewer classes than the labels, beyond what honest models do.

    The distance is the total variation between the predicted-class and the true-class
    distributions (without labels: a balanced set), less what sampling noise gives.
    """
    n, num_classes = int(pred_counts.sum()), pred_counts.size
    if n < MIN_SAMPLES_PER_CLASS * num_classes:
        return None
    # Without labels, a balanced test set (as in CIFAR) is the reasonable expectation.
    true_counts = cm.sum(axis=1) if cm is not None else np.full(num_classes, 1.0)
    expected = true_counts / true_counts.sum()
    pred_entropy, true_entropy = _normalised_entropy(pred_counts), _normalised_entropy(true_counts)
    shift = _distribution_shift(pred_counts, expected)
    # Predictions more spread out than the labels (e.g. a one-class subset) have no deficit.
    deficit = true_entropy - pred_entropy
    warning_deficit, error_deficit = collapse_thresholds(num_classes)
    if deficit < warning_deficit or not shift["over"].size:
        return None

    top = _top_set(pred_counts)
    share, expected_share = float(pred_counts[top].sum() / n), float(expected[top].sum())
    ratio = share / expected_share if expected_share > 0 else float("inf")
    precision = per_class_metrics(cm)["precision"] if cm is not None else None
    top_rows = [{"class": names[i], "id": int(i), "share": float(pred_counts[i] / n),
                 "expected_share": float(expected[i]),
                 **({"precision": float(precision[i])} if precision is not None else {})}
                for i in top[:MAX_LISTED]]
    never = np.flatnonzero(pred_counts == 0)
    reference = "the true labels" if cm is not None else "a balanced test set (no labels given)"
    evidence = {
        "top_classes": top_rows, "top_classes_share": share, "expected_top_share": expected_share,
        "over_representation": ratio if np.isfinite(ratio) else None, "expected_from": reference,
        "prediction_tv": shift["tv"], "prediction_tv_noise": shift["tv"] - shift["tv_excess"],
        "over_predicted_classes": _names_of(shift["over"], names), "over_predicted_share": shift["over_share"],
        "over_predicted_label_share": shift["over_label_share"],
        "starved_classes": _names_of(shift["starved"], names), "num_starved": int(shift["starved"].size),
        "starved_share": shift["starved_share"], "starved_label_share": shift["starved_label_share"],
        "pred_entropy": pred_entropy, "true_entropy": true_entropy, "entropy_deficit": deficit,
        "never_predicted": int(never.size), "never_predicted_classes": _names_of(never, names),
    }
    detail = (
        f"The predicted classes are concentrated far more than {reference}: normalised entropy {pred_entropy:.2f} "
        f"against {true_entropy:.2f} (a deficit of {deficit:.2f}; cifarlab's calibration on real models puts the "
        f"line between honest evaluations and broken ones at {warning_deficit:g} for {num_classes} classes); the "
        f"distance between the two distributions (total variation) is {shift['tv']:.2f}, and {never.size} of "
        f"{num_classes} classes are never predicted. A model that puts most inputs into a few classes usually sees "
        "inputs unlike its training inputs: preprocessing differs between training and evaluation (missing /255, "
        "other normalisation or channel order). Less often the model never learned or learned very little "
        "(diverged training, an untrained or wrong checkpoint, a single short epoch)."
    )
    severity = "error" if deficit >= error_deficit else "warning"
    return Finding("prediction-collapse", severity, _shift_words(shift, names, num_classes, cm is not None),
                   detail, evidence, fix=_PREPROCESSING_FIX, score=_SCORE_COLLAPSE + deficit)


def _is_permutation(cm: np.ndarray, remapped: float) -> bool:
    """Re-mapping gains a lot, and the re-mapped accuracy is clearly above chance."""
    n = int(cm.sum())
    if n < MIN_SAMPLES_PER_CLASS * cm.shape[0]:
        return False  # with few samples per class, matching noise alone gains 30+ points
    return _clear_gain(cm, remapped, permutation_min_gain(n, cm.shape[0]))


def _is_shift(cm: np.ndarray, shifted: float) -> bool:
    """Reading the predictions as one cyclic shift of the labels gains a lot (see SHIFT_EXPLAINS)."""
    return _clear_gain(cm, shifted, PERMUTATION_MIN_GAIN)


def _clear_gain(cm: np.ndarray, realigned: float, min_gain: float) -> bool:
    """Realigned accuracy beats accuracy by min_gain and PERMUTATION_MIN_FACTOR, clearly above chance."""
    n = int(cm.sum())
    accuracy = float(np.trace(cm) / n)
    if realigned - accuracy < min_gain or realigned < PERMUTATION_MIN_FACTOR * accuracy:
        return False
    return all(_above_chance(realigned, _chance_level(cm), n))


def permutation_min_gain(n: int, num_classes: int) -> float:
    """The gain a re-mapping must bring: PERMUTATION_MIN_GAIN, more where noise alone re-maps well."""
    return max(PERMUTATION_MIN_GAIN, PERMUTATION_NOISE / np.sqrt(n / num_classes))


def _permutation_finding(cm: np.ndarray, names: list[str], col_of_row: np.ndarray,
                         remapped: float) -> Finding | None:
    """The model is good once predicted classes are re-mapped: labels and predictions are misaligned."""
    shifts = _shift_accuracies(cm)
    k = int(np.argmax(shifts[1:])) + 1
    shifted = _is_shift(cm, float(shifts[k]))
    if not (shifted or _is_permutation(cm, remapped)):
        return None
    num_classes, accuracy = cm.shape[0], float(np.trace(cm) / cm.sum())
    moved = np.flatnonzero((col_of_row != np.arange(num_classes)) & (cm.sum(axis=1) > 0))
    # A shift is the story when the full re-mapping adds little beyond it, or no more than
    # re-mapping noise adds (on a weak model, noise re-maps a few more classes).
    beyond_shift = remapped - float(shifts[k])
    is_shift = shifted and (shifts[k] >= SHIFT_EXPLAINS * remapped
                            or beyond_shift < permutation_min_gain(int(cm.sum()), cm.shape[0]))
    signed_k = k if k <= num_classes // 2 else k - num_classes  # -1 reads better than C-1
    evidence = {
        "accuracy": accuracy, "remapped_accuracy": remapped, "classes_moved": int(moved.size),
        "kind": "cyclic-shift" if is_shift else "permutation",
        "mapping": [{"true": names[i], "predicted": names[col_of_row[i]]} for i in moved[:MAX_LISTED]],
        "mapping_truncated": bool(moved.size > MAX_LISTED),
    }
    if is_shift:
        evidence.update({"shift": signed_k, "shift_accuracy": float(shifts[k])})
        title = (f"Predictions are the labels shifted by {signed_k} (pred = (true {'+' if signed_k > 0 else '-'} "
                 f"{abs(signed_k)}) mod {num_classes}): accuracy {_pct(accuracy)}, {_pct(float(shifts[k]))} aligned")
        fix = (f"labels are offset by {signed_k}: use y_true = (y_true + {signed_k}) % {num_classes}, or fix the "
               "label map / class order (e.g. 0- vs 1-based class ids)")
    else:
        title = (f"Labels and predictions are misaligned: re-mapping {moved.size} of {num_classes} classes "
                 f"raises accuracy from {_pct(accuracy)} to {_pct(remapped)}")
        fix = ("use the class order the model was trained with (e.g. the label map saved with the model) "
               "instead of a re-sorted or re-indexed one; evidence.mapping lists true -> predicted")
    detail = (
        f"Measured accuracy is {_pct(accuracy)}, but matching each true class to one predicted class "
        f"(linear_sum_assignment on the confusion matrix) gives {_pct(remapped)}: the model separates the "
        "classes well and only the class ids disagree. This comes from a label map or class order that "
        "differs between training and evaluation, not from the model."
    )
    return Finding("label-permutation", "error", title, detail, evidence, fix=fix,
                   score=_SCORE_PERMUTATION + remapped - accuracy)


def _coarse_accuracy(cm: np.ndarray, coarse_of_fine: np.ndarray) -> tuple[str, float] | None:
    """("coarse-labels" | "coarse-predictions", accuracy once fine ids are mapped to coarse), or None.

    Coarse labels with fine predictions: every label is below 20, and a prediction j counts
    as correct for label i when coarse(j) == i. The other way round for coarse predictions.
    """
    num_coarse = int(coarse_of_fine.max()) + 1
    rows_used, cols_used = np.flatnonzero(cm.sum(axis=1)), np.flatnonzero(cm.sum(axis=0))
    n = cm.sum()
    if rows_used.max() < num_coarse <= cols_used.max():
        return "coarse-labels", float(cm[coarse_of_fine[None, :] == np.arange(cm.shape[0])[:, None]].sum() / n)
    if cols_used.max() < num_coarse <= rows_used.max():
        return "coarse-predictions", float(cm[coarse_of_fine[:, None] == np.arange(cm.shape[1])[None, :]].sum() / n)
    return None


def _fine_coarse_finding(cm: np.ndarray) -> Finding | None:
    """CIFAR-100 fine and coarse (superclass) ids mixed up between predictions and labels."""
    if cm.shape[0] != len(CIFAR100_COARSE_OF_FINE) or not _enough_samples(int(cm.sum()), 20):
        return None
    mixed = _coarse_accuracy(cm, np.asarray(CIFAR100_COARSE_OF_FINE))
    if mixed is None:
        return None
    kind, mapped = mixed
    accuracy, n = float(np.trace(cm) / cm.sum()), int(cm.sum())
    if mapped - accuracy < PERMUTATION_MIN_GAIN or mapped < PERMUTATION_MIN_FACTOR * accuracy \
            or not all(_above_chance(mapped, 1 / 20, n)):
        return None
    if kind == "coarse-labels":
        title = (f"Fine predictions (100 classes) are scored against coarse labels (20 superclasses): mapping "
                 f"each prediction to its superclass raises accuracy from {_pct(accuracy)} to {_pct(mapped)}")
        fix = ("score against the fine labels (CIFAR-100's fine_labels / label_mode='fine'), or compare "
               "superclasses: coarse_of_fine[y_pred] == y_coarse")
    else:
        title = (f"Coarse predictions (20 superclasses) are scored against fine labels (100 classes): mapping "
                 f"each label to its superclass raises accuracy from {_pct(accuracy)} to {_pct(mapped)}")
        fix = ("score against the coarse labels (CIFAR-100's coarse_labels / label_mode='coarse'), the ones "
               "the model was trained on")
    detail = ("The labels only take the 20 superclass ids" if kind == "coarse-labels" else
              "The predictions only take the 20 superclass ids") + (
        " while the other side uses all 100 CIFAR-100 classes, and reading both as superclasses (CIFAR-100's "
        "fine-to-coarse table) makes them agree: the model is fine, the evaluation compares two label sets.")
    evidence = {"kind": kind, "accuracy": accuracy, "coarse_accuracy": mapped, "num_samples": n}
    return Finding("fine-coarse-labels", "error", title, detail, evidence, fix=fix,
                   score=_SCORE_PERMUTATION + 1 + mapped - accuracy)


def _near_chance_detail(stats: dict[str, Any], confidence: _Confidence | None,
                        learned: bool) -> tuple[str, str, str]:
    """(severity, detail, fix) for chance accuracy with diverse predictions: shuffled labels or no learning.

    `learned`: the accuracy recorded at training was clearly above chance, which rules out
    "never learned" whatever the confidence looks like.
    """
    spread = (f"Predictions are spread over {stats['classes_predicted']} classes (entropy "
              f"{stats['pred_entropy']:.2f} against {stats['true_entropy']:.2f} for the labels)")
    if confidence is not None and not confidence.confident and not learned:
        return ("error", f"{spread} but with a mean confidence of only {confidence.mean:.2f}: the model has most "
                "likely not learned (untrained or freshly initialised weights, a wrong checkpoint, diverged training).",
                "check that the trained weights are loaded and that the training loss went down")
    confident = f", with a mean confidence of {confidence.mean:.2f}" if confidence is not None else ""
    if learned:
        confident += f", from a model that reached {_pct(stats['trained_accuracy'])} at training"
    return ("error", f"{spread}{confident}, yet they match the labels only as often as chance. A good-looking "
            "prediction distribution with chance accuracy typically means labels were shuffled relative to the "
            "images, e.g. a Keras generator with shuffle=True during predict, or labels collected in a "
            "separate pass over a shuffled loader" + ("" if confidence is not None else
                                                        "; less often a model that never learned") + ".",
            "evaluate with shuffle=False / keep images and labels in the same order "
            "(collect labels in the same loop as the predictions)")


def _near_chance_finding(cm: np.ndarray, stats: dict[str, Any], confidence: _Confidence | None,
                         cause: Finding | None, trained_accuracy: float | None = None) -> Finding | None:
    """Accuracy not clearly above chance; the detail depends on what else was found."""
    n, accuracy, chance = int(cm.sum()), stats["accuracy"], _chance_level(cm)
    significant, useful = _above_chance(accuracy, chance, n)
    if significant and useful:
        return None
    evidence = {"accuracy": accuracy, "chance": chance, "num_samples": n,
                "z_score": float((accuracy - chance) / np.sqrt(chance * (1 - chance) / n))}
    title = f"Accuracy {_pct(accuracy)} is not clearly above chance ({_pct(chance)})"
    if useful:  # above chance by a useful margin, only too few samples to be sure
        return Finding("near-chance", "info", title, f"With {n} samples a weak model cannot be told from "
                       "chance; evaluate on more samples.", evidence, fix="evaluate on more samples",
                       score=_SCORE_INFO)
    if cause is not None and cause.id in ("label-permutation", "fine-coarse-labels"):
        return Finding("near-chance", "info", title, f"Explained by the {cause.id} finding above.", evidence,
                       fix=cause.fix, score=_SCORE_INFO)
    if cause is not None:  # collapse: a model predicting few classes cannot beat chance
        return Finding("near-chance", "warning", title, "Part of the prediction collapse above: a model that "
                       "predicts a few classes cannot beat chance.", evidence, fix=cause.fix,
                       score=_SCORE_NEAR_CHANCE)
    learned = trained_accuracy is not None and trained_accuracy >= chance + NEAR_CHANCE_TRAINED_MARGIN
    severity, detail, fix = _near_chance_detail({**stats, "trained_accuracy": trained_accuracy}, confidence,
                                                learned)
    return Finding("near-chance", severity, title, detail, evidence, fix=fix, score=_SCORE_NEAR_CHANCE)


def _gap_finding(accuracy: float, trained_accuracy: float, others: list[Finding]) -> Finding | None:
    """Accuracy far below the one recorded at training time."""
    halved = accuracy < TRAIN_EVAL_GAP_RATIO * trained_accuracy
    if not halved and trained_accuracy - accuracy <= TRAIN_EVAL_GAP_POINTS:
        return None
    causes = [f.id for f in others if f.severity in ("error", "warning")]
    if causes:
        detail = f"The drop is explained by the {', '.join(causes)} finding(s) above."
    else:
        detail = ("The predictions look otherwise normal, so the usual causes are a subtler preprocessing "
                  "difference (normalisation statistics, resizing, channel order), the model left in training "
                  "mode (dropout active, batch-norm using batch statistics) or a different checkpoint. If the "
                  "recorded number is training-set accuracy, over-fitting also explains a gap.")
    severity = "error" if halved and not any(f.severity == "error" for f in others) else "warning"
    return Finding("train-eval-gap", severity,
                   f"Accuracy {_pct(accuracy)} is far below the {_pct(trained_accuracy)} recorded at training",
                   detail, {"accuracy": accuracy, "trained_accuracy": trained_accuracy,
                            "drop": trained_accuracy - accuracy},
                   fix="call model.eval() before predicting and run `cifarlab diagnose --model MODEL --images X` "
                       "to probe preprocessing and train/eval mode", score=_SCORE_GAP)


def _confidence_findings(confidence: _Confidence | None) -> list[Finding]:
    """Info-level notes on over-confidence and calibration; never a failure on their own."""
    if confidence is None or confidence.ece is None:
        return []
    findings = []
    share = confidence.confidently_wrong_share
    if share is not None and share > CONFIDENTLY_WRONG_INFO_SHARE:
        findings.append(Finding(
            "confidently-wrong", "info", f"{_pct(share)} of predictions are wrong with confidence >= "
            f"{CONFIDENTLY_WRONG}", "Many confident mistakes point at systematic errors (misaligned labels, "
            "shifted inputs) rather than hard examples.", {"confidently_wrong_share": share,
                                                           "mean_confidence_wrong": confidence.mean_wrong},
            score=_SCORE_INFO))
    if confidence.ece > ECE_INFO:
        findings.append(Finding(
            "calibration", "info", f"Expected calibration error is {confidence.ece:.2f}",
            f"Over {ECE_BINS} equal-width confidence bins, confidence and accuracy differ by {confidence.ece:.2f} "
            f"on average (mean confidence {confidence.mean:.2f}); confidences should not be read as probabilities.",
            {"expected_calibration_error": confidence.ece, "mean_confidence": confidence.mean},
            fix="calibrate with temperature scaling on a validation split if probabilities matter",
            score=_SCORE_INFO - 1))
    return findings


# --------------------------------------------------------------------------- #
# Assembly
# --------------------------------------------------------------------------- #


def _summary(stats: dict[str, Any], names: list[str], named: bool) -> dict[str, Any]:
    summary = dict(stats)
    summary["top_class_ids"] = stats["top_classes"]
    if named:
        summary["top_classes"] = [names[i] for i in stats["top_classes"]]
    return summary


def _diagnose(pred_counts: np.ndarray, cm: np.ndarray | None, names: list[str], named: bool,
              trained_accuracy: float | None, confidence: _Confidence | None) -> Diagnosis:
    true_counts = cm.sum(axis=1) if cm is not None else None
    stats = _stats_from_counts(pred_counts, true_counts, int(np.trace(cm)) if cm is not None else None)
    diagnosis = Diagnosis(summary=_summary(stats, names, named))
    collapse = _collapse_finding(pred_counts, cm, names)
    findings = [collapse] if collapse else []
    if cm is not None:
        col_of_row, remapped = _best_remapping(cm)
        diagnosis.summary["remapped_accuracy"] = remapped
        # Mixed fine/coarse ids also re-map well; the specific finding explains both.
        permutation = _fine_coarse_finding(cm) or _permutation_finding(cm, names, col_of_row, remapped)
        findings += [permutation] if permutation else []
        near = _near_chance_finding(cm, stats, confidence, permutation or collapse, trained_accuracy)
        findings += [near] if near else []
        if trained_accuracy is not None:
            gap = _gap_finding(stats["accuracy"], trained_accuracy, findings)
            findings += [gap] if gap else []
    if confidence is not None:
        diagnosis.summary.update(confidence.summary())
    findings += _confidence_findings(confidence)
    for finding in findings:
        diagnosis.add(finding)
    return diagnosis


def analyze_confusion(cm: np.ndarray, class_names: list[str] | None = None, *,
                      trained_accuracy: float | None = None) -> Diagnosis:
    """Diagnose a (C, C) confusion matrix of counts (row = true class, column = predicted class).

    Findings: prediction-collapse, label-permutation, near-chance, train-eval-gap
    (only with ``trained_accuracy``, a fraction such as 0.9). Classes without
    samples (empty rows) are allowed.
    """
    counts = _validated_matrix(cm)
    names = _validated_names(class_names, counts.shape[0])
    trained = _validated_trained_accuracy(trained_accuracy)
    return _diagnose(counts.sum(axis=0), counts, names, class_names is not None, trained, None)


# --------------------------------------------------------------------------- #
# Predictions
# --------------------------------------------------------------------------- #


def _labels(y_true: Any, num_classes: int, num_samples: int) -> tuple[np.ndarray, bool]:
    """Class ids from ``y_true`` (ids or one-hot / per-class scores), and whether it was one-hot."""
    arr = np.asarray(y_true)
    one_hot = arr.ndim == 2
    if one_hot:
        if arr.shape != (num_samples, num_classes):
            raise InputError(f"one-hot y_true must have shape ({num_samples}, {num_classes}) (samples x classes), "
                             f"got {arr.shape}; or pass one class id per sample.")
        arr = as_probabilities(arr).argmax(axis=1)
    labels = as_class_ids(arr, num_classes, "y_true")
    if labels.size != num_samples:
        raise InputError(f"y_true has {labels.size} labels but y_pred has {num_samples} predictions; "
                         "they must describe the same samples in the same order.")
    return labels, one_hot


def _probabilities(probs: Any, num_classes: int, num_samples: int) -> tuple[np.ndarray, bool]:
    """(N, C) probabilities, softmaxing them when they look like logits; and whether they did."""
    arr = as_probabilities(probs, num_samples=num_samples)
    if arr.shape[1] != num_classes:
        raise InputError(f"probs has {arr.shape[1]} columns but num_classes is {num_classes}; "
                         "pass one probability (or logit) per class.")
    if is_probability(arr):
        return arr, False
    return softmax(arr), True


def _expected_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Sum over equal-width bins of |accuracy - mean confidence|, weighted by the bin's share of samples."""
    # Bins are (0, 1/15], (1/15, 2/15], ...; a confidence of exactly 0 joins the first bin.
    bins = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    conf_sum = np.bincount(bins, weights=confidence, minlength=ECE_BINS)
    correct_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=ECE_BINS)
    return float(np.abs(correct_sum - conf_sum).sum() / confidence.size)


def _confidence_stats(probs: np.ndarray, pred: np.ndarray, labels: np.ndarray | None) -> _Confidence:
    # The probability given to the prediction actually made (= max prob when y_pred = argmax).
    conf = probs[np.arange(pred.size), pred]
    stats = _Confidence(mean=float(conf.mean()), num_classes=probs.shape[1])
    if labels is None:
        return stats
    correct = pred == labels
    stats.mean_correct = float(conf[correct].mean()) if correct.any() else None
    stats.mean_wrong = float(conf[~correct].mean()) if (~correct).any() else None
    stats.confidently_wrong_share = float((~correct & (conf >= CONFIDENTLY_WRONG)).mean())
    stats.ece = _expected_calibration_error(conf, correct)
    return stats


def _checked_num_classes(num_classes: Any) -> int:
    num_classes = check_num_classes(num_classes)
    if num_classes < 2:
        raise InputError(f"num_classes must be at least 2 for a classifier, got {num_classes}.")
    return num_classes


def analyze_predictions(y_pred: np.ndarray, num_classes: int, *, y_true: np.ndarray | None = None,
                        probs: np.ndarray | None = None, class_names: list[str] | None = None,
                        trained_accuracy: float | None = None) -> Diagnosis:
    """Diagnose predicted class ids, with optional labels and probabilities.

    ``y_true`` may be class ids (N,) or one-hot (N, C) (``summary["y_true_was_one_hot"]``).
    ``probs`` (N, C) that are not probabilities (values outside [0, 1] or rows not
    summing to 1) are treated as logits and softmaxed (``summary["probs_were_logits"]``).
    With labels, everything ``analyze_confusion`` reports; with probabilities, also
    mean confidence (and, with labels, confidence of correct and wrong predictions,
    the share confidently wrong and the expected calibration error).
    """
    num_classes = _checked_num_classes(num_classes)
    pred = as_class_ids(y_pred, num_classes, "y_pred")
    if pred.size == 0:
        raise InputError("y_pred is empty; a diagnosis needs at least one prediction.")
    names = _validated_names(class_names, num_classes)
    trained = _validated_trained_accuracy(trained_accuracy)
    labels, one_hot = _labels(y_true, num_classes, pred.size) if y_true is not None else (None, False)
    scores, were_logits = _probabilities(probs, num_classes, pred.size) if probs is not None else (None, False)

    cm = confusion_matrix(labels, pred, num_classes) if labels is not None else None
    confidence = _confidence_stats(scores, pred, labels) if scores is not None else None
    diagnosis = _diagnose(np.bincount(pred, minlength=num_classes), cm, names, class_names is not None,
                          trained, confidence)
    diagnosis.summary.update({"probs_were_logits": were_logits, "y_true_was_one_hot": one_hot})
    if scores is not None:
        diagnosis.summary["probs_argmax_agreement"] = float((scores.argmax(axis=1) == pred).mean())
    return diagnosis
