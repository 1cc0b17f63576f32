"""Explain why a classifier mainly predicts a few classes, from whatever the user has.

    diagnose(confusion=cm)                                  # only a confusion matrix
    diagnose(predictions=probs, labels=y)                   # model outputs (+ labels)
    diagnose(model="model.onnx", images=x, labels=y)        # a model and what it was fed
    diagnose(model="model.safetensors", data="cifar10", split="test")

Output-only analysis (collapse.py) finds the symptom: collapse, permuted labels, chance
accuracy, a gap to the accuracy recorded at training. With a model, probes.py finds the
cause: it compares the inputs with the training statistics stored in the model file and
re-runs the model under candidate corrections (divide by 255, swap BGR, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.choices import SPLITS
from cifarlab.diagnosis.collapse import analyze_confusion, analyze_predictions
from cifarlab.diagnosis.input_stats import input_findings
from cifarlab.diagnosis.inputs import as_labels, load_array
from cifarlab.diagnosis.probes import probe_findings, run_probes
from cifarlab.diagnosis.report import CAUSE_IDS, ClassCounts, Diagnosis, Finding
from cifarlab.diagnosis.train_mode import train_mode_finding
from cifarlab.errors import CifarlabError, InputError
from cifarlab.formats import open_model
from cifarlab.metrics import MAX_CLASSES, as_array, softmax
from cifarlab.runner import ModelRunner

__all__ = ["diagnose", "Diagnosis", "Finding"]

ArrayLike = Any  # np.ndarray, or a path to .npy/.npz/.csv


def diagnose(*, confusion: ArrayLike | None = None, predictions: ArrayLike | None = None,
             labels: ArrayLike | None = None, model: Any = None, images: ArrayLike | None = None,
             data: Any = None, split: str = "test", class_names: list[str] | None = None,
             max_images: int = 2000, plot_dir: str | Path | None = None, resize: bool = False) -> Diagnosis:
    """Diagnose a classifier from a confusion matrix, predictions, or a model and its inputs.

    Paths are read as .npy/.npz/.csv (and cm.json for `confusion`). With a model, give the
    images it was fed (`images`, optional `labels`) or a dataset (`data`, `split`); a
    cifarlab model defaults to the dataset it was trained on. `max_images` bounds the
    probes' cost. `plot_dir` also writes the confusion matrix and class histogram PNGs.
    `resize` resizes images of another size than the model's to its size (bicubic; see
    cifarlab.imageops.resize_images), keeping their dtype, scale and layout as given.
    """
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise CifarlabError(f"max_images must be a positive number of images, got {max_images!r}")
    if model is None and (images is not None or data is not None):
        raise CifarlabError("--images and --data need --model: which model was fed these images?")
    if model is not None and predictions is not None:
        raise CifarlabError("give either --model (cifarlab runs it) or --predictions (outputs you already have)")
    if model is not None:
        diagnosis, y_pred, y_true, names = _diagnose_model(model, images, labels, data, split,
                                                           class_names, max_images, resize)
    elif predictions is not None:
        diagnosis, y_pred, y_true, names = _diagnose_predictions(predictions, labels, class_names)
    elif confusion is not None:
        cm = _read_confusion(confusion)
        diagnosis = analyze_confusion(cm, class_names)
        diagnosis.counts = ClassCounts(class_names or [str(i) for i in range(len(cm))], cm.sum(0), cm)
    else:
        raise CifarlabError("nothing to diagnose: give a confusion matrix (--confusion), predictions "
                            "(--predictions [--labels]) or a model with its inputs (--model --images/--data)")
    if diagnosis.counts is None:
        diagnosis.counts = class_counts(y_pred, y_true, names)
    if plot_dir is not None:
        from cifarlab.diagnosis.figures import save_diagnosis_plots

        save_diagnosis_plots(diagnosis, plot_dir)
    return diagnosis


# ---- the three entry points --------------------------------------------------------------

def _read_confusion(confusion: ArrayLike) -> np.ndarray:
    from cifarlab.metrics import load_confusion_json

    if isinstance(confusion, (str, Path)):
        path = Path(confusion)
        return load_confusion_json(path) if path.suffix.lower() == ".json" else load_array(path, "confusion")
    return as_array(confusion, "confusion matrix")


def _diagnose_predictions(predictions: ArrayLike, labels: ArrayLike | None, class_names: list[str] | None):
    outputs = _array(predictions, "predictions")
    if outputs.size == 0:
        where = f" in {predictions}" if isinstance(predictions, (str, Path)) else ""
        raise InputError(f"the predictions{where} are empty (shape {outputs.shape}): there is nothing to diagnose; "
                         "save the model's outputs for the images first")
    raw_labels = None if labels is None else _array(labels, "labels")  # may be one-hot: analysis notes it
    y_true = None if raw_labels is None else as_labels(raw_labels)[0]
    if outputs.dtype == bool or not (np.issubdtype(outputs.dtype, np.integer)
                                     or np.issubdtype(outputs.dtype, np.floating)):
        raise InputError(f"predictions must be numbers: (N, C) probabilities/logits or (N,) class ids; "
                         f"got dtype {outputs.dtype}")
    if outputs.ndim == 2:  # probabilities or logits
        if outputs.shape[1] < 2 or not np.all(np.isfinite(outputs)):
            raise InputError(f"predictions (N, C) need at least 2 classes and finite values; got shape "
                             f"{outputs.shape}{'' if np.all(np.isfinite(outputs)) else ' with NaN or inf'}. "
                             "Check the model output (e.g. a diverged checkpoint).")
        probs, y_pred, num_classes = outputs, outputs.argmax(1), outputs.shape[1]
    elif outputs.ndim == 1:  # class ids
        probs, y_pred = None, as_labels(outputs)[0]
        largest = max(int(y_pred.max(initial=0)), int(y_true.max(initial=0)) if y_true is not None else 0)
        num_classes = len(class_names) if class_names else largest + 1
        if num_classes > MAX_CLASSES:
            raise InputError(f"the class ids go up to {largest:,}, which would mean {largest + 1:,} classes "
                             f"(cifarlab handles up to {MAX_CLASSES:,}); pass class ids 0..C-1")
    else:
        raise InputError(f"predictions must be (N, C) probabilities/logits or (N,) class ids; got shape {outputs.shape}")
    diagnosis = analyze_predictions(y_pred, num_classes, y_true=raw_labels, probs=probs, class_names=class_names)
    return diagnosis, y_pred, y_true, class_names


def _diagnose_model(model: Any, images: ArrayLike | None, labels: ArrayLike | None, data: Any,
                    split: str, class_names: list[str] | None, max_images: int, resize: bool = False):
    runner = open_model(model)
    dataset_names = None
    y: np.ndarray | None
    if images is None:
        x, y, dataset_names = _dataset_images(runner, data, split, resize)
    else:
        x = _checked_images(_array(images, "images"))
        x = _resized(x, runner) if resize else x
        y = None if labels is None else as_labels(_array(labels, "labels"))[0]
    if y is not None and len(y) != len(x):
        raise InputError(f"got {len(x)} images but {len(y)} labels; they must correspond one to one")
    names = class_names or runner.classes or dataset_names

    y_pred, diagnosis, logits = None, None, None
    try:
        logits = runner.logits(x)
    except InputError as exc:  # the model cannot even run on them: the probes say why
        diagnosis = Diagnosis(summary={"model": runner.name, "model_expects": runner.expects,
                                       "num_samples": len(x), "runs_as_given": False, "as_given_error": str(exc)})
    else:
        y_pred = logits.argmax(1)
        diagnosis = analyze_predictions(y_pred, logits.shape[1], y_true=y, probs=softmax(logits),
                                        class_names=names, trained_accuracy=runner.trained_accuracy)
        diagnosis.summary = {"model": runner.name, "model_expects": runner.expects, **diagnosis.summary}

    for finding in input_findings(x, runner):
        _merge(diagnosis, finding)
    diagnosis.probes = run_probes(runner, x, y, max_images=max_images, as_given_logits=logits)
    for finding in probe_findings(diagnosis.probes, labels_given=y is not None):
        _merge(diagnosis, finding)
    mode_finding = train_mode_finding(runner, x)
    if mode_finding is not None:
        _merge(diagnosis, mode_finding)
    if logits is None and not any(f.severity == "error" and f.id in CAUSE_IDS for f in diagnosis.findings):
        diagnosis.add(_cannot_run(runner, x, diagnosis.summary["as_given_error"]))
    _absorb_into_pairs(diagnosis)
    _explain_symptoms(diagnosis)
    return diagnosis, y_pred, y, names


def _cannot_run(runner: ModelRunner, images: np.ndarray, error: str) -> Finding:
    """The model could not run on the images as given, and no probe made it: that is the
    finding (never a "healthy" verdict about predictions that were never made)."""
    from cifarlab.runner import describe_spec

    return Finding(
        "input-shape", "error", "The model cannot run on these images as given",
        f"{error}. None of the candidate corrections (transposes, planar reshape) made them fit, so "
        "nothing about the model's predictions could be measured.",
        evidence={"images_shape": list(images.shape), "images_dtype": str(images.dtype),
                  "model_takes": describe_spec(runner.input_spec)},
        fix=f"convert the images to what the model takes: {describe_spec(runner.input_spec)}", score=1.0)


def _checked_images(images: np.ndarray) -> np.ndarray:
    """A batch of numeric images (rank 4; one rank-3 image becomes a batch of one), all finite.

    Any layout, dtype and value range is accepted on purpose: diagnosing those is the point.
    """
    if images.dtype == bool or not (np.issubdtype(images.dtype, np.integer)
                                    or np.issubdtype(images.dtype, np.floating)):
        raise InputError(f"--images must be numbers (uint8 pixels or floats); got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise InputError(f"--images must be a batch of images of rank 4, (N, H, W, C) or (N, C, H, W); "
                         f"got shape {images.shape}")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise InputError(f"--images contain {int((~np.isfinite(images)).sum())} NaN or infinite values; "
                         "a model cannot be diagnosed on them. Check the preprocessing that produced them.")
    return images


def _resized(images: np.ndarray, runner: ModelRunner) -> np.ndarray:
    """The images at the model's size, in their own layout (a layout mistake stays visible)."""
    from cifarlab.diagnosis.probes import channel_axis
    from cifarlab.imageops import resize_images

    height, width = runner.input_spec.get("height"), runner.input_spec.get("width")
    if height is None or width is None:
        raise InputError(f"{runner.name} does not declare its image size, so --resize cannot know the "
                         "target; resize the images yourself")
    axis = channel_axis(images)
    if axis is None:
        raise InputError(f"cannot resize images of shape {images.shape}: expected (N, H, W, 3) or (N, 3, H, W)")
    return resize_images(images, (int(height), int(width)), layout="NHWC" if axis == -1 else "NCHW")


