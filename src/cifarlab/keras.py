"""Keras models (`.keras`, legacy `.h5`), run on Keras 3's PyTorch backend: no TensorFlow.

keras and h5py are an optional extra (`pip install 'cifarlab[keras]'`). A file is checked
before Keras reads it (`check_keras_file`): its model config is read as JSON and refused if
it asks for code (a `Lambda` layer) or for classes Keras does not ship (custom objects), and
its sizes are bounded (a zip bomb posing as `.keras`, absurd layer sizes). Keras then loads
it with `safe_mode=True`.

What the model expects is read from the model itself where it is written down: the input
shape and layout, a leading `Rescaling`/`Normalization` (then the model takes 0..255
pixels), a softmax at the end. Where it is not (the founding question's model: `/255` was
done in the training script), `evaluate` must be told (`--preprocessing`) and `diagnose`
finds out by probing.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.data import Dataset, check_class_count, resolve_dataset
from cifarlab.errors import CifarlabError, InputError, ModelFileError
from cifarlab.fileio import require_file
from cifarlab.runner import ModelRunner, RunnerClassifier, image_layout, image_size

KERAS_HINT = "pip install 'cifarlab[keras]'"
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")

# Bounds on a hostile file, far above any image classifier's needs: the weights' total
# uncompressed size, the config's size, a zip member's expansion ratio, and the sizes a layer
# may declare (units/filters, input height/width) before Keras allocates anything.
MAX_WEIGHT_BYTES = 2 * 1024**3
MAX_CONFIG_BYTES = 16 * 1024**2
MAX_EXPANSION_RATIO = 100
MAX_LAYER_SIZE = 65_536
MAX_INPUT_SIDE = 4096
# The child process that reads a file's HDF5 data first (cifarlab.h5probe) gets this long:
# a CIFAR model's weights read in well under a second.
H5_READ_SECONDS = 60

# Layers that hold Python code (marshalled bytecode or a function name to import).
CODE_LAYERS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda"})
# Layers before the first weight layer that do nothing at inference (augmentation).
_INFERENCE_NO_OPS = ("Random", "Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout")


# ---- importing Keras on the torch backend -------------------------------------------------------

def import_keras() -> Any:
    """keras, on the PyTorch backend; a clear error if it is missing or on another backend."""
    loaded = sys.modules.get("keras")
    if loaded is not None:
        backend = loaded.backend.backend()
        if backend != "torch":
            raise CifarlabError(
                f"Keras is already imported in this process with the {backend!r} backend; cifarlab runs "
                "Keras models on the PyTorch backend. Set KERAS_BACKEND=torch before anything imports "
                "keras (or use the cifarlab command, which sets it).")
        return loaded
    requested = os.environ.get("KERAS_BACKEND", "torch") or "torch"
    if requested != "torch":
        raise CifarlabError(
            f"KERAS_BACKEND is {requested!r}; cifarlab runs Keras models on the PyTorch backend (no "
            "TensorFlow needed). Set KERAS_BACKEND=torch, or unset it, before using cifarlab with Keras.")
    os.environ["KERAS_BACKEND"] = "torch"
    try:
        return importlib.import_module("keras")
    except ImportError:
        raise CifarlabError(f"this needs Keras, an optional extra: {KERAS_HINT}") from None


def is_keras_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in KERAS_SUFFIXES


def is_keras_model(obj: Any) -> bool:
    """A live keras.Model (checked without importing Keras)."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.Model)


# ---- checking and loading a file -----------------------------------------------------------------

def check_keras_file(path: Path) -> dict[str, Any]:
    """The file's model config, refused if it asks for code or custom classes or is too large."""
    require_file(path, "Keras model", ModelFileError)
    if path.suffix.lower() == ".keras":
        config = _keras_zip_config(path)
    else:
        config = _h5_config(path)
    _refuse_unsafe(config, path)
    return config


