"""ONNX export round trips: real trained models, real ONNX files, real onnxruntime."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from synthetic import synthetic_dataset

from cifarlab.errors import CifarlabError
from cifarlab.training import TrainConfig, train

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cifarlab.export import export_onnx  # noqa: E402
from cifarlab.onnx import read_onnx_metadata  # noqa: E402
from cifarlab.runner import apply_preprocessing  # noqa: E402


@pytest.fixture(scope="module", params=["keras-cnn", "airbench-small"])
def trained(request, tmp_path_factory):
    """A model of each preprocessing kind ("scale", "standardize"), trained one epoch."""
    run_dir = tmp_path_factory.mktemp(request.param)
    cfg = TrainConfig(data="synthetic", model=request.param, epochs=1, batch_size=32)
    return train(cfg, dataset=synthetic_dataset(), run_dir=run_dir, progress=False)


def random_images(n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def run_onnx(path, feed: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


def test_uint8_export_matches_pytorch(trained, tmp_path):
    info = export_onnx(trained.model, tmp_path / "model.onnx")
    images = random_images()
    got = run_onnx(info["path"], images)
    assert info["input"] == "uint8" and info["max_abs_diff"] < 1e-4
    assert np.abs(got - trained.model.predict_logits(images)).max() < 1e-4
    session = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    assert graph_input.type == "tensor(uint8)" and graph_input.shape[1:] == [32, 32, 3]


def test_float_export_takes_preprocessed_nhwc(trained, tmp_path):
    info = export_onnx(trained.model_path, tmp_path / "model.onnx", input="float")  # from the file
    meta = read_onnx_metadata(info["path"])
    images = random_images()
    got = run_onnx(info["path"], apply_preprocessing(images, meta["expected_preprocessing"]))
    assert np.abs(got - trained.model.predict_logits(images)).max() < 1e-4
    expected = meta["expected_preprocessing"]
    if trained.model.meta["preprocessing"]["kind"] == "scale":
        assert expected["std"] == [255.0] * 3 and "/ 255" in expected["description"]
    else:
        assert expected["mean"] == trained.model.meta["train_input_stats"]["mean"]


def test_metadata_round_trips(trained, tmp_path):
    path = export_onnx(trained.model, tmp_path / "model.onnx", input="float")["path"]
    meta = read_onnx_metadata(path)
    assert meta["classes"] == trained.model.classes
    assert meta["onnx_input"] == "float"
    assert meta["architecture"] == trained.model.meta["architecture"]
    assert meta["train_input_stats"] == trained.model.meta["train_input_stats"]
    assert meta["metrics"]["val_acc"] == trained.model.meta["metrics"]["val_acc"]


def test_training_mode_export_is_random_and_leaves_the_model_alone(trained, tmp_path):
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    path = export_onnx(trained.model, tmp_path / "train.onnx", training=True)["path"]
    images = random_images(32)
    # onnxruntime drops Dropout nodes unless told not to; BatchNorm uses batch statistics.
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["EliminateDropout"])
    name = session.get_inputs()[0].name
    first = session.run(None, {name: images})[0]
    again = session.run(None, {name: images})[0]
    half = session.run(None, {name: images[:16]})[0]
    assert max(np.abs(first - again).max(), np.abs(first[:16] - half).max()) > 1e-3
    assert not trained.model.training
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, before[key]), f"export changed {key}"


def test_bad_input_kind_is_refused(trained, tmp_path):
    with pytest.raises(CifarlabError, match="'uint8' or 'float'"):
        export_onnx(trained.model, tmp_path / "m.onnx", input="float16")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_package_says_how_to_install(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what an environment without it looks like
    with pytest.raises(CifarlabError, match=r"pip install 'cifarlab\[onnx\]'"):
        export_onnx(trained.model, tmp_path / "m.onnx")


def test_cli_export_both_variants(trained, tmp_path):
    import subprocess

    for flag, dtype in (([], np.uint8), (["--onnx-float"], np.float32)):
        out = tmp_path / f"model-{dtype.__name__}.onnx"
        proc = subprocess.run([sys.executable, "-m", "cifarlab", "export", str(trained.model_path),
                               "--onnx", str(out), *flag], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "max abs logit difference" in proc.stdout and out.is_file()
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == ("tensor(uint8)" if dtype is np.uint8 else "tensor(float)")
    missing = subprocess.run([sys.executable, "-m", "cifarlab", "export", str(tmp_path / "nope.safetensors"),
                              "--onnx", str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr
