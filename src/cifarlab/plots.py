"""Plots of confusion matrices, class histograms, per-class accuracy and training history.

Computing and drawing are separate, as in scikit-learn: each ``*_figure`` function draws on
the caller's ``ax`` (a Figure is made when none is given) and returns the Figure, so a
notebook can place it in its own layout; ``save_png`` and ``png_bytes`` render one, and the
``plot_*`` functions are the one-line "draw and save" forms the CLI uses.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas
directly, never through pyplot: no global figure registry, no GUI backend, nothing to
close, and safe to call from worker threads or tests.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, cast

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from cifarlab.errors import InputError
from cifarlab.history import HISTORY_COLUMNS, read_history
from cifarlab.metrics import as_count_matrix

__all__ = ["confusion_matrix_figure", "history_figure", "per_class_accuracy_figure", "plot_confusion_matrix",
           "plot_history", "plot_per_class_accuracy", "plot_prediction_histogram", "png_bytes",
           "prediction_histogram_figure", "save_png"]

# Up to this many classes every cell gets its value written in it (CIFAR-10 size).
_ANNOTATE_MAX_CLASSES = 20
# Up to this many classes tick labels still fit (at 4.5 pt on a 14-inch figure);
# beyond it they would overlap, so they are left out and the axis label says so.
_LABEL_MAX_CLASSES = 120
# Beyond this many classes a confusion matrix is drawn in blocks of classes (counts summed):
# a 10,000-class matrix has more cells than the figure has pixels, and drawing it took
# minutes. `cifarlab diagnose` accepts up to metrics.MAX_CLASSES classes.
_MAX_DRAWN_SIDE = 500
_DPI = 150


def png_bytes(fig: Figure) -> bytes:
    """The figure rendered as PNG, in memory."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)  # attaches itself to fig; savefig then renders with Agg
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def save_png(fig: Figure, path: Path) -> Path:
    """Render the figure as a PNG file at ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig))
    return path


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The caller's axes and their figure, or a new figure of ``figsize`` with one axes."""
    if ax is not None:
        return cast(Figure, ax.figure), ax  # a SubFigure draws the same way
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _row_normalize(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its total; rows with no samples stay all zero."""
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    out = np.zeros(counts.shape, dtype=np.float64)
    np.divide(counts, totals, out=out, where=totals != 0)
    return out


def _color_norm(values: np.ndarray, normalize: bool, log_scale: bool, fit_max: bool = False) -> Normalize:
    positive = values[values > 0]
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    if fit_max and positive.size:  # diagonal masked: the largest mistake gets the darkest colour
        vmax = float(positive.max())
    # A log scale needs a positive lower bound; with nothing positive fall back to linear.
    if log_scale and positive.size:
        vmin = float(positive.min())
        return LogNorm(vmin=vmin, vmax=max(vmax, vmin * 10))
    return Normalize(vmin=0.0, vmax=vmax)


def _in_blocks(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """A matrix of more than _MAX_DRAWN_SIDE classes summed over blocks of consecutive classes."""
    n = counts.shape[0]
    block = -(-n // _MAX_DRAWN_SIDE)
    if block == 1:
        return counts, 1
    side = -(-n // block)
    padded = np.zeros((side * block, side * block), dtype=counts.dtype)
    padded[:n, :n] = counts
    return padded.reshape(side, block, side, block).sum(axis=(1, 3)), block


def _figure_size(num_classes: int) -> tuple[float, float]:
    if num_classes <= _ANNOTATE_MAX_CLASSES:
        return (8.0, 7.0)
    return (14.0, 13.0)  # the colour bar takes width, so slightly less height wastes less


def _set_class_ticks(ax: Axes, class_names: list[str]) -> tuple[str, str]:
    """Put class names on both axes if they fit; return the x and y axis labels."""
    n = len(class_names)
    if n > _LABEL_MAX_CLASSES:
        ax.set_xticks([])
        ax.set_yticks([])
        note = f" (labels omitted: {n} classes)"
        return "Predicted class" + note, "True class" + note
    ticks = np.arange(n)
    if n <= _ANNOTATE_MAX_CLASSES:
        ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
        ax.set_yticks(ticks, labels=class_names, fontsize=9)
    else:
        ax.set_xticks(ticks, labels=class_names, rotation=90, fontsize=4.5)
        ax.set_yticks(ticks, labels=class_names, fontsize=4.5)
        ax.tick_params(length=1.5, pad=1)
    return "Predicted class", "True class"


def _annotate_cells(ax: Axes, values: np.ndarray, norm: Normalize, normalize: bool) -> None:
    """Write each cell's value in it, dark on light cells and light on dark ones."""
    n = values.shape[0]
    fontsize = 8 if n <= 10 else 6
    for i in range(n):
        for j in range(n):
            v = values[i, j]
            if v == 0:
                continue  # blank zero cells keep the matrix readable
            text = f"{v:.2f}" if normalize else str(int(v))
            shade = float(np.clip(norm(v), 0, 1))
            color = "white" if shade > 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path, **options: Any) -> Path:
    """``confusion_matrix_figure`` saved as a PNG at ``path``; returns ``path``."""
    return save_png(confusion_matrix_figure(cm, class_names, **options), path)


