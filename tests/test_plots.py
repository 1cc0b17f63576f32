"""Tests for cifarlab.plots: valid, non-blank PNGs that depend on their input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.errors import InputError
from cifarlab.plots import plot_confusion_matrix, plot_history, plot_prediction_histogram

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_confusion(num_classes: int, seed: int, accuracy: float = 0.8) -> np.ndarray:
    """A plausible confusion matrix: mostly diagonal, errors on a few neighbouring classes."""
    rng = np.random.default_rng(seed)
    n = 100 * num_classes
    y = rng.integers(0, num_classes, n)
    pred = np.where(rng.random(n) < accuracy, y, (y + rng.integers(1, 4, n)) % num_classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L"), dtype=np.float64)


def assert_reasonable_png(path: Path, min_side: int) -> np.ndarray:
    pixels = load_png(path)
    assert min(pixels.shape) >= min_side
    assert max(pixels.shape) <= 4000
    assert pixels.std() > 10  # not a blank canvas
    return pixels


def test_ten_class_confusion_png(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "cm10.png"
    out = plot_confusion_matrix(
        random_confusion(10, seed=0), CIFAR10_NAMES, path,
        title="Confusion matrix — cifar10 test split, model X (accuracy 80.0%)",
    )
    assert out == path
    assert_reasonable_png(path, min_side=600)


def test_hundred_class_confusion_png(tmp_path: Path) -> None:
    path = tmp_path / "cm100.png"
    names = [f"class_{i}" for i in range(100)]
    plot_confusion_matrix(random_confusion(100, seed=0), names, path, title="cifar100")
    assert_reasonable_png(path, min_side=1500)  # large enough for 100 legible labels


def test_different_matrices_give_different_images(tmp_path: Path) -> None:
    a = plot_confusion_matrix(random_confusion(10, 1), CIFAR10_NAMES, tmp_path / "a.png", title="t")
    worse = random_confusion(10, 2, accuracy=0.3)
    b = plot_confusion_matrix(worse, CIFAR10_NAMES, tmp_path / "b.png", title="t")
    pa, pb = load_png(a), load_png(b)
    assert pa.shape == pb.shape
    assert np.abs(pa - pb).mean() > 1


@pytest.mark.parametrize("normalize", [True, False])
def test_log_scale_and_counts_with_empty_row(tmp_path: Path, normalize: bool) -> None:
    cm = random_confusion(10, 3)
    cm[4] = 0  # a class with no samples must not break normalisation or the log scale
    path = plot_confusion_matrix(
        cm, CIFAR10_NAMES, tmp_path / "log.png", title="t", normalize=normalize, log_scale=True
    )
    assert_reasonable_png(path, min_side=600)


def test_all_zero_matrix_log_scale_falls_back(tmp_path: Path) -> None:
    path = plot_confusion_matrix(np.zeros((3, 3), dtype=int), ["a", "b", "c"], tmp_path / "z.png",
                                 title="empty", log_scale=True)
    load_png(path)


def test_confusion_plot_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected 10, got 9"):
        plot_confusion_matrix(random_confusion(10, 0), CIFAR10_NAMES[:9], tmp_path / "x.png", title="t")
    with pytest.raises(InputError, match="square"):
        plot_confusion_matrix(np.zeros((2, 3), dtype=int), ["a", "b"], tmp_path / "x.png", title="t")


HEADER = "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"


def test_history_png_with_and_without_validation(tmp_path: Path) -> None:
    epochs = range(1, 11)
    with_val = tmp_path / "h1.csv"
    with_val.write_text(HEADER + "".join(
        f"{e},{2 / e:.3f},{1 - 1 / (e + 1):.3f},{2.2 / e:.3f},{1 - 1.2 / (e + 1):.3f},0.1,10.0\n" for e in epochs
    ))
    no_val = tmp_path / "h2.csv"
    no_val.write_text(HEADER + "".join(f"{e},{2 / e:.3f},{1 - 1 / (e + 1):.3f},,,0.1,10.0\n" for e in epochs))
    a = plot_history(with_val, tmp_path / "h1.png", title="with validation")
    b = plot_history(no_val, tmp_path / "h2.png", title="without validation")
    pa, pb = assert_reasonable_png(a, 400), assert_reasonable_png(b, 400)
    assert np.abs(pa - pb).mean() > 0.1


def test_history_single_epoch(tmp_path: Path) -> None:
    csv_path = tmp_path / "h.csv"
    csv_path.write_text(HEADER + "1,2.0,0.3,,,0.1,5\n")
    assert_reasonable_png(plot_history(csv_path, tmp_path / "h.png", title="one epoch"), 400)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("epoch,train_loss\n1,2.0\n", "missing columns"),
        (HEADER, "no epochs"),
        (HEADER + "1,abc,0.3,,,0.1,5\n", "line 2: 'train_loss' must be a number \\(finite\\), got str 'abc'"),
        # Cells that parse as floats but are no history (before, drawn without a word):
        (HEADER + "1,nan,0.3,,,0.1,5\n", "line 2: 'train_loss' must be a number \\(finite\\), got float nan"),
        (HEADER + "1,2.0,inf,,,0.1,5\n", "line 2: 'train_acc' must be a number in \\[0, 1\\]"),
        (HEADER + "1,2.0,5,,,0.1,5\n", "'train_acc' must be a number in \\[0, 1\\]"),
        (HEADER + "1.5,2.0,0.3,,,0.1,5\n", "'epoch' must be an integer"),
        (HEADER + "2,2.0,0.3,,,0.1,5\n1,2.0,0.3,,,0.1,5\n", "epochs must be 1..2 in order, got 2, 1"),
        (HEADER + "1,2.0\n", "line 2 has 2 cells, the header 7"),
        # Tracebacks before: csv.Error (a field over 128 KiB) and UnicodeDecodeError.
        (HEADER + "1," + "9" * 200_000 + ",0.3,,,0.1,5\n", "line 2: not CSV .field larger than field limit"),
        (HEADER.encode() + b"1,2.0,0.3,,,0.1,5\n\xff\xfe\n", "is not UTF-8 text"),
    ],
)
def test_history_bad_csv(tmp_path: Path, content: str | bytes, message: str) -> None:
    csv_path = tmp_path / "h.csv"
    csv_path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=message):
        plot_history(csv_path, tmp_path / "h.png", title="t")


def test_history_that_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a folder; pass the history.csv"):
        plot_history(tmp_path, tmp_path / "h.png", title="t")
    with pytest.raises(InputError, match="does not exist; pass the history.csv"):
        plot_history(tmp_path / "none.csv", tmp_path / "h.png", title="t")


def red_pixels(path: Path) -> int:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())


def test_highlighted_columns_are_outlined_in_red(tmp_path):
    cm = random_confusion(10, seed=0)
    plain = plot_confusion_matrix(cm, CIFAR10_NAMES, tmp_path / "plain.png", title="t")
    marked = plot_confusion_matrix(cm, CIFAR10_NAMES, tmp_path / "marked.png", title="t",
                                   highlight_columns=[3, 7])
    assert red_pixels(plain) == 0
    assert red_pixels(marked) > 500  # two full-height outlines


def test_prediction_histogram_shows_both_distributions(tmp_path):
    true_counts = np.full(100, 50)
    pred_counts = np.zeros(100, dtype=int)
    pred_counts[[3, 71]] = 2500
    path = plot_prediction_histogram(true_counts, pred_counts, [f"c{i}" for i in range(100)],
                                     tmp_path / "hist.png", title="collapsed")
    assert_reasonable_png(path, min_side=400)
    assert red_pixels(path) > 1000  # the two tall predicted bars
    only_pred = plot_prediction_histogram(None, pred_counts, [f"c{i}" for i in range(100)],
                                          tmp_path / "pred.png", title="no labels")
    assert not np.array_equal(load_png(path), load_png(only_pred))


def test_ten_thousand_classes_are_drawn_aggregated_not_one_bar_each(tmp_path):
    """Up to metrics.MAX_CLASSES classes: the matrix in blocks of classes, the histogram ranked.
    One bar and one tick label per class made a 1,400-inch figure that took minutes to draw."""
    rng = np.random.default_rng(0)
    n = 10_000
    y = rng.integers(0, n, 50_000)
    p = np.where(rng.random(50_000) < 0.5, y, 3)  # half the predictions collapse onto class 3
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (y, p), 1)
    names = [f"c{i}" for i in range(n)]
    hist = plot_prediction_histogram(np.bincount(y, minlength=n), np.bincount(p, minlength=n), names,
                                     tmp_path / "hist.png", title="histogram")
    matrix = plot_confusion_matrix(cm, names, tmp_path / "cm.png", title="matrix", highlight_columns=[3])
    assert Image.open(hist).size == (1500, 675)  # a 10 x 4.5 inch figure at 150 dpi
    assert max(Image.open(matrix).size) <= 2100
    # Block (0, 0) of the 20 x 20 classes holds class 3's column: its outline is drawn in red.
    pixels = np.asarray(Image.open(matrix).convert("RGB")).reshape(-1, 3)
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).any()


def test_figures_draw_on_the_callers_axes_and_render_in_memory():
    """scikit-learn's pattern: draw on the axes given, return the figure; saving is the caller's."""
    from matplotlib.figure import Figure

    from cifarlab.plots import confusion_matrix_figure, png_bytes, prediction_histogram_figure

    cm = random_confusion(10, seed=0)
    fig = Figure(figsize=(12, 5))
    left, right = fig.subplots(1, 2)
    assert confusion_matrix_figure(cm, CIFAR10_NAMES, title="mine", ax=left) is fig
    assert prediction_histogram_figure(cm.sum(1), cm.sum(0), CIFAR10_NAMES, title="hist", ax=right) is fig
    assert len(left.images) == 1 and left.get_title() == "mine"
    assert len(right.patches) == 20 and right.get_title() == "hist"  # a true and a predicted bar per class
    data = png_bytes(fig)
    assert data.startswith(b"\x89PNG") and Image.open(io.BytesIO(data)).size == (1800, 750)
    alone = confusion_matrix_figure(cm, CIFAR10_NAMES, title="alone")
    assert alone is not fig and len(alone.axes) == 2  # its own axes and the colour bar