def _keras_zip_config(path: Path) -> dict[str, Any]:
    """config.json of a `.keras` file (a zip), after bounding what its members expand to."""
    not_keras = f"{path} is not a Keras 3 `.keras` file"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            total = sum(m.file_size for m in members)
            if total > MAX_WEIGHT_BYTES:
                raise ModelFileError(f"{path} expands to {total / 1024**3:.1f} GiB; cifarlab reads Keras files "
                                     f"up to {MAX_WEIGHT_BYTES / 1024**3:.0f} GiB")
            for m in members:
                if m.file_size > 1024**2 and m.file_size > MAX_EXPANSION_RATIO * max(m.compress_size, 1):
                    raise ModelFileError(f"{path}: member {m.filename} expands {m.file_size / max(m.compress_size, 1):.0f}x "
                                         f"(more than {MAX_EXPANSION_RATIO}x): a zip bomb, not a model")
            names = {m.filename: m for m in members}
            if "config.json" not in names or "model.weights.h5" not in names:
                raise ModelFileError(f"{not_keras}: it lacks config.json or model.weights.h5")
            if names["config.json"].file_size > MAX_CONFIG_BYTES:
                raise ModelFileError(f"{path}: its config.json is {names['config.json'].file_size:,} bytes")
            raw = archive.read("config.json")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ModelFileError(f"{not_keras} (a zip archive): {exc}. Was it truncated or saved as .h5?") from None
    read_h5_bounded(path, "model.weights.h5")
    return _parse_config(raw, path)


def _h5_config(path: Path) -> dict[str, Any]:
    """The `model_config` attribute of a legacy HDF5 model, read by the bounded probe."""
    result = read_h5_bounded(path)
    if result["config"] is None:
        raise ModelFileError(f"{path} is an HDF5 file but not a Keras model (it has no model_config): "
                             "a weights-only file (save_weights) needs its model's code to be used")
    return _parse_config(result["config"].encode("utf-8", "surrogatepass"), path)


def read_h5_bounded(path: Path, member: str = "") -> dict[str, Any]:
    """Read an HDF5 file (or a `.keras` zip's MEMBER) completely in a child process with a time
    limit (cifarlab.h5probe says why); {"config": str | None, "bytes": N}, or ModelFileError."""
    where = f"{path}" + (f" ({member})" if member else "")
    command = [sys.executable, "-m", "cifarlab.h5probe", str(path), member, str(MAX_WEIGHT_BYTES)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=H5_READ_SECONDS)
    except subprocess.TimeoutExpired:
        raise ModelFileError(f"reading the HDF5 data of {where} did not finish in {H5_READ_SECONDS} s: "
                             "the file is damaged (or built to hang its reader)") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        if "No module named 'h5py'" in done.stderr:
            raise CifarlabError(f"reading Keras models needs h5py, an optional extra: {KERAS_HINT}")
        raise ModelFileError(f"the HDF5 library failed on {where} (exit status {done.returncode}): "
                             "the file is damaged")
    result = json.loads(lines[-1])
    if "error" in result:
        raise ModelFileError(f"{where} is not a readable HDF5 file ({result['error']}). Was it truncated?")
    if result["bytes"] > MAX_WEIGHT_BYTES:
        raise ModelFileError(f"{where} declares {result['bytes'] / 1024**3:.1f} GiB of weights; cifarlab reads "
                             f"Keras files up to {MAX_WEIGHT_BYTES / 1024**3:.0f} GiB")
    return result


def _parse_config(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path}: its model config is not JSON ({exc})") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelFileError(f"{path}: its model config is not a Keras model description")
    return config


def _refuse_unsafe(config: dict[str, Any], path: Path) -> None:
    """Refuse configs that need code to run or would allocate absurd layers."""
    code, custom, huge = [], [], []
    for obj in _objects(config):
        name, module = obj.get("class_name"), obj.get("module")
        registered = obj.get("registered_name")
        if name in CODE_LAYERS or module == "builtins" or name == "__lambda__":
            code.append(_describe_code(obj))
        elif (isinstance(module, str) and not module.startswith("keras")) or \
                (isinstance(registered, str) and registered != name and not registered.startswith("keras")):
            custom.append(str(registered or f"{module}.{name}"))
        huge += _oversized(obj.get("config"))
    if code:
        raise ModelFileError(
            f"{path} asks to run Python code ({', '.join(sorted(set(code))[:5])}). cifarlab loads Keras files in safe mode and never runs such code. Replace "
            "the Lambda with built-in layers (e.g. Rescaling), or export the model to ONNX yourself.")
    if custom:
        raise ModelFileError(
            f"{path} needs custom objects that are not part of Keras ({', '.join(sorted(set(custom))[:5])}); "
            "cifarlab does not import your code to load them. Use built-in layers, or export the model to "
            "ONNX where your code is importable (model.export('model.onnx', format='onnx')).")
    if huge:
        raise ModelFileError(f"{path} declares layer sizes beyond cifarlab's limits ({'; '.join(huge[:3])}): "
                             "not an image classifier cifarlab can run")


