"""cifarlab's metrics against scikit-learn's on random inputs: the same numbers, by an independent implementation."""

import numpy as np
import pytest

from cifarlab.metrics import confusion_matrix, per_class_metrics, softmax, top_k_accuracy

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_confusion_and_per_class_metrics_match_sklearn(seed, num_classes):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    y_true = rng.integers(0, num_classes, n)
    # Mostly right, with a skew towards a few classes, so some classes are never predicted.
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, max(1, num_classes // 3), n))
    labels = np.arange(num_classes)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    np.testing.assert_array_equal(cm, sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels))
    ours = per_class_metrics(cm)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(ours["precision"], precision)
    np.testing.assert_allclose(ours["recall"], recall)
    np.testing.assert_allclose(ours["f1"], f1)
    np.testing.assert_array_equal(ours["support"], support)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_accuracy_matches_sklearn(seed, k):
    rng = np.random.default_rng(seed)
    num_classes, n = 20, 500
    probs = softmax(rng.normal(size=(n, num_classes)))  # continuous scores: no ties to break
    y_true = rng.integers(0, num_classes, n)
    expected = sklearn_metrics.top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(num_classes))
    assert top_k_accuracy(probs, y_true, k) == pytest.approx(expected)
