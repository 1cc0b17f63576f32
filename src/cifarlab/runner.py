"""Run any classifier on numpy arrays *as given*, so diagnosis sees what the user's inputs do.

A `ModelRunner` puts a cifarlab model, an ONNX file (cifarlab.onnx), a Keras file
(cifarlab.keras), a live torch `nn.Module` or a plain callable behind one `logits(images)`
call, with what is known about the model's input contract (`input_spec`) and its training
data (`train_stats`). Unlike `Classifier.predict`, a runner never validates the *values* of
what it is fed: a float array in 0..1 given to a model that expects 0..255 is exactly the bug
that diagnosis has to reproduce. It only refuses arrays the model cannot run at all (wrong
rank, shape or layout), with an InputError that says what the model declares.

`RunnerClassifier` turns a runner back into what evaluation needs (raw uint8 NHWC images in,
logits out), applying the preprocessing the model's file or its user states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab.errors import CifarlabError, InputError
from cifarlab.metrics import is_probability, softmax
from cifarlab.modelfile import Classifier, validate_images


@dataclass
class ModelRunner:
    """A classifier behind one call: `logits(images)` -> (N, C) floats."""

    name: str  # e.g. "model.safetensors (cifarlab airbench-small)" or "model.onnx"
    kind: str  # "cifarlab" | "onnx" | "keras" | "callable"
    num_classes: int | None  # None for a callable until it has been run once
    classes: list[str] | None
    # {"dtype": "uint8"|"float32"|None, "layout": "NHWC"|"NCHW"|None, "height", "width",
    #  "channels", "preprocessing": {...} or None}; None values mean "unknown".
    input_spec: dict[str, Any]
    train_stats: dict[str, list[float]] | None  # per-channel mean/std/min/max of raw training pixels
    trained_accuracy: float | None  # validation accuracy recorded at training time
    forward: Callable[[np.ndarray], Any] = field(repr=False)  # one batch, already cast
    # The dtype batches are cast to before `forward`; None: as given (uint8 or float32).
    feed_dtype: str | None = None
    meta: Mapping[str, Any] | None = field(repr=False, default=None)  # the cifarlab metadata, if any
    outputs: str | None = None  # "probabilities" | "logits" where the model says; None: unknown

    @property
    def expects(self) -> str:
        """What the model takes and returns, as far as its file says (one line for people)."""
        pre = self.input_spec.get("preprocessing")
        if pre is None:
            scale = "how its inputs are scaled is not recorded in the model"
        elif pre.get("applied_by") == "model":
            scale = f"raw 0..255 pixels, preprocessed inside the model ({pre.get('description') or pre['kind']})"
        else:
            scale = f"pixels preprocessed by the caller ({pre.get('description') or pre['kind']})"
        out = f"; returns {self.outputs}" if self.outputs else ""
        return f"images {describe_spec(self.input_spec)}; {scale}{out}"

    def logits(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Run the model on `images` exactly as given (only the dtype is cast); (N, C) float32.

        Outputs that are probabilities (rows in [0, 1] summing to 1) come back as log
        probabilities, so softmax of the result is always the model's class distribution.
        """
        batch = self.check_input(images)
        outputs = [self._run_batch(batch[i:i + batch_size]) for i in range(0, len(batch), batch_size)]
        if not outputs:
            return np.zeros((0, self.num_classes or 0), np.float32)
        result = as_logits(np.concatenate(outputs))
        if self.num_classes is None:
            self.num_classes = result.shape[1]
        return result

    def check_input(self, images: Any) -> np.ndarray:
        """`images` as a numpy array of the model's dtype, or InputError if it cannot run."""
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        spec = self.input_spec
        if array.ndim != 4:
            raise InputError(f"{self.name} takes a batch of images {describe_spec(spec)}; "
                             f"got an array of shape {array.shape} (rank {array.ndim}, expected 4)")
        if not shape_fits(array.shape, spec):
            raise InputError(shape_mismatch_message(self.name, spec, array.shape))
        return cast_for_model(array, self.feed_dtype)

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        try:
            out = self.forward(batch)
        except CifarlabError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            # A model with an unknown input contract tells us only by failing; say what we fed it.
            raise InputError(f"{self.name} failed on a batch of shape {batch.shape} "
                             f"({batch.dtype}): {str(exc).splitlines()[0]}") from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        try:
            out = np.asarray(out, dtype=np.float32)
        except (TypeError, ValueError) as exc:  # e.g. a list of {class: probability} dicts
            raise InputError(f"{self.name} returned {type(out).__name__}, not an array of numbers ({exc}); "
                             "expected logits or probabilities of shape (N, classes)") from None
        if out.ndim != 2:
            raise InputError(f"{self.name} returned an array of shape {out.shape}; expected (N, classes)")
        return out


