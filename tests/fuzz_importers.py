"""A time-bounded mutation fuzzer for cifarlab's importers of untrusted files.

Targets (each the public entry a user's file goes through):

* ``archive``: ``load_dataset`` on tar, tar.gz and zip ImageFolders and on official-format
  CIFAR-10 archives (pickles through the restricted unpickler);
* ``image``: ImageFolder image decoding (``_decode_one``, with and without resize) and
  ``cifarlab predict``'s ``read_image``;
* ``array``: ``diagnose``'s ``.npy``/``.npz``/``.csv`` reader;
* ``cm-json``: ``load_confusion_json``;
* ``model``: ``load_model`` on safetensors files;
* ``keras``: ``open_keras`` (the file check, Keras' safe-mode loader, the input contract) on
  `.keras` and `.h5` files, the `.keras` config also mutated inside its zip; only where the
  ``keras`` extra is installed.

Field-level targets: a valid container whose JSON document has 1-3 fields replaced by values of
the wrong type or range (None, booleans, huge or negative numbers, NaN, long strings, empty or
nested containers) or deleted:

* ``model-meta``: a safetensors model file's cifarlab metadata, through ``load_model``;
* ``checkpoint``: a checkpoint's state (config, history, optimizer), through
  ``CheckpointState.from_dict``, what ``--resume`` reads before it trains;
* ``metrics``: an evaluation's metrics.json, through ``EvaluationResult.from_dict``
  (what ``cifarlab report`` reads);
* ``history``: a run's history.csv, its cells replaced or its bytes mutated, through
  ``read_history`` (what ``cifarlab report --history`` reads);
* ``diagnosis``: the ``cifarlab diagnose --json`` document, through ``load_diagnosis`` and the
  report's HTML of it;
* ``onnx-meta``: the cifarlab metadata of an exported ONNX file, through ``check_onnx_meta``.

Inputs are valid seed files mutated (bit flips, byte changes, inserted and deleted runs,
truncation, splices with another seed). Compressed archives are also mutated *inside* the
compression (the tar or pickle is mutated, then recompressed), so the mutations reach the
parsers instead of stopping at a gzip checksum. The property: every input gives a result or
a CifarlabError; any other exception is a crash, recorded with the input that caused it.

Run longer than the test suite does, for the numbers in docs/reliability.md:

    python tests/fuzz_importers.py --seconds 600 [--seed 1] [--targets model,metrics] [--save-crashes DIR]
"""

from __future__ import annotations

import argparse
import collections
import copy
import gzip
import inspect
import io
import json
import random
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cifarlab.data import load_dataset
from cifarlab.data.imagefolder import _decode_one
from cifarlab.diagnosis.inputs import load_array
from cifarlab.errors import CifarlabError
from cifarlab.metrics import load_confusion_json
from cifarlab.modelfile import build_classifier, load_model, make_meta, save_model
from cifarlab.predict import read_image


def _keras_available() -> bool:
    try:
        from cifarlab.keras import import_keras

        import_keras()
        return True
    except CifarlabError:
        return False


FIELD_TARGETS = ("model-meta", "checkpoint", "metrics", "onnx-meta", "history", "diagnosis")
TARGETS = ("archive", "image", "array", "cm-json", "model") + (("keras",) if _keras_available() else ()) \
    + FIELD_TARGETS

# Values of the wrong type or range for any field.
WRONG_VALUES: list[object] = [None, True, False, 0, -1, 1, 2**70, -(2**70), 1e308, -1e-308, float("nan"),
                              float("inf"), "", "x" * 20_000, "NaN", [], [1, 2, 3], [[1]], ["a"] * 3, {},
                              {"a": 1}, 0.5, 4096, 10**6]


def _fields(doc: object, path: tuple = ()) -> list[tuple]:
    """Every (container path, key) in a JSON document."""
    found: list[tuple] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        found.append(path + (key,))
        found.extend(_fields(value, path + (key,)))
    return found


