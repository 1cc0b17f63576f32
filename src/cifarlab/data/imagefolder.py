"""ImageFolder datasets: ``train/<class>/*`` and ``test/<class>/*``, decoded in parallel.

Images come from files people downloaded or scraped, so decoding is defensive: only common
raster formats are decoded (by content, whatever the extension says), an image may declare
at most MAX_IMAGE_PIXELS pixels, and an image that cannot be decoded is either refused (the
default: the import stops and names the file) or, with ``bad_images="skip"``, left out and
reported by path in ``Dataset.skipped``.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import sys
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cifarlab.choices import BAD_IMAGE_POLICIES
from cifarlab.data.archives import _Tree
from cifarlab.data.dataset import IMAGE_SIZE, Dataset, printable
from cifarlab.errors import CifarlabError, DataError, ImageDecodeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# The decoders Pillow may pick, by the file's content. Common raster formats, decoded in this
# process; left out are EPS (Pillow runs Ghostscript on it) and rarely used, less-tested parsers.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")  # JPEG includes MPO
# 4096 x 4096: far more than a 32x32 dataset needs even with --resize; a PNG or GIF declaring
# more is a decompression bomb (Pillow's own limit, 89M pixels, is 5x higher).
MAX_IMAGE_PIXELS = 4096 * 4096

# Below this many images, starting worker processes costs more than it saves.
_PARALLEL_MIN_IMAGES = 2000
_DECODE_CHUNK = 1000


def check_bad_images(policy: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise CifarlabError(f"bad_images must be 'refuse' or 'skip', got {policy!r}")
    return policy


def _imagefolder_from_tree(tree: _Tree, name: str, source: str, resize: bool, progress: bool,
                           bad_images: str = "refuse") -> Dataset:
    train = _class_files(tree, "train")
    test = _class_files(tree, "test")
    if set(train) != set(test):
        raise DataError(
            f"{tree.origin}: train/ and test/ must have the same class folders. Only in train/: "
            f"{sorted(set(train) - set(test))}; only in test/: {sorted(set(test) - set(train))}."
        )
    classes = sorted(train)  # sorted folder names, as torchvision's ImageFolder
    arrays: list[np.ndarray] = []
    skipped: list[str] = []
    for split, by_class in (("train", train), ("test", test)):
        files = [(f, label) for label, c in enumerate(classes) for f in by_class[c]]
        x, ok, bad = _decode_images(tree, [f for f, _ in files], resize, bad_images, progress, f"{name} {split}")
        if not ok.any():
            raise DataError(f"{tree.origin}: none of the {len(files)} images in {split}/ could be decoded "
                            f"(first: {bad[0]}). Check the files.")
        arrays += [x, np.array([label for _, label in files], dtype=np.int64)[ok]]
        skipped += bad
    train_x, train_y, test_x, test_y = arrays
    return Dataset(name, train_x, train_y, test_x, test_y, classes=[printable(c) for c in classes], source=source,
                   skipped=skipped)


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


def _decode_images(tree: _Tree, names: list[str], resize: bool, bad_images: str, progress: bool,
                   desc: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decoded images of the decodable files, a mask of which those are, and "where: why" of the others."""
    out = np.empty((len(names), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    ok = np.ones(len(names), dtype=bool)
    bad: list[str] = []
    chunks = [names[i : i + _DECODE_CHUNK] for i in range(0, len(names), _DECODE_CHUNK)]
    # Workers get encoded bytes, not paths: an archive is only in this process's memory.
    jobs = [[(tree.where(n), tree.read(n)) for n in chunk] for chunk in chunks]
    skip = [bad_images == "skip"] * len(jobs)
    with tqdm(total=len(names), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        if len(names) > _PARALLEL_MIN_IMAGES and (os.cpu_count() or 1) > 1:
            with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
                try:
                    _fill(out, ok, bad, pool.map(_decode_chunk, jobs, [resize] * len(jobs), skip), bar)
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # one bad image: do not decode the rest
                    raise
        else:
            _fill(out, ok, bad, (_decode_chunk(job, resize, s) for job, s in zip(jobs, skip)), bar)
    return (out if ok.all() else out[ok]), ok, bad


def _fill(out: np.ndarray, ok: np.ndarray, bad: list[str], results: Any, bar: tqdm) -> None:
    start = 0
    for block, block_ok, block_bad in results:
        out[start : start + len(block)] = block
        ok[start : start + len(block)] = block_ok
        bad += block_bad
        start += len(block)
        bar.update(len(block))


def _decode_chunk(items: list[tuple[str, bytes]], resize: bool,
                  skip: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode (location, encoded bytes) pairs; runs in worker processes, so top-level.

    With `skip`, an undecodable image becomes a black placeholder marked False in the mask,
    and "location: reason" is listed; without, its ImageDecodeError propagates.
    """
    block = np.zeros((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    ok = np.ones(len(items), dtype=bool)
    bad = []
    for i, (where, data) in enumerate(items):
        try:
            block[i] = _decode_one(where, data, resize)
        except ImageDecodeError as e:
            if not skip:
                raise
            ok[i] = False
            bad.append(f"{where}: {e.reason}")
    return block, ok, bad


class _Undecodable(Exception):
    """Internal: why an image cannot be decoded (becomes an ImageDecodeError with the location)."""


def _decode_one(where: str, data: bytes, resize: bool) -> np.ndarray:
    try:
        rgb = _decode_rgb(where, data, resize)
    except DataError:  # the wrong size without --resize: a decision, not a broken file
        raise
    except Exception as e:  # noqa: BLE001 - Pillow's parsers raise many types on corrupt data
        reason = (str(e) if isinstance(e, _Undecodable)
                  else f"not a {'/'.join(IMAGE_FORMATS)} image (UnidentifiedImageError)"
                  if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}")
        raise ImageDecodeError(where, reason) from None
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


# Pillow modes of more than 8 bits per channel. Converting them to RGB directly clips every
# value above 255 (a 16-bit PNG comes out white), so 16-bit ones are scaled to 8 bits, and
# 32-bit integer and float ones (TIFF), whose value range the file does not state, refused.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = ("I", "F")


def to_rgb(img: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: 16-bit grayscale scaled (65535 -> 255), other modes converted.

    Raises ValueError for 32-bit integer and floating-point images: which values mean black
    and white is not written in the file (0..1? 0..255? 0..65535?).
    """
    if img.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode in WIDE_MODES:
        raise ValueError(f"it has {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels, whose "
                         "range the file does not state; save it as 8-bit (or 16-bit PNG) RGB first")
    return img.convert("RGB")  # grayscale, RGBA, palette, CMYK -> RGB


def _decode_rgb(where: str, data: bytes, resize: bool) -> Image.Image:
    """The image as RGB; size checks use the header only, before any pixel is decoded."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise _Undecodable(f"it declares {img.width}x{img.height} pixels, more than the "
                               f"{MAX_IMAGE_PIXELS:,} accepted (a decompression bomb?)")
        if img.size != (IMAGE_SIZE, IMAGE_SIZE) and not resize:
            raise DataError(
                f"{where} is {img.width}x{img.height}; images must be {IMAGE_SIZE}x{IMAGE_SIZE}. "
                "Pass --resize to resize every image to 32x32 (bicubic)."
            )
        try:
            return to_rgb(img)
        except ValueError as exc:
            raise _Undecodable(str(exc)) from None
