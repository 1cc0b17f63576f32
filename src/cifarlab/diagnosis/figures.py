"""The pictures of a diagnosis, drawn from what it was computed from (`Diagnosis.counts`):
the confusion matrix with the columns that take most predictions outlined, and how often
each class is predicted against how often it occurs. Drawing only; `diagnose` computes."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from cifarlab.diagnosis.report import Diagnosis
from cifarlab.plots import confusion_matrix_figure, prediction_histogram_figure, save_png


def diagnosis_figures(diagnosis: Diagnosis) -> dict[str, Figure]:
    """File name -> figure: confusion_matrix.png (where labels were known) and
    class_histogram.png; none where the model could not run on the inputs as given."""
    counts = diagnosis.counts
    if counts is None:
        return {}
    verdict = f"diagnosis: {diagnosis.verdict}"
    collapsed = any(f.id == "prediction-collapse" for f in diagnosis.findings)
    highlight = diagnosis.summary.get("top_class_ids", []) if collapsed else []
    figures = {}
    if counts.confusion is not None:
        title = (f"Confusion matrix ({verdict}; outlined: classes that take most predictions)" if highlight
                 else f"Confusion matrix ({verdict})")
        figures["confusion_matrix.png"] = confusion_matrix_figure(counts.confusion, counts.names,
                                                                  highlight_columns=highlight, title=title)
    figures["class_histogram.png"] = prediction_histogram_figure(
        counts.true, counts.predicted, counts.names,
        title=f"How often each class is predicted vs how often it occurs ({verdict})")
    return figures


def save_diagnosis_plots(diagnosis: Diagnosis, plot_dir: str | Path) -> list[Path]:
    """The figures as PNGs in `plot_dir` (made if missing); returns their paths."""
    return [save_png(figure, Path(plot_dir) / name) for name, figure in diagnosis_figures(diagnosis).items()]