def mutate_fields(doc: object, rng: random.Random) -> object:
    """A deep copy of `doc` with 1-3 fields replaced by a wrong value, or deleted."""
    doc = json.loads(json.dumps(doc))
    for _ in range(rng.randint(1, 3)):
        paths = _fields(doc)
        if not paths:
            break
        *parents, key = rng.choice(paths)
        container = doc
        for step in parents:
            container = container[step]
        if isinstance(container, dict) and rng.random() < 0.2:
            del container[key]
        else:
            container[key] = copy.deepcopy(rng.choice(WRONG_VALUES))  # never one list in two places
    return doc


@dataclass
class FuzzReport:
    inputs: collections.Counter = field(default_factory=collections.Counter)  # per target
    refused: collections.Counter = field(default_factory=collections.Counter)  # CifarlabError, per target
    crashes: dict[tuple[str, str, str], tuple[str, bytes]] = field(default_factory=dict)  # key -> (trace, input)
    spent: collections.Counter = field(default_factory=collections.Counter)  # seconds, per target
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.inputs.values())

    def summary(self) -> str:
        per = ", ".join(f"{t} {self.inputs[t]:,} in {self.spent[t]:.0f} s ({self.refused[t]:,} refused)"
                        for t in TARGETS if self.inputs[t])
        return (f"{self.total:,} inputs in {self.seconds:.0f} s: {per}; "
                f"{len(self.crashes)} distinct crashes")


# ---- seeds -------------------------------------------------------------------------------------

def _png(size=(32, 32), mode="RGB", fmt="PNG", seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt)
    return buf.getvalue()


IMAGE_SEEDS = [_png(), _png(mode="L"), _png(mode="RGBA"), _png(mode="P"), _png(fmt="JPEG"), _png(fmt="BMP"),
               _png(fmt="GIF"), _png(fmt="TIFF"), _png(fmt="WEBP"), _png(size=(40, 24))]


def _folder_members() -> dict[str, bytes]:
    return {f"{split}/{cls}/{i}.png": IMAGE_SEEDS[(i + len(cls)) % len(IMAGE_SEEDS)]
            for split in ("train", "test") for cls in ("ant", "bee") for i in range(2)}


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _py2_pickle(obj) -> bytes:
    """A protocol-2 pickle like the official CIFAR batches (bytes keys, numpy arrays)."""
    import pickle

    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _cifar10_members() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    batch = lambda n: _py2_pickle({b"labels": [int(v) for v in rng.integers(0, 3, n)],  # noqa: E731
                                   b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)})
    members = {f"cifar-10-batches-py/data_batch_{i}": batch(2) for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = batch(2)
    members["cifar-10-batches-py/batches.meta"] = _py2_pickle({b"label_names": [b"a", b"b", b"c"]})
    return members


def _model_seed() -> bytes:
    stats = {"mean": [120.0] * 3, "std": [60.0] * 3, "min": [0] * 3, "max": [255] * 3}
    meta = make_meta(architecture="airbench-small", arch_args={"widths": [8, 16, 16]}, classes=["a", "b"],
                     train_stats=stats)
    with tempfile.TemporaryDirectory() as tmp:
        return save_model(build_classifier(meta), Path(tmp) / "m.safetensors").read_bytes()


def _document_seeds(model_seed: bytes) -> dict[str, object]:
    """Valid JSON documents, as cifarlab writes them, for the field-level targets."""
    from cifarlab.config import TrainConfig
    from cifarlab.metrics import classification_report

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.safetensors").write_bytes(model_seed)
        model_meta = load_model(Path(tmp) / "m.safetensors").meta.to_dict()
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 40)
    metrics = {**classification_report(probs, rng.integers(0, 4, 40), list("abcd"), coarse_of_fine=[0, 0, 1, 1],
                                       coarse_names=["x", "y"]),
               "split": "test", "tta": None, "dataset": {"name": "d", "source": "s"},
               "model": {"path": "m", "architecture": "airbench-small", "trained_metrics": {"val_acc": 0.5}}}
    row = {"epoch": 1, "train_loss": 2.0, "train_acc": 0.3, "val_loss": None, "val_acc": None, "lr": 0.1,
           "seconds": 3.0}
    checkpoint = {"config": {**TrainConfig(model="airbench-small", epochs=2).__dict__, "plan": {"epoch_seconds": 3.0}},
                  "history": [row, {**row, "epoch": 2}],
                  "optimizer": {"param_groups": [{"lr": 0.1, "params": [0, 1]}], "scalars": {}}}
    onnx_meta = {**model_meta, "onnx_input": "float",
                 "expected_preprocessing": {"kind": "standardize", "mean": [1, 2, 3], "std": [4, 5, 6]}}
    from cifarlab.diagnosis import diagnose

    collapsed = np.zeros((4, 4), int)
    collapsed[:, 1] = 25  # every class predicted as one: findings with evidence and a fix
    diagnosis = json.loads(diagnose(confusion=collapsed, class_names=list("abcd")).to_json())
    return {"model-meta": model_meta, "checkpoint": checkpoint, "metrics": metrics, "onnx-meta": onnx_meta,
            "history": checkpoint["history"], "diagnosis": diagnosis}


