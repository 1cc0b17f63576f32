"""An ONNX classifier behind the part of the `Classifier` interface that evaluation uses.

`cifarlab.evaluation.evaluate` needs four things from a model: its metadata (dataset, split,
classes, architecture), its class names, its image size, and logits for raw uint8 NHWC
images. `OnnxClassifier` provides them for a file written by `cifarlab export`, running it
with onnxruntime through the diagnosis' ONNX runner (one copy of the ONNX-reading code):

* a uint8 export is fed the raw pixels, as a `Classifier` is;
* a float export is fed the pixels preprocessed as its metadata states
  (`expected_preprocessing`: x / 255, or the training mean/std), so it scores exactly what
  the model would.

A file without cifarlab metadata (exported by other tools) says nothing about its classes,
dataset or preprocessing. It can still be evaluated when the dataset is given (`--data`:
its class names) and the graph takes raw uint8 NHWC pixels, the only input that needs no
assumption about preprocessing; anything else is refused with what to do instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.data import Dataset
from cifarlab.diagnosis.runners import ModelRunner, open_onnx
from cifarlab.errors import CifarlabError
from cifarlab.export import preprocess_float
from cifarlab.modelfile import validate_images


class OnnxClassifier:
    """An ONNX file that takes images as `Classifier.predict_logits` does: raw uint8 NHWC."""

    def __init__(self, runner: ModelRunner, path: Path, meta: dict[str, Any], image_size: tuple[int, int]):
        self.runner = runner
        self.path = path
        self.meta = meta
        self.image_size = image_size

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def predict_logits(self, images: Any, batch_size: int = 1000) -> np.ndarray:
        """Logits (N, C) for raw uint8 NHWC images, fed in the form the graph was exported for."""
        pixels = validate_images(images, self.image_size).numpy()
        if self.meta.get("onnx_input") == "float":
            return self.runner.logits(preprocess_float(pixels, self.meta["expected_preprocessing"]), batch_size)
        return self.runner.logits(pixels, batch_size)


def open_onnx_classifier(path: str | Path, data: str | Dataset | None,
                         progress: bool = True) -> tuple[OnnxClassifier, Dataset]:
    """The ONNX file at `path` and the dataset to evaluate it on (`data`, else its metadata's)."""
    from cifarlab.evaluation import resolve_dataset  # evaluation imports this module lazily

    path = Path(path)
    runner = open_onnx(path)
    if runner.meta is not None:
        meta = {**runner.meta, "classes": runner.classes or runner.meta.get("classes")}
        model = OnnxClassifier(runner, path, meta, _image_size(runner, meta, None))
        return model, resolve_dataset(model, data, progress)
    return _foreign(runner, path, data, progress)


def _foreign(runner: ModelRunner, path: Path, data: str | Dataset | None,
             progress: bool) -> tuple[OnnxClassifier, Dataset]:
    """A file without cifarlab metadata: classes from `data`, raw uint8 NHWC input only."""
    from cifarlab.evaluation import resolve_dataset

    missing = (f"{path.name} has no cifarlab metadata (it was not written by `cifarlab export`), "
               "so its class names, dataset and input preprocessing are unknown")
    if data is None:
        raise CifarlabError(f"{missing}. Pass the dataset it was trained on with --data (it gives "
                            "the class names), or export the model with `cifarlab export MODEL --onnx OUT`.")
    spec = runner.input_spec
    if spec.get("dtype") != "uint8" or spec.get("layout") != "NHWC":
        raise CifarlabError(
            f"{missing}. It takes {spec.get('dtype') or 'float'} {spec.get('layout')} input, and only a "
            "graph that takes raw uint8 NHWC pixels (0..255) can be evaluated without knowing its "
            "preprocessing. Export it with the preprocessing inside, or run `cifarlab diagnose --model "
            f"{path.name} --images x.npy --labels y.npy` with the images as your pipeline prepares them.")
    meta: dict[str, Any] = {"architecture": path.name, "dataset": {}, "metrics": None}
    stub = OnnxClassifier(runner, path, meta, (0, 0))
    dataset = resolve_dataset(stub, data, progress)
    if runner.num_classes is not None and runner.num_classes != len(dataset.classes):
        raise CifarlabError(
            f"{path.name} outputs {runner.num_classes} classes but dataset {dataset.name!r} has "
            f"{len(dataset.classes)}; pass the dataset the model was trained on with --data.")
    meta.update(classes=list(dataset.classes), num_classes=len(dataset.classes))
    stub.image_size = _image_size(runner, meta, dataset)
    return stub, dataset


def _image_size(runner: ModelRunner, meta: dict[str, Any], dataset: Dataset | None) -> tuple[int, int]:
    """(H, W) from the metadata, else the graph's declared input, else the dataset's images."""
    declared = meta.get("input") or runner.input_spec
    h, w = declared.get("height"), declared.get("width")
    if (h is None or w is None) and dataset is not None:
        h, w = dataset.train_x.shape[1:3]
    return int(h or 32), int(w or 32)
