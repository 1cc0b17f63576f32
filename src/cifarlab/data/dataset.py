"""The in-memory dataset: uint8 NHWC images plus labels, as every builder returns it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cifarlab.errors import DataError

IMAGE_SIZE = 32


@dataclass
class Dataset:
    """Images as uint8 NHWC RGB arrays (possibly read-only memmaps) plus labels."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    coarse_classes: list[str] | None = None
    train_y_coarse: np.ndarray | None = None
    test_y_coarse: np.ndarray | None = None
    source: str = ""
    # Images left out at import because they could not be decoded ("location: reason"),
    # with bad_images="skip"; empty otherwise.
    skipped: list[str] = field(default_factory=list)

    @property
    def coarse_of_fine(self) -> list[int] | None:
        """Coarse label id of each fine label id (-1 where a fine label never occurs)."""
        if self.train_y_coarse is None:
            return None
        mapping = np.full(len(self.classes), -1, dtype=np.int64)
        mapping[self.train_y] = self.train_y_coarse
        if not np.array_equal(mapping[self.train_y], self.train_y_coarse):
            raise DataError(f"{self.name}: a fine label belongs to more than one coarse label in {self.source}.")
        return mapping.tolist()


def printable(name: str) -> str:
    """A class name from a file, with control characters escaped (a folder named with a
    terminal escape sequence must not drive the user's terminal when it is printed)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)
