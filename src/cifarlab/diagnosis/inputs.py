"""Read the arrays a user brings to `cifarlab diagnose`: .npy, .npz or .csv files.

Nothing here is pickle: `.npy`/`.npz` are read with allow_pickle=False, so a crafted file
cannot run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from cifarlab.errors import InputError
from cifarlab.fileio import require_file
from cifarlab.metrics import as_array

# The largest array read from a .npz member (a CIFAR test split as float32 is 123 MB).
MAX_ARRAY_BYTES = 8 * 1024**3
# Keys tried, in order, when an .npz holds several arrays.
NPZ_KEYS = {
    "images": ("x", "images", "x_test", "X", "X_test", "data"),
    "labels": ("y", "labels", "y_test", "Y", "y_true", "targets"),
    "predictions": ("probs", "probabilities", "logits", "predictions", "y_pred", "preds"),
    "confusion": ("cm", "confusion", "confusion_matrix", "matrix"),
}


def load_array(path: str | Path, what: str) -> np.ndarray:
    """One array from a .npy, .npz or .csv file; `what` is images, labels, predictions or
    confusion (the flag it came from, named in every message)."""
    path = Path(path)
    require_file(path, f"--{what}: file", InputError)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".csv", ".txt"):
        raise InputError(f"--{what}: {path} has suffix {suffix!r}; expected .npy, .npz or .csv")
    try:
        if suffix == ".npy":
            # Memory-mapped first: a header that claims more data than the file holds fails here,
            # before anything of that size is allocated; then copied into memory.
            return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
        if suffix == ".npz":
            return _from_npz(path, what)
        return _from_csv(path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/zipfile raise many types on damaged files; all mean "bad file"
        raise InputError(f"--{what}: cannot read {path} as a {suffix} array file "
                         f"({type(exc).__name__}: {exc}). Save it with np.save / np.savez / np.savetxt.") from None


def _from_npz(path: Path, what: str) -> np.ndarray:
    _check_npz_sizes(path, what)
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.keys())
        if len(keys) == 1:
            return archive[keys[0]]
        for key in NPZ_KEYS[what]:
            if key in archive:
                return archive[key]
    raise InputError(f"--{what}: {path} holds arrays {keys}; expected one of {list(NPZ_KEYS[what])} "
                     "or a file with a single array")


def _check_npz_sizes(path: Path, what: str) -> None:
    """Each member's declared size is bounded, and its array header may not claim more data than
    the member holds: numpy allocates the whole array from the header before reading it, so a
    few bytes claiming a 10^12-element array (or a zip bomb) would exhaust memory first."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.file_size > MAX_ARRAY_BYTES:
                raise InputError(f"--{what}: {path} member {info.filename} expands to {info.file_size:,} bytes; "
                                 f"cifarlab reads arrays up to {MAX_ARRAY_BYTES:,} bytes")
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
            declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if declared > info.file_size:
                raise InputError(f"--{what}: {path} member {info.filename} declares {declared:,} bytes of data "
                                 f"but holds {info.file_size:,}: the file is damaged")


def _from_csv(path: Path) -> np.ndarray:
    array = np.loadtxt(path, delimiter=",", ndmin=1)
    # Whole numbers in a 1-D file are class ids, not floats.
    if array.ndim == 1 and np.all(array == np.round(array)):
        return array.astype(np.int64)
    return array


def as_labels(labels: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, bool]:
    """Integer class ids (N,); one-hot (N, C) rows are accepted and reported as such."""
    labels = as_array(labels, "labels")
    one_hot = labels.ndim == 2 and labels.shape[1] > 1
    numeric = np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)
    if not (numeric or (one_hot and labels.dtype == bool)):
        raise InputError(f"labels must be integer class ids (N,) or one-hot rows (N, C); got dtype {labels.dtype}")
    if one_hot:
        if not np.all(np.isfinite(labels)):
            raise InputError("one-hot labels (N, C) must be finite; got NaN or inf")
        labels = labels.argmax(1)
    elif labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputError(f"labels must be a 1-D array of class ids (or one-hot rows); got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isfinite(labels)) \
            or np.any(labels != np.round(labels)):
        raise InputError("labels must be whole-number class ids; got fractional or NaN values")
    labels = labels.astype(np.int64)
    if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"labels must be in [0, {num_classes}); got values from {labels.min()} to {labels.max()}")
    return labels, one_hot
