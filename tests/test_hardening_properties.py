"""Property-based tests (hypothesis) over the loaders and the diagnosis inputs.

The one property everywhere: whatever arrays, files or folders a user brings, a public function
either returns a result that satisfies its contract or raises a CifarlabError (whose message the
CLI prints with exit status 2). Any other exception is a crash. Where a valid input is
generated, the result is also checked (round trips, shapes, counts).
"""

from __future__ import annotations

import io
import json
import pickle
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from cifarlab import metrics
from cifarlab.data import load_dataset
from cifarlab.diagnosis import diagnose
from cifarlab.diagnosis.collapse import analyze_confusion, analyze_predictions
from cifarlab.diagnosis.inputs import as_labels, load_array
from cifarlab.errors import CifarlabError
from cifarlab.imageops import resize_images
from cifarlab.modelfile import build_classifier, make_meta

SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# ---- strategies -------------------------------------------------------------------------------

DTYPES = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                   hnp.boolean_dtypes(), hnp.complex_number_dtypes(), st.just(np.dtype("U3")),
                   st.just(np.dtype(object)))


def arrays(max_dims: int = 3, max_side: int = 6, dtypes=DTYPES):
    """Arrays of any dtype (NaN, inf, huge and negative values included) and small shapes."""
    return dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=max_dims,
                                                                      min_side=0, max_side=max_side)))


def plausible_ids(max_classes: int = 6):
    """Class ids, one-hot rows or scores: what a pipeline may actually hand over."""
    return st.one_of(
        hnp.arrays(np.int64, st.integers(0, 40), elements=st.integers(-2, max_classes + 1)),
        hnp.arrays(np.float64, st.tuples(st.integers(0, 40), st.integers(0, max_classes)),
                   elements=st.floats(-3, 3) | st.sampled_from([np.nan, np.inf, -np.inf])),
        hnp.arrays(np.int64, st.tuples(st.integers(0, 40), st.integers(0, max_classes)),
                   elements=st.integers(0, 1)),
    )


