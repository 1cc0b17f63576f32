"""Batched data augmentation on raw uint8 NHWC tensors, on whatever device they live on.

One gather per batch, no per-image Python: each image gets its own shift and flip by
indexing the batch with per-image row/column index grids. Shifts fill the border by
reflection (airbench) or by repeating the edge pixel (Keras' fill_mode="nearest").
"""

from __future__ import annotations

import torch


def fold_coordinates(coords: torch.Tensor, size: int, fill: str) -> torch.Tensor:
    """Map out-of-range pixel coordinates back into [0, size)."""
    if fill == "edge":
        return coords.clamp(0, size - 1)
    if fill == "reflect":  # -1 -> 1, size -> size - 2 (no edge repeat), valid for |shift| < size
        coords = coords.abs()
        return (size - 1) - ((size - 1) - coords).abs()
    raise ValueError(f"fill must be 'reflect' or 'edge', got {fill!r}")


def random_translate_flip(images: torch.Tensor, max_shift: int, flip: bool = True,
                          fill: str = "reflect", generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in x and y, and mirror half of them.

    images: uint8 (N, H, W, C). The random numbers come from `generator` (on the CPU, so a
    seed gives the same augmentation on every device).
    """
    n, h, w, _ = images.shape
    device = images.device
    shift_y = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=generator).to(device)
    shift_x = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=generator).to(device)
    mirror = (torch.rand(n, 1, generator=generator) < 0.5).to(device) if flip else None
    rows = fold_coordinates(torch.arange(h, device=device) + shift_y, h, fill)  # (N, H)
    cols = fold_coordinates(torch.arange(w, device=device) + shift_x, w, fill)  # (N, W)
    if mirror is not None:
        cols = torch.where(mirror, (w - 1) - cols, cols)
    batch = torch.arange(n, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]