def _describe_code(obj: dict[str, Any]) -> str:
    config = obj.get("config")
    if obj.get("class_name") in CODE_LAYERS:
        return f"{obj['class_name']} layer {config.get('name') if isinstance(config, dict) else ''!r}"
    if isinstance(config, str):
        return f"function {config!r}"
    return "a lambda function"


def _objects(node: Any) -> list[dict[str, Any]]:
    """Every serialised object ({"class_name": ...}) in a Keras config tree."""
    found: list[dict[str, Any]] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _oversized(config: Any) -> list[str]:
    if not isinstance(config, dict):
        return []
    problems = [f"{key}={config[key]}" for key in ("units", "filters", "output_dim", "input_dim")
                if isinstance(config.get(key), int) and config[key] > MAX_LAYER_SIZE]
    for key in ("batch_shape", "batch_input_shape", "shape"):
        dims = config.get(key)
        if isinstance(dims, list) and any(isinstance(d, int) and d > MAX_INPUT_SIDE for d in dims[-3:]):
            problems.append(f"{key}={dims}")
    return problems


def load_keras(path: str | Path) -> Any:
    """A `.keras` / `.h5` file as a keras.Model, checked first and loaded in safe mode."""
    path = Path(path)
    check_keras_file(path)
    keras = import_keras()
    try:
        # compile=False: evaluation needs no optimizer or loss (and a custom loss would not load).
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises TypeError/ValueError/OSError and its own types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"Keras cannot load {path}: {first[:400]}") from None


# ---- what the model expects --------------------------------------------------------------------

