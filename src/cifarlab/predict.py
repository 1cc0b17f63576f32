"""Classify image files through the model's own bundled preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifarlab.errors import InputError
from cifarlab.modelfile import Classifier


def read_image(path: str | Path, size: tuple[int, int], resize: bool = False) -> np.ndarray:
    """An image file as uint8 HWC RGB, exactly what the model takes."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")  # grayscale, palette and RGBA files become RGB
            if image.size != (size[1], size[0]):
                if not resize:
                    raise InputError(
                        f"{path}: the model takes {size[1]}x{size[0]} images, this one is "
                        f"{image.size[0]}x{image.size[1]}; pass --resize to scale it"
                    )
                image = image.resize((size[1], size[0]), Image.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot be read as an image ({exc})") from None


def predict_files(model: Classifier, paths: list[str | Path], *, top: int = 5,
                  resize: bool = False) -> list[dict[str, Any]]:
    """Top-`top` classes with probabilities for each image file."""
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
