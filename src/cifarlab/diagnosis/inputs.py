"""Read the arrays a user brings to `cifarlab diagnose`: .npy, .npz or .csv files.

Nothing here is pickle: `.npy`/`.npz` are read with allow_pickle=False, so a crafted file
cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarlab.errors import InputError

# Keys tried, in order, when an .npz holds several arrays.
NPZ_KEYS = {
    "images": ("x", "images", "x_test", "X", "X_test", "data"),
    "labels": ("y", "labels", "y_test", "Y", "y_true", "targets"),
    "predictions": ("probs", "probabilities", "logits", "predictions", "y_pred", "preds"),
}


def load_array(path: str | Path, what: str) -> np.ndarray:
    """One array from a .npy, .npz or .csv file; `what` is images, labels or predictions."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--{what}: file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            return _from_npz(path, what)
        if suffix in (".csv", ".txt"):
            return _from_csv(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"--{what}: cannot read {path} ({exc})") from None
    raise InputError(f"--{what}: {path} has suffix {suffix!r}; expected .npy, .npz or .csv")


def _from_npz(path: Path, what: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.keys())
        if len(keys) == 1:
            return archive[keys[0]]
        for key in NPZ_KEYS[what]:
            if key in archive:
                return archive[key]
    raise InputError(f"--{what}: {path} holds arrays {keys}; expected one of {list(NPZ_KEYS[what])} "
                     "or a file with a single array")


def _from_csv(path: Path) -> np.ndarray:
    array = np.loadtxt(path, delimiter=",", ndmin=1)
    # Whole numbers in a 1-D file are class ids, not floats.
    if array.ndim == 1 and np.all(array == np.round(array)):
        return array.astype(np.int64)
    return array


def as_labels(labels: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, bool]:
    """Integer class ids (N,); one-hot (N, C) rows are accepted and reported as such."""
    labels = np.asarray(labels)
    one_hot = labels.ndim == 2 and labels.shape[1] > 1
    if one_hot:
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
