"""The batched augmentation against an independent numpy reference (np.pad + crop)."""

import numpy as np
import pytest
import torch

from cifarlab.augment import random_translate_flip


def candidates(image: np.ndarray, max_shift: int, mode: str) -> dict[tuple[int, int, bool], np.ndarray]:
    """Every (dy, dx, mirrored) variant of one HWC image, made with numpy's padding."""
    h, w, _ = image.shape
    s = max_shift
    padded = np.pad(image, ((s, s), (s, s), (0, 0)), mode=mode)
    out = {}
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            crop = padded[s + dy:s + dy + h, s + dx:s + dx + w]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = crop[:, ::-1]
    return out


def images(n=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("fill,numpy_mode", [("reflect", "reflect"), ("edge", "edge")])
def test_each_output_is_a_shifted_or_mirrored_copy(fill, numpy_mode):
    x = images()
    out = random_translate_flip(x, 2, True, fill, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    seen = []
    for original, augmented in zip(x.numpy(), out.numpy()):
        matches = [k for k, v in candidates(original, 2, numpy_mode).items() if np.array_equal(v, augmented)]
        assert matches, "output is not a reflect/edge shift (+flip) of its input"
        seen.append(matches[0])
    shifts = {(dy, dx) for dy, dx, _ in seen}
    mirrored = sum(m for _, _, m in seen)
    assert len(shifts) > 10  # up to 25 possible shifts for +-2 px, 64 draws
    assert 16 <= mirrored <= 48  # about half, P(outside) < 1e-4


def test_no_shift_no_flip_is_identity():
    x = images()
    assert torch.equal(random_translate_flip(x, 0, False), x)


def test_same_seed_same_augmentation_different_seed_different():
    x = images()
    a = random_translate_flip(x, 4, True, "reflect", torch.Generator().manual_seed(3))
    b = random_translate_flip(x, 4, True, "reflect", torch.Generator().manual_seed(3))
    c = random_translate_flip(x, 4, True, "reflect", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_statistics_preserved():
    # Shifts and flips move pixels around; the per-channel mean should barely change.
    x = images(256)
    out = random_translate_flip(x, 3, True, "reflect", torch.Generator().manual_seed(0))
    assert torch.allclose(out.float().mean((0, 1, 2)), x.float().mean((0, 1, 2)), atol=1.0)
