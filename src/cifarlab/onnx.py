"""ONNX files: the optional packages, reading a graph's input contract and metadata, and
running it.

onnx and onnxruntime are optional (`pip install 'cifarlab[onnx]'`) and imported only when an
ONNX file is opened or written. `open_onnx` gives a `ModelRunner` (the graph as written, for
diagnosis); `open_onnx_classifier` gives what `evaluate` needs:

* a uint8 export by `cifarlab export` is fed the raw pixels, as a `Classifier` is;
* a float export is fed the pixels preprocessed as its metadata states
  (`expected_preprocessing`: x / 255, or the training mean/std), so it scores exactly what
  the model would.

A file without cifarlab metadata (exported by other tools) says nothing about its classes,
dataset or preprocessing. It can still be evaluated when the dataset is given (`--data`:
its class names) and the graph takes raw uint8 NHWC pixels, the only input that needs no
assumption about preprocessing; anything else is refused with what to do instead.
"""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.data import Dataset, check_class_count, resolve_dataset
from cifarlab.errors import CifarlabError, InputError, ModelFileError
from cifarlab.fileio import require_file
from cifarlab.modelfile import METADATA_KEY
from cifarlab.modelmeta import Preprocessing, optional_record, read_dataset, read_metrics, read_split
from cifarlab.runner import ModelRunner, RunnerClassifier, image_layout, image_size, recorded_accuracy
from cifarlab.schema import Fields

ONNX_HINT = "pip install 'cifarlab[onnx]'"
# One batch (500 images by default) of a CIFAR classifier runs in well under a second; a graph
# that takes this long is stopped rather than left to hang evaluation or diagnosis.
ONNX_BATCH_SECONDS = 120.0

# ONNX element types we can feed, mapped to numpy dtypes.
_ONNX_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32",
                "tensor(float16)": "float16", "tensor(double)": "float64"}


def import_onnx_package(name: str) -> Any:
    """onnx or onnxruntime, which are optional: a clear error says how to install them."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CifarlabError(f"this needs the {name} package, an optional extra: {ONNX_HINT}") from None


def open_onnx(path: str | Path) -> ModelRunner:
    """An onnxruntime CPU session; input contract from the graph, the rest from cifarlab metadata."""
    ort = import_onnx_package("onnxruntime")
    path = Path(path)
    require_file(path, "ONNX model", CifarlabError)
    try:
        # EliminateDropout would silently turn a graph exported in training mode into an
        # eval-mode one; diagnosis must run the graph as written to see that bug.
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                       disabled_optimizers=["EliminateDropout"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise CifarlabError(f"{path} is not a loadable ONNX model: {exc}") from None
    meta = _onnx_cifarlab_meta(session, path)
    spec = onnx_input_spec(session, path, meta)
    input_name = session.get_inputs()[0].name
    output = onnx_class_output(session, path)

    def forward(batch: np.ndarray) -> np.ndarray:
        return run_bounded(ort, session, path, output.name, input_name, batch)

    return ModelRunner(
        name=path.name, kind="onnx", num_classes=_onnx_num_classes(output, meta),
        classes=_onnx_classes(session, meta), input_spec=spec,
        train_stats=(meta or {}).get("train_input_stats"),
        trained_accuracy=recorded_accuracy(meta) if meta else None, forward=forward,
        feed_dtype=spec["dtype"], meta=meta)


def run_bounded(ort: Any, session: Any, path: Path, output: str, input_name: str, batch: np.ndarray) -> Any:
    """session.run on one batch, stopped after ONNX_BATCH_SECONDS (onnxruntime checks its
    terminate flag between nodes); any onnxruntime failure becomes an InputError that says
    what was fed (its exception types are not RuntimeError or ValueError)."""
    options = ort.RunOptions()
    timer = threading.Timer(ONNX_BATCH_SECONDS, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        return session.run([output], {input_name: batch}, options)[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own types (Fail, InvalidArgument, ...)
        if options.terminate:
            raise InputError(f"{path.name} ran longer than {ONNX_BATCH_SECONDS:g} s on one batch of {len(batch)} "
                             "images and was stopped: is it an image classifier of a sensible size?") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"onnxruntime failed running {path.name} on a batch of shape {batch.shape} "
                         f"({batch.dtype}): {first[:300]}") from None
    finally:
        timer.cancel()


def onnx_input_spec(session: Any, path: Path, meta: dict[str, Any] | None) -> dict[str, Any]:
    inputs = session.get_inputs()
    declared = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs)
    if len(inputs) != 1:
        raise InputError(f"{path.name} declares {len(inputs)} inputs ({declared}); "
                         "diagnosis needs a classifier with one image input")
    shape, onnx_type = inputs[0].shape, inputs[0].type
    if len(shape) != 4:
        raise InputError(f"{path.name} declares input {declared}, of rank {len(shape)}; "
                         "diagnosis needs a batch of images of rank 4 (NHWC or NCHW)")
    if onnx_type not in _ONNX_DTYPES:
        raise InputError(f"{path.name} declares input {declared}; expected uint8 or float images")
    layout, h, w, c = image_layout(shape, f"{path.name} declares input {declared}")
    return {"dtype": _ONNX_DTYPES[onnx_type], "layout": layout, "height": h, "width": w,
            "channels": c, "preprocessing": _onnx_preprocessing(meta)}


def _onnx_cifarlab_meta(session: Any, path: Path) -> dict[str, Any] | None:
    """The metadata cifarlab's export wrote, checked; None for a graph without it (or with
    someone else's "cifarlab" key that is not a JSON object: a foreign model)."""
    props = session.get_modelmeta().custom_metadata_map
    try:
        meta = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return None
    check_onnx_meta(meta, path)
    return meta


