"""Evaluate a model on a dataset split and write the files people look at.

Outputs in the evaluation folder:
    metrics.json              accuracy, top-5, per-class precision/recall/F1, most-confused pairs
                              (and the coarse-label view for CIFAR-100)
    cm.json                   the confusion matrix as a list of rows (row = true, column = predicted)
    confusion_matrix.png      the same, drawn with class names
    coarse_confusion_matrix.png   for CIFAR-100
    probs.npy, labels.npy     the predicted probabilities and true labels, for later diagnosis
    confused_examples.npz     a few images of each of the most-confused pairs (save_confused_examples),
                              for `cifarlab report`

Test-time augmentation (`tta`) averages the logits over mirrored ("flip") and also
1-pixel-shifted ("flip+translate") copies of each image; the model file is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.augment import fold_coordinates
from cifarlab.choices import TTA_MODES
from cifarlab.data import Dataset, check_classes, split_images
from cifarlab.errors import CifarlabError
from cifarlab.formats import ModelLike, open_classifier
from cifarlab.metrics import classification_report, save_confusion_json, softmax
from cifarlab.modelfile import Classifier, validate_images
from cifarlab.plots import plot_confusion_matrix
from cifarlab.runner import parse_preprocessing


def evaluate(model: ModelLike, *, data: str | Dataset | None = None,
             split: str = "test", out_dir: str | Path | None = None,
             progress: bool = True, tta: bool | str | None = None,
             label: str | None = None, preprocessing: str | None = None) -> dict[str, Any]:
    """Evaluate `model` on `split` ("val" or "test") of `data` and write the report files.

    `model`: a Classifier, a model.safetensors, an .onnx file (run with onnxruntime; see
    cifarlab.onnx), a Keras .keras/.h5 file or a live keras.Model (see cifarlab.keras).
    `data` defaults to the dataset the model was trained on; "val" is the exact validation
    split recorded in the model file. `preprocessing` ("scale", "standardize:MEAN:STD",
    "none") states what a Keras or foreign ONNX model's training script did to the pixels,
    where the model does not record it. `tta`:
    True or "flip", or "flip+translate" (see predict_logits_tta). `label` names this
    evaluation in metrics.json and the plot titles (e.g. "correct preprocessing"). Returns
    the metrics dictionary (also metrics.json).
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
    if label:
        report["label"] = label
    report["split"] = split
    report["tta"] = tta
    report["dataset"] = {"name": dataset.name, "source": dataset.source}
    report["model"] = {"path": str(model_path) if model_path else None,
                       "architecture": meta["architecture"],
                       "trained_metrics": meta.get("metrics")}
    if meta.get("expects"):  # a model from another tool: what its file says it takes
        report["model"]["expects"] = meta["expects"]

    out = Path(out_dir) if out_dir else default_out_dir(model_path, split)
    write_outputs(report, probs, labels, model, out)
    save_confused_examples(out / "confused_examples.npz", images, labels, probs, report["most_confused"])
    report["out_dir"] = str(out)
    return report


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


def default_out_dir(model_path: Path | None, split: str) -> Path:
    if model_path is None:
        return Path(f"eval-{split}")
    return model_path.parent / f"eval-{model_path.stem}-{split}"


def write_outputs(report: dict[str, Any], probs: np.ndarray, labels: np.ndarray,
                  model: Classifier, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    cm = np.asarray(report["confusion_matrix"])
    save_confusion_json(cm, out / "cm.json")
    np.save(out / "probs.npy", probs.astype(np.float32))
    np.save(out / "labels.npy", labels.astype(np.int64))
    where = f"{report['dataset']['name']} {report['split']} split"
    if report.get("label"):
        where = f"{where}, {report['label']}"
    plot_confusion_matrix(cm, model.classes, out / "confusion_matrix.png",
                          title=f"Confusion matrix — {where}, {model.meta['architecture']} "
                                f"(accuracy {report['accuracy']:.1%})")
    coarse = report.get("coarse")
    if coarse:
        plot_confusion_matrix(np.asarray(coarse["confusion_matrix"]), coarse["classes"],
                              out / "coarse_confusion_matrix.png",
                              title=f"Superclass confusion — {where} "
                                    f"(coarse accuracy {coarse['accuracy']:.1%})")


def save_confused_examples(path: Path, images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                           pairs: list[dict[str, Any]], *, max_pairs: int = 5, per_pair: int = 4) -> Path:
    """Write up to `per_pair` images of each of the first `max_pairs` most-confused pairs.

    The evaluation folder keeps no images otherwise, and a report that shows *what* a
    "cat -> dog" confusion looks like is far more telling than the count. Flat arrays, one
    row per example: images (M, H, W, 3) uint8, true_ids, predicted_ids, indices (into the
    evaluated split), confidence (probability of the predicted class) and pair (rank of the
    pair in `pairs`). Within a pair the most confident mistakes come first.
    """
    predicted = probs.argmax(1)
    rows: list[np.ndarray] = []
    for rank, pair in enumerate(pairs[:max_pairs]):
        hits = np.flatnonzero((labels == pair["true_id"]) & (predicted == pair["predicted_id"]))
        order = np.argsort(-probs[hits, pair["predicted_id"]], kind="stable")
        rows.append(np.stack([hits[order[:per_pair]], np.full(min(per_pair, len(hits)), rank)], 1))
    chosen = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
    index, pair_rank = chosen[:, 0].astype(np.int64), chosen[:, 1].astype(np.int64)
    np.savez_compressed(
        path, images=np.asarray(images[index], dtype=np.uint8),
        true_ids=labels[index].astype(np.int64), predicted_ids=predicted[index].astype(np.int64),
        indices=index, confidence=probs[index, predicted[index]].astype(np.float32), pair=pair_rank)
    return path