def outcome(call):
    """The call's result, or None when it raised a CifarlabError; anything else fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call()
    except CifarlabError as exc:
        assert str(exc), "an error must say what is wrong"
        return None


# ---- diagnosis and metrics inputs ---------------------------------------------------------------

@settings(SETTINGS, max_examples=150)
@given(arrays(), arrays())
def test_diagnose_any_arrays_gives_a_result_or_a_clear_error(a: np.ndarray, b: np.ndarray) -> None:
    for call in (lambda: diagnose(confusion=a), lambda: diagnose(predictions=a),
                 lambda: diagnose(predictions=a, labels=b), lambda: as_labels(a),
                 lambda: metrics.per_class_metrics(a), lambda: metrics.confusion_matrix(a, b, 5)):
        result = outcome(call)
        if hasattr(result, "verdict"):
            assert result.verdict in ("healthy", "problem") and result.exit_code in (0, 1)


@settings(SETTINGS, max_examples=150)
@given(plausible_ids(), plausible_ids(), st.integers(-1, 8), st.booleans())
def test_analyze_predictions_on_plausible_inputs(pred, truth, num_classes, with_probs) -> None:
    probs = truth.astype(np.float64) if with_probs and truth.ndim == 2 else None
    result = outcome(lambda: analyze_predictions(pred, num_classes, y_true=truth, probs=probs))
    if result is not None:  # a valid diagnosis: a JSON document with a verdict
        json.loads(result.to_json())
        assert 0 <= result.summary["accuracy"] <= 1 if "accuracy" in result.summary else True


@settings(SETTINGS, max_examples=150)
@given(hnp.arrays(np.int64, st.tuples(st.integers(0, 7), st.integers(0, 7)),
                  elements=st.integers(-3, 10**6)))
def test_confusion_matrices(cm: np.ndarray) -> None:
    result = outcome(lambda: analyze_confusion(cm))
    valid = cm.shape[0] == cm.shape[1] >= 2 and (cm >= 0).all() and cm.sum() > 0
    assert (result is not None) == valid
    if valid:
        assert result.summary["num_samples"] == cm.sum()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner,
                                                                                max_size=3), max_leaves=30)


@settings(SETTINGS, max_examples=200)
@given(JSON | st.lists(st.lists(st.integers(0, 50), min_size=2, max_size=2), min_size=2, max_size=2))
def test_cm_json_files(value) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cm.json"
        path.write_text(json.dumps(value))
        cm = outcome(lambda: metrics.load_confusion_json(path))
    if cm is not None:
        assert cm.dtype == np.int64 and cm.ndim == 2 and cm.shape[0] == cm.shape[1] >= 2
        assert cm.tolist() == value  # what was valid comes back exactly


# ---- array files ---------------------------------------------------------------------------------

@settings(SETTINGS, max_examples=150)
@given(arrays(max_dims=3), st.sampled_from([".npy", ".npz", ".csv"]),
       st.sampled_from(["images", "labels", "predictions"]))
def test_array_files_round_trip_or_are_refused(a: np.ndarray, suffix: str, what: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"a{suffix}"
        try:  # writing is numpy's job; only what cifarlab then reads is under test
            if suffix == ".npy":
                np.save(path, a)  # object arrays are pickled: reading them back must be refused
            elif suffix == ".npz":
                np.savez(path, x=a)
            else:
                np.savetxt(path, np.atleast_1d(a), delimiter=",")
        except (ValueError, TypeError, AttributeError, pickle.PicklingError):  # e.g. unpicklable objects
            assume(False)
        loaded = outcome(lambda: load_array(path, what))
    if suffix in (".npy", ".npz") and a.dtype != object:
        assert loaded is not None and loaded.dtype == a.dtype
        np.testing.assert_array_equal(loaded, a)
    if a.dtype == object and suffix != ".csv":
        assert loaded is None  # pickled by np.save: never unpickled


# ---- models fed random arrays ----------------------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    stats = {"mean": [125.0] * 3, "std": [60.0] * 3, "min": [0] * 3, "max": [255] * 3}
    meta = make_meta(architecture="airbench-small", arch_args={}, classes=["a", "b", "c"], train_stats=stats)
    return build_classifier(meta).eval()


MODEL = _tiny_model()
IMAGE_DTYPES = st.one_of(st.just(np.dtype(np.uint8)), hnp.floating_dtypes(sizes=(32, 64)),
                         hnp.integer_dtypes(), st.just(np.dtype(bool)), st.just(np.dtype(object)))
IMAGE_SHAPES = st.one_of(st.tuples(st.integers(0, 3), st.just(32), st.just(32), st.just(3)),
                         st.tuples(st.integers(1, 3), st.just(3), st.just(32), st.just(32)),
                         hnp.array_shapes(min_dims=2, max_dims=5, min_side=1, max_side=6))
IMAGES = st.tuples(IMAGE_DTYPES, IMAGE_SHAPES).flatmap(lambda t: hnp.arrays(*t))


@settings(SETTINGS, max_examples=100)
@given(IMAGES)
def test_predict_on_any_array(images: np.ndarray) -> None:
    logits = outcome(lambda: MODEL.predict_logits(images))
    if logits is not None:
        assert logits.shape == (len(images) if images.ndim == 4 else 1, 3) and np.isfinite(logits).all()
    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3):
        assert logits is not None  # the contract itself is always accepted


@settings(SETTINGS, max_examples=25)
@given(IMAGES, st.none() | hnp.arrays(np.int64, st.integers(0, 4), elements=st.integers(-1, 4)))
def test_diagnose_a_model_on_any_array(images: np.ndarray, labels) -> None:
    result = outcome(lambda: diagnose(model=MODEL, images=images, labels=labels, max_images=8))
    if result is not None:
        json.loads(result.to_json())


@settings(SETTINGS, max_examples=60)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(0, 2), st.integers(1, 70), st.integers(1, 70), st.just(3))),
       st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_resize_images_shape_and_range(images: np.ndarray, size) -> None:
    out = resize_images(images, size)
    assert out.dtype == np.uint8 and out.shape == (len(images), *size, 3)
    if images.size and (images == images.flat[0]).all():
        assert (out == images.flat[0]).all()  # a constant image stays that constant


# ---- ImageFolder datasets made of random files ---------------------------------------------------------

MODES = st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "LA"])
FORMATS = st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
SIZES = st.one_of(st.just((32, 32)), st.tuples(st.integers(1, 80), st.integers(1, 80)))


@st.composite
def image_file(draw) -> tuple[bytes, str]:
    """(encoded bytes, kind): kind is "exact" (RGB PNG 32x32), "ok", "other-size" or "corrupt"."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200)), "corrupt"
    mode, fmt, size = draw(MODES), draw(FORMATS), draw(SIZES)
    seed = draw(st.integers(0, 2**16))
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    try:
        buf = io.BytesIO()
        img.convert(mode).save(buf, fmt)
    except (OSError, ValueError, KeyError):  # a mode the format cannot store: use RGB PNG
        mode, fmt, buf = "RGB", "PNG", io.BytesIO()
        img.save(buf, "PNG")
    data = buf.getvalue()
    if draw(st.integers(0, 9)) == 0:
        return data[: draw(st.integers(0, max(0, len(data) - 1)))], "corrupt"  # truncated
    exact = (mode, fmt, size) == ("RGB", "PNG", (32, 32))
    return data, "exact" if exact else ("ok" if size == (32, 32) else "other-size")