def keras_input_spec(model: Any, name: str) -> dict[str, Any]:
    """The runner's input spec: shape and layout from the model's Input, preprocessing from its layers."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise InputError(f"{name} has no declared input (a Sequential model built without keras.Input): "
                         "call it once on a batch, or add keras.Input(shape=(32, 32, 3)), before saving")
    if len(inputs) != 1:
        raise InputError(f"{name} has {len(inputs)} inputs; cifarlab needs a classifier with one image input")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4:
        raise InputError(f"{name} takes input of shape {shape}; cifarlab needs a batch of images (rank 4)")
    layout, h, w, c = image_layout(shape, f"{name} takes input of shape {shape}")
    dtype = str(getattr(inputs[0], "dtype", "float32"))
    return {"dtype": "uint8" if dtype == "uint8" else "float32", "layout": layout, "height": h, "width": w,
            "channels": c, "preprocessing": leading_preprocessing(model)}


def leading_preprocessing(model: Any) -> dict[str, Any] | None:
    """The affine map a model's leading Rescaling/Normalization layers apply to 0..255 pixels.

    x_model = (x - mean) / std per channel, composed over the layers before the first one that
    computes; augmentation layers (Random*, dropout, noise) do nothing at inference and are
    passed. None when the first computing layer is not a preprocessing layer.
    """
    mean, std, parts = np.zeros(3), np.ones(3), []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer" or kind.startswith(_INFERENCE_NO_OPS):
            continue
        if kind == "Rescaling":
            scale = np.broadcast_to(np.asarray(layer.scale, np.float64), 3)
            offset = np.broadcast_to(np.asarray(layer.offset, np.float64), 3)
            mean, std = mean - offset * std / scale, std / scale
            parts.append(f"Rescaling(scale={_short(layer.scale)}, offset={_short(layer.offset)})")
        elif kind == "Normalization" and not getattr(layer, "invert", False):
            mu = np.broadcast_to(np.asarray(layer.mean, np.float64).reshape(-1), 3)
            sigma = np.sqrt(np.broadcast_to(np.asarray(layer.variance, np.float64).reshape(-1), 3))
            mean, std = mean + mu * std, std * np.maximum(sigma, 1e-12)
            parts.append("Normalization")
        else:
            break
    if not parts:
        return None
    kind = "scale" if np.allclose(mean, 0) and np.allclose(std, 255) else "standardize"
    return {"kind": kind, "mean": mean.tolist(), "std": std.tolist(), "applied_by": "model",
            "description": " then ".join(parts)}


def output_kind(model: Any) -> str | None:
    """"probabilities" when the last layer ends in a softmax, "logits" when linear, else None."""
    last = model.layers[-1] if model.layers else None
    kind = type(last).__name__
    if kind == "Softmax":
        return "probabilities"
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    return {"softmax": "probabilities", "linear": "logits"}.get(activation or "")


def _short(value: Any) -> str:
    array = np.asarray(value, np.float64).reshape(-1)
    return f"{array[0]:.6g}" if array.size == 1 else "[" + ", ".join(f"{v:.4g}" for v in array) + "]"


# ---- running it --------------------------------------------------------------------------------

def keras_runner(model: Any, name: str) -> ModelRunner:
    """A keras.Model behind the runner interface, called with training=False."""
    spec = keras_input_spec(model, name)

    def forward(batch: np.ndarray) -> Any:
        with torch.no_grad():
            return model(batch, training=False)

    outputs = model.outputs[0].shape if getattr(model, "outputs", None) else None
    num_classes = outputs[-1] if outputs is not None and isinstance(outputs[-1], int) else None
    return ModelRunner(name=f"{name} (Keras {type(model).__name__})", kind="keras", num_classes=num_classes,
                       classes=None, input_spec=spec, train_stats=None, trained_accuracy=None,
                       forward=forward, feed_dtype=spec["dtype"], outputs=output_kind(model))


def keras_model(model: str | Path | Any) -> tuple[Any, str]:
    """(keras.Model, name to show) for a Keras file or a live keras.Model."""
    if isinstance(model, (str, Path)):
        return load_keras(model), Path(model).name
    return model, str(getattr(model, "name", "keras model"))


def open_keras(model: str | Path | Any) -> ModelRunner:
    """A runner for a Keras file or a live keras.Model."""
    return keras_runner(*keras_model(model))


def open_keras_classifier(model: str | Path | Any, data: str | Dataset | None,
                          preprocessing: dict[str, Any] | None,
                          progress: bool = True) -> tuple[RunnerClassifier, Dataset]:
    """A Keras model for `evaluate`: classes from `data`, preprocessing from the model or the caller."""
    loaded, name = keras_model(model)
    runner = keras_runner(loaded, name)
    if data is None:
        raise CifarlabError(f"{name} does not record its classes or dataset; pass the dataset it was trained "
                            "on with --data (it gives the class names, in the order of your labels)")
    feed = caller_preprocessing(runner, preprocessing, name)
    dataset = resolve_dataset(data, None, progress)
    check_class_count(name, runner.num_classes, dataset)
    spec = runner.input_spec
    meta: dict[str, Any] = {
        "architecture": runner.name, "dataset": {"name": dataset.name}, "metrics": None,
        "classes": list(dataset.classes), "num_classes": len(dataset.classes),
        "expects": runner.expects, "preprocessing": spec["preprocessing"] or feed,
        "coarse_classes": dataset.coarse_classes, "coarse_of_fine": dataset.coarse_of_fine}
    return RunnerClassifier(runner, meta, image_size(spec, dataset.train_x), feed), dataset


def caller_preprocessing(runner: ModelRunner, preprocessing: dict[str, Any] | None,
                         name: str) -> dict[str, Any] | None:
    """The preprocessing the caller must apply: none if the model has its own, else the one given."""
    inside = runner.input_spec.get("preprocessing")
    if inside is not None:
        if preprocessing is not None and preprocessing["kind"] != "none":
            raise CifarlabError(
                f"{name} preprocesses its inputs itself ({inside['description']}: it takes 0..255 pixels), so "
                f"--preprocessing {preprocessing['kind']} would apply it twice. Leave --preprocessing out.")
        return None
    if preprocessing is None:
        raise CifarlabError(
            f"{name} does not say how its inputs were scaled (no Rescaling or Normalization layer: your "
            "training script did it). Pass --preprocessing scale (x / 255), standardize:MEAN:STD or none, "
            f"as your training script did; if unsure, run `cifarlab diagnose --model {name} --data DATASET`, "
            "which finds out.")
    return preprocessing
