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

Modules, one per job:

* ``dataset``: the ``Dataset`` every builder returns;
* ``archives``: folders, tar and zip read safely into memory;
* ``cifar``: the official releases, their MD5s and the restricted unpickler;
* ``imagefolder``: ImageFolder class discovery and parallel image decoding;
* ``fetch``: resumable, verified download;
* ``cache``: the atomic, memory-mapped cache;
* ``split``: the seeded, stratified train/val split.

This module resolves a name or path to one of those builders and caches the result.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

from cifarlab.data.archives import _open_tree, _stem, _Tree
from cifarlab.data.cache import _read_cache, _write_cache
from cifarlab.data.cifar import (
    _CIFAR10_TRAIN_BATCHES,
    _NAME_ALIASES,
    OFFICIAL,
    _check_md5,
    _check_members,
    _cifar10_from_tree,
    _cifar100_from_tree,
    _Official,
    _official_by_archive_name,
)
from cifarlab.data.dataset import Dataset
from cifarlab.data.fetch import download
from cifarlab.data.imagefolder import _imagefolder_from_tree, check_bad_images
from cifarlab.data.split import get_split, split_images, split_indices, split_info
from cifarlab.errors import ChecksumError, CifarlabError, DataError

__all__ = [
    "Dataset",
    "default_cache_dir",
    "load_dataset",
    "split_indices",
    "get_split",
    "split_info",
    "split_images",
    "resolve_dataset",
    "check_classes",
    "check_class_count",
    "download",
]


def default_cache_dir() -> Path:
    """``$CIFARLAB_HOME`` if set, else ``~/.cache/cifarlab``."""
    env = os.environ.get("CIFARLAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cifarlab"


def _search_dirs(cache_dir: Path) -> list[Path]:
    """Folders searched for an existing official archive, in this order."""
    home = Path.home()
    return [cache_dir, home / ".keras" / "datasets", Path.cwd() / "data", home / "data", home / ".cache" / "torch"]


def load_dataset(
    spec: str | Path,
    *,
    cache_dir: Path | None = None,
    download: bool = True,
    verify: bool = True,
    resize: bool = False,
    bad_images: str = "refuse",
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

    ``bad_images`` decides what happens to ImageFolder images that cannot be decoded
    (corrupt, truncated, an unsupported format, a decompression bomb): ``"refuse"`` (the
    default) stops with a DataError naming the file; ``"skip"`` leaves them out, warns, and
    lists them in ``Dataset.skipped``. The choice is made at import: the cache remembers
    which files were skipped and every later load of that entry warns again.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"the dataset must be a name or a path, got {type(spec).__name__} {spec!r}")
    check_bad_images(bad_images)
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
        build = functools.partial(_build_from_path, path, verify=verify, resize=resize, progress=progress,
                                  bad_images=bad_images)

    target = cache_dir / "datasets" / key
    cached = _read_cache(target, need_verified=verify)
    if cached is not None:
        return _report_skipped(cached, target)
    ds, verified = build()
    try:
        _write_cache(target, ds, verified)
    except OSError as e:
        # A read-only or full disk should not stop a run; it just costs a decode next time.
        warnings.warn(f"Could not cache {ds.name} in {target} ({e}); it will be decoded again next time.",
                      stacklevel=2)
        return _report_skipped(ds, None)
    cached = _read_cache(target, need_verified=False)
    if cached is None:
        raise DataError(f"The cache just written at {target} cannot be read back; delete it and try again.")
    return _report_skipped(cached, target)


def _report_skipped(ds: Dataset, target: Path | None) -> Dataset:
    """Warn that images were left out at import (bad_images="skip"), naming the first few."""
    if ds.skipped:
        shown = "\n  ".join(ds.skipped[:5])
        more = f"\n  ... and {len(ds.skipped) - 5} more" if len(ds.skipped) > 5 else ""
        listed = f" (all listed in {target / 'meta.json'})" if target is not None else ""
        warnings.warn(f"{len(ds.skipped)} images of {ds.name} could not be decoded and were left out{listed}:"
                      f"\n  {shown}{more}", stacklevel=3)
    return ds


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


def _detect_format(tree: _Tree) -> str:
    names = set(tree.files)
    if {"train", "test", "meta"} <= names:
        return "cifar100"
    if {*_CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta"} <= names:
        return "cifar10"
    if any(n.startswith("train/") for n in names) and any(n.startswith("test/") for n in names):
        return "imagefolder"
    has_train = any(n.startswith("train/") for n in names) or tree.prefix.rstrip("/").endswith("train")
    if has_train:
        raise DataError(f"{tree.origin} has train/ but no test/: an ImageFolder dataset needs both, "
                        "train/<class>/* and test/<class>/* with the same class folders. Move some images of "
                        "each class into test/<class>/.")
    found = ", ".join(sorted({n.split("/", 1)[0] for n in names})[:10]) or "nothing"
    raise DataError(
        f"{tree.origin} is not a dataset this tool understands (found: {found}). Expected the official CIFAR "
        "python version (cifar-100-python/{train,test,meta} or cifar-10-batches-py/{data_batch_1..5,test_batch,"
        "batches.meta}) or an ImageFolder (train/<class>/*.png|jpg and test/<class>/*)."
    )


def _build_from_path(
    path: Path, *, verify: bool, resize: bool, progress: bool, expect: str | None = None,
    bad_images: str = "refuse",
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
        ds = _imagefolder_from_tree(tree, _stem(path), source, resize, progress, bad_images)
    return ds, verify or not (official or official_folder)


def resolve_dataset(data: str | Dataset | None, recorded: dict | None, progress: bool = True,
                    resize: bool = False) -> Dataset:
    """`data` (a Dataset or a spec for load_dataset), else the dataset a model file records."""
    if isinstance(data, Dataset):
        return data
    spec = data or (recorded or {}).get("spec")
    if not spec:
        raise CifarlabError("the model file does not say which dataset it was trained on; pass --data")
    return load_dataset(spec, progress=progress, resize=resize)


def check_class_count(model_name: str, num_classes: int | None, dataset: Dataset) -> None:
    """Refuse a dataset whose number of classes differs from a model's outputs (None: unknown)."""
    if num_classes is not None and num_classes != len(dataset.classes):
        raise CifarlabError(f"{model_name} outputs {num_classes} classes but dataset {dataset.name!r} has "
                            f"{len(dataset.classes)}; pass the dataset the model was trained on with --data")


def check_classes(classes: list[str], dataset: Dataset) -> None:
    """Refuse to score a model on a dataset whose class names (and order) differ from its own."""
    if list(dataset.classes) != list(classes):
        raise CifarlabError(
            f"the dataset's classes do not match the model's: model has {len(classes)} "
            f"({', '.join(classes[:5])}, ...), dataset {dataset.name!r} has "
            f"{len(dataset.classes)} ({', '.join(dataset.classes[:5])}, ...). "
            "Evaluate on the dataset the model was trained on (--data)."
        )
