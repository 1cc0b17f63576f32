"""A cifarlab model's metadata: what the weights are (architecture, classes), what they take
(the input contract: raw uint8 RGB NHWC pixels of one size) and what they do to it first
(the preprocessing constants), plus where they came from (dataset, split, recipe, metrics).

One record, `ModelMeta`, written into the model file as JSON and read back by `from_dict`,
which checks every field once with its name in the message: sizes are bounded before any
network is built, the preprocessing's std is positive, the class names match the head, the
coarse map fits its classes, the split record has what `--split val` needs. Nothing
downstream checks again. The record also reads as the JSON mapping (`meta["classes"]`), the
shape that foreign models' metadata has, so evaluation and diagnosis treat both alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cifarlab.config import arch_args_problem
from cifarlab.errors import ModelFileError
from cifarlab.imageops import MAX_SIDE
from cifarlab.metrics import MAX_CLASSES
from cifarlab.schema import DocumentView, Fields, describe

FORMAT = "cifarlab-model"
FORMAT_VERSION = 1
DAMAGED_HINT = "the file was damaged or edited; use the original file written by cifarlab"

# The fixed part of the input contract, written into every file for the people who read it.
INPUT_CONTRACT = {"dtype": "uint8", "layout": "NHWC", "channels": "RGB"}
PIXEL_RANGE = (0, 255)


@dataclass(frozen=True)
class Preprocessing:
    """(x - mean) / std per channel, in 0..255 pixel units, done inside the model.
    `kind`: "scale" (x / 255, the Keras habit) or "standardize" (the training split's stats)."""

    kind: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, kind: str, train_stats: PixelStats) -> Preprocessing:
        """The constants that a model's preprocessing kind implies."""
        if kind == "scale":
            return cls(kind, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
        if kind == "standardize":
            return cls(kind, train_stats.mean, train_stats.std)
        raise ModelFileError(f"unknown preprocessing kind {kind!r}; expected 'scale' or 'standardize'")

    @classmethod
    def read(cls, f: Fields) -> Preprocessing:
        kind = f.optional_string("kind") or "standardize"
        mean = f.channels("mean", 0, 255)
        std = f.channels("std", 1e-6, 1e6)  # positive: preprocessing divides by it
        return cls(kind, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class PixelStats:
    """Per-channel mean, std, min and max of raw training pixels (0..255), recorded so that
    diagnosis can compare what a model is fed with what it was trained on."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min: tuple[float, float, float]
    max: tuple[float, float, float]

    @classmethod
    def read(cls, f: Fields) -> PixelStats:
        values = [f.channels(key, 0, 255) for key in ("mean", "std", "min", "max")]
        return cls(*((v[0], v[1], v[2]) for v in values))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std), "min": list(self.min), "max": list(self.max)}


def read_split(f: Fields) -> dict[str, Any]:
    """The split record (cifarlab.data.split.split_info) that `--split val` rebuilds and checks."""
    f.require("seed", "val_fraction", "n_train", "n_val", "val_indices_sha256")
    return {"method": f.optional_string("method") or "stratified", "seed": f.integer("seed"),
            "val_fraction": f.number("val_fraction", 0, 0.999), "n_train": f.integer("n_train"),
            "n_val": f.integer("n_val"), "val_indices_sha256": f.string("val_indices_sha256")}


def read_dataset(f: Fields) -> dict[str, str | None]:
    """Which dataset trained the model: its name, where it came from, and the spec to load it."""
    for key in ("name", "source", "spec"):
        f.optional_string(key)
    return dict(f.data)


def read_metrics(f: Fields) -> dict[str, float | None]:
    """Training's last numbers (losses, accuracies, epochs, seconds): each a number or null,
    accuracies in [0, 1]; counts stay integers."""
    for key in f.data:
        f.optional_number(key, 0, 1) if key.endswith("_acc") else f.optional_number(key)
    return dict(f.data)


@dataclass(frozen=True, eq=False)  # equality is the Mapping's: the same JSON document
class ModelMeta(DocumentView):
    """Everything needed to use a cifarlab model's weights correctly; see the module's text."""

    architecture: str
    arch_args: dict[str, Any]
    classes: tuple[str, ...]
    image_size: tuple[int, int]  # (height, width) of the uint8 NHWC input
    preprocessing: Preprocessing
    train_input_stats: PixelStats | None = None
    coarse_classes: tuple[str, ...] | None = None
    coarse_of_fine: tuple[int, ...] | None = None  # the coarse class of each fine class
    dataset: dict[str, str | None] | None = None
    split: dict[str, Any] | None = None
    metrics: dict[str, float | None] | None = None
    recipe: dict[str, Any] | None = None  # the resolved TrainConfig, shown and never computed with
    created: str | None = None
    cifarlab_version: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer writer, carried through

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ---- the file's JSON document ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        height, width = self.image_size
        optional = {
            "train_input_stats": self.train_input_stats.to_dict() if self.train_input_stats else None,
            "coarse_classes": list(self.coarse_classes) if self.coarse_classes is not None else None,
            "coarse_of_fine": list(self.coarse_of_fine) if self.coarse_of_fine is not None else None,
            "dataset": self.dataset, "split": self.split, "cifarlab_version": self.cifarlab_version,
            "recipe": self.recipe, "metrics": self.metrics, "created": self.created,
        }
        return {
            "format": FORMAT, "format_version": self.format_version, "architecture": self.architecture,
            "arch_args": dict(self.arch_args), "num_classes": self.num_classes, "classes": list(self.classes),
            "input": {**INPUT_CONTRACT, "height": height, "width": width, "range": list(PIXEL_RANGE)},
            "preprocessing": self.preprocessing.to_dict(),
            **{key: value for key, value in optional.items() if value is not None},
            **self.extra,
        }

    @classmethod
    def from_dict(cls, meta: Any, where: str) -> ModelMeta:
        """The record of a model file's metadata document, every field checked (ModelFileError
        naming the field)."""
        f = Fields(meta, f"{where}: the cifarlab metadata", DAMAGED_HINT, ModelFileError)
        version = meta.get("format_version", 0)
        if meta.get("format") != FORMAT or isinstance(version, bool) or not isinstance(version, int) \
                or version > FORMAT_VERSION:
            raise ModelFileError(f"{where}: unsupported model format {describe(meta.get('format'))} version "
                                 f"{describe(version)}; this cifarlab reads {FORMAT} up to version {FORMAT_VERSION}.")
        f.require("architecture", "arch_args", "num_classes", "classes", "input", "preprocessing")
        problem = arch_args_problem(meta["arch_args"])
        if problem:
            f.fail(f"{f.where}: {problem}")
        classes = f.strings("classes")
        if meta["num_classes"] != len(classes):
            f.fail(f"{f.where}: 'classes' must name the num_classes={describe(meta['num_classes'])} classes "
                   f"of the head, got {len(classes)} names")
        f.integer("num_classes", 1, MAX_CLASSES)
        contract = f.object("input")
        stats = f.optional_object("train_input_stats")
        coarse_classes, coarse_of_fine = _read_coarse(f, len(classes))
        known = {"format", "format_version", "num_classes", "input", *cls.__dataclass_fields__} - {"extra"}
        return cls(
            architecture=f.string("architecture"), arch_args=dict(meta["arch_args"]), classes=tuple(classes),
            image_size=(contract.integer("height", 1, MAX_SIDE), contract.integer("width", 1, MAX_SIDE)),
            preprocessing=Preprocessing.read(f.object("preprocessing")),
            train_input_stats=PixelStats.read(stats) if stats else None,
            coarse_classes=coarse_classes, coarse_of_fine=coarse_of_fine,
            dataset=optional_record(f, "dataset", read_dataset), split=optional_record(f, "split", read_split),
            metrics=optional_record(f, "metrics", read_metrics), recipe=f.optional_dict("recipe"),
            created=f.optional_string("created"), cifarlab_version=f.optional_string("cifarlab_version"),
            format_version=version, extra={k: v for k, v in meta.items() if k not in known},
        )

    def document(self) -> dict[str, Any]:
        return self.to_dict()


def optional_record(f: Fields, key: str, read: Any) -> Any:
    """read(the object under `key`), or None where the key is absent or null."""
    sub = f.optional_object(key)
    return read(sub) if sub is not None else None


def _read_coarse(f: Fields, num_classes: int) -> tuple[tuple[str, ...] | None, tuple[int, ...] | None]:
    """The coarse class names and the coarse id of each fine class: both or neither, the map one
    id per fine class, each naming one of the coarse classes."""
    if not f.has("coarse_classes") and not f.has("coarse_of_fine"):
        return None, None
    f.require("coarse_classes", "coarse_of_fine")
    names = f.strings("coarse_classes")
    ids = f.data["coarse_of_fine"]
    if not isinstance(ids, list) or len(ids) != num_classes or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(names) for i in ids):
        f.fail(f"{f.where}: 'coarse_of_fine' must hold one coarse class id in [0, {len(names)}) for each of the "
               f"{num_classes} classes, got {describe(ids)}")
    return tuple(names), tuple(ids)


def make_meta(*, architecture: str, arch_args: dict[str, Any], classes: list[str], train_stats: dict[str, list[float]],
              image_size: tuple[int, int] = (32, 32), **extra: Any) -> ModelMeta:
    """A new model's metadata: the architecture's default arguments filled in, its preprocessing
    kind resolved into constants from the training pixels' statistics. `extra` takes the record's
    optional fields (dataset, split, coarse classes, ...)."""
    from cifarlab.models import get_model_spec  # the registry imports torch; the record itself does not

    spec = get_model_spec(architecture)
    stats = PixelStats.read(Fields(train_stats, "the training images' statistics"))
    for key in ("coarse_classes", "coarse_of_fine"):
        if extra.get(key) is not None:
            extra[key] = tuple(extra[key])
    # Through JSON, so that the record equals what a reader of its file gets (tuples become lists).
    arch_args = json.loads(json.dumps({**spec.default_args, **arch_args}))
    return ModelMeta(architecture=architecture, arch_args=arch_args,
                     classes=tuple(classes), image_size=(int(image_size[0]), int(image_size[1])),
                     preprocessing=Preprocessing.of(spec.preprocessing, stats),
                     train_input_stats=stats, **extra)
