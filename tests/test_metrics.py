"""Tests for cifarlab.metrics against hand-computed values (no scikit-learn)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cifarlab.errors import InputError
from cifarlab.metrics import (
    as_count_matrix,
    classification_report,
    coarse_confusion,
    confusion_matrix,
    format_report,
    load_confusion_json,
    most_confused_pairs,
    per_class_metrics,
    save_confusion_json,
    top_k_accuracy,
)

# Hand example, 4 classes: class 2 has support but is never predicted; class 3 is
# predicted once but has no support.
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 3, 0, 1])
EXPECTED_CM = np.array(
    [
        [2, 1, 0, 0],
        [0, 2, 0, 1],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
    ]
)
NAMES = ["cat", "dog", "frog", "ship"]


def one_hot_probs(pred: np.ndarray, num_classes: int, confidence: float = 0.7) -> np.ndarray:
    """Probabilities whose argmax is ``pred``: ``confidence`` on it, the rest spread evenly."""
    probs = np.full((len(pred), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


# --------------------------------------------------------------------------- #
# confusion_matrix
# --------------------------------------------------------------------------- #


def test_confusion_matrix_hand_example() -> None:
    cm = confusion_matrix(Y_TRUE, Y_PRED, 4)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, EXPECTED_CM)


def test_confusion_matrix_accepts_lists_and_integral_floats() -> None:
    cm = confusion_matrix(list(Y_TRUE), Y_PRED.astype(np.float32), 4)
    np.testing.assert_array_equal(cm, EXPECTED_CM)


def test_confusion_matrix_out_of_range_names_values() -> None:
    with pytest.raises(InputError, match=r"\[0, 4\).*\[4, 7\]"):
        confusion_matrix([0, 4, 7, 4], [0, 1, 2, 3], 4)
    with pytest.raises(InputError, match=r"y_pred.*\[-1\]"):
        confusion_matrix([0, 1], [0, -1], 4)


def test_confusion_matrix_mismatched_lengths() -> None:
    with pytest.raises(InputError, match="same length.*3 and 2"):
        confusion_matrix([0, 1, 2], [0, 1], 3)


def test_confusion_matrix_non_integer_float_labels() -> None:
    with pytest.raises(InputError, match=r"non-integer values \[0\.5"):
        confusion_matrix(np.array([0.5, 1.0]), np.array([0, 1]), 2)
    with pytest.raises(InputError, match="non-integer"):
        confusion_matrix(np.array([np.nan, 1.0]), np.array([0, 1]), 2)


def test_confusion_matrix_rejects_2d_and_bad_num_classes() -> None:
    with pytest.raises(InputError, match="1-D"):
        confusion_matrix(np.zeros((2, 2), dtype=int), np.zeros(4, dtype=int), 2)
    with pytest.raises(InputError, match="num_classes"):
        confusion_matrix([0], [0], 0)
    with pytest.raises(InputError, match="dtype"):
        confusion_matrix(np.array(["a", "b"]), np.array([0, 1]), 2)


# --------------------------------------------------------------------------- #
# per-class metrics, top-k, confused pairs, coarse
# --------------------------------------------------------------------------- #


def test_per_class_metrics_hand_values() -> None:
    m = per_class_metrics(EXPECTED_CM)
    # Column totals (predicted) are [3, 4, 0, 1]; row totals (support) [3, 3, 2, 0].
    np.testing.assert_allclose(m["precision"], [2 / 3, 2 / 4, 0.0, 0.0])
    np.testing.assert_allclose(m["recall"], [2 / 3, 2 / 3, 0.0, 0.0])
    f1_dog = 2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3)  # = 4/7
    np.testing.assert_allclose(m["f1"], [2 / 3, f1_dog, 0.0, 0.0])
    np.testing.assert_array_equal(m["support"], [3, 3, 2, 0])
    assert m["support"].dtype == np.int64


def test_top_k_accuracy_constructed() -> None:
    probs = np.array(
        [
            [0.1, 0.2, 0.3, 0.4],  # true 3: rank 0
            [0.1, 0.2, 0.3, 0.4],  # true 2: rank 1
            [0.4, 0.3, 0.2, 0.1],  # true 3: rank 3
            [0.25, 0.25, 0.25, 0.25],  # true 2: all tied, lower ids win -> rank 2
        ]
    )
    y = np.array([3, 2, 3, 2])
    assert [top_k_accuracy(probs, y, k) for k in (1, 2, 3, 4, 10)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_top1_equals_argmax_accuracy_with_ties() -> None:
    rng = np.random.default_rng(0)
    # Coarsely quantised scores produce many ties.
    probs = rng.integers(0, 3, size=(200, 5)).astype(float)
    y = rng.integers(0, 5, size=200)
    assert top_k_accuracy(probs, y, 1) == pytest.approx(float((probs.argmax(1) == y).mean()))


def test_top_k_accuracy_bad_inputs() -> None:
    probs = np.full((2, 3), 1 / 3)
    with pytest.raises(InputError, match="2 rows but y_true has 3"):
        top_k_accuracy(probs, [0, 1, 2], 1)
    with pytest.raises(InputError, match="k must be at least 1"):
        top_k_accuracy(probs, [0, 1], 0)
    with pytest.raises(InputError, match="NaN"):
        top_k_accuracy(np.array([[np.nan, 1.0, 0.0]] * 2), [0, 1], 1)


def test_most_confused_pairs_order_and_fields() -> None:
    cm = np.array([[5, 1, 3], [4, 6, 0], [0, 2, 7]])
    pairs = most_confused_pairs(cm, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("b", "a", 4),
        ("a", "c", 3),
        ("c", "b", 2),
        ("a", "b", 1),
    ]
    assert pairs[0] == {
        "true": "b", "predicted": "a", "true_id": 1, "predicted_id": 0, "count": 4, "rate": 0.4
    }
    assert pairs[1]["rate"] == pytest.approx(3 / 9)
    assert len(most_confused_pairs(cm, ["a", "b", "c"], k=2)) == 2


def test_most_confused_pairs_ties_are_deterministic() -> None:
    pairs = most_confused_pairs(EXPECTED_CM, NAMES)
    assert [(p["true_id"], p["predicted_id"]) for p in pairs] == [(0, 1), (1, 3), (2, 0), (2, 1)]


def test_most_confused_pairs_wrong_name_count() -> None:
    with pytest.raises(InputError, match="expected 4, got 3"):
        most_confused_pairs(EXPECTED_CM, NAMES[:3])


def test_coarse_confusion_sums_blocks() -> None:
    # Coarse 0 = fine {0, 2}, coarse 1 = fine {1, 3}.
    coarse = coarse_confusion(EXPECTED_CM, [0, 1, 0, 1], 2)
    np.testing.assert_array_equal(coarse, [[3, 2], [0, 3]])
    assert coarse.sum() == EXPECTED_CM.sum()


def test_coarse_confusion_bad_mapping() -> None:
    with pytest.raises(InputError, match="4 classes but coarse_of_fine has 3"):
        coarse_confusion(EXPECTED_CM, [0, 1, 0], 2)
    with pytest.raises(InputError, match="coarse_of_fine.*\\[2\\]"):
        coarse_confusion(EXPECTED_CM, [0, 1, 2, 1], 2)


# --------------------------------------------------------------------------- #
# classification_report / format_report
# --------------------------------------------------------------------------- #


def test_classification_report_fields() -> None:
    probs = one_hot_probs(Y_PRED, 4)
    report = classification_report(
        probs, Y_TRUE, NAMES, coarse_of_fine=[0, 1, 0, 1], coarse_names=["animal", "other"], top_k=2
    )
    json.dumps(report)  # must be JSON-serialisable as is
    cm = np.array(report["confusion_matrix"])
    np.testing.assert_array_equal(cm, EXPECTED_CM)
    assert report["num_samples"] == 8
    assert report["num_classes"] == 4
    assert report["accuracy"] == pytest.approx(np.trace(cm) / cm.sum()) == pytest.approx(4 / 8)
    assert report["top2_accuracy"] == pytest.approx(top_k_accuracy(probs, Y_TRUE, 2))
    assert report["macro_f1"] == pytest.approx((2 / 3 + 4 / 7) / 4)
    assert report["macro_precision"] == pytest.approx((2 / 3 + 1 / 2) / 4)
    assert report["macro_recall"] == pytest.approx((2 / 3 + 2 / 3) / 4)
    assert report["mean_confidence"] == pytest.approx(0.7)
    assert report["per_class"][2] == {
        "class": "frog", "id": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2
    }
    assert report["most_confused"] == most_confused_pairs(EXPECTED_CM, NAMES)
    coarse = report["coarse"]
    assert coarse["classes"] == ["animal", "other"]
    assert coarse["confusion_matrix"] == [[3, 2], [0, 3]]
    assert coarse["accuracy"] == pytest.approx(6 / 8)
    assert coarse["most_confused"][0]["true"] == "animal"


def test_classification_report_omits_top_k_when_trivial_and_coarse_when_absent() -> None:
    report = classification_report(one_hot_probs(Y_PRED, 4), Y_TRUE, NAMES)  # top_k=5 >= 4 classes
    assert not any(key.startswith("top") for key in report)
    assert "coarse" not in report


def test_classification_report_bad_inputs() -> None:
    probs = one_hot_probs(Y_PRED, 4)
    with pytest.raises(InputError, match="8 rows but y_true has 7"):
        classification_report(probs, Y_TRUE[:7], NAMES)
    with pytest.raises(InputError, match="expected 4, got 3"):
        classification_report(probs, Y_TRUE, NAMES[:3])
    with pytest.raises(InputError, match="softmax"):
        classification_report(probs * 5 - 1, Y_TRUE, NAMES)  # looks like logits
    with pytest.raises(InputError, match="both coarse_of_fine and coarse_names"):
        classification_report(probs, Y_TRUE, NAMES, coarse_of_fine=[0, 1, 0, 1])
    with pytest.raises(InputError, match="2-D"):
        classification_report(probs[0], Y_TRUE, NAMES)


def test_format_report_mentions_key_numbers() -> None:
    report = classification_report(
        one_hot_probs(Y_PRED, 4), Y_TRUE, NAMES, coarse_of_fine=[0, 1, 0, 1], coarse_names=["a", "b"], top_k=2
    )
    text = format_report(json.loads(json.dumps(report)))  # also works on a report read back from JSON
    assert "accuracy: 50.00%" in text
    assert "top-2 accuracy" in text
    assert "macro F1" in text
    assert "coarse accuracy: 75.00%" in text
    worst_section = text.split("worst")[1].split("most confused")[0]
    assert worst_section.index("frog") < worst_section.index("dog")  # frog F1 0 is worse than dog 4/7
    assert "cat -> dog: 1" in text


# --------------------------------------------------------------------------- #
# JSON round trip and refusals
# --------------------------------------------------------------------------- #


def test_save_load_round_trip_and_exact_layout(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cm.json"
    save_confusion_json(EXPECTED_CM, path)
    # Exactly what `json.dump(cm.tolist(), f)` writes, nothing else.
    assert path.read_text() == json.dumps(EXPECTED_CM.tolist())
    loaded = load_confusion_json(path)
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, EXPECTED_CM)


def test_load_accepts_integral_floats(tmp_path: Path) -> None:
    path = tmp_path / "cm.json"
    path.write_text("[[1.0, 2.0], [0, 3]]")
    np.testing.assert_array_equal(load_confusion_json(path), [[1, 2], [0, 3]])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[[1, 2, 3], [4, 5, 6]]", "square.*row 0 has 3"),
        ("[[1, 2], [3]]", "square.*row 1 has 1"),
        ("[[1, -2], [3, 4]]", "row 0, column 1 must be a non-negative count, got -2"),
        ("[[1, 2.5], [3, 4]]", "row 0, column 1 must be an integer count, got non-integer 2.5"),
        ('[[1, "2"], [3, 4]]', "must be an integer count, got '2'"),
        ("[[1, true], [3, 4]]", "must be an integer count, got True"),
        ("[[5]]", "at least 2 classes"),
        ('{"matrix": [[1, 0], [0, 1]]}', "list of rows"),
        ("[1, 2]", "list of rows"),
        ("[[1, 2], [3, 4]", "not valid JSON"),
    ],
)
def test_load_refuses_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "cm.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_confusion_json(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_confusion_json(tmp_path / "nope.json")


def test_save_refuses_normalised_matrix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a normalised matrix"):
        save_confusion_json(np.array([[0.5, 0.5], [0.0, 1.0]]), tmp_path / "cm.json")


# --------------------------------------------------------------------------- #
# Property test
# --------------------------------------------------------------------------- #


@st.composite
def label_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    num_classes = draw(st.integers(min_value=1, max_value=12))
    n = draw(st.integers(min_value=1, max_value=200))
    labels = st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)
    return np.array(draw(labels)), np.array(draw(labels)), num_classes


@settings(max_examples=100, deadline=None)
@given(label_pairs())
def test_confusion_matrix_marginals(data: tuple[np.ndarray, np.ndarray, int]) -> None:
    y_true, y_pred, num_classes = data
    cm = confusion_matrix(y_true, y_pred, num_classes)
    n = len(y_true)
    assert cm.shape == (num_classes, num_classes)
    assert cm.sum() == n
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(y_true, minlength=num_classes))
    np.testing.assert_array_equal(cm.sum(axis=0), np.bincount(y_pred, minlength=num_classes))
    assert np.trace(cm) / n == pytest.approx(float((y_true == y_pred).mean()))


def test_counts_whose_total_would_wrap_int64_are_refused(tmp_path: Path) -> None:
    """Each cell within the per-cell bound, but 1,100 x 1,100 of them sum beyond int64: before,
    diagnose printed num_samples -3.3e18 and accuracy 258% and called the model healthy."""
    from cifarlab.diagnosis import diagnose

    cm = np.full((1100, 1100), 2**53 // 1000, dtype=np.int64)
    with pytest.raises(InputError, match=r"holds 10,898,[0-9,]+ samples in all, more than any real evaluation"):
        diagnose(confusion=cm)
    path = tmp_path / "cm.json"
    path.write_text(json.dumps([[2**52, 2**52], [1, 7]]))
    with pytest.raises(InputError, match=r"cm.json holds 9,007,199,254,74[0-9,]+ samples in all"):
        load_confusion_json(path)
    assert as_count_matrix([[2**52, 2**52 - 8], [1, 7]]).sum() == 2**53  # at the bound: kept, exact
