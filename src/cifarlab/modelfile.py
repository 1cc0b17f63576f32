"""The model file: weights plus everything needed to use them correctly, in one safetensors file.

The contract that makes the seed's bug impossible: a cifarlab model takes **raw uint8 RGB
images, NHWC, 0..255**, exactly as stored in the dataset. Scaling (/255) and normalisation
(the training split's per-channel mean/std) happen inside `Classifier.forward`, and their
constants are stored in the file next to the weights. `predict` refuses anything that is
not such an array, so a forgotten or doubled `/255` is an error, not 3% accuracy.

safetensors holds only tensors and a str->str metadata map, so loading never runs code
(unlike pickle-based `.pt` files). All our metadata is one JSON document under the key
"cifarlab".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from cifarlab.errors import CifarlabError, InputError, ModelFileError
from cifarlab.fileio import atomic_write, require_file
from cifarlab.metrics import softmax
from cifarlab.modelmeta import ModelMeta, make_meta
from cifarlab.models import create_model

__all__ = ["METADATA_KEY", "Preprocess", "input_statistics", "Classifier", "validate_images", "build_classifier",
           "make_meta", "save_model", "atomic_save_safetensors", "read_safetensors", "read_meta", "load_model"]

METADATA_KEY = "cifarlab"
MAX_TENSORS = 10_000  # a model holds 41; its checkpoint, with optimizer state and averages, a few hundred


class Preprocess(nn.Module):
    """uint8 NHWC 0..255 -> float NCHW, (x - mean) / std with mean/std in pixel units."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        # channels_last keeps the NHWC memory order, so the permute above costs nothing.
        x = x.contiguous(memory_format=torch.channels_last)
        return (x - self.mean) / self.std


def input_statistics(images: np.ndarray, max_images: int = 10_000) -> dict[str, list[float]]:
    """Per-channel mean/std/min/max of raw pixels, recorded so later tools can compare inputs."""
    sample = np.asarray(images[:max_images], dtype=np.float64).reshape(-1, images.shape[-1])
    return {
        "mean": sample.mean(0).round(4).tolist(),
        "std": sample.std(0).round(4).tolist(),
        "min": sample.min(0).tolist(),
        "max": sample.max(0).tolist(),
    }


