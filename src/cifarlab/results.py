"""The evaluation result: the record `evaluate` returns, its folder, and reading it back.

An evaluation folder holds
    metrics.json              the record below, as JSON (`EvaluationResult.to_dict`)
    cm.json                   the confusion matrix as a list of rows (row = true, column = predicted)
    probs.npy, labels.npy     the predicted probabilities and true labels, for later diagnosis
    confused_examples.npz     a few images of each of the most-confused pairs (`ConfusedExamples`)
and the PNGs that `cifarlab.evaluation` draws beside them. Writing (`to_folder`, `save`) and
reading (`from_folder`, `load`) sit next to each other here; reading validates every field
once (`cifarlab.schema`), so `cifarlab report` never meets a half-checked document.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.errors import InputError
from cifarlab.fileio import atomic_write
from cifarlab.metrics import MAX_CLASSES, as_count_matrix, load_confusion_json, save_confusion_json
from cifarlab.schema import DocumentView, Fields, read_json_file

EVALUATE_HINT = "run `cifarlab evaluate MODEL --out DIR` and pass DIR"


@dataclass(frozen=True)
class ClassScore:
    name: str
    id: int
    precision: float
    recall: float
    f1: float
    support: int

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.name, "id": self.id, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "support": self.support}

    @classmethod
    def read(cls, f: Fields) -> ClassScore:
        f.require("class", "id", "precision", "recall", "f1", "support")
        return cls(f.string("class"), f.integer("id", 0, MAX_CLASSES - 1), f.number("precision", 0, 1),
                   f.number("recall", 0, 1), f.number("f1", 0, 1), f.integer("support"))


@dataclass(frozen=True)
class ConfusedPair:
    """`count` images of class `true` predicted as `predicted` (`rate`: of the true class's images)."""

    true: str
    predicted: str
    true_id: int
    predicted_id: int
    count: int
    rate: float

    def to_dict(self) -> dict[str, Any]:
        return {"true": self.true, "predicted": self.predicted, "true_id": self.true_id,
                "predicted_id": self.predicted_id, "count": self.count, "rate": self.rate}

    @classmethod
    def read(cls, f: Fields, num_classes: int) -> ConfusedPair:
        f.require("true", "predicted", "true_id", "predicted_id", "count", "rate")
        return cls(f.string("true"), f.string("predicted"), f.integer("true_id", 0, num_classes - 1),
                   f.integer("predicted_id", 0, num_classes - 1), f.integer("count"), f.number("rate", 0, 1))


def _pairs(f: Fields, key: str, num_classes: int) -> list[ConfusedPair]:
    return [ConfusedPair.read(item, num_classes) for item in f.objects(key)] if key in f.data else []


def _matrix(f: Fields, key: str, num_classes: int) -> np.ndarray:
    try:
        cm = as_count_matrix(f.data[key], f"{f.where}: {key!r}")
    except InputError as exc:
        f.fail(str(exc).rstrip("."))
    if cm.shape[0] != num_classes:
        f.fail(f"{f.where}: the confusion matrix is {cm.shape[0]}x{cm.shape[0]} but {num_classes} classes are "
               "listed; the files come from different evaluations")
    return cm


@dataclass(frozen=True, eq=False)  # holds an array: compared through EvaluationResult's mapping view
class CoarseView:
    """The same predictions counted by superclass (CIFAR-100's 20 coarse labels)."""

    classes: list[str]
    accuracy: float
    confusion_matrix: np.ndarray
    most_confused: list[ConfusedPair]

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "classes": self.classes,
                "confusion_matrix": self.confusion_matrix.tolist(),
                "most_confused": [p.to_dict() for p in self.most_confused]}

    @classmethod
    def read(cls, f: Fields) -> CoarseView:
        f.require("accuracy", "classes", "confusion_matrix")
        classes = f.strings("classes")
        return cls(classes, f.number("accuracy", 0, 1), _matrix(f, "confusion_matrix", len(classes)),
                   _pairs(f, "most_confused", len(classes)))


