"""The on-disk cache: one folder of ``.npy`` files per dataset, written atomically, read as memmaps."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.data.dataset import Dataset

CACHE_FORMAT_VERSION = 1

_ARRAY_FIELDS = ("train_x", "train_y", "test_x", "test_y", "train_y_coarse", "test_y_coarse")


def _read_cache(target: Path, need_verified: bool) -> Dataset | None:
    """The cached dataset, or None when absent, stale, or not verified enough."""
    try:
        meta = json.loads((target / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != CACHE_FORMAT_VERSION or (need_verified and not meta.get("verified")):
            return None
        arrays = {
            f: np.load(target / f"{f}.npy", mmap_mode="r", allow_pickle=False)
            for f in _ARRAY_FIELDS
            if f in meta["arrays"]
        }
        ds = Dataset(
            name=meta["name"], classes=meta["classes"], coarse_classes=meta.get("coarse_classes"),
            source=meta.get("source", ""), skipped=list(meta.get("skipped", [])), **arrays,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: rebuild it
    if len(ds.train_x) != len(ds.train_y) or len(ds.test_x) != len(ds.test_y):
        return None
    return ds


def _write_cache(target: Path, ds: Dataset, verified: bool) -> None:
    """Write into a temporary sibling, then rename it into place: readers see all or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        arrays = {f: getattr(ds, f) for f in _ARRAY_FIELDS if getattr(ds, f) is not None}
        for field, arr in arrays.items():
            with open(tmp / f"{field}.npy", "wb") as out:
                np.save(out, np.ascontiguousarray(arr), allow_pickle=False)
                _fsync(out)
        meta = {
            "format_version": CACHE_FORMAT_VERSION, "name": ds.name, "classes": list(ds.classes),
            "coarse_classes": ds.coarse_classes, "source": ds.source, "verified": verified, "arrays": list(arrays),
            "skipped": list(ds.skipped),
        }  # fmt: skip
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:  # last: it marks the entry complete
            json.dump(meta, f, indent=1)
            _fsync(f)
        _fsync_dir(tmp)
        if target.exists():  # stale, damaged or unverified entry being replaced
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
