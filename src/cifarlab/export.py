"""Export a cifarlab model to ONNX, with its metadata, verified against PyTorch.

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

from cifarlab.errors import CifarlabError
from cifarlab.fileio import chmod_default, fsync_dir, storage_error
from cifarlab.modelfile import METADATA_KEY, Classifier, load_model
from cifarlab.onnx import import_onnx_package
from cifarlab.runner import apply_preprocessing

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


def export_onnx(model: Classifier | str | Path, path: str | Path, *, input: str = "uint8",
                opset: int | None = None, training: bool = False) -> dict[str, Any]:
    """Write `model` as an ONNX file at `path`, check it with onnxruntime; returns a summary.

    `training=True` exports dropout and BatchNorm in *training* mode (random dropout masks,
    batch statistics). It exists only so tests can reproduce the "model left in training
    mode" bug; such a graph is not checked against PyTorch (its outputs are random).
    """
    onnx = import_onnx_package("onnx")
    if input not in ("uint8", "float"):
        raise CifarlabError(f"input must be 'uint8' or 'float', got {input!r}")
    classifier = load_model(model) if isinstance(model, (str, Path)) else model
    # A copy: tracing in training mode runs a forward pass that would update the caller's
    # BatchNorm running statistics (and .cpu() would move the caller's model).
    classifier = copy.deepcopy(classifier).cpu().to(memory_format=torch.contiguous_format)
    module = classifier if input == "uint8" else FloatNHWCNet(classifier.net)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        classifier.train(training)
        _trace_to_onnx(module, _example_input(classifier, input), tmp, opset, training)
        _write_metadata(onnx, tmp, export_metadata(classifier, input))
        diff = None if training else verify_onnx(classifier, tmp, input)
        with open(tmp, "rb") as f:  # on disk before the rename, so a crash cannot leave a torn file
            os.fsync(f.fileno())
        chmod_default(tmp)
        os.replace(tmp, path)  # only a verified file takes the final name
        fsync_dir(path.parent)
    except OSError as exc:
        raise storage_error(exc, path, "ONNX file") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": str(path), "max_abs_diff": diff, "input": input, "training": training}


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


def _example_input(classifier: Classifier, input: str) -> torch.Tensor:
    h, w = classifier.image_size
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
