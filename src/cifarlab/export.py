"""Export a cifarlab model to ONNX, with its metadata, verified against PyTorch; seal a Keras
model the same way, verified against Keras.

Two input contracts:

* ``input="uint8"`` (default): the graph takes raw uint8 RGB images NHWC (N, 32, 32, 3) and
  does the model's scaling/normalisation itself, like `Classifier`. Nothing can be fed wrong
  except the images themselves.
* ``input="float"``: the graph takes float32 NHWC images *already preprocessed* the way the
  model's own Preprocess would (e.g. pixels / 255 for keras-cnn); the graph is just the
  network behind an NHWC->NCHW permute. This is what a Keras model looks like, and the
  expected preprocessing is written into the metadata so a consumer (and `cifarlab
  diagnose`) can check it.

Metadata (ONNX `metadata_props`): "cifarlab" holds the model file's metadata JSON plus
"onnx_input" and "expected_preprocessing"; "classes" holds the JSON list of label names.

Sealing a Keras model (`.keras`/`.h5`, or a live keras.Model): the graph takes raw uint8
NHWC pixels and applies the preprocessing the user states (`preprocessing`, as their
training script did; none needed when the model starts with Rescaling/Normalization) before
the model, and its metadata names the classes (from `data`). Whoever serves the file can no
longer feed it the wrong scale, and `cifarlab evaluate sealed.onnx` needs no flags. On Keras'
PyTorch backend a keras.Model is a torch module, so it is traced like ours.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. It needs nothing
beyond onnx (the dynamo exporter would also need onnxscript), traces these plain conv
nets exactly, and is the one that can export dropout/BatchNorm in training mode, which the
diagnosis tests use. onnx and onnxruntime are optional: `pip install 'cifarlab[onnx]'`.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab.data import check_class_count, resolve_dataset
from cifarlab.errors import CifarlabError, InputError
from cifarlab.fileio import chmod_default, fsync_dir, remove_stale_temps, storage_error
from cifarlab.keras import caller_preprocessing, import_keras, is_keras_file, is_keras_model, keras_model, keras_runner
from cifarlab.modelfile import METADATA_KEY, Classifier, load_model
from cifarlab.onnx import import_onnx_package
from cifarlab.runner import ModelRunner, apply_preprocessing, image_size, parse_preprocessing

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Outputs must match PyTorch to this fraction of the logit scale (float32 reorderings
# in onnxruntime's kernels stay orders of magnitude below it).
TOLERANCE = 1e-3


class FloatNHWCNet(nn.Module):
    """The bare network on preprocessed float NHWC input: what a Keras model takes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.permute(0, 3, 1, 2))


def export_onnx(model: Any, path: str | Path, *, input: str = "uint8", opset: int | None = None,
                training: bool = False, preprocessing: str | None = None,
                data: Any = None) -> dict[str, Any]:
    """Write `model` as an ONNX file at `path`, check it with onnxruntime; returns a summary.

    `model`: a cifarlab Classifier or model file, or a Keras file / keras.Model to seal
    (then `preprocessing`, see runner.parse_preprocessing, and `data`, the dataset that names
    its classes). `training=True` exports dropout and BatchNorm in *training* mode (random
    dropout masks, batch statistics). It exists only so tests can reproduce the "model left in
    training mode" bug; such a graph is not checked against PyTorch (its outputs are random).
    """
    check_onnx_path(Path(path))
    onnx = import_onnx_package("onnx")
    if input not in ("uint8", "float"):
        raise CifarlabError(f"input must be 'uint8' or 'float', got {input!r}")
    if is_keras_model(model) or (isinstance(model, (str, Path)) and is_keras_file(model)):
        return seal_keras(onnx, model, Path(path), input, opset, preprocessing, data)
    if preprocessing is not None or data is not None:
        raise CifarlabError("--preprocessing and --data are for sealing a Keras model; a cifarlab model "
                            "file carries its preprocessing and classes")
    classifier = load_model(model) if isinstance(model, (str, Path)) else model
    # A copy: tracing in training mode runs a forward pass that would update the caller's
    # BatchNorm running statistics (and .cpu() would move the caller's model).
    classifier = copy.deepcopy(classifier).cpu().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    module = classifier if input == "uint8" else FloatNHWCNet(classifier.net)

    def write(tmp: str) -> float | None:
        classifier.train(training)
        _trace_to_onnx(module, _example_input(classifier.image_size, input), tmp, opset, training)
        _write_metadata(onnx, tmp, export_metadata(classifier, input))
        return None if training else verify_onnx(classifier, tmp, input)

    diff = _write_verified(Path(path), write)
    return {"path": str(path), "max_abs_diff": diff, "input": input, "training": training,
            "reference": "PyTorch"}