@dataclass(frozen=True)
class ModelSummary:
    """Which model was evaluated: its file, architecture, and what its file records."""

    path: str | None
    architecture: str | None
    trained_metrics: dict[str, Any] | None = None  # the model file's own record of its training
    expects: dict[str, Any] | None = None  # a foreign model's input, read from its file

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "architecture": self.architecture, "trained_metrics": self.trained_metrics}
        return out | ({"expects": self.expects} if self.expects else {})

    @classmethod
    def read(cls, f: Fields) -> ModelSummary:
        return cls(f.optional_string("path"), f.optional_string("architecture"),
                   f.optional_dict("trained_metrics"), f.optional_dict("expects"))


@dataclass(frozen=True, eq=False)
class EvaluationResult(DocumentView):
    """One model evaluated on one split: the numbers, the matrix, and what was evaluated.

    It also reads as the metrics.json mapping (`result["accuracy"]`, `result["out_dir"]`),
    the shape `evaluate` returned before it was a record; two results are equal when those
    mappings are.
    """

    num_samples: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    mean_confidence: float
    per_class: list[ClassScore]
    most_confused: list[ConfusedPair]
    confusion_matrix: np.ndarray
    top_k: int | None = None  # k of `top_k_accuracy`; None where the classes are k or fewer
    top_k_accuracy: float | None = None
    coarse: CoarseView | None = None
    label: str | None = None  # names this evaluation in titles (e.g. "raw pixels")
    split: str | None = None
    tta: str | None = None
    dataset_name: str | None = None
    dataset_source: str | None = None
    model: ModelSummary | None = None
    out_dir: Path | None = None  # the folder it was written to

    @property
    def classes(self) -> list[str]:
        return [c.name for c in self.per_class]

    @property
    def num_classes(self) -> int:
        return len(self.per_class)

    @property
    def where(self) -> str:
        """What was measured on which split, e.g. "airbench on cifar10 test split"."""
        model = (self.model.architecture if self.model else None) or "an unnamed model"
        dataset = self.dataset_name or "unnamed data"
        return f"{model} on {dataset} {self.split} split" if self.split else f"{model} on {dataset}"

    @property
    def identity(self) -> tuple[Any, ...]:
        """What was evaluated, on what, how: two results with the same identity are one
        evaluation run twice."""
        model = (self.model.path, self.model.architecture) if self.model else None
        return model, self.dataset_name, self.split, self.tta, self.label

    # ---- metrics.json ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_samples": self.num_samples, "num_classes": self.num_classes,
                               "accuracy": self.accuracy}
        if self.top_k is not None:
            out[f"top{self.top_k}_accuracy"] = self.top_k_accuracy
        out |= {"macro_precision": self.macro_precision, "macro_recall": self.macro_recall,
                "macro_f1": self.macro_f1, "mean_confidence": self.mean_confidence,
                "per_class": [c.to_dict() for c in self.per_class],
                "most_confused": [p.to_dict() for p in self.most_confused]}
        if self.coarse is not None:
            out["coarse"] = self.coarse.to_dict()
        out["confusion_matrix"] = self.confusion_matrix.tolist()
        if self.label:
            out["label"] = self.label
        out |= {"split": self.split, "tta": self.tta,
                "dataset": {"name": self.dataset_name, "source": self.dataset_source},
                "model": self.model.to_dict() if self.model else None}
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "the metrics", cm: np.ndarray | None = None) -> EvaluationResult:
        """The record from a metrics.json document (or `classification_report`'s dict plus the
        evaluation's keys), every field checked. `cm`: the matrix when the document has none
        (an evaluation folder's cm.json)."""
        f = Fields(data, where, EVALUATE_HINT)
        f.require("accuracy", "per_class")
        per_class = [ClassScore.read(item) for item in f.objects("per_class")]
        if sorted(c.id for c in per_class) != list(range(len(per_class))) or len(per_class) < 2:
            f.fail(f"{where}: per_class must list classes 0..C-1 once each (C >= 2), got ids "
                   f"{[c.id for c in per_class][:8]}")
        per_class.sort(key=lambda c: c.id)
        n = len(per_class)
        if "confusion_matrix" in f.data:
            cm = _matrix(f, "confusion_matrix", n)
        elif cm is None:
            f.fail(f"{where} has no confusion_matrix and there is no cm.json next to it")
        elif cm.shape[0] != n:
            f.fail(f"{where}: the confusion matrix is {cm.shape[0]}x{cm.shape[0]} but per_class lists "
                   f"{n} classes; the files come from different evaluations")
        top_key = next((k for k in f.data if k.startswith("top") and k.endswith("_accuracy")), None)
        dataset = f.optional_object("dataset")
        model = f.optional_object("model")
        return cls(
            num_samples=f.integer("num_samples") if "num_samples" in f.data else int(cm.sum()),
            accuracy=f.number("accuracy", 0, 1),
            macro_precision=f.number("macro_precision", 0, 1), macro_recall=f.number("macro_recall", 0, 1),
            macro_f1=f.number("macro_f1", 0, 1), mean_confidence=f.number("mean_confidence", 0, 1),
            per_class=per_class, most_confused=_pairs(f, "most_confused", n), confusion_matrix=cm,
            top_k=_top_k(f, top_key) if top_key else None,
            top_k_accuracy=f.number(top_key, 0, 1) if top_key else None,
            coarse=CoarseView.read(f.object("coarse")) if f.has("coarse") else None,
            label=f.optional_string("label"), split=f.optional_string("split"), tta=f.optional_string("tta"),
            dataset_name=dataset.optional_string("name") if dataset else None,
            dataset_source=dataset.optional_string("source") if dataset else None,
            model=ModelSummary.read(model) if model else None,
            out_dir=Path(f.string("out_dir")) if f.has("out_dir") else None)

    # ---- the folder -----------------------------------------------------------------------
    def to_folder(self, out: str | Path, probs: np.ndarray, labels: np.ndarray) -> EvaluationResult:
        """Write metrics.json, cm.json, probs.npy and labels.npy (each atomically) into `out`;
        returns the record with its out_dir set."""
        out = Path(out)
        atomic_write(out / "metrics.json", (json.dumps(self.to_dict(), indent=2) + "\n").encode(), what="metrics")
        save_confusion_json(self.confusion_matrix, out / "cm.json")
        atomic_write(out / "probs.npy", _npy(probs.astype(np.float32)), what="probabilities")
        atomic_write(out / "labels.npy", _npy(labels.astype(np.int64)), what="labels")
        return replace(self, out_dir=out)

    @classmethod
    def from_folder(cls, path: str | Path) -> EvaluationResult:
        """The record of an evaluation folder (or of its metrics.json)."""
        folder = _evaluation_folder(Path(path))
        metrics_path = folder / "metrics.json"
        data = read_json_file(metrics_path, "the metrics.json written by `cifarlab evaluate`")
        cm = load_confusion_json(folder / "cm.json") if (folder / "cm.json").is_file() else None
        return replace(cls.from_dict(data, str(metrics_path), cm), out_dir=folder)

    def document(self) -> dict[str, Any]:
        """The mapping view: metrics.json's keys, and out_dir."""
        return self.to_dict() | {"out_dir": str(self.out_dir) if self.out_dir else None}


