"""`evaluate` on exported ONNX files: the same numbers as the PyTorch model, through onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from synthetic import synthetic_dataset, write_image_folder

from cifarlab.cli import main
from cifarlab.errors import CifarlabError
from cifarlab.evaluation import evaluate
from cifarlab.metrics import load_confusion_json
from cifarlab.training import TrainConfig, train

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from cifarlab.export import export_onnx  # noqa: E402

OUTPUTS = ("metrics.json", "cm.json", "confusion_matrix.png", "probs.npy", "labels.npy")


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """CIFARLAB_HOME for the whole module: evaluate() loads the dataset named in the metadata."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("cache")
        patch.setenv("CIFARLAB_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, cache_home):
    """The synthetic dataset written as an ImageFolder, so the model file records a real path."""
    root = tmp_path_factory.mktemp("images")
    return write_image_folder(root, synthetic_dataset(n_test_per_class=25))


@pytest.fixture(scope="module", params=["keras-cnn", "airbench-small"])
def exported(request, image_folder, tmp_path_factory):
    """A model of each preprocessing kind ("scale", "standardize"), trained one epoch and exported
    both ways; plus its PyTorch evaluation on the test split."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = TrainConfig(data=str(image_folder), model=request.param, epochs=1, batch_size=32)
    result = train(cfg, run_dir=root / "run", progress=False)
    files = {kind: export_onnx(result.model, root / f"{kind}.onnx", input=kind)["path"]
             for kind in ("uint8", "float")}
    reference = evaluate(result.model_path, out_dir=root / "eval-pytorch", progress=False)
    return {"result": result, "files": files, "reference": reference, "root": root}


def assert_same_evaluation(got: dict, expected: dict) -> None:
    got_dir, expected_dir = got["out_dir"], expected["out_dir"]
    assert got["accuracy"] == expected["accuracy"]
    np.testing.assert_array_equal(load_confusion_json(f"{got_dir}/cm.json"),
                                  load_confusion_json(f"{expected_dir}/cm.json"))
    # Probabilities too: a wrong preprocessing can leave argmax intact on easy images.
    np.testing.assert_allclose(np.load(f"{got_dir}/probs.npy"), np.load(f"{expected_dir}/probs.npy"), atol=1e-4)
    np.testing.assert_array_equal(np.load(f"{got_dir}/labels.npy"), np.load(f"{expected_dir}/labels.npy"))


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_onnx_evaluation_equals_pytorch(exported, kind, tmp_path):
    # No data given: the dataset, classes and split come from the ONNX metadata.
    report = evaluate(exported["files"][kind], out_dir=tmp_path, progress=False)
    assert_same_evaluation(report, exported["reference"])
    assert all((tmp_path / name).is_file() for name in OUTPUTS)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"]["path"] == exported["files"][kind]
    assert metrics["model"]["architecture"] == exported["result"].model.meta["architecture"]
    assert [c["class"] for c in metrics["per_class"]] == exported["result"].model.classes


def test_onnx_val_split_and_tta_match_pytorch(exported, tmp_path):
    model_path, onnx_file = exported["result"].model_path, exported["files"]["float"]
    for split, tta in (("val", None), ("test", "flip")):
        expected = evaluate(model_path, split=split, tta=tta, out_dir=tmp_path / f"pt-{split}", progress=False)
        got = evaluate(onnx_file, split=split, tta=tta, out_dir=tmp_path / f"onnx-{split}", progress=False)
        assert_same_evaluation(got, expected)


def test_cli_evaluates_an_onnx_file(exported, tmp_path, capsys):
    assert main(["evaluate", exported["files"]["uint8"], "--out", str(tmp_path), "--quiet"]) == 0
    assert f"accuracy: {exported['reference']['accuracy']:.2%}" in capsys.readouterr().out
    np.testing.assert_array_equal(load_confusion_json(tmp_path / "cm.json"),
                                  np.asarray(exported["reference"]["confusion_matrix"]))


def strip_metadata(path: str, out) -> str:
    """The same graph without cifarlab's metadata, as another exporter would write it."""
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, str(out))
    return str(out)


def test_onnx_without_metadata_needs_data(exported, image_folder, tmp_path, capsys):
    foreign = strip_metadata(exported["files"]["uint8"], tmp_path / "foreign.onnx")
    with pytest.raises(CifarlabError, match="no cifarlab metadata.*--data"):
        evaluate(foreign, out_dir=tmp_path / "x", progress=False)
    assert main(["evaluate", foreign, "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no cifarlab metadata" in err and "--data" in err
    # With --data, a graph that takes raw uint8 pixels needs no metadata: its classes come from the data.
    report = evaluate(foreign, data=str(image_folder), out_dir=tmp_path / "eval", progress=False)
    assert_same_evaluation(report, exported["reference"])


def test_float_onnx_without_metadata_is_refused_with_what_to_do(exported, image_folder, tmp_path):
    foreign = strip_metadata(exported["files"]["float"], tmp_path / "foreign-float.onnx")
    with pytest.raises(CifarlabError, match="raw uint8 NHWC.*cifarlab diagnose"):
        evaluate(foreign, data=str(image_folder), out_dir=tmp_path / "x", progress=False)


def test_onnx_with_other_classes_is_refused(exported, tmp_path):
    other = tmp_path / "other"
    ds = synthetic_dataset(num_classes=3)
    for i, (x, y) in enumerate(zip(np.concatenate([ds.train_x, ds.test_x]), np.concatenate([ds.train_y, ds.test_y]))):
        folder = other / ("train" if i < len(ds.train_y) else "test") / f"k{y}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(folder / f"{i}.png")
    foreign = strip_metadata(exported["files"]["uint8"], tmp_path / "foreign.onnx")
    with pytest.raises(CifarlabError, match="outputs 4 classes but dataset 'other' has 3"):
        evaluate(foreign, data=str(other), out_dir=tmp_path / "x", progress=False)
