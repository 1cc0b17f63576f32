"""Find, verify, decode and cache CIFAR-style datasets; split them reproducibly.

A dataset is decoded once into ``<cache_dir>/datasets/<key>/`` as ``.npy`` files
and from then on memory-mapped, so loading 60,000 images takes milliseconds.

Two on-disk formats are understood, detected by content rather than by name:

* the official CIFAR "python version" (pickled batches, as published at
  https://www.cs.toronto.edu/~kriz/cifar.html), as a ``.tar.gz`` or extracted;
* an ImageFolder layout, ``[root/]train/<class>/*.png`` and ``[root/]test/<class>/*``
  (class ids = sorted folder names, as in torchvision), as a folder,
  ``.tar[.gz]``/``.tgz`` or ``.zip``.

Archives are read into memory member by member, never extracted to disk, and
pickles go through an allow-list unpickler: a downloaded file cannot write
outside the cache or run code.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import http.client
import io
import json
import os
import pickle
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from cifarlab.errors import ChecksumError, DataError, InputError

__all__ = [
    "Dataset",
    "default_cache_dir",
    "load_dataset",
    "split_indices",
    "get_split",
    "split_info",
    "download",
]

CACHE_FORMAT_VERSION = 1
IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")

# Limits on what an archive may expand to. The official CIFAR-100 archive holds
# 3 members / ~180 MB; an ImageFolder copy of CIFAR holds ~60,000 files.
MAX_ARCHIVE_BYTES = 2 * 1024**3
MAX_ARCHIVE_MEMBERS = 1_000_000

# Below this many images, starting worker processes costs more than it saves.
_PARALLEL_MIN_IMAGES = 2000
_DECODE_CHUNK = 1000


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
_NAME_ALIASES = {"cifar100": "cifar100", "cifar-100": "cifar100", "cifar10": "cifar10", "cifar-10": "cifar10"}
_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #


@dataclass
class Dataset:
    """Images as uint8 NHWC RGB arrays (possibly read-only memmaps) plus labels."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    coarse_classes: list[str] | None = None
    train_y_coarse: np.ndarray | None = None
    test_y_coarse: np.ndarray | None = None
    source: str = ""

    @property
    def coarse_of_fine(self) -> list[int] | None:
        """Coarse label id of each fine label id (-1 where a fine label never occurs)."""
        if self.train_y_coarse is None:
            return None
        mapping = np.full(len(self.classes), -1, dtype=np.int64)
        mapping[self.train_y] = self.train_y_coarse
        if not np.array_equal(mapping[self.train_y], self.train_y_coarse):
            raise DataError(f"{self.name}: a fine label belongs to more than one coarse label in {self.source}.")
        return mapping.tolist()