class Classifier(nn.Module):
    """A network plus its preprocessing and metadata; forward takes uint8 NHWC images."""

    def __init__(self, net: nn.Module, preprocess: Preprocess, meta: ModelMeta):
        super().__init__()
        self.preprocess = preprocess
        self.net = net
        self.meta = meta

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.meta.image_size

    @property
    def device(self) -> torch.device:
        return self.preprocess.mean.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))

    @torch.no_grad()
    def predict_logits(self, images: Any, batch_size: int = 1000) -> np.ndarray:
        """Logits (N, C) for raw uint8 NHWC images; validates the input first."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch = validate_images(images, self.image_size)
        was_training = self.training
        self.eval()
        try:
            out = [self(batch[i:i + batch_size].to(self.device)).float().cpu()
                   for i in range(0, len(batch), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_proba(self, images: Any, batch_size: int = 1000) -> np.ndarray:
        """Class probabilities (N, C), rows summing to 1."""
        return softmax(self.predict_logits(images, batch_size))

    def predict(self, images: Any, batch_size: int = 1000) -> np.ndarray:
        """Predicted class ids (N,) for raw uint8 NHWC images."""
        return self.predict_logits(images, batch_size).argmax(1)


def validate_images(images: Any, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """Return images as a uint8 NHWC tensor, or raise InputError saying what is wrong.

    Never converts silently: a float array in 0..1 is exactly the bug this project exists
    for, and guessing its scale would hide it.
    """
    array = images.detach().cpu() if isinstance(images, torch.Tensor) else _as_numeric_array(images)
    if array.ndim == 3:
        array = array[None]  # one image
    h, w = size
    expected = f"raw RGB images as uint8, shape (N, {h}, {w}, 3), values 0..255"
    if array.ndim != 4:
        raise InputError(f"expected {expected}; got an array of shape {tuple(array.shape)}")
    _check_dtype(array, expected)
    shape = tuple(array.shape)
    if shape[1:] == (3, h, w):
        raise InputError(
            f"expected {expected}; got {shape}, which looks like NCHW (channels first). "
            "Pass x.transpose(0, 2, 3, 1) (numpy) or x.permute(0, 2, 3, 1) (torch)."
        )
    if shape[-1] != 3:
        kind = {1: "grayscale", 4: "RGBA"}.get(shape[-1], f"{shape[-1]}-channel")
        raise InputError(f"expected {expected}; got {shape}, {kind} images. Convert them to RGB first.")
    if shape[1:3] != (h, w):
        raise InputError(
            f"expected {expected}; got images of {shape[1]}x{shape[2]} pixels. Resize them to {h}x{w}: "
            "`cifarlab predict --resize` for image files, cifarlab.imageops.resize_images(x) for arrays."
        )
    if isinstance(array, torch.Tensor):
        return array.contiguous()
    # Cached datasets are read-only memmaps; torch wants writable memory, so copy those.
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _as_numeric_array(images: Any) -> np.ndarray:
    """np.asarray, refusing ragged nesting and non-numeric contents with an InputError."""
    try:
        array = np.asarray(images)
    except (ValueError, TypeError) as exc:  # ragged lists of images of different sizes
        raise InputError(f"expected one array of images of equal size; got {type(images).__name__} "
                         f"that numpy cannot stack ({exc}). Resize the images to one size first.") from None
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"expected raw RGB images as uint8 numbers 0..255; got an array of dtype {array.dtype}. "
                         "Decode the images to pixel arrays first (e.g. np.asarray(PIL.Image.open(f))).")
    return array


def _check_dtype(array: Any, expected: str) -> None:
    dtype = str(array.dtype).replace("torch.", "")
    if dtype == "uint8":
        return
    values = array.float().numpy() if isinstance(array, torch.Tensor) else np.asarray(array, np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"expected {expected}; got {dtype} values containing NaN or inf")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    hint = "Pass the images as stored (uint8 0..255): this model scales and normalises them itself."
    if hi <= 1.0 and lo >= -1.0:
        hint = ("They look already scaled (e.g. divided by 255 or normalised); this model does "
                "that itself, so pass the raw uint8 pixels instead.")
    elif lo >= 0 and hi <= 255 and np.all(values == np.round(values)):
        hint = "The values are whole numbers in 0..255: convert with .astype(np.uint8)."
    raise InputError(f"expected {expected}; got dtype {dtype} with values in [{lo:g}, {hi:g}]. {hint}")


def build_classifier(meta: ModelMeta) -> Classifier:
    """An untrained Classifier for the architecture and preprocessing described by meta."""
    net = create_model(meta.architecture, meta.num_classes, **meta.arch_args)
    return Classifier(net, Preprocess(list(meta.preprocessing.mean), list(meta.preprocessing.std)), meta)


def save_model(model: Classifier, path: str | Path) -> Path:
    """Write weights + metadata atomically: a crash leaves the old file or the new one."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_save_safetensors(tensors, {METADATA_KEY: json.dumps(model.meta.to_dict())}, Path(path))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path,
                            what: str | None = None) -> Path:
    """Write a safetensors file atomically and durably (see cifarlab.fileio.atomic_write).

    A full disk raises StorageError and leaves the previous file (the last good checkpoint)
    in place. Serialised in memory first, so that a failing write is an OSError with its errno.
    """
    what = what or ("checkpoint" if any(k.endswith("checkpoint") for k in metadata) else "model file")
    return atomic_write(path, safetensors_bytes(tensors, metadata=metadata), what=what)