def confusion_matrix_figure(
    cm: np.ndarray,
    class_names: list[str],
    *,
    title: str,
    normalize: bool = True,
    log_scale: bool = False,
    highlight_columns: list[int] | None = None,
    mask_diagonal: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Draw ``cm`` (rows = true class, columns = predicted class) on ``ax`` (or a new figure).

    ``normalize`` divides each row by its total so cells read as "fraction of the
    true class"; ``log_scale`` uses a logarithmic colour scale (zero cells are left
    blank), which makes small confusions visible next to a bright diagonal.
    ``highlight_columns`` outlines those predicted classes in red (the "vertical bars"
    of a collapsed model, as marked by the diagnosis). ``mask_diagonal`` greys out the
    correct predictions and scales the colours to the largest mistake, so that the
    confusions are not washed out by a bright diagonal. Returns the figure.
    """
    counts = as_count_matrix(cm)
    if len(class_names) != counts.shape[0]:
        raise InputError(f"class_names must have one name per class: expected {counts.shape[0]}, "
                         f"got {len(class_names)}.")
    counts, block = _in_blocks(counts)
    if block > 1:
        class_names = [f"{i * block}-{min((i + 1) * block, len(class_names)) - 1}" for i in range(len(counts))]
        highlight_columns = sorted({c // block for c in highlight_columns or []})
        title = f"{title} (in blocks of {block} classes)"
    n = counts.shape[0]
    values = _row_normalize(counts) if normalize else counts.astype(np.float64)
    if mask_diagonal:
        np.fill_diagonal(values, 0)  # out of the colour range; drawn grey below
    norm = _color_norm(values, normalize, log_scale, fit_max=mask_diagonal)
    blues = colormaps["Blues"]
    cmap = blues.with_extremes(bad=blues(0.0))  # masked zeros on a log scale show as the lowest colour

    fig, ax = _axes(ax, _figure_size(n))
    shown = np.ma.masked_less_equal(values, 0) if isinstance(norm, LogNorm) else values
    image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8 if n <= _ANNOTATE_MAX_CLASSES else 0.6)
    colorbar.set_label(("fraction of true class" if normalize else "count")
                       + (" (diagonal masked)" if mask_diagonal else ""))
    for i in range(n if mask_diagonal else 0):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, facecolor="#bdbdbd", edgecolor="none"))

    xlabel, ylabel = _set_class_ticks(ax, list(class_names))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if n <= _ANNOTATE_MAX_CLASSES:
        _annotate_cells(ax, values, norm, normalize)
    for column in highlight_columns or []:
        ax.add_patch(Rectangle((column - 0.5, -0.5), 1, n, fill=False, edgecolor="red", linewidth=1.5))
    # Long titles ("Confusion matrix — cifar100 test split, model ... (accuracy ...)") would be clipped.
    ax.set_title("\n".join(textwrap.wrap(title, 70 if n <= _ANNOTATE_MAX_CLASSES else 110)))
    return fig


def plot_prediction_histogram(y_true_counts: np.ndarray | None, y_pred_counts: np.ndarray,
                              class_names: list[str], path: Path, **options: Any) -> Path:
    """``prediction_histogram_figure`` saved as a PNG at ``path``; returns ``path``."""
    return save_png(prediction_histogram_figure(y_true_counts, y_pred_counts, class_names, **options), path)


def prediction_histogram_figure(y_true_counts: np.ndarray | None, y_pred_counts: np.ndarray,
                                class_names: list[str], *, title: str, ax: Axes | None = None) -> Figure:
    """Bars of how often each class is predicted, next to how often it truly occurs.

    A healthy model's predicted bars follow the true ones; a collapsed one shows a few
    tall bars and many empty classes.
    """
    n = len(class_names)
    if n > _LABEL_MAX_CLASSES:
        return _ranked_histogram(y_true_counts, y_pred_counts, title, ax)
    x = np.arange(n)
    fig, ax = _axes(ax, (max(8.0, n * 0.14), 4.5))
    width = 0.4 if y_true_counts is not None else 0.8
    if y_true_counts is not None:
        ax.bar(x - width / 2, y_true_counts, width, label="true class", color="#9ecae1")
    ax.bar(x + (width / 2 if y_true_counts is not None else 0), y_pred_counts, width,
           label="predicted class", color="#d62728")
    fontsize = 9 if n <= _ANNOTATE_MAX_CLASSES else 4.5
    ax.set_xticks(x, labels=class_names, rotation=90, fontsize=fontsize)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title("\n".join(textwrap.wrap(title, 110)))
    return fig


def _ranked_histogram(y_true_counts: np.ndarray | None, y_pred_counts: np.ndarray, title: str,
                      ax: Axes | None) -> Figure:
    """Too many classes for a bar each: the classes ranked by how often they are predicted,
    predictions as a filled curve and the true counts of the same classes as a line. A
    collapse shows as a tall head and a long empty tail."""
    order = np.argsort(-np.asarray(y_pred_counts), kind="stable")
    rank = np.arange(len(order))
    fig, ax = _axes(ax, (10.0, 4.5))
    ax.fill_between(rank, np.asarray(y_pred_counts)[order], step="mid", color="#d62728", alpha=0.7,
                    label="predicted class")
    if y_true_counts is not None:
        ax.step(rank, np.asarray(y_true_counts)[order], where="mid", color="#3182bd", linewidth=0.8,
                label="true class")
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_xlabel(f"classes, most predicted first ({len(order):,} classes; names omitted)")
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title("\n".join(textwrap.wrap(title, 110)))
    return fig


def plot_per_class_accuracy(accuracy: np.ndarray, class_names: list[str], path: Path, **options: Any) -> Path:
    """``per_class_accuracy_figure`` saved as a PNG at ``path``; returns ``path``."""
    return save_png(per_class_accuracy_figure(accuracy, class_names, **options), path)


def per_class_accuracy_figure(accuracy: np.ndarray, class_names: list[str], *, title: str,
                              overall: float | None = None, chance: float | None = None,
                              ax: Axes | None = None) -> Figure:
    """Each class's accuracy (recall) as a bar, best first, with the overall and chance levels.

    Sorted bars show at a glance whether a model is uniformly mediocre or perfect on a few
    classes and blind to the rest (the shape a preprocessing bug gives).
    """
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if len(class_names) != len(accuracy):
        raise InputError(f"class_names must have one name per class: expected {len(accuracy)}, "
                         f"got {len(class_names)}.")
    order = np.argsort(-accuracy, kind="stable")
    n = len(order)
    fig, ax = _axes(ax, (max(8.0, n * 0.14), 4.5))
    ax.bar(np.arange(n), accuracy[order], 0.8, color="#3182bd")
    for level, label, style in ((overall, "overall", "-"), (chance, "chance", ":")):
        if level is not None:
            ax.axhline(level, color="#d62728", linestyle=style, linewidth=1, label=f"{label} {level:.1%}")
    fontsize = 9 if n <= _ANNOTATE_MAX_CLASSES else 4.5
    ax.set_xticks(np.arange(n), labels=[class_names[i] for i in order], rotation=90, fontsize=fontsize)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (recall)")
    if overall is not None or chance is not None:
        ax.legend(loc="upper right")
    ax.set_title("\n".join(textwrap.wrap(title, 110)))
    return fig


# --------------------------------------------------------------------------- #
# Training history
# --------------------------------------------------------------------------- #


def _plot_pair(ax: Axes, epochs: np.ndarray, train: np.ndarray, val: np.ndarray, ylabel: str) -> None:
    # Markers keep a single-epoch run visible (a one-point line draws nothing).
    ax.plot(epochs, train, marker="o", markersize=3, label="train")
    # Validation may run only every few epochs; join the epochs that have it
    # instead of leaving gaps at the empty cells.
    has_val = ~np.isnan(val)
    if has_val.any():
        ax.plot(epochs[has_val], val[has_val], marker="o", markersize=3, label="validation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()


def plot_history(history_csv: Path, path: Path, *, title: str) -> Path:
    """``history_figure`` of a run's history.csv saved as a PNG at ``path``; returns ``path``."""
    return save_png(history_figure(read_history(history_csv), title=title), path)


def history_figure(history: list[dict[str, Any]], *, title: str, axes: tuple[Axes, Axes] | None = None) -> Figure:
    """Loss and accuracy vs epoch from a training history (``cifarlab.history.read_history``),
    on two axes (the caller's or new). Validation cells may be None (validation did not run
    that epoch); where none has it, only the training curves are drawn.
    """
    h = {c: np.array([math.nan if row[c] is None else row[c] for row in history], dtype=float)
         for c in HISTORY_COLUMNS}
    if axes is None:
        fig = Figure(figsize=(11.0, 4.5), layout="constrained")
        loss_ax, acc_ax = fig.subplots(1, 2)
    else:
        loss_ax, acc_ax = axes
        fig = cast(Figure, loss_ax.figure)
    _plot_pair(loss_ax, h["epoch"], h["train_loss"], h["val_loss"], "loss")
    loss_ax.set_title("loss")
    _plot_pair(acc_ax, h["epoch"], h["train_acc"], h["val_acc"], "accuracy")
    acc_ax.set_title("accuracy")
    fig.suptitle(title)
    return fig