FOLDERS = st.dictionaries(st.sampled_from(["ant", "bee", "cat"]),
                          st.tuples(st.lists(image_file(), min_size=1, max_size=3),
                                    st.lists(image_file(), min_size=1, max_size=2)), min_size=1, max_size=3)


@settings(SETTINGS, max_examples=60)
@given(FOLDERS, st.booleans(), st.sampled_from(["refuse", "skip"]))
def test_image_folders_of_random_files(folder, resize: bool, bad_images: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        kinds = []
        for cls, splits in folder.items():
            for split, files in zip(("train", "test"), splits):
                (root / split / cls).mkdir(parents=True)
                for i, (data, kind) in enumerate(files):
                    (root / split / cls / f"{i}.png").write_bytes(data)
                    kinds.append(kind)
        ds = outcome(lambda: load_dataset(root, cache_dir=Path(tmp) / "cache", resize=resize,
                                          bad_images=bad_images, progress=False))
    may_fail = "corrupt" in kinds or ("other-size" in kinds and not resize)
    if ds is None:
        assert may_fail
        return
    assert ds.train_x.dtype == np.uint8 and ds.train_x.shape[1:] == (32, 32, 3)
    assert len(ds.train_x) == len(ds.train_y) and len(ds.test_x) == len(ds.test_y)
    assert set(np.unique(np.concatenate([ds.train_y, ds.test_y]))) <= set(range(len(ds.classes)))
    assert len(ds.skipped) <= kinds.count("corrupt")  # a few "corrupt" byte strings decode fine
    assert len(ds.train_y) + len(ds.test_y) + len(ds.skipped) == len(kinds)


# ---- every numeric `cifarlab train` flag --------------------------------------------------------

def _numeric_train_flags() -> list[str]:
    import dataclasses
    import typing

    from cifarlab.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)
            and hints[f.name] in (int, float, int | None, float | None)]


NUMERIC_FLAGS = _numeric_train_flags()
FLAG_VALUES = st.one_of(st.integers(-(2**80), 2**80), st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0x10", "", "1_000", "５"]))


@SETTINGS
@given(st.sampled_from(NUMERIC_FLAGS), FLAG_VALUES)
def test_every_numeric_train_flag_is_accepted_or_refused_naming_it(name: str, value) -> None:
    """Parsed as the CLI parses it and validated as `cifarlab train` does before any work: a
    value is accepted, or refused with exit status 2 (argparse) or a CifarlabError naming the flag."""
    import contextlib
    import io as _io

    from cifarlab.cli import build_parser
    from cifarlab.config import TrainConfig

    flag = "--" + name.replace("_", "-")
    try:
        with contextlib.redirect_stderr(_io.StringIO()):
            args = build_parser().parse_args(["train", f"{flag}={value}"])
    except SystemExit as exc:
        assert exc.code == 2
        return
    config = TrainConfig(**{n: getattr(args, n) for n in TrainConfig.__dataclass_fields__ if hasattr(args, n)})
    try:
        config.validate()
    except CifarlabError as exc:
        assert flag in str(exc), (flag, str(exc))
