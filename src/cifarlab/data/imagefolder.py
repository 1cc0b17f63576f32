"""ImageFolder datasets: ``train/<class>/*`` and ``test/<class>/*``, decoded in parallel."""

from __future__ import annotations

import concurrent.futures
import io
import os
import sys
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from cifarlab.data.archives import _Tree
from cifarlab.data.dataset import IMAGE_SIZE, Dataset
from cifarlab.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# Below this many images, starting worker processes costs more than it saves.
_PARALLEL_MIN_IMAGES = 2000
_DECODE_CHUNK = 1000


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