def read_safetensors(path: str | Path, *, weights: bool = True, shapes: dict[str, tuple[int, ...]] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with errors a user can act on; with
    `weights=False` only the header is read (no tensors: cheap, whatever the file's size).
    Given `shapes`, the header must list exactly those tensors (names and sizes) before any
    tensor is read, so a file listing more than a model needs costs no work in proportion.

    cifarlab's own metadata entries (keys starting with "cifarlab") must be JSON objects, so
    that callers can json.loads them without meeting a torn or hand-edited header.
    """
    path = Path(path)
    require_file(path, "model file", ModelFileError)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, names = f.metadata() or {}, f.keys()
            if len(names) > MAX_TENSORS:
                raise ModelFileError(f"{path} lists {len(names):,} tensors; cifarlab's models and checkpoints "
                                     f"hold at most a few hundred (refused above {MAX_TENSORS:,}): the file was "
                                     "damaged or edited, or is not cifarlab's")
            if shapes is not None:
                _check_listed_shapes(path, names, shapes, lambda k: tuple(f.get_slice(k).get_shape()))
            tensors = {k: f.get_tensor(k) for k in names} if weights else {}
    except ModelFileError:
        raise
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({exc}). cifarlab model files are "
            "written by `cifarlab train`; pickled .pt/.pth files are not accepted."
        ) from None
    for key, value in metadata.items():
        if key.startswith(METADATA_KEY):
            _json_object(value, path, key)
    return tensors, metadata


def _check_listed_shapes(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]],
                         shape_of: Callable[[str], tuple[int, ...]]) -> None:
    stored = {k: shape_of(k) for k in names} if len(names) == len(shapes) else {}
    if stored != shapes:
        differ = sorted(set(shapes) ^ set(names)) or [k for k in shapes if shapes[k] != stored[k]]
        raise ModelFileError(
            f"{path}: weights do not match the architecture its metadata describes ({len(names):,} tensors "
            f"listed, {len(shapes):,} needed; first differences: {', '.join(differ[:3])}); the file was "
            "damaged or edited.")


def read_meta(path: str | Path) -> ModelMeta:
    """The checked metadata of a cifarlab model file, from its header alone (no weights read):
    the cheap check before anything slow, and what `load_model` builds from."""
    path = Path(path)
    _, metadata = read_safetensors(path, weights=False)
    if METADATA_KEY not in metadata:
        raise ModelFileError(
            f"{path} is a safetensors file without cifarlab metadata: it holds weights but not "
            "the architecture and preprocessing needed to use them. Was it written by cifarlab?"
        )
    return ModelMeta.from_dict(json.loads(metadata[METADATA_KEY]), str(path))  # a JSON object: checked


def _json_object(text: str, path: Path, key: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, 4,300+ digit ints
        raise ModelFileError(f"{path}: the {key!r} metadata is not valid JSON ({exc}); the file was "
                             "damaged or edited. Use the original file written by cifarlab.") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: the {key!r} metadata should be a JSON object, got {type(value).__name__}; "
                             "the file was damaged or edited. Use the original file written by cifarlab.")
    return value


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Load a cifarlab model file; the result is in eval mode and validates what it is fed.

    Cheap checks first: the metadata (header), then the tensors' names and shapes (header)
    against the architecture built on the "meta" device (shapes only, no memory); only a file
    that lists exactly the weights the architecture needs has its tensors read. So neither
    metadata asking for a huge network nor a header listing a million extra tensors costs
    work in proportion to it.
    """
    path = Path(path)
    meta = read_meta(path)
    tensors, _ = read_safetensors(path, shapes=_architecture_shapes(meta, path))
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ModelFileError(f"{path}: {len(bad)} weight tensors hold NaN or infinite values ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}): the training that wrote it diverged. "
                             "Retrain (e.g. with a lower --lr) or use an earlier checkpoint.")
    model = build_classifier(meta)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not match architecture {meta.architecture!r}: {exc}") from None
    return model.to(device).eval()


def _architecture_shapes(meta: ModelMeta, path: Path) -> dict[str, tuple[int, ...]]:
    """The weight shapes of the network the metadata describes, built on the "meta" device."""
    try:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in build_classifier(meta).state_dict().items()}
    except CifarlabError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:  # arch_args the builder rejects
        raise ModelFileError(f"{path}: the metadata describes no buildable {meta.architecture!r} "
                             f"network ({type(exc).__name__}: {exc}); the file was damaged or edited.") from None
