"""Seeded, stratified train/val split of a dataset's training set."""

from __future__ import annotations

import hashlib

import numpy as np

from cifarlab.data.dataset import Dataset
from cifarlab.errors import CifarlabError, InputError


def split_indices(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train_idx, val_idx), both sorted int64.

    Each class contributes ``round(count * val_fraction)`` of its samples to val, so
    class balance is the same in both parts.
    """
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels must be 1-D, got shape {labels.shape}.")
    rng = np.random.default_rng(seed)
    val_parts = []
    for c in np.unique(labels):  # sorted, so the rng draws happen in a fixed order
        idx = rng.permutation(np.flatnonzero(labels == c))
        val_parts.append(idx[: int(round(len(idx) * val_fraction))])
    val = np.sort(np.concatenate(val_parts)).astype(np.int64) if val_parts else np.empty(0, np.int64)
    in_val = np.zeros(len(labels), dtype=bool)
    in_val[val] = True
    return np.flatnonzero(~in_val).astype(np.int64), val


def get_split(
    ds: Dataset, split: str, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of ``"train"`` (train minus val), ``"val"`` or ``"test"`` (the official test set)."""
    if split == "test":
        return ds.test_x, np.asarray(ds.test_y, dtype=np.int64)
    if split not in ("train", "val"):
        raise InputError(f"split must be 'train', 'val' or 'test', got {split!r}.")
    train_idx, val_idx = split_indices(ds.train_y, val_fraction, seed)
    if split == "train" and len(val_idx) == 0:
        return ds.train_x, np.asarray(ds.train_y, dtype=np.int64)  # no copy of a memmap
    idx = train_idx if split == "train" else val_idx
    return ds.train_x[idx], np.asarray(ds.train_y[idx], dtype=np.int64)


def split_info(ds: Dataset, val_fraction: float, seed: int) -> dict:
    """A record of the split, with a hash identifying exactly which images were held out."""
    train_idx, val_idx = split_indices(ds.train_y, val_fraction, seed)
    return {
        "method": "stratified",
        "seed": seed,
        "val_fraction": val_fraction,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "val_indices_sha256": hashlib.sha256(val_idx.astype("<i8").tobytes()).hexdigest(),
    }


def split_images(recorded: dict | None, dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images of `split`; for "val", the very split a model was trained without.

    `recorded` is the model file's "split" record (val_fraction, seed, the indices' hash).
    """
    if split == "test":
        return get_split(dataset, "test")
    if split != "val":
        raise CifarlabError(f"--split must be 'val' or 'test', got {split!r}")
    if not recorded or not recorded.get("n_val"):
        raise CifarlabError("this model was trained without a validation split; use --split test")
    fraction, seed = recorded["val_fraction"], recorded["seed"]
    if split_info(dataset, fraction, seed)["val_indices_sha256"] != recorded["val_indices_sha256"]:
        raise CifarlabError(
            "this dataset's validation split differs from the one recorded in the model file "
            "(a different copy or version of the data?), so 'val' would include training images. "
            "Use --split test."
        )
    return get_split(dataset, "val", fraction, seed)
