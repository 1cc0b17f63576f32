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
                          fill: str = "reflect", generator: torch.Generator | None = None,
                          mirror: torch.Tensor | None = None) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in x and y, and mirror half of them.

    images: uint8 (N, H, W, C). The random numbers come from `generator` (on the CPU, so a
    seed gives the same augmentation on every device). `mirror` (N,) bool, when given,
    says which images to mirror instead of a coin flip (see alternating_mirror).
    """
    n, h, w, _ = images.shape
    device = images.device
    shift_y = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=generator).to(device)
    shift_x = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=generator).to(device)
    if mirror is not None:
        mirror = mirror.view(n, 1).to(device)
    elif flip:
        mirror = (torch.rand(n, 1, generator=generator) < 0.5).to(device)
    rows = fold_coordinates(torch.arange(h, device=device) + shift_y, h, fill)  # (N, H)
    cols = fold_coordinates(torch.arange(w, device=device) + shift_x, w, fill)  # (N, W)
    if mirror is not None:
        cols = torch.where(mirror, (w - 1) - cols, cols)
    batch = torch.arange(n, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]


def alternating_mirror(first_epoch_mirror: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images to mirror in `epoch` (1-based) under airbench's alternating flips.

    Each image is mirrored in every other epoch, starting from a random choice in epoch 1:
    over any two epochs the network sees both orientations of every image, where independent
    coin flips show a quarter of the images the same way twice.
    """
    return first_epoch_mirror if epoch % 2 == 1 else ~first_epoch_mirror