def _top_k(f: Fields, key: str) -> int:
    digits = key[len("top"):-len("_accuracy")]
    if not digits.isdigit():
        f.fail(f"{f.where}: {key!r} is not a top-k accuracy (topK_accuracy with K a number)")
    return int(digits)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def claim_folder(out: Path, result: EvaluationResult, overwrite: bool) -> None:
    """Refuse to write `result` into a folder that holds another evaluation (another model,
    split, test-time augmentation, dataset or label), unless `overwrite`: one folder, one
    result. The same evaluation run again replaces its files."""
    metrics = out / "metrics.json"
    if overwrite or not metrics.is_file():
        return
    try:
        old: EvaluationResult | None = EvaluationResult.from_folder(out)
    except InputError:  # damaged: it cannot be shown to be this evaluation
        old = None
    if old is not None and old.identity == result.identity:
        return
    held = f"the evaluation of {old.where}" if old else "an evaluation that cannot be read"
    raise InputError(f"{out} holds {held}; this one is of {result.where}. Pass another --out, or "
                     "--overwrite to replace it")


def _evaluation_folder(path: Path) -> Path:
    if path.is_file() and path.name == "metrics.json":
        return path.parent
    if not path.exists():
        raise InputError(f"evaluation folder {path} does not exist; expected a folder written by "
                         f"`cifarlab evaluate` (metrics.json, cm.json, ...): {EVALUATE_HINT}")
    if not path.is_dir():
        raise InputError(f"{path} is a file, not an evaluation folder; expected the folder written by "
                         f"`cifarlab evaluate` (metrics.json, cm.json, ...): {EVALUATE_HINT}")
    if not (path / "metrics.json").exists():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise InputError(f"{path} has no metrics.json (it holds: {found}); expected a folder written by "
                         f"`cifarlab evaluate`: {EVALUATE_HINT}")
    return path