def _dataset_images(runner: ModelRunner, data: Any, split: str,
                    resize: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A dataset split as raw uint8 images, and its class names; for a cifarlab model, "val" is
    its recorded split."""
    from cifarlab.data import Dataset, check_class_count, get_split, load_dataset, split_images

    spec = data or (runner.meta or {}).get("dataset", {}).get("spec")
    if spec is None:
        raise CifarlabError("which images should the model be diagnosed on? Pass --images (what you fed it) "
                            "or --data with --split")
    dataset = spec if isinstance(spec, Dataset) else load_dataset(spec, progress=False, resize=resize)
    if runner.classes is None:  # the dataset names the classes: their number must match the outputs
        check_class_count(runner.name, runner.num_classes, dataset)
    if runner.kind == "cifarlab" and runner.meta is not None:
        return (*split_images(runner.meta.get("split"), dataset, split), list(dataset.classes))
    if split not in SPLITS:
        raise CifarlabError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    return (*get_split(dataset, split), list(dataset.classes))


# ---- helpers ----------------------------------------------------------------------------

def _array(value: ArrayLike, what: str) -> np.ndarray:
    return load_array(value, what) if isinstance(value, (str, Path)) else as_array(value, what)


def _merge(diagnosis: Diagnosis, finding: Finding) -> None:
    """Add a finding; one finding per id, the stronger one keeping the other's evidence.

    The stored-statistics comparison and the probes often both name the same cause (e.g.
    input-scale): the reader should see one finding with both kinds of evidence. Its title is
    the verified one (a probe that re-ran the model: "multiplying them by 255 raises accuracy
    from 11% to 46%") whichever scores higher, since it states what the fix achieves.
    """
    order = {"error": 0, "warning": 1, "info": 2}
    for i, existing in enumerate(diagnosis.findings):
        if existing.id != finding.id:
            continue
        strong, weak = sorted([existing, finding], key=lambda f: (order[f.severity], -f.score))
        verified, other = (finding, existing) if "transform" in finding.evidence else (existing, finding)
        if "transform" in verified.evidence:
            strong.title, strong.fix = verified.title, verified.fix or other.fix
            strong.detail = f"{verified.detail} {other.detail}"
        else:
            strong.detail = f"{strong.detail} {weak.detail}"
        strong.evidence = {**weak.evidence, **strong.evidence}
        diagnosis.findings[i] = strong
        return
    diagnosis.add(finding)


def _absorb_into_pairs(diagnosis: Diagnosis) -> None:
    """A statistics-only finding (e.g. input-scale) that is one half of a verified pair joins it.

    Its fix alone would leave the other mistake in place, so it must not stand above the pair.
    """
    from cifarlab.diagnosis.probes import PROBES

    for pair in [f for f in diagnosis.findings if f.id == "two-mistakes"]:
        halves = {PROBES[step].finding for step in pair.evidence["steps"]}
        for finding in [f for f in diagnosis.findings if f.id in halves and "transform" not in f.evidence]:
            pair.detail = f"{pair.detail} {finding.detail}"
            pair.evidence = {**pair.evidence, "statistics": finding.evidence}
            diagnosis.findings.remove(finding)


_SYMPTOM_IDS = ("prediction-collapse", "near-chance", "train-eval-gap")


def _explain_symptoms(diagnosis: Diagnosis) -> None:
    """Symptoms that a found cause explains point at that cause and its fix, not a fix of their own."""
    causes = [f for f in diagnosis.ranked() if f.id in CAUSE_IDS and f.severity in ("error", "warning")]
    if not causes:
        return
    for finding in diagnosis.findings:
        if finding.id in _SYMPTOM_IDS:
            finding.fix = causes[0].fix
            if finding.id == "train-eval-gap":
                finding.detail = (f"The drop is explained by the {', '.join(f.id for f in causes)} "
                                  "finding(s) above.")
            elif "Explained by" not in finding.detail:
                finding.detail = f"Explained by the {causes[0].id} finding above. {finding.detail}"


def class_counts(y_pred: np.ndarray | None, y_true: np.ndarray | None,
                 names: list[str] | None) -> ClassCounts | None:
    """The outputs counted per class; None where the model could not run on the inputs."""
    from cifarlab.metrics import confusion_matrix

    if y_pred is None:
        return None
    num_classes = len(names) if names else int(max(y_pred.max(), y_true.max() if y_true is not None else 0) + 1)
    names = names or [str(i) for i in range(num_classes)]
    if y_true is None:
        return ClassCounts(names, np.bincount(y_pred, minlength=num_classes))
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return ClassCounts(names, cm.sum(0), cm)