def check_onnx_path(path: Path) -> None:
    """An .onnx name in a folder that exists: a typo in either is caught before the export."""
    if path.suffix.lower() != ".onnx":
        raise InputError(f"--onnx {path}: an ONNX file's name ends in .onnx, this one in "
                         f"{path.suffix or 'nothing'}; e.g. --onnx {path.with_suffix('.onnx')}")
    if not path.parent.is_dir():
        raise InputError(f"--onnx {path}: the folder {path.parent} does not exist; create it first "
                         f"(mkdir -p {path.parent}) or write the file elsewhere")


def _write_verified(path: Path, write: Any) -> Any:
    """Run `write(tmp)` on a temporary file beside `path`; only if it returns, the file takes
    the final name (fsynced first, so a crash cannot leave a torn file). Temporary files that
    an earlier, killed export left beside it are removed first (fileio.remove_stale_temps)."""
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        result = write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        chmod_default(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise storage_error(exc, path, "ONNX file") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return result


# ---- sealing a Keras model ---------------------------------------------------------------------

class SealedKeras(nn.Module):
    """Raw uint8 NHWC pixels -> (x - mean) / std per channel -> the Keras model (inference)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: Any, mean: list[float], std: list[float], layout: str):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, 1, 3))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 1, 1, 3))
        self.channels_first = layout == "NCHW"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        if self.channels_first:
            x = x.permute(0, 3, 1, 2)
        return self.model(x, training=False)


def seal_keras(onnx: Any, model: Any, path: Path, input: str, opset: int | None,
               preprocessing: str | None, data: Any) -> dict[str, Any]:
    """A Keras model as an ONNX file that takes raw uint8 pixels; verified against Keras."""
    import_keras()  # tracing needs the PyTorch backend: a live model from another one is refused here
    loaded, name = keras_model(model)
    runner = keras_runner(loaded, name)
    if input != "uint8":
        raise CifarlabError("a sealed Keras model takes raw uint8 pixels; leave out --onnx-float")
    if data is None:
        raise CifarlabError(f"{name} does not record its classes; pass --data (the dataset it was trained on), "
                            "so the ONNX file names them and `cifarlab evaluate` needs no flags")
    stated = parse_preprocessing(preprocessing) if preprocessing is not None else None
    feed = caller_preprocessing(runner, stated, name) or parse_preprocessing("none")
    dataset = resolve_dataset(data, None, progress=False)
    check_class_count(name, runner.num_classes, dataset)
    spec = runner.input_spec
    size = image_size(spec, dataset.train_x)
    sealed = SealedKeras(loaded, feed["mean"], feed["std"], spec["layout"]).eval()
    meta = _sealed_metadata(runner, feed, dataset, data, size)

    def write(tmp: str) -> float:
        _trace_to_onnx(sealed, _example_input(size, "uint8"), tmp, opset, training=False)
        _write_metadata(onnx, tmp, {METADATA_KEY: json.dumps(meta), "classes": json.dumps(meta["classes"])})
        return verify_sealed(runner, feed, tmp, size)

    diff = _write_verified(path, write)
    return {"path": str(path), "max_abs_diff": diff, "input": "uint8", "training": False, "reference": "Keras"}


def _sealed_metadata(runner: ModelRunner, feed: dict[str, Any], dataset: Any, data: Any,
                     size: tuple[int, int]) -> dict[str, Any]:
    inside = runner.input_spec["preprocessing"]
    pre = inside if inside is not None else {**feed, "description": f"{feed['description']}, sealed by cifarlab"}
    return {
        "architecture": runner.name, "source": "keras", "outputs": runner.outputs,
        "classes": list(dataset.classes), "num_classes": len(dataset.classes),
        "coarse_classes": dataset.coarse_classes, "coarse_of_fine": dataset.coarse_of_fine,
        "dataset": {"name": dataset.name, "spec": data if isinstance(data, str) else None},
        "preprocessing": {k: pre[k] for k in ("kind", "mean", "std", "description")},
        "input": {"dtype": "uint8", "layout": "NHWC", "height": size[0], "width": size[1], "channels": 3},
        "onnx_input": "uint8", "metrics": None,
        "expected_preprocessing": {"kind": "none", "dtype": "uint8", "layout": "NHWC",
                                   "description": "raw RGB pixels as uint8 NHWC, 0..255; the graph "
                                                  "preprocesses them itself"}}


def verify_sealed(runner: ModelRunner, feed: dict[str, Any], path: str, size: tuple[int, int],
                  n: int = 16, seed: int = 0) -> float:
    """Max |onnxruntime - Keras| output on random uint8 images; refused above TOLERANCE."""
    ort = import_onnx_package("onnxruntime")
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, *size, 3), dtype=np.uint8)
    x = apply_preprocessing(pixels, feed)
    if runner.input_spec["layout"] == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    expected = np.asarray(runner.forward(x).detach().cpu().numpy(), np.float32)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: pixels})[0]
    diff = float(np.abs(got - expected).max())
    if not diff <= TOLERANCE:  # also catches NaN
        raise CifarlabError(f"the sealed ONNX file does not match the Keras model: max |difference| {diff:.3g} "
                            f"(more than {TOLERANCE:g}); it was not written")
    return diff


def _trace_to_onnx(module: nn.Module, example: torch.Tensor, path: str, opset: int | None,
                   training: bool) -> None:
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (which needs onnxscript);
        # the warning says nothing actionable to a cifarlab user.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), path, dynamo=False, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=opset, training=mode,
            # Constant folding would bake training-mode dropout/BN into constants.
            do_constant_folding=not training,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _example_input(size: tuple[int, int], input: str) -> torch.Tensor:
    h, w = size
    images = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    return images if input == "uint8" else images.float()


def expected_preprocessing(classifier: Classifier, input: str) -> dict[str, Any]:
    """What the caller must do to raw 0..255 RGB pixels before feeding the graph."""
    pre = classifier.meta["preprocessing"]
    if input == "uint8":
        return {"kind": "none", "dtype": "uint8", "layout": "NHWC",
                "description": "raw RGB pixels as uint8 NHWC, 0..255; the graph scales them itself"}
    mean, std = [float(m) for m in pre["mean"]], [float(s) for s in pre["std"]]
    if pre["kind"] == "scale":
        text = "float32 NHWC RGB pixels divided by 255 (values 0..1): x = pixels / 255.0"
    else:
        text = (f"float32 NHWC RGB pixels standardised per channel: x = (pixels - {mean}) / {std}, "
                "with pixels the raw 0..255 values")
    return {"kind": pre["kind"], "dtype": "float32", "layout": "NHWC", "mean": mean, "std": std,
            "description": text}


def export_metadata(classifier: Classifier, input: str) -> dict[str, str]:
    meta = {**classifier.meta, "onnx_input": input,
            "expected_preprocessing": expected_preprocessing(classifier, input)}
    return {METADATA_KEY: json.dumps(meta), "classes": json.dumps(list(classifier.classes))}


def _write_metadata(onnx: Any, path: str, metadata: dict[str, str]) -> None:
    proto = onnx.load(path)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


@torch.no_grad()
def verify_onnx(classifier: Classifier, path: str | Path, input: str, n: int = 16, seed: int = 0) -> float:
    """Max |onnxruntime - PyTorch| logits on random images; raises past the tolerance.

    The reference is always the Classifier on raw uint8 pixels, so a float export is checked
    together with the preprocessing its metadata tells callers to apply.
    """
    ort = import_onnx_package("onnxruntime")
    h, w = classifier.image_size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    expected = classifier.eval()(torch.from_numpy(pixels)).numpy()
    feed = pixels if input == "uint8" else apply_preprocessing(pixels, expected_preprocessing(classifier, input))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: feed})[0]
    diff = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if not diff <= TOLERANCE * scale:  # also catches NaN
        raise CifarlabError(f"ONNX export of {classifier.meta['architecture']} does not match PyTorch: "
                            f"max |difference| {diff:.3g} on logits of scale {scale:.3g}")
    return diff