def as_logits(outputs: np.ndarray) -> np.ndarray:
    """Probabilities become log-probabilities; logits pass through unchanged."""
    if outputs.size and is_probability(outputs):
        return np.log(np.clip(outputs, 1e-12, None)).astype(np.float32)
    return outputs.astype(np.float32, copy=False)


def cast_for_model(array: np.ndarray, dtype: str | None) -> np.ndarray:
    """Cast to the dtype the model needs without rescaling.

    For a uint8 graph, float values are rounded and saturated to 0..255: what the user's
    values mean in pixel units, never divided or multiplied.
    """
    if dtype == "uint8" and array.dtype != np.uint8:
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if dtype in ("float32", "float16", "float64") and array.dtype != np.dtype(dtype):
        return array.astype(dtype)
    if dtype is None and array.dtype not in (np.uint8, np.float32):
        return array.astype(np.float32)
    return np.ascontiguousarray(array)


def expected_shape(spec: dict[str, Any]) -> tuple[int | None, int | None, int | None] | None:
    """(H, W, C) or (C, H, W) per the spec, or None when the layout is unknown."""
    h, w, c = spec.get("height"), spec.get("width"), spec.get("channels")
    if spec.get("layout") == "NHWC":
        return h, w, c
    if spec.get("layout") == "NCHW":
        return c, h, w
    return None


def shape_fits(shape: tuple[int, ...], spec: dict[str, Any]) -> bool:
    """Does a batch shape match the spec? Unknown (None) dimensions match anything."""
    expected = expected_shape(spec)
    if expected is None:
        return True
    return len(shape) == 4 and all(e is None or e == d for e, d in zip(expected, shape[1:]))


def image_layout(shape: Any, what: str) -> tuple[str, int | None, int | None, Any]:
    """(layout, height, width, channels) of a model's declared rank-4 input shape: NHWC when
    the last axis has 3 channels, NCHW when axis 1 has; symbolic sizes become None. `what`
    starts the error, e.g. "model.onnx declares input x: tensor(float) [N, 32, 32, 4]"."""
    if shape[3] == 3:
        layout, (h, w, c) = "NHWC", shape[1:]
    elif shape[1] == 3:
        layout, (c, h, w) = "NCHW", shape[1:]
    else:
        raise InputError(f"{what}: neither axis 1 nor axis 3 has 3 channels, so its layout (NHWC or NCHW) "
                         "is unclear")
    return layout, *(d if isinstance(d, int) else None for d in (h, w)), c


def image_size(spec: dict[str, Any], images: np.ndarray | None) -> tuple[int, int]:
    """(H, W) a spec declares; a side it leaves open is taken from `images` (N, H, W, C), else 32."""
    h, w = spec.get("height"), spec.get("width")
    if (h is None or w is None) and images is not None:
        h, w = images.shape[1:3]
    return int(h or 32), int(w or 32)


def describe_spec(spec: dict[str, Any]) -> str:
    shape = expected_shape(spec)
    if shape is None:
        return "(input shape unknown)"
    dims = ", ".join(str(d) for d in shape)
    return f"of shape (N, {dims}) {spec.get('layout')}, dtype {spec.get('dtype') or 'float'}"


