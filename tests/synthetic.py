"""A small learnable dataset made in memory, for tests that need training but not real images.

Each class has its own colour; images are that colour plus noise, so a few epochs of any of
our models separate them. Real-image tests use the shared CIFAR-10 copy instead.
"""

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cifarlab.data import Dataset


def synthetic_dataset(n_train_per_class: int = 50, n_test_per_class: int = 10, num_classes: int = 4,
                      seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(num_classes, 3))

    def make(n_per_class):
        y = np.repeat(np.arange(num_classes), n_per_class)
        noise = rng.integers(-40, 41, size=(len(y), 32, 32, 3))
        x = np.clip(colours[y][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return x, y.astype(np.int64)

    train_x, train_y = make(n_train_per_class)
    test_x, test_y = make(n_test_per_class)
    classes = [f"class{i}" for i in range(num_classes)]
    return Dataset("synthetic", train_x, train_y, test_x, test_y, classes, source="tests/synthetic.py")


def write_image_folder(root: Path, ds: Dataset) -> Path:
    """Write a dataset as an ImageFolder (train/<class>/NNNN.png, test/<class>/NNNN.png)."""
    for split, xs, ys in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / ds.classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(folder / f"{i:04d}.png")
    return root


# ---- small files for the importer tests ------------------------------------------------------

PNG = (lambda buf: (Image.new("RGB", (32, 32), (9, 99, 199)).save(buf, "PNG"), buf.getvalue())[1])(io.BytesIO())
IMAGES = {f"{split}/{cls}/0.png": PNG for split in ("train", "test") for cls in ("cat", "dog")}


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\nshowpage\n"


def pixel_bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (the data is not valid beyond it)."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # the IHDR chunk's size fields
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # its CRC, so the header is valid
    return bytes(data)


# A quick training run on the synthetic data (TrainConfig fields).
QUICK = dict(model="airbench-small", epochs=3, batch_size=32, lr=0.2, seed=0, device="cpu")
