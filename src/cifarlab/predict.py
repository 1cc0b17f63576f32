"""Classify image files through the model's own bundled preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifarlab.data.imagefolder import IMAGE_FORMATS, MAX_IMAGE_PIXELS, to_rgb
from cifarlab.errors import InputError
from cifarlab.fileio import require_file
from cifarlab.modelfile import Classifier


def read_image(path: str | Path, size: tuple[int, int], resize: bool = False) -> np.ndarray:
    """An image file as uint8 HWC RGB, exactly what the model takes.

    Decoded like ImageFolder datasets: common raster formats only (by content), at most
    MAX_IMAGE_PIXELS pixels, and any decoder failure becomes an InputError naming the file.
    """
    path = Path(path)
    require_file(path, "image file", InputError)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InputError(f"{path}: declares {image.width}x{image.height} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS:,} accepted (a decompression bomb?)")
            if image.size != (size[1], size[0]) and not resize:
                raise InputError(
                    f"{path}: the model takes {size[1]}x{size[0]} images, this one is "
                    f"{image.size[0]}x{image.size[1]}; pass --resize to scale it"
                )
            try:
                rgb = to_rgb(image)  # grayscale, palette, RGBA and 16-bit files become 8-bit RGB
            except ValueError as exc:
                raise InputError(f"{path}: {exc}") from None
            if rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path}: cannot be read as an image (expected one of: "
                         f"{', '.join(IMAGE_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's parsers raise many types on corrupt data
        raise InputError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})") from None


def predict_files(model: Classifier, paths: list[str | Path], *, top: int = 5,
                  resize: bool = False) -> list[dict[str, Any]]:
    """Top-`top` classes with probabilities for each image file."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"--top must be a positive number of classes, got {top!r}")
    if not paths:
        raise InputError("no image files given; pass one or more PNG/JPEG files")
    images = np.stack([read_image(p, model.image_size, resize) for p in paths])
    probs = model.predict_proba(images)
    top = min(top, probs.shape[1])
    results = []
    for path, row in zip(paths, probs):
        best = np.argsort(-row)[:top]
        results.append({"path": str(path),
                        "top": [{"class": model.classes[i], "id": int(i), "probability": float(row[i])}
                                for i in best]})
    return results