def _keras_seeds() -> dict[str, bytes]:
    """A small CNN (Rescaling, Conv, pooling, dropout, Dense, softmax) as .keras and .h5 bytes."""
    if "keras" not in TARGETS:
        return {}
    from cifarlab.keras import import_keras

    keras = import_keras()
    layers = keras.layers
    model = keras.Sequential([keras.Input((32, 32, 3)), layers.Rescaling(1 / 255), layers.Conv2D(4, 3),
                              layers.MaxPooling2D(), layers.Dropout(0.25), layers.Flatten(),
                              layers.Dense(3, activation="softmax")])
    seeds = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for suffix in (".keras", ".h5"):
            model.save(Path(tmp) / f"m{suffix}")
            seeds[suffix] = (Path(tmp) / f"m{suffix}").read_bytes()
    return seeds


def _array_seeds() -> dict[str, list[bytes]]:
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    def npz(**arrays):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    probs = np.random.default_rng(0).dirichlet(np.ones(3), 6)
    return {".npy": [npy(probs), npy(np.arange(6)), npy(np.zeros((2, 32, 32, 3), np.uint8))],
            ".npz": [npz(probs=probs), npz(x=np.arange(4), y=np.arange(4))],
            ".csv": [b"0.2,0.3,0.5\n0.1,0.8,0.1\n", b"0\n1\n2\n1\n"]}


# ---- mutation ------------------------------------------------------------------------------------

