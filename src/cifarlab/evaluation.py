"""Evaluate a model on a dataset split and write the files people look at.

The result is an `EvaluationResult` (cifarlab.results), written to an evaluation folder
(metrics.json, cm.json, probs.npy, labels.npy, confused_examples.npz) together with the
pictures drawn here: confusion_matrix.png, and coarse_confusion_matrix.png for CIFAR-100.

Test-time augmentation (`tta`) averages the logits over mirrored ("flip") and also
1-pixel-shifted ("flip+translate") copies of each image; the model file is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.augment import fold_coordinates
from cifarlab.choices import TTA_MODES
from cifarlab.data import Dataset, check_classes, split_images
from cifarlab.errors import CifarlabError
from cifarlab.formats import ModelLike, open_classifier
from cifarlab.metrics import classification_report, softmax
from cifarlab.modelfile import Classifier, validate_images
from cifarlab.plots import plot_confusion_matrix
from cifarlab.results import ConfusedExamples, EvaluationResult, ModelSummary, claim_folder
from cifarlab.runner import parse_preprocessing


def evaluate(model: ModelLike, *, data: str | Dataset | None = None,
             split: str = "test", out_dir: str | Path | None = None,
             progress: bool = True, tta: bool | str | None = None,
             label: str | None = None, preprocessing: str | None = None,
             overwrite: bool = False) -> EvaluationResult:
    """Evaluate `model` on `split` ("val" or "test") of `data` and write the report files.

    `model`: a Classifier, a model.safetensors, an .onnx file (run with onnxruntime; see
    cifarlab.onnx), a Keras .keras/.h5 file or a live keras.Model (see cifarlab.keras).
    `data` defaults to the dataset the model was trained on; "val" is the exact validation
    split recorded in the model file. `preprocessing` ("scale", "standardize:MEAN:STD",
    "none") states what a Keras or foreign ONNX model's training script did to the pixels,
    where the model does not record it. `tta`:
    True or "flip", or "flip+translate" (see predict_logits_tta). `label` names this
    evaluation in metrics.json and the plot titles (e.g. "correct preprocessing"). Returns
    the EvaluationResult, written to `out_dir` (default: beside the model file, see
    default_out_dir); a folder holding another evaluation is refused unless `overwrite`.
    """
    tta = "flip" if tta is True else (tta or None)
    if tta is not None and tta not in TTA_MODES:
        raise CifarlabError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    model_path = Path(model) if isinstance(model, (str, Path)) else None
    stated = parse_preprocessing(preprocessing) if preprocessing is not None else None
    model, dataset = open_classifier(model, data, stated, progress)
    check_classes(model.classes, dataset)
    images, labels = split_images(model.meta.get("split"), dataset, split)

    logits = model.predict_logits(images) if tta is None else predict_logits_tta(model, images, tta)
    probs = softmax(logits)
    meta = model.meta
    report = classification_report(probs, labels, model.classes,
                                   coarse_of_fine=meta.get("coarse_of_fine"),
                                   coarse_names=meta.get("coarse_classes"))
    summary = ModelSummary(str(model_path) if model_path else None, meta["architecture"],
                           meta.get("metrics"), meta.get("expects"))
    result = replace(EvaluationResult.from_dict(report, "the evaluation"), label=label, split=split, tta=tta,
                     dataset_name=dataset.name, dataset_source=dataset.source, model=summary)
    out = Path(out_dir) if out_dir else default_out_dir(model_path, split, tta)
    claim_folder(out, result, overwrite)
    result = result.to_folder(out, probs, labels)
    ConfusedExamples.choose(images, labels, probs, result.most_confused).save(out / "confused_examples.npz")
    draw_confusion_matrices(result, out)
    return result


def predict_logits_tta(model: Classifier, images: Any, tta: str = "flip",
                       batch_size: int = 1000) -> np.ndarray:
    """Logits (N, C) averaged over the test-time views of raw uint8 NHWC images (tta_views)."""
    batch = validate_images(images, model.image_size)
    return np.stack([model.predict_logits(view, batch_size) for view in tta_views(batch, tta)]).mean(0)


def tta_views(images: torch.Tensor, tta: str) -> Iterator[torch.Tensor]:
    """Each image and its mirror; with "flip+translate" also both shifted 1 pixel up-left and
    down-right (airbench's choice: 6 passes, where all 4 axis shifts would take 10)."""
    shifts = [(0, 0), (-1, -1), (1, 1)] if tta == "flip+translate" else [(0, 0)]
    _, h, w, _ = images.shape
    for dy, dx in shifts:
        # Border filled by reflection, as training's random shifts do.
        rows = fold_coordinates(torch.arange(h) + dy, h, "reflect")
        cols = fold_coordinates(torch.arange(w) + dx, w, "reflect")
        view = images[:, rows][:, :, cols]
        yield view
        yield view.flip(2)


def default_out_dir(model_path: Path | None, split: str, tta: str | None = None) -> Path:
    """eval-model-test beside model.safetensors; the format and the TTA named too where they
    differ (eval-model-onnx-test, eval-model-test-tta-flip), so that two evaluations of one
    run never share a folder."""
    name = "eval" if model_path is None else f"eval-{model_path.stem}"
    if model_path is not None and model_path.suffix not in ("", ".safetensors"):
        name += f"-{model_path.suffix[1:]}"
    name += f"-{split}" + (f"-tta-{tta}" if tta else "")
    return (model_path.parent if model_path is not None else Path()) / name


def draw_confusion_matrices(result: EvaluationResult, out: Path) -> None:
    """confusion_matrix.png (and coarse_confusion_matrix.png) beside the result's files."""
    where = f"{result.dataset_name} {result.split} split"
    if result.label:
        where = f"{where}, {result.label}"
    architecture = result.model.architecture if result.model else "a model"
    plot_confusion_matrix(result.confusion_matrix, result.classes, out / "confusion_matrix.png",
                          title=f"Confusion matrix — {where}, {architecture} (accuracy {result.accuracy:.1%})")
    if result.coarse is not None:
        plot_confusion_matrix(result.coarse.confusion_matrix, result.coarse.classes,
                              out / "coarse_confusion_matrix.png",
                              title=f"Superclass confusion — {where} (coarse accuracy {result.coarse.accuracy:.1%})")