def default_cache_dir() -> Path:
    """``$CIFARLAB_HOME`` if set, else ``~/.cache/cifarlab``."""
    env = os.environ.get("CIFARLAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cifarlab"


def _search_dirs(cache_dir: Path) -> list[Path]:
    """Folders searched for an existing official archive, in this order."""
    home = Path.home()
    return [cache_dir, home / ".keras" / "datasets", Path.cwd() / "data", home / "data", home / ".cache" / "torch"]


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #


def load_dataset(
    spec: str | Path,
    *,
    cache_dir: Path | None = None,
    download: bool = True,
    verify: bool = True,
    resize: bool = False,
    progress: bool = True,
) -> Dataset:
    """Load a dataset by name or path, decoding it into the cache on first use.

    ``spec`` is ``"cifar100"`` / ``"cifar10"`` (also ``"cifar-100"``, ``"cifar-10"``,
    any case) or a path to an archive (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``) or
    folder holding either the official python-version files or an ImageFolder.

    For a name, an existing copy of the official archive (``cifar-100-python.tar.gz``,
    ``cifar-10-python.tar.gz``, Keras' ``cifar-10-batches-py.tar.gz``) or of its
    extracted folder (``cifar-100-python/``, ``cifar-10-batches-py/``) is looked for,
    in order, in: the cache dir, ``~/.keras/datasets``, ``./data``, ``~/data`` and
    ``~/.cache/torch``. If none is found and ``download`` is true, the official
    archive is downloaded into the cache dir.

    With ``verify``, a file or folder whose name claims to be an official release is
    checked against the published MD5 (ChecksumError on mismatch). With ``resize``,
    ImageFolder images of another size are resized to 32x32 instead of refused.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    official = _NAME_ALIASES.get(str(spec).strip().lower()) if isinstance(spec, str) else None
    if official is not None:
        key = official
        build = functools.partial(_build_official, OFFICIAL[official], cache_dir, download, verify, progress)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(
                f"Dataset {str(spec)!r} is neither a known name (cifar10, cifar100) nor an existing path. "
                "Pass 'cifar10', 'cifar100', or the path of an archive or folder with --data PATH."
            )
        key = _path_cache_key(path, resize)
        build = functools.partial(_build_from_path, path, verify=verify, resize=resize, progress=progress)

    target = cache_dir / "datasets" / key
    cached = _read_cache(target, need_verified=verify)
    if cached is not None:
        return cached
    ds, verified = build()
    try:
        _write_cache(target, ds, verified)
    except OSError as e:
        # A read-only or full disk should not stop a run; it just costs a decode next time.
        warnings.warn(f"Could not cache {ds.name} in {target} ({e}); it will be decoded again next time.")
        return ds
    cached = _read_cache(target, need_verified=False)
    if cached is None:
        raise DataError(f"The cache just written at {target} cannot be read back; delete it and try again.")
    return cached


def _path_cache_key(path: Path, resize: bool) -> str:
    """``<stem>-<hash>``: a changed, moved or resized-on-load copy gets its own entry."""
    path = path.resolve()
    st = path.stat()
    # A folder's own mtime misses edits inside its subfolders, so every file counts.
    stats = _file_stats(path) if path.is_dir() else [f"{path}|{st.st_size}|{st.st_mtime_ns}"]
    digest = hashlib.sha256("\n".join([f"{path}|resize={resize}", *sorted(stats)]).encode())
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in _stem(path))
    return f"{stem}-{digest.hexdigest()[:12]}"


def _file_stats(root: Path) -> list[str]:
    """``path|size|mtime_ns`` of every file below ``root`` (scandir: one stat per file)."""
    stats, folders = [], [str(root)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    folders.append(entry.path)
                elif entry.is_file():
                    st = entry.stat()
                    stats.append(f"{entry.path}|{st.st_size}|{st.st_mtime_ns}")
    return stats


def _stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- #
# Official releases by name
# --------------------------------------------------------------------------- #


def _build_official(
    official: _Official, cache_dir: Path, allow_download: bool, verify: bool, progress: bool
) -> tuple[Dataset, bool]:
    candidates = _official_candidates(official, cache_dir)
    for path in candidates:
        if path.exists():
            return _build_from_path(path, verify=verify, resize=False, progress=progress, expect=official.name)

    looked = "\n  ".join(str(p) for p in candidates)
    manual = f"Download {official.url} yourself and pass it with --data PATH (archive or extracted folder)."
    if not allow_download:
        raise DataError(f"No local copy of {official.name} found; looked for:\n  {looked}\n{manual}")
    dest = cache_dir / official.archive_names[0]
    try:
        download(official.url, dest, official.md5, progress=progress)
    except ChecksumError:
        raise
    except DataError as e:
        raise DataError(f"{e}\nNo local copy of {official.name} found either; looked for:\n  {looked}") from e
    ds, _ = _build_from_path(dest, verify=False, resize=False, progress=progress, expect=official.name)
    return ds, True  # download() has just checked the MD5


def _official_candidates(official: _Official, cache_dir: Path) -> list[Path]:
    names = [*official.archive_names, official.folder]
    return [d / n for d in _search_dirs(cache_dir) for n in names]


# --------------------------------------------------------------------------- #
# Reading archives and folders
# --------------------------------------------------------------------------- #


@dataclass
class _Tree:
    """Regular files of an archive or folder: relative posix path -> bytes or file."""

    origin: Path
    files: dict[str, bytes | Path]
    prefix: str = ""  # wrapper folder stripped from every name

    def read(self, name: str) -> bytes:
        value = self.files[name]
        return value if isinstance(value, bytes) else value.read_bytes()

    def where(self, name: str) -> str:
        """Where ``name`` is, in words a user can find it by."""
        value = self.files[name]
        return str(value) if isinstance(value, Path) else f"{self.origin} (member {self.prefix}{name})"


def _ignored(parts: tuple[str, ...]) -> bool:
    # macOS archives carry __MACOSX/ and ._* resource forks; editors leave dotfiles.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _open_tree(path: Path) -> _Tree:
    if path.is_dir():
        tree = _Tree(path, _folder_files(path))
    elif tarfile.is_tarfile(path):
        tree = _Tree(path, _tar_files(path))
    elif zipfile.is_zipfile(path):
        tree = _Tree(path, _zip_files(path))
    else:
        raise DataError(f"{path} is neither a folder nor a tar/tar.gz/zip archive. Pass one of those with --data PATH.")
    return _strip_wrapper(tree)


def _folder_files(root: Path) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for fname in filenames:
            rel = rel_dir / fname
            if not _ignored(rel.parts):
                files[str(rel)] = Path(dirpath) / fname
    return files


def _safe_member_name(archive: Path, name: str) -> str | None:
    """Normalised member name, None for ignorable entries; DataError for escaping ones."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise DataError(
            f"{archive} contains the unsafe member {name!r} (absolute path or '..'); refusing to read it. "
            "Re-create the archive with relative paths."
        )
    parts = tuple(p for p in posix.parts if p != ".")
    return None if not parts or _ignored(parts) else "/".join(parts)