def check_onnx_meta(meta: dict[str, Any], path: Path) -> None:
    """The fields of the cifarlab metadata in an ONNX file that running it relies on."""
    f = Fields(meta, f"{path}: the cifarlab metadata", "the file was damaged or edited; export it again "
               "with `cifarlab export`", ModelFileError)
    if f.has("onnx_input") and f.string("onnx_input") not in ("uint8", "float"):
        f.fail(f"{f.where}: 'onnx_input' must be uint8 or float, got {meta['onnx_input']!r}")
    # The preprocessing whose numbers are used: the caller's for a float export (a uint8
    # export's expected_preprocessing only says "none"), the graph's own otherwise.
    used = {"float": "expected_preprocessing", "uint8": "preprocessing"}.get(meta.get("onnx_input", ""))
    if used is not None and not f.has(used):
        f.fail(f"{f.where}: a {meta['onnx_input']}-input export needs {used!r}")
    if used == "expected_preprocessing":
        Preprocessing.read(f.object(used))
    if f.has("preprocessing"):
        Preprocessing.read(f.object("preprocessing"))
    if f.has("classes"):
        f.strings("classes")
    stats = f.optional_object("train_input_stats")
    if stats is not None:
        for key in ("mean", "std"):
            stats.channels(key, 0, 255)
    for key, read in (("dataset", read_dataset), ("split", read_split), ("metrics", read_metrics)):
        optional_record(f, key, read)