# ---- confused_examples.npz ------------------------------------------------------------------

MAX_EXAMPLES = 10_000  # rows of confused_examples.npz; evaluate writes at most 5 pairs x 4


@dataclass(frozen=True)
class ConfusedExamples:
    """A few images of each of the most-confused pairs, one row per example: images (M, H, W, 3)
    uint8, true_ids, predicted_ids, indices (into the evaluated split), confidence (probability
    of the predicted class) and pair (rank of the pair in the result's most_confused)."""

    images: np.ndarray
    true_ids: np.ndarray
    predicted_ids: np.ndarray
    indices: np.ndarray
    confidence: np.ndarray
    pair: np.ndarray

    @classmethod
    def choose(cls, images: np.ndarray, labels: np.ndarray, probs: np.ndarray, pairs: list[ConfusedPair],
               *, max_pairs: int = 5, per_pair: int = 4) -> ConfusedExamples:
        """Up to `per_pair` images of each of the first `max_pairs` pairs, the most confident
        mistakes first. The evaluation folder keeps no images otherwise, and a report that
        shows *what* a "cat -> dog" confusion looks like says more than the count."""
        predicted = probs.argmax(1)
        rows: list[np.ndarray] = []
        for rank, pair in enumerate(pairs[:max_pairs]):
            hits = np.flatnonzero((labels == pair.true_id) & (predicted == pair.predicted_id))
            order = np.argsort(-probs[hits, pair.predicted_id], kind="stable")
            rows.append(np.stack([hits[order[:per_pair]], np.full(min(per_pair, len(hits)), rank)], 1))
        chosen = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
        index, pair_rank = chosen[:, 0].astype(np.int64), chosen[:, 1].astype(np.int64)
        return cls(np.asarray(images[index], dtype=np.uint8), labels[index].astype(np.int64),
                   predicted[index].astype(np.int64), index, probs[index, predicted[index]].astype(np.float32),
                   pair_rank)

    def save(self, path: str | Path) -> Path:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=self.images, true_ids=self.true_ids, predicted_ids=self.predicted_ids,
                            indices=self.indices, confidence=self.confidence, pair=self.pair)
        return atomic_write(path, buffer.getvalue(), what="example images")

    @classmethod
    def load(cls, path: str | Path, num_classes: int) -> ConfusedExamples | None:
        """The file's examples, checked; None for folders written before evaluate stored them."""
        path = Path(path)
        if not path.is_file():
            return None
        hint = (f"{path}: expected the example images written by `cifarlab evaluate`. Delete it, or "
                "evaluate again")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in ("images", "true_ids", "predicted_ids", "indices",
                                                    "confidence", "pair")}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise InputError(f"{hint} (it cannot be read: {exc})") from None
        rows = len(arrays["images"])
        images = arrays["images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or rows > MAX_EXAMPLES:
            raise InputError(f"{hint} (images must be uint8 (M, H, W, 3) with M <= {MAX_EXAMPLES:,}, got "
                             f"{images.dtype} {images.shape})")
        for key in ("true_ids", "predicted_ids", "indices", "confidence", "pair"):
            column = arrays[key]
            if column.shape != (rows,) or column.dtype.kind not in "iuf":
                raise InputError(f"{hint} ({key} must be {rows} numbers, got {column.dtype} {column.shape})")
        for key in ("true_ids", "predicted_ids"):
            if rows and not (0 <= arrays[key].min() and arrays[key].max() < num_classes):
                raise InputError(f"{hint} ({key} must be class ids 0..{num_classes - 1})")
        return cls(**arrays)