class _Budget:
    """Counts members and bytes so a hostile archive cannot exhaust memory."""

    def __init__(self, archive: Path) -> None:
        self.archive, self.members, self.bytes = archive, 0, 0

    def add(self, size: int) -> None:
        self.members += 1
        self.bytes += size
        if self.members > MAX_ARCHIVE_MEMBERS or self.bytes > MAX_ARCHIVE_BYTES:
            raise DataError(
                f"{self.archive} expands to more than {MAX_ARCHIVE_MEMBERS:,} files or "
                f"{MAX_ARCHIVE_BYTES / 1024**3:.0f} GiB; refusing to read it. Extract it yourself "
                "and pass the folder with --data PATH if it is genuine."
            )


def _tar_files(path: Path) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {}
    budget = _Budget(path)
    try:
        # Streaming mode ("r|*") reads the compressed file once, front to back.
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                name = _safe_member_name(path, member.name)
                if member.issym() or member.islnk():
                    warnings.warn(f"Skipping link {member.name!r} in {path}: links are not followed in archives.")
                    continue
                if name is None or not member.isfile():
                    continue
                budget.add(member.size)
                stream = tar.extractfile(member)
                files[name] = stream.read() if stream is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"Could not read the tar archive {path}: {e}. Is it complete? Try downloading it again.") from e
    return files


