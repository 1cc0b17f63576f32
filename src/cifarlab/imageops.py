"""Array-level image operations users need before a model will take their images.

`resize_images` is what the "images of another size" errors point to: cifarlab models take
32x32 images and never resize silently (a resized test set is a different test set).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.errors import InputError
from cifarlab.metrics import as_array

LAYOUTS = ("NHWC", "NCHW")
MAX_SIDE = 4096  # pixels, either side of the target size
MAX_RESIZED_BYTES = 4 * 2**30  # the resized batch: 10,000 images of 224x224x3 float32 are 5.6 GiB
CHUNK_BYTES = 256 * 2**20  # float32 working memory per chunk of images


def resize_images(images: Any, size: tuple[int, int] = (32, 32), *, layout: str = "NHWC") -> np.ndarray:
    """Resize a batch of images to `size` (height, width), bicubic with antialiasing.

    `images` is (N, H, W, C) for layout "NHWC" or (N, C, H, W) for "NCHW" (one HWC/CHW image
    is also accepted). The dtype and the value scale are kept: uint8 stays uint8 (rounded and
    clipped to 0..255); float images stay float, so a scaling mistake stays visible to diagnosis.
    """
    array = as_array(images, "images")
    if layout not in LAYOUTS:
        raise InputError(f"layout must be NHWC or NCHW, got {layout!r}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.dtype == bool or not (
            np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"expected a batch of images (N, H, W, C) or (N, C, H, W) of numbers; got shape "
                         f"{array.shape}, dtype {array.dtype}")
    height, width = _checked_size(size)
    channels_last = layout == "NHWC"
    n, channels = array.shape[0], array.shape[3 if channels_last else 1]
    if tuple(array.shape[1:3] if channels_last else array.shape[2:]) == (height, width):
        return array
    out_dtype = array.dtype if array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating) else np.float32
    shape = (n, height, width, channels) if channels_last else (n, channels, height, width)
    need = n * height * width * channels * np.dtype(out_dtype).itemsize
    if need > MAX_RESIZED_BYTES:
        raise InputError(f"resizing {n:,} images to {height}x{width} would take {need / 2**30:.1f} GiB (at most "
                         f"{MAX_RESIZED_BYTES / 2**30:g} GiB); resize fewer images at a time (e.g. --max-images)")
    out = np.zeros(shape, out_dtype)
    # In chunks: the float32 copies torch works on stay near CHUNK_BYTES, whatever the batch.
    per_image = 4 * channels * max(height * width, int(np.prod(array.shape[1:])) // channels)
    step = max(1, CHUNK_BYTES // per_image)
    for start in range(0, n, step):
        out[start:start + step] = _resize_chunk(array[start:start + step], height, width, channels_last, out_dtype)
    return out


def _resize_chunk(array: np.ndarray, height: int, width: int, channels_last: bool, out_dtype: Any) -> np.ndarray:
    nchw = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if channels_last:
        nchw = nchw.permute(0, 3, 1, 2)
    resized = F.interpolate(nchw, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    if channels_last:
        resized = resized.permute(0, 2, 3, 1)
    result = resized.contiguous().numpy()
    if out_dtype == np.uint8:
        return np.clip(np.rint(result), 0, 255).astype(np.uint8)
    return result.astype(out_dtype)


def _checked_size(size: Any) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (height, width), got {size!r}") from None
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise InputError(f"size must be 1..{MAX_SIDE} pixels each way, got {size!r}")
    return height, width