def shape_mismatch_message(name: str, spec: dict[str, Any], shape: tuple[int, ...]) -> str:
    h, w, c = spec.get("height"), spec.get("width"), spec.get("channels")
    base = f"{name} takes images {describe_spec(spec)}; got {tuple(shape)}"
    if spec.get("layout") == "NHWC" and tuple(shape[1:]) == (c, h, w):
        return f"{base}, which is NCHW (channels first). Transpose with x.transpose(0, 2, 3, 1)."
    if spec.get("layout") == "NCHW" and tuple(shape[1:]) == (h, w, c):
        return f"{base}, which is NHWC (channels last). Transpose with x.transpose(0, 3, 1, 2)."
    return f"{base}. Resize or convert the images to that shape (`cifarlab diagnose --resize` resizes them)."


# ---- runners for cifarlab models, torch modules and callables ------------------------------

def cifarlab_runner(classifier: Classifier, name: str) -> ModelRunner:
    """A cifarlab model, called on the array as given (bypassing predict's validation).

    The classifier keeps whatever train/eval mode it is in: load_model returns eval mode, and
    a live model left in training mode must show that.
    """
    meta = classifier.meta
    h, w = meta.image_size
    spec = {"dtype": "uint8", "layout": "NHWC", "height": h, "width": w, "channels": 3,
            "preprocessing": {**meta.preprocessing.to_dict(), "applied_by": "model"}}

    @torch.no_grad()
    def forward(batch: np.ndarray) -> torch.Tensor:
        # Floats go through the same Preprocess as uint8 (it calls .float()), which is what
        # reproduces a doubled or missing /255.
        with buffers_kept(classifier):
            return classifier(torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(classifier.device))

    # feed_dtype None: floats must reach the network as given, never rounded to uint8.
    return ModelRunner(
        name=f"{name} (cifarlab {meta.architecture})", kind="cifarlab",
        num_classes=meta.num_classes, classes=list(meta.classes), input_spec=spec,
        train_stats=meta.train_input_stats.to_dict() if meta.train_input_stats else None,
        trained_accuracy=recorded_accuracy(meta),
        forward=forward, feed_dtype=None, meta=meta)


def module_runner(module: nn.Module, input_spec: dict[str, Any] | None,
                  classes: list[str] | None) -> ModelRunner:
    """A live torch module; it runs in whatever mode it is in (that is what is being diagnosed)."""
    spec = {**_unknown_spec(), "dtype": "float32", **(input_spec or {})}
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    @torch.no_grad()
    def forward(batch: np.ndarray) -> torch.Tensor:
        with buffers_kept(module):
            return module(torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(device))

    return ModelRunner(name=type(module).__name__, kind="callable", num_classes=_num_classes(classes),
                       classes=classes, input_spec=spec, train_stats=None, trained_accuracy=None,
                       forward=forward, feed_dtype=spec["dtype"])