def _onnx_preprocessing(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where the graph's preprocessing happens: inside (uint8 export) or by the caller (float)."""
    if not meta:
        return None
    if meta.get("onnx_input") == "float":
        return {**meta["expected_preprocessing"], "applied_by": "caller"}
    return {**meta["preprocessing"], "applied_by": "model"}


def _onnx_classes(session: Any, meta: dict[str, Any] | None) -> list[str] | None:
    if meta and meta.get("classes"):
        return list(meta["classes"])
    raw = session.get_modelmeta().custom_metadata_map.get("classes")
    try:
        names = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None
    return list(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def onnx_class_output(session: Any, path: Path) -> Any:
    """The output holding the class scores: the first float output of rank 2 (N, classes).

    Converters such as sklearn-onnx put predicted labels (int64, rank 1) first and the
    probabilities second; a shape left unknown by the exporter is accepted and checked on the
    first batch.
    """
    outputs = session.get_outputs()
    for out in outputs:
        rank = len(out.shape) if isinstance(out.shape, (list, tuple)) else None
        if out.type in _ONNX_DTYPES and out.type != "tensor(uint8)" and rank in (2, None, 0):
            if rank == 2 or len(outputs) == 1:
                return out
    declared = ", ".join(f"{o.name}: {o.type} {o.shape}" for o in outputs) or "none"
    raise InputError(f"{path.name} declares outputs {declared}; diagnosis needs a float output of shape "
                     "(N, classes) holding logits or probabilities")


def _onnx_num_classes(output: Any, meta: dict[str, Any] | None) -> int | None:
    shape = output.shape if isinstance(output.shape, (list, tuple)) else []
    last = shape[-1] if len(shape) == 2 else None
    if isinstance(last, int):
        return last
    return int(meta["num_classes"]) if meta and isinstance(meta.get("num_classes"), int) else None


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The cifarlab metadata of an exported file (with "classes" decoded), {} if it has none."""
    ort = import_onnx_package("onnxruntime")
    props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    meta = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}
    if "classes" in props:
        meta["classes"] = json.loads(props["classes"])
    return meta



# ---- evaluation ------------------------------------------------------------------------------

def open_onnx_classifier(path: str | Path, data: str | Dataset | None,
                         preprocessing: dict[str, Any] | None = None,
                         progress: bool = True) -> tuple[RunnerClassifier, Dataset]:
    """The ONNX file at `path` and the dataset to evaluate it on (`data`, else its metadata's).

    `preprocessing` (runner.parse_preprocessing) is for a float graph from another tool.
    """
    path = Path(path)
    runner = open_onnx(path)
    if runner.meta is None:
        return _foreign(runner, path, data, preprocessing, progress)
    if preprocessing is not None:
        raise CifarlabError(f"{path.name} was exported by cifarlab and records its preprocessing; "
                            "leave --preprocessing out")
    meta = {**runner.meta, "classes": runner.classes or runner.meta.get("classes")}
    feed = meta["expected_preprocessing"] if meta.get("onnx_input") == "float" else None
    model = RunnerClassifier(runner, meta, image_size(meta.get("input") or runner.input_spec, None), feed)
    return model, resolve_dataset(data, meta.get("dataset"), progress)


def _foreign(runner: ModelRunner, path: Path, data: str | Dataset | None,
             preprocessing: dict[str, Any] | None, progress: bool) -> tuple[RunnerClassifier, Dataset]:
    """A file without cifarlab metadata: classes from `data`; raw uint8 NHWC input, or float NHWC
    input with the preprocessing the caller states."""
    missing = (f"{path.name} has no cifarlab metadata (it was not written by `cifarlab export`), "
               "so its class names, dataset and input preprocessing are unknown")
    if data is None:
        raise CifarlabError(f"{missing}. Pass the dataset it was trained on with --data (it gives "
                            "the class names), or export the model with `cifarlab export MODEL --onnx OUT`.")
    spec = runner.input_spec
    raw = spec.get("dtype") == "uint8" and spec.get("layout") == "NHWC"
    if not raw and (preprocessing is None or spec.get("layout") != "NHWC"):
        raise CifarlabError(
            f"{missing}. It takes {spec.get('dtype') or 'float'} {spec.get('layout')} input, and only a "
            "graph that takes raw uint8 NHWC pixels (0..255) can be evaluated without knowing its "
            "preprocessing. For a float NHWC graph pass --preprocessing (scale, standardize:MEAN:STD or "
            "none, as your training script did); otherwise run `cifarlab diagnose --model "
            f"{path.name} --images x.npy --labels y.npy` with the images as your pipeline prepares them.")
    if raw and preprocessing is not None and preprocessing["kind"] != "none":
        raise CifarlabError(f"{path.name} takes raw uint8 pixels, so it preprocesses them itself; "
                            "leave --preprocessing out")
    dataset = resolve_dataset(data, None, progress)
    check_class_count(path.name, runner.num_classes, dataset)
    meta: dict[str, Any] = {"architecture": path.name, "dataset": {}, "metrics": None, "expects": runner.expects,
                            "classes": list(dataset.classes), "num_classes": len(dataset.classes)}
    return RunnerClassifier(runner, meta, image_size(runner.input_spec, dataset.train_x),
                            None if raw else preprocessing), dataset