def _zip_files(path: Path) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {}
    budget = _Budget(path)
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = _safe_member_name(path, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    warnings.warn(f"Skipping link {info.filename!r} in {path}: links are not followed in archives.")
                    continue
                if name is None or info.is_dir():
                    continue
                budget.add(info.file_size)
                files[name] = zf.read(info)  # reads at most file_size bytes, checks the CRC
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise DataError(f"Could not read the zip archive {path}: {e}. Is it complete? Try downloading it again.") from e
    return files


def _strip_wrapper(tree: _Tree) -> _Tree:
    """Drop a single top-level folder that wraps everything (``cifar-100-python/...``)."""
    tops = {name.split("/", 1)[0] for name in tree.files}
    if len(tops) != 1 or not all("/" in name for name in tree.files):
        return tree
    top = tops.pop()
    files = {name[len(top) + 1 :]: value for name, value in tree.files.items()}
    return _Tree(tree.origin, files, prefix=f"{tree.prefix}{top}/")


def _detect_format(tree: _Tree) -> str:
    names = set(tree.files)
    if {"train", "test", "meta"} <= names:
        return "cifar100"
    if {*_CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta"} <= names:
        return "cifar10"
    if any(n.startswith("train/") for n in names) and any(n.startswith("test/") for n in names):
        return "imagefolder"
    found = ", ".join(sorted({n.split("/", 1)[0] for n in names})[:10]) or "nothing"
    raise DataError(
        f"{tree.origin} is not a dataset this tool understands (found: {found}). Expected the official CIFAR "
        "python version (cifar-100-python/{train,test,meta} or cifar-10-batches-py/{data_batch_1..5,test_batch,"
        "batches.meta}) or an ImageFolder (train/<class>/*.png|jpg and test/<class>/*)."
    )


def _build_from_path(
    path: Path, *, verify: bool, resize: bool, progress: bool, expect: str | None = None
) -> tuple[Dataset, bool]:
    """Decode ``path``; also return False when a published checksum applied but was skipped.

    Only a name that claims to be an official release is checked: the archive as a
    whole, or the member files of an extracted ``cifar-100-python/`` folder. Renamed
    or home-made copies in the same format load without a check.
    """
    official = _official_by_archive_name(path.name)
    if official is not None and verify:
        _check_md5(path, official.md5, what=f"{path} (the official {official.name} archive)")
    tree = _open_tree(path)
    fmt = _detect_format(tree)
    if expect is not None and fmt != expect:
        raise DataError(f"{path} holds {fmt}, not {expect}. Rename or remove it, or pass it with --data PATH.")
    official_folder = (
        path.is_dir() and fmt in OFFICIAL and OFFICIAL[fmt].folder in (path.name, tree.prefix.rstrip("/"))
    )
    if official_folder and verify:
        _check_members(tree, OFFICIAL[fmt].member_md5)

    source = str(path.resolve())
    if fmt == "cifar100":
        ds = _cifar100_from_tree(tree, source)
    elif fmt == "cifar10":
        ds = _cifar10_from_tree(tree, source)
    else:
        ds = _imagefolder_from_tree(tree, _stem(path), source, resize, progress)
    return ds, verify or not (official or official_folder)


def _official_by_archive_name(name: str) -> _Official | None:
    return next((o for o in OFFICIAL.values() if name in o.archive_names), None)


# --------------------------------------------------------------------------- #
# Checksums
# --------------------------------------------------------------------------- #


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


# --------------------------------------------------------------------------- #
# Official python-version pickles
# --------------------------------------------------------------------------- #


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


def _unpickle(tree: _Tree, name: str) -> dict:
    try:
        # The official files are Python 2 pickles: "bytes" keeps their str keys as bytes.
        obj = _CifarUnpickler(io.BytesIO(tree.read(name)), encoding="bytes").load()
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
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in _field(batch, key, where)]


def _batch_images(batch: dict, where: str) -> np.ndarray:
    """Planar rows (R 1024, G 1024, B 1024, each row-major) -> uint8 NHWC."""
    data = np.asarray(_field(batch, "data", where))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise DataError(f"{where}: 'data' should be uint8 of shape (N, 3072), got {data.dtype} {data.shape}.")
    return np.ascontiguousarray(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))


