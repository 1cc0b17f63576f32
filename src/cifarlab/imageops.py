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
    nchw = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if layout == "NHWC":
        nchw = nchw.permute(0, 3, 1, 2)
    if tuple(nchw.shape[2:]) == (height, width):
        return array
    if nchw.shape[0] == 0:  # interpolate refuses empty batches
        shape = (0, height, width, nchw.shape[1]) if layout == "NHWC" else (0, nchw.shape[1], height, width)
        return np.zeros(shape, array.dtype)
    out = F.interpolate(nchw, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    if layout == "NHWC":
        out = out.permute(0, 2, 3, 1)
    result = out.contiguous().numpy()
    if array.dtype == np.uint8:
        return np.clip(np.rint(result), 0, 255).astype(np.uint8)
    return result.astype(array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32)


def _checked_size(size: Any) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise InputError(f"size must be positive, got {size!r}")
    return height, width
