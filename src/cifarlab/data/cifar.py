"""The official CIFAR "python version": where each release comes from, its checksums, and its pickles.

The batches are Python 2 pickles; they go through an allow-list unpickler that can
build numpy arrays and nothing else callable, so a file posing as one cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from cifarlab.data.archives import _Tree
from cifarlab.data.dataset import IMAGE_SIZE, Dataset, printable
from cifarlab.data.fetch import _md5_file
from cifarlab.errors import ChecksumError, DataError
from cifarlab.metrics import MAX_CLASSES


@dataclass(frozen=True)
class _Official:
    """Where an official CIFAR release comes from and how to recognise it."""

    name: str
    url: str
    md5: str
    folder: str  # top-level folder inside the archive
    archive_names: tuple[str, ...]  # file names that claim to be this release
    member_md5: dict[str, str]  # md5 of files inside ``folder`` (where published)


OFFICIAL: dict[str, _Official] = {
    "cifar100": _Official(
        name="cifar100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        archive_names=("cifar-100-python.tar.gz",),
        member_md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
    "cifar10": _Official(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        # Keras saves the very same file under the folder's name.
        archive_names=("cifar-10-python.tar.gz", "cifar-10-batches-py.tar.gz"),
        member_md5={},
    ),
}
# The superclass (coarse label) of each CIFAR-100 fine label, in the official label order; the
# dataset's own files give the same (tests/test_data.py checks it against the real archive).
# Diagnosis uses it to recognise fine predictions scored against coarse labels from a
# confusion matrix alone.
CIFAR100_COARSE_OF_FINE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)
_NAME_ALIASES = {"cifar100": "cifar100", "cifar-100": "cifar100", "cifar10": "cifar10", "cifar-10": "cifar10"}
_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _official_by_archive_name(name: str) -> _Official | None:
    return next((o for o in OFFICIAL.values() if name in o.archive_names), None)


def _check_md5(path: Path, expected: str, what: str) -> None:
    actual = _md5_file(path)
    if actual != expected:
        raise ChecksumError(
            f"MD5 of {what} is {actual}, expected {expected}. The file is corrupt or incomplete: delete it and "
            "download it again. If you modified it on purpose, load it with --no-verify."
        )


def _check_members(tree: _Tree, member_md5: dict[str, str]) -> None:
    for name, expected in member_md5.items():
        actual = hashlib.md5(tree.read(name)).hexdigest()
        if actual != expected:
            raise ChecksumError(
                f"MD5 of {tree.where(name)} is {actual}, expected {expected} (official release). "
                "Re-extract the official archive, or load a deliberately modified copy with --no-verify."
            )


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 use to spell ``bytes``; latin-1 only."""
    if encoding.lower().replace("-", "") != "latin1":
        raise DataError(f"Refusing to decode a pickle that uses the {encoding!r} codec.")
    return text.encode("latin1")


# Fetched from live objects so the names resolve in numpy 1.x (numpy.core) and 2.x (numpy._core).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and nothing else callable."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"Refusing to load a pickle that references {module}.{name}: CIFAR files only contain "
                "numpy arrays, lists and dicts. The file is not an official CIFAR batch."
            ) from None


# The official CIFAR-100 training pickle runs 0.5M opcodes; 8x that bounds what a hostile one
# can make the unpickler allocate (each opcode makes at most one object).
MAX_PICKLE_OPS = 4_000_000
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _check_opcodes(data: bytes, where: str) -> None:
    """Walk the opcodes without running any: refuse pickles that would exhaust memory.

    The allow-list stops code execution, not allocation: a single LONG_BINPUT with index
    10**9 makes the C unpickler grow its memo table to 8 GB, and 200 MB of EMPTY_DICT opcodes
    build 200 million dicts.
    """
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data), 1):
            if count > MAX_PICKLE_OPS or (op.name in _MEMO_OPS and int(cast(int, arg)) > MAX_PICKLE_OPS):
                raise DataError(f"{where} is not a CIFAR pickle: it has more than {MAX_PICKLE_OPS:,} opcodes or "
                                "memo entries (the official ones have about 500,000); refusing to load it.")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - genops raises ValueError and others on malformed input
        raise DataError(f"{where} is not a readable CIFAR pickle ({type(e).__name__}: {e}).") from e