def callable_runner(function: Callable, input_spec: dict[str, Any] | None,
                    classes: list[str] | None) -> ModelRunner:
    """A function numpy batch -> logits or probabilities (e.g. a Keras model's predict)."""
    spec = {**_unknown_spec(), **(input_spec or {})}
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return ModelRunner(name=name, kind="callable", num_classes=_num_classes(classes), classes=classes,
                       input_spec=spec, train_stats=None, trained_accuracy=None, forward=function,
                    feed_dtype=spec["dtype"])


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Run `module` as it is, but leave its buffers as they were.

    A model left in training mode is diagnosed in training mode (that is the bug to find), but
    each forward pass would also move its BatchNorm running statistics towards the batch, and
    the probes feed it deliberately wrong inputs (pixels x255, transposed images): diagnosing a
    user's live model would leave its statistics, and so its eval-mode predictions, broken.
    """
    if not any(m.training for m in module.modules()):
        yield  # eval mode changes no buffer
        return
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


def _unknown_spec() -> dict[str, Any]:
    return {"dtype": None, "layout": None, "height": None, "width": None, "channels": 3,
            "preprocessing": None}


def _num_classes(classes: list[str] | None) -> int | None:
    return len(classes) if classes else None


def recorded_accuracy(meta: Mapping[str, Any]) -> float | None:
    metrics = meta.get("metrics") or {}
    value = metrics.get("val_acc", metrics.get("test_acc"))
    return float(value) if value is not None else None




# ---- a runner as a Classifier, for evaluation -----------------------------------------------

# `--preprocessing` for a model file that does not record its own (Keras, foreign ONNX): what
# the user's training script did to 0..255 pixels. Mean and std are given in 0..1 units, as
# torchvision's Normalize and most scripts write them.
PREPROCESSING_CHOICES = ("none", "scale", "standardize:MEAN:STD")


def parse_preprocessing(text: str) -> dict[str, Any]:
    """`--preprocessing` -> {"kind", "mean", "std" (0..255 pixel units), "description"}.

    "none": raw 0..255 pixels; "scale": x / 255; "standardize:0.507,0.487,0.441:0.267,0.256,0.276":
    (x / 255 - mean) / std per RGB channel (one value is used for all three).
    """
    if text == "none":
        return {"kind": "none", "mean": [0.0] * 3, "std": [1.0] * 3, "description": "raw 0..255 pixels"}
    if text == "scale":
        return {"kind": "scale", "mean": [0.0] * 3, "std": [255.0] * 3, "description": "x / 255"}
    kind, _, rest = text.partition(":")
    mean_text, _, std_text = rest.partition(":")
    try:
        mean, std = _three(mean_text), _three(std_text)
    except ValueError:
        mean = std = []
    if kind != "standardize" or not mean or not std or min(std) <= 0:
        raise CifarlabError(
            f"--preprocessing {text!r} is not one of none, scale, standardize:MEAN:STD (e.g. "
            "standardize:0.507,0.487,0.441:0.267,0.256,0.276, in 0..1 units, std > 0): say what your "
            "training script did to the 0..255 pixels")
    return {"kind": "standardize", "mean": [m * 255 for m in mean], "std": [s * 255 for s in std],
            "description": f"(x / 255 - {mean}) / {std}"}


def _three(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(np.isfinite(values)):
        raise ValueError(text)
    return values


def apply_preprocessing(pixels: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """Raw uint8 NHWC pixels -> float32 (pixels - mean) / std, per channel.

    `preprocessing` holds "mean" and "std" in pixel units: x / 255 is mean 0, std 255.
    """
    mean = np.asarray(preprocessing["mean"], np.float32)
    std = np.asarray(preprocessing["std"], np.float32)
    return ((pixels.astype(np.float32) - mean) / std).astype(np.float32)


class RunnerClassifier:
    """A runner behind the part of the `Classifier` interface that evaluation uses.

    `evaluate` needs four things from a model: its metadata (dataset, split, classes,
    architecture), its class names, its image size, and logits for raw uint8 NHWC images.
    `feed` is the preprocessing the caller must apply before the model (None: the model takes
    raw pixels itself), so a model scores exactly what it would in a correct pipeline.
    """

    def __init__(self, runner: ModelRunner, meta: Mapping[str, Any], image_size: tuple[int, int],
                 feed: dict[str, Any] | None):
        self.runner = runner
        self.meta = meta
        self.image_size = image_size
        self.feed = feed

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def predict_proba(self, images: Any, batch_size: int = 1000) -> np.ndarray:
        return softmax(self.predict_logits(images, batch_size))

    def predict_logits(self, images: Any, batch_size: int = 1000) -> np.ndarray:
        """Logits (N, C) for raw uint8 NHWC images, fed in the form the model needs."""
        pixels = validate_images(images, self.image_size).numpy()
        if self.feed is not None:
            return self.runner.logits(apply_preprocessing(pixels, self.feed), batch_size)
        return self.runner.logits(pixels, batch_size)