def _batch_labels(batch: dict, key: str, n: int, n_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(_field(batch, key, where), dtype=np.int64)
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


# --------------------------------------------------------------------------- #
# ImageFolder
# --------------------------------------------------------------------------- #


def _imagefolder_from_tree(tree: _Tree, name: str, source: str, resize: bool, progress: bool) -> Dataset:
    train = _class_files(tree, "train")
    test = _class_files(tree, "test")
    if set(train) != set(test):
        raise DataError(
            f"{tree.origin}: train/ and test/ must have the same class folders. Only in train/: "
            f"{sorted(set(train) - set(test))}; only in test/: {sorted(set(test) - set(train))}."
        )
    classes = sorted(train)  # sorted folder names, as torchvision's ImageFolder
    arrays = []
    for split, by_class in (("train", train), ("test", test)):
        files = [(f, label) for label, c in enumerate(classes) for f in by_class[c]]
        x = _decode_images(tree, [f for f, _ in files], resize, progress, desc=f"{name} {split}")
        arrays += [x, np.array([label for _, label in files], dtype=np.int64)]
    return Dataset(name, *arrays, classes=classes, source=source)


def _class_files(tree: _Tree, split: str) -> dict[str, list[str]]:
    """Class folder name -> sorted image paths under ``<split>/<class>/`` (any depth)."""
    by_class: dict[str, list[str]] = {}
    for name in tree.files:
        parts = name.split("/")
        if len(parts) >= 3 and parts[0] == split and name.lower().endswith(IMAGE_EXTENSIONS):
            by_class.setdefault(parts[1], []).append(name)
    if not by_class:
        raise DataError(
            f"{tree.origin} has no images under {split}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    return {c: sorted(files) for c, files in by_class.items()}


def _decode_images(tree: _Tree, names: list[str], resize: bool, progress: bool, desc: str) -> np.ndarray:
    out = np.empty((len(names), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    chunks = [names[i : i + _DECODE_CHUNK] for i in range(0, len(names), _DECODE_CHUNK)]
    # Workers get encoded bytes, not paths: an archive is only in this process's memory.
    jobs = [[(tree.where(n), tree.read(n)) for n in chunk] for chunk in chunks]
    with tqdm(total=len(names), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        if len(names) > _PARALLEL_MIN_IMAGES and (os.cpu_count() or 1) > 1:
            with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
                try:
                    _fill(out, pool.map(_decode_chunk, jobs, [resize] * len(jobs)), bar)
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # one bad image: do not decode the rest
                    raise
        else:
            _fill(out, (_decode_chunk(job, resize) for job in jobs), bar)
    return out


def _fill(out: np.ndarray, results: Any, bar: tqdm) -> None:
    start = 0
    for block in results:
        out[start : start + len(block)] = block
        start += len(block)
        bar.update(len(block))


def _decode_chunk(items: list[tuple[str, bytes]], resize: bool) -> np.ndarray:
    """Decode (location, encoded bytes) pairs; runs in worker processes, so top-level."""
    return np.stack([_decode_one(where, data, resize) for where, data in items])


def _decode_one(where: str, data: bytes, resize: bool) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (IMAGE_SIZE, IMAGE_SIZE) and not resize:  # header only: nothing decoded yet
                raise DataError(
                    f"{where} is {img.width}x{img.height}; images must be {IMAGE_SIZE}x{IMAGE_SIZE}. "
                    "Pass --resize to resize every image to 32x32 (bicubic)."
                )
            rgb = img.convert("RGB")  # grayscale, RGBA, palette, CMYK -> RGB
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"Cannot decode the image {where}: {e}. Remove or replace the file.") from e
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


# --------------------------------------------------------------------------- #
# Cache
# --------------------------------------------------------------------------- #

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
            source=meta.get("source", ""), **arrays,
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
            with open(tmp / f"{field}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                _fsync(f)
        meta = {
            "format_version": CACHE_FORMAT_VERSION, "name": ds.name, "classes": list(ds.classes),
            "coarse_classes": ds.coarse_classes, "source": ds.source, "verified": verified, "arrays": list(arrays),
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


# --------------------------------------------------------------------------- #
# Download
# --------------------------------------------------------------------------- #


def download(url: str, dest: Path, md5: str | None, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resuming a previous ``dest.part``; return ``dest``.

    ``dest`` appears only once the file is complete and (if ``md5`` is given)
    verified, so an interrupted or corrupt download is never mistaken for a good one.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        _fetch(url, part, progress)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
        raise DataError(
            f"Could not download {url}: {e}. Run again to resume, or download it manually and pass the "
            "file with --data PATH."
        ) from e
    if md5 is not None:
        actual = _md5_file(part)
        if actual != md5:
            part.unlink()
            raise ChecksumError(
                f"MD5 of the file downloaded from {url} is {actual}, expected {md5}; it was deleted. "
                "Try again later, or download it manually and pass it with --data PATH."
            )
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return dest


def _fetch(url: str, part: Path, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (all of it if the server cannot resume)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cifarlab", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is longer than the file: it is not a prefix of it
            part.unlink()
            return _fetch(url, part, progress)
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        content_range = response.headers.get("Content-Range", "")
        if resumed and not content_range.startswith(f"bytes {offset}-"):
            part.unlink()  # the server resumed somewhere else: the .part cannot be trusted
            return _fetch(url, part, progress)
        if not resumed:
            offset = 0  # the server sent the whole file (200): start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[: -len(".part")],
            file=sys.stderr, disable=not progress,
        ) as bar:  # fmt: skip
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            _fsync(f)
            received = f.tell()
    if total is not None and received != total:
        raise OSError(f"connection closed after {received:,} of {total:,} bytes")


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


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
