"""Every model format cifarlab reads, in one place: a path or a live object in, the right
loader out.

    .safetensors (cifarlab)   cifarlab.modelfile   carries its preprocessing, classes, dataset
    .onnx                     cifarlab.onnx        cifarlab metadata if exported by cifarlab
    .keras, .h5, .hdf5        cifarlab.keras       on Keras 3's PyTorch backend, safe mode
    a live Classifier, keras.Model, torch nn.Module or callable (diagnosis)

`open_model` gives a `ModelRunner` (the model run on arrays as given: diagnosis);
`open_classifier` gives what evaluation and prediction need (raw uint8 pixels in, logits out)
with the dataset that names its classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cifarlab.data import Dataset, resolve_dataset
from cifarlab.errors import CifarlabError
from cifarlab.fileio import file_problem, require_file
from cifarlab.keras import (
    check_keras_file,
    is_keras_file,
    is_keras_model,
    load_keras,
    open_keras,
    open_keras_classifier,
)
from cifarlab.modelfile import Classifier, read_meta
from cifarlab.modelfile import load_model as load_cifarlab_model
from cifarlab.runner import ModelRunner, RunnerClassifier, callable_runner, cifarlab_runner, module_runner

ModelLike = Any  # str | Path | Classifier | keras.Model | nn.Module | Callable


def load_model(path: str | Path, device: str = "cpu") -> Any:
    """A cifarlab model file as a `Classifier`, or a Keras file as a `keras.Model` (checked, safe mode).

    Both can be given to `evaluate`, `diagnose` and `export_onnx`.
    """
    if is_keras_file(path):
        return load_keras(path)
    if Path(path).suffix.lower() == ".onnx":
        raise CifarlabError(f"{path} is an ONNX file: give its path to evaluate, diagnose or predict, "
                            "which run it with onnxruntime")
    return load_cifarlab_model(path, device)


def check_model_file(path: str | Path) -> None:
    """The cheap checks of a model file, run before anything slow (loading a dataset)."""
    path = Path(path)
    if path.is_dir():
        inside = [p.name for p in (path / "model.safetensors", path / "model.onnx") if p.is_file()]
        hint = f"pass the model file inside it: {path / inside[0]}" if inside else \
            "pass a model file (model.safetensors, .onnx, .keras or .h5)"
        raise CifarlabError(f"{path} is a folder, not a model file; {hint}")
    if path.suffix == ".safetensors" and path.name == "checkpoint.safetensors":
        raise CifarlabError(f"{path} is a training checkpoint, not a model: continue training with "
                            f"`cifarlab train --resume {path.parent}`, or use {path.parent / 'model.safetensors'} "
                            "once the run has finished")
    if is_keras_file(path):
        check_keras_file(path)
    elif file_problem(path):
        require_file(path, "model file", CifarlabError)
    elif path.suffix.lower() != ".onnx":
        read_meta(path)  # the header only: a damaged field fails here, not after the dataset loaded


def open_model(model: ModelLike, *, input_spec: dict[str, Any] | None = None,
               classes: list[str] | None = None) -> ModelRunner:
    """A ModelRunner for a model file, a Classifier, a keras.Model, an nn.Module or a callable.

    `input_spec` (partial dicts are merged) and `classes` describe a live module or callable,
    whose input contract cannot be read from anywhere.
    """
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix.lower() == ".onnx":
            from cifarlab.onnx import open_onnx  # onnxruntime is optional

            return open_onnx(path)
        if is_keras_file(path):
            return open_keras(path)
        return cifarlab_runner(load_cifarlab_model(path), name=f"{path.name}")
    if isinstance(model, Classifier):
        return cifarlab_runner(model, name="Classifier")
    if is_keras_model(model):  # before nn.Module: on the torch backend a keras.Model is one
        return open_keras(model)
    if isinstance(model, nn.Module):
        return module_runner(model, input_spec, classes)
    if callable(model):
        return callable_runner(model, input_spec, classes)
    raise CifarlabError(f"cannot run a {type(model).__name__}: expected a .safetensors, .onnx, .keras or .h5 "
                        "path, a cifarlab Classifier, a keras.Model, a torch nn.Module or a callable returning logits")


def open_classifier(model: ModelLike, data: str | Dataset | None, preprocessing: dict[str, Any] | None = None,
                    progress: bool = True) -> tuple[Classifier | RunnerClassifier, Dataset]:
    """The model as raw-uint8-pixels-in, logits-out, and the dataset that names its classes.

    `data` defaults to the dataset the model file records. `preprocessing`
    (runner.parse_preprocessing) is for files that do not record their own: Keras files and
    ONNX files from other tools.
    """
    path = Path(model) if isinstance(model, (str, Path)) else None
    if is_keras_model(model) or (path is not None and is_keras_file(path)):
        return open_keras_classifier(model, data, preprocessing, progress)
    if path is not None and path.suffix.lower() == ".onnx":
        from cifarlab.onnx import open_onnx_classifier  # onnxruntime is optional

        return open_onnx_classifier(path, data, preprocessing, progress)
    classifier = load_cifarlab_model(path) if path is not None else model
    if not isinstance(classifier, Classifier):
        raise CifarlabError(f"cannot evaluate a {type(model).__name__}: expected a model file (.safetensors, "
                            ".onnx, .keras, .h5), a cifarlab Classifier or a keras.Model")
    _refuse_preprocessing(preprocessing, "a cifarlab model file")
    return classifier, resolve_dataset(data, classifier.meta.get("dataset"), progress)


def open_predictor(model: str | Path, data: str | None, preprocessing: dict[str, Any] | None) -> Any:
    """The model for classifying image files. A cifarlab model file names its classes itself;
    other files are opened as for evaluation (their classes come from `data`)."""
    path = Path(model)
    if is_keras_file(path) or path.suffix.lower() == ".onnx":
        return open_classifier(path, data, preprocessing, progress=False)[0]
    _refuse_preprocessing(preprocessing, "a cifarlab model file")
    return load_cifarlab_model(path)


def _refuse_preprocessing(preprocessing: dict[str, Any] | None, what: str) -> None:
    if preprocessing is not None:
        raise CifarlabError(f"--preprocessing is for models that do not record their own; {what} carries "
                            "its preprocessing inside. Leave --preprocessing out.")