def mutate(data: bytes, rng: random.Random, other: bytes | None = None) -> bytes:
    """1-8 random edits: flip a bit, set a byte (often to 0x00/0xff/0x7f), insert or delete a run,
    truncate, or splice in a piece of another seed."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(b) + 1)
        if op < 0.3 and b:
            b[pos % len(b)] ^= 1 << rng.randrange(8)
        elif op < 0.55 and b:
            b[pos % len(b)] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op < 0.7:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif op < 0.85 and b:
            del b[pos:pos + rng.randint(1, 64)]
        elif op < 0.93:
            del b[pos:]
        elif other:
            start = rng.randrange(len(other))
            b[pos:pos] = other[start:start + rng.randint(1, 256)]
    return bytes(b)


class Fuzzer:
    """Seeds, mutation and the targets; `run(seconds)` fuzzes until the time is up."""

    def __init__(self, seed: int = 0, workdir: Path | None = None):
        self.rng = random.Random(seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="cifarlab-fuzz-", dir=workdir))
        folder = _folder_members()
        self.tar_members = [folder, _cifar10_members()]
        self.zip_seeds = [_zip(folder), _zip(folder, zipfile.ZIP_STORED)]
        self.model_seed = _model_seed()
        self.keras_seeds = _keras_seeds()
        self.arrays = _array_seeds()
        self.documents = _document_seeds(self.model_seed)
        self.report = FuzzReport()

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # Each generator returns (bytes to write, file suffix); each target reads the file.
    def archive_input(self) -> tuple[bytes, str]:
        kind = self.rng.choice(["tar", "tar.gz-inner", "tar.gz-outer", "zip", "member"])
        members = dict(self.rng.choice(self.tar_members))
        if kind == "member":  # one member (image or pickle) mutated inside a valid archive
            name = self.rng.choice(list(members))
            members[name] = mutate(members[name], self.rng)
            return gzip.compress(_tar(members), mtime=0), ".tar.gz"
        if kind == "zip":
            return mutate(self.rng.choice(self.zip_seeds), self.rng), ".zip"
        raw = _tar(members)
        if kind == "tar":
            return mutate(raw, self.rng), ".tar"
        if kind == "tar.gz-inner":
            return gzip.compress(mutate(raw, self.rng), mtime=0), ".tar.gz"
        return mutate(gzip.compress(raw, mtime=0), self.rng), ".tar.gz"

    def run_archive(self, path: Path) -> None:
        options = {"resize": self.rng.random() < 0.5, "bad_images": self.rng.choice(["refuse", "skip"])}
        if "bad_images" not in inspect.signature(load_dataset).parameters:  # an older cifarlab, for comparison
            del options["bad_images"]
        load_dataset(path, cache_dir=self.tmp / "cache", progress=False, **options)

    def image_input(self) -> tuple[bytes, str]:
        seeds = IMAGE_SEEDS
        return mutate(self.rng.choice(seeds), self.rng, self.rng.choice(seeds)), ".png"

    def run_image(self, path: Path) -> None:
        if self.rng.random() < 0.5:
            _decode_one(str(path), path.read_bytes(), resize=self.rng.random() < 0.5)
        else:
            read_image(path, (32, 32), resize=self.rng.random() < 0.5)

    def array_input(self) -> tuple[bytes, str]:
        suffix = self.rng.choice(list(self.arrays))
        return mutate(self.rng.choice(self.arrays[suffix]), self.rng), suffix

    def run_array(self, path: Path) -> None:
        load_array(path, self.rng.choice(["images", "labels", "predictions"]))

    def cm_json_input(self) -> tuple[bytes, str]:
        seeds = [b"[[5, 1], [0, 7]]", json.dumps(np.eye(4, dtype=int).tolist()).encode(), b"[[1e3, 0], [0, 2.0]]"]
        return mutate(self.rng.choice(seeds), self.rng), ".json"

    def run_cm_json(self, path: Path) -> None:
        load_confusion_json(path)

    def model_input(self) -> tuple[bytes, str]:
        data = bytearray(self.model_seed)
        header = int.from_bytes(data[:8], "little")
        if self.rng.random() < 0.6:  # edit the JSON header (shapes, offsets, metadata), where parsing happens
            for _ in range(self.rng.randint(1, 4)):
                data[self.rng.randrange(8, 8 + header)] = self.rng.randrange(32, 127)
            return bytes(data), ".safetensors"
        return mutate(bytes(data), self.rng), ".safetensors"

    def run_model(self, path: Path) -> None:
        load_model(path)

    def keras_input(self) -> tuple[bytes, str]:
        suffix = self.rng.choice(sorted(self.keras_seeds))
        seed = self.keras_seeds[suffix]
        if suffix == ".keras" and self.rng.random() < 0.5:  # edit the config JSON the loaders parse
            with zipfile.ZipFile(io.BytesIO(seed)) as archive:
                members = {name: archive.read(name) for name in archive.namelist()}
            config = bytearray(members["config.json"])
            for _ in range(self.rng.randint(1, 4)):
                config[self.rng.randrange(len(config))] = self.rng.randrange(32, 127)
            members["config.json"] = bytes(config)
            return _zip(members), suffix
        return mutate(seed, self.rng), suffix

    def run_keras(self, path: Path) -> None:
        from cifarlab.keras import open_keras

        open_keras(path)

    def _document(self, name: str) -> tuple[bytes, str]:
        return json.dumps(mutate_fields(self.documents[name], self.rng)).encode(), ".json"

    def model_meta_input(self) -> tuple[bytes, str]:
        from safetensors import safe_open
        from safetensors.torch import save

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "m.safetensors").write_bytes(self.model_seed)
            with safe_open(str(Path(tmp) / "m.safetensors"), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.dumps(mutate_fields(self.documents["model-meta"], self.rng))
        return save(tensors, metadata={"cifarlab": meta}), ".safetensors"

    def run_model_meta(self, path: Path) -> None:
        load_model(path)

    def checkpoint_input(self) -> tuple[bytes, str]:
        return self._document("checkpoint")

    def run_checkpoint(self, path: Path) -> None:
        from cifarlab.training.runfolder import CheckpointState

        CheckpointState.from_dict(json.loads(path.read_text()), str(path))

    def metrics_input(self) -> tuple[bytes, str]:
        return self._document("metrics")

    def run_metrics(self, path: Path) -> None:
        from cifarlab.results import EvaluationResult

        EvaluationResult.from_dict(json.loads(path.read_text()), str(path))

    def onnx_meta_input(self) -> tuple[bytes, str]:
        return self._document("onnx-meta")

    def run_onnx_meta(self, path: Path) -> None:
        from cifarlab.onnx import check_onnx_meta

        meta = json.loads(path.read_text())
        if isinstance(meta, dict):  # anything else is a foreign model's key (see _onnx_cifarlab_meta)
            check_onnx_meta(meta, path)

    def history_input(self) -> tuple[bytes, str]:
        """Half the time the rows' cells replaced or deleted, half the CSV's bytes mutated."""
        from cifarlab.history import history_csv

        rows = mutate_fields(self.documents["history"], self.rng)
        try:
            text = history_csv(rows)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):  # a row deleted or no longer an object
            text = history_csv(self.documents["history"])
        return (text if self.rng.random() < 0.5 else mutate(text, self.rng)), ".csv"

    def run_history(self, path: Path) -> None:
        from cifarlab.history import read_history

        read_history(path)

    def diagnosis_input(self) -> tuple[bytes, str]:
        return self._document("diagnosis")

    def run_diagnosis(self, path: Path) -> None:
        from cifarlab.report import Canvas, diagnosis_section, load_diagnosis

        diagnosis_section(load_diagnosis(path), Canvas(), None)  # the HTML the report makes of it

    def one(self, target: str) -> None:
        """Generate one input for `target`, run it, and record the outcome."""
        attr = target.replace("-", "_")
        start = time.perf_counter()
        data, suffix = getattr(self, f"{attr}_input")()
        path = self.tmp / f"fuzz{suffix}"
        path.write_bytes(data)
        self.report.inputs[target] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                getattr(self, f"run_{attr}")(path)
        except CifarlabError:
            self.report.refused[target] += 1
        except Exception as exc:  # noqa: BLE001 - a crash is what this looks for
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            key = (target, type(exc).__name__, f"{Path(frame.filename).name}:{frame.lineno}")
            self.report.crashes.setdefault(key, (traceback.format_exc(), data))
        finally:
            self.report.spent[target] += time.perf_counter() - start

    def run(self, seconds: float, targets: tuple[str, ...] = TARGETS) -> FuzzReport:
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for target in targets:
                self.one(target)
        self.report.seconds += time.perf_counter() - start
        return self.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-crashes", type=Path, help="write each crashing input here")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated, from {', '.join(TARGETS)} (default: all; they take turns)")
    args = parser.parse_args(argv)
    targets = tuple(args.targets.split(","))
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    with Fuzzer(args.seed) as fuzzer:
        report = fuzzer.run(args.seconds, targets)
    print(report.summary())
    for (target, kind, where), (trace, data) in report.crashes.items():
        print(f"\n--- {target}: {kind} at {where}\n{trace}")
        if args.save_crashes:
            args.save_crashes.mkdir(parents=True, exist_ok=True)
            (args.save_crashes / f"{target}-{kind}-{where.replace(':', '-')}").write_bytes(data)
    return 1 if report.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
