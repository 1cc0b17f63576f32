"""Read an HDF5 file completely, in a child process: `python -m cifarlab.h5probe PATH [MEMBER]`.

HDF5's C library can loop forever or crash on a damaged file (the fuzzer of
tests/fuzz_importers.py found mutated `.h5` models on which reading an attribute never
returns), and a Python thread cannot interrupt it. So before Keras reads a model's HDF5 data,
cifarlab.keras runs this script with a time limit: it reads every attribute and every dataset
(after bounding their declared size) and prints one JSON line, {"config": ..., "bytes": N} or
{"error": "..."}. MEMBER names the HDF5 file inside a `.keras` zip.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from typing import Any


def probe(path: str, member: str, max_bytes: int) -> dict[str, Any]:
    import h5py
    import numpy as np

    source: Any = io.BytesIO(zipfile.ZipFile(path).read(member)) if member else path
    with h5py.File(source, "r") as f:
        items: list[Any] = [f]
        f.visititems(lambda _name, item: items.append(item))
        datasets = [item for item in items if isinstance(item, h5py.Dataset)]
        total = sum(int(np.prod(d.shape, dtype=np.float64)) * d.dtype.itemsize for d in datasets)
        if total > max_bytes:
            return {"bytes": total, "config": None}
        for item in items:
            dict(item.attrs)
        for dataset in datasets:
            dataset[()]
        config = f.attrs.get("model_config")
    if isinstance(config, bytes):
        config = config.decode()
    return {"bytes": total, "config": None if config is None else str(config)}


def main(argv: list[str]) -> int:
    path, member, max_bytes = argv[0], argv[1] if len(argv) > 1 else "", int(argv[2]) if len(argv) > 2 else 2**31
    try:
        result = probe(path, member, max_bytes)
    except Exception as exc:  # noqa: BLE001 - any failure to read is reported, not raised
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