def _unpickle(tree: _Tree, name: str) -> dict:
    data = tree.read(name)
    _check_opcodes(data, tree.where(name))
    try:
        # The official files are Python 2 pickles: "bytes" keeps their str keys as bytes.
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed pickle can fail in many ways; all mean "bad file"
        raise DataError(f"{tree.where(name)} is not a readable CIFAR pickle ({type(e).__name__}: {e}).") from e
    if not isinstance(obj, dict):
        raise DataError(f"{tree.where(name)} should hold a dict, got {type(obj).__name__}.")
    return obj


def _field(batch: dict, key: str, where: str) -> Any:
    for k in (key.encode(), key):  # Python 2 pickles give bytes keys, re-saved ones may give str
        if k in batch:
            return batch[k]
    raise DataError(f"{where} has no {key!r} entry; found {sorted(map(str, batch))}.")


def _names(batch: dict, key: str, where: str) -> list[str]:
    """Class names: a list of str or bytes (Python 2 pickles), as many as a dataset may have."""
    names = _field(batch, key, where)
    if not isinstance(names, (list, tuple)) or not 2 <= len(names) <= MAX_CLASSES \
            or not all(isinstance(n, (str, bytes)) and 0 < len(n) <= 1000 for n in names):
        raise DataError(f"{where}: {key!r} should be a list of 2..{MAX_CLASSES:,} class names (strings), got "
                        f"{type(names).__name__} {str(names)[:60]}.")
    try:
        return [printable(n.decode("utf-8") if isinstance(n, bytes) else n) for n in names]
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: {key!r} holds a name that is not UTF-8 ({exc}).") from None


def _batch_images(batch: dict, where: str) -> np.ndarray:
    """Planar rows (R 1024, G 1024, B 1024, each row-major) -> uint8 NHWC."""
    data = np.asarray(_field(batch, "data", where))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise DataError(f"{where}: 'data' should be uint8 of shape (N, 3072), got {data.dtype} {data.shape}.")
    return np.ascontiguousarray(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))


def _batch_labels(batch: dict, key: str, n: int, n_classes: int, where: str) -> np.ndarray:
    raw = np.asarray(_field(batch, key, where))
    # Integers only: a float label 1.7 would silently become class 1.
    if raw.dtype.kind not in "iu" and not (raw.dtype.kind == "f" and np.isfinite(raw).all()
                                           and (raw == np.round(raw)).all()):
        raise DataError(f"{where}: {key!r} should be integer class ids, got {raw.dtype} values "
                        f"{raw.ravel()[:5].tolist()}.")
    labels = raw.astype(np.int64)
    if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= n_classes)):
        raise DataError(f"{where}: {key!r} should be {n} ids in [0, {n_classes}), got shape {labels.shape}.")
    return labels


def _cifar100_from_tree(tree: _Tree, source: str) -> Dataset:
    meta = _unpickle(tree, "meta")
    classes = _names(meta, "fine_label_names", tree.where("meta"))
    coarse = _names(meta, "coarse_label_names", tree.where("meta"))
    parts = {}
    for split in ("train", "test"):
        batch, where = _unpickle(tree, split), tree.where(split)
        x = _batch_images(batch, where)
        y = _batch_labels(batch, "fine_labels", len(x), len(classes), where)
        yc = _batch_labels(batch, "coarse_labels", len(x), len(coarse), where)
        parts[split] = (x, y, yc)
    return Dataset(
        name="cifar100",
        train_x=parts["train"][0], train_y=parts["train"][1],
        test_x=parts["test"][0], test_y=parts["test"][1],
        classes=classes, coarse_classes=coarse,
        train_y_coarse=parts["train"][2], test_y_coarse=parts["test"][2],
        source=source,
    )  # fmt: skip


def _cifar10_from_tree(tree: _Tree, source: str) -> Dataset:
    classes = _names(_unpickle(tree, "batches.meta"), "label_names", tree.where("batches.meta"))

    def read(batch_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in batch_names:
            batch, where = _unpickle(tree, name), tree.where(name)
            xs.append(_batch_images(batch, where))
            ys.append(_batch_labels(batch, "labels", len(xs[-1]), len(classes), where))
        return np.concatenate(xs), np.concatenate(ys)

    train_x, train_y = read(_CIFAR10_TRAIN_BATCHES)
    test_x, test_y = read(("test_batch",))
    return Dataset("cifar10", train_x, train_y, test_x, test_y, classes, source=source)
