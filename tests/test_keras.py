"""Keras files (.keras, .h5) and live keras.Models: evaluate, diagnose, predict and seal.

The models are the founding question's layer stack (Conv/ReLU/MaxPool/Dropout/Dense/tanh/
softmax), trained for three epochs inside the test on 8,000 real CIFAR-10 (JPEG copy) images,
once without preprocessing layers (the training script divides by 255, as in the question)
and once with Rescaling(1/255) as its first layer. Skipped without the `keras` extra or the
shared data.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.errors import CifarlabError, ModelFileError

pytestmark = pytest.mark.filterwarnings("ignore")


def keras_or_skip():
    from cifarlab.keras import import_keras

    try:
        return import_keras()
    except CifarlabError as exc:
        pytest.skip(str(exc))


def question_model(keras, rescaling: bool):
    layers = keras.layers
    first = [layers.Rescaling(1 / 255)] if rescaling else []
    return keras.Sequential([
        keras.Input((32, 32, 3)), *first,
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Dropout(0.25), layers.Flatten(), layers.Dense(128, activation="tanh"),
        layers.Dense(10, activation="softmax")])


@pytest.fixture(scope="module")
def keras_models(cifar10_jpeg, tmp_path_factory):
    keras = keras_or_skip()
    root = tmp_path_factory.mktemp("keras")
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(len(cifar10_jpeg.train_y), 8000, replace=False))
    x, y = cifar10_jpeg.train_x[train], cifar10_jpeg.train_y[train]
    models = {}
    for name, rescaling, inputs in (("scaled-outside", False, x / 255.0), ("rescaling-inside", True, x)):
        keras.utils.set_random_seed(0)
        model = question_model(keras, rescaling)
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(inputs.astype("float32"), y, epochs=3, batch_size=64, verbose=0)
        model.save(root / f"{name}.keras")
        model.save(root / f"{name}.h5")
        models[name] = model
    test = np.sort(rng.choice(len(cifar10_jpeg.test_y), 2000, replace=False))
    return {"root": root, "models": models, "x": cifar10_jpeg.test_x[test], "y": cifar10_jpeg.test_y[test]}


# ---- the same numbers as Keras ----------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_evaluate_gives_kerases_own_numbers(keras_models, cifar10_jpeg, suffix, tmp_path):
    from cifarlab.evaluation import evaluate

    model = keras_models["models"]["scaled-outside"]
    x, y = cifar10_jpeg.test_x, cifar10_jpeg.test_y
    own = model.predict(x / 255.0, verbose=0).argmax(1)  # the user's own argmax loop
    _, keras_accuracy = model.evaluate(x / 255.0, y, verbose=0)
    report = evaluate(keras_models["root"] / f"scaled-outside{suffix}", data=cifar10_jpeg,
                      preprocessing="scale", out_dir=tmp_path, progress=False)
    expected_cm = np.zeros((10, 10), np.int64)
    np.add.at(expected_cm, (y, own), 1)
    assert np.array_equal(np.asarray(json.loads((tmp_path / "cm.json").read_text())), expected_cm)
    assert report["accuracy"] == pytest.approx(keras_accuracy, abs=1e-6)
    assert 0.40 < report["accuracy"] < 0.70  # a real, briefly trained model
    assert "Rescaling" not in report["model"]["expects"] and "returns probabilities" in report["model"]["expects"]


def test_a_live_keras_model_with_rescaling_needs_no_preprocessing(keras_models, cifar10_jpeg, tmp_path):
    from cifarlab.evaluation import evaluate

    model = keras_models["models"]["rescaling-inside"]
    own = model.predict(cifar10_jpeg.test_x.astype("float32"), verbose=0).argmax(1)
    report = evaluate(model, data=cifar10_jpeg, out_dir=tmp_path, progress=False)
    assert report["accuracy"] == pytest.approx(float((own == cifar10_jpeg.test_y).mean()), abs=1e-6)
    assert "Rescaling(scale=0.00392157, offset=0)" in report["model"]["expects"]


def test_evaluate_refuses_what_it_cannot_know(keras_models, cifar10_jpeg, capsys):
    root = keras_models["root"]
    data = str(root / "no-such-dataset")  # never loaded: the model is refused first
    assert main(["evaluate", str(root / "scaled-outside.keras"), "--data", str(cifar10_jpeg.source),
                 "--quiet"]) == 2
    assert "does not say how its inputs were scaled" in capsys.readouterr().err
    assert main(["evaluate", str(root / "rescaling-inside.h5"), "--data", str(cifar10_jpeg.source),
                 "--preprocessing", "scale", "--quiet"]) == 2
    assert "would apply it twice" in capsys.readouterr().err
    assert main(["evaluate", str(root / "scaled-outside.h5"), "--preprocessing", "scale", "--quiet"]) == 2
    assert "pass the dataset it was trained on with --data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:  # argparse's own exit, before anything is loaded
        main(["evaluate", str(root / "scaled-outside.h5"), "--data", data, "--preprocessing", "standardize:0.5"])
    assert exit_status.value.code == 2
    assert "is not one of none, scale, standardize:MEAN:STD" in capsys.readouterr().err


# ---- diagnosis -----------------------------------------------------------------------------------

def test_diagnose_names_the_forgotten_division(keras_models, tmp_path):
    from cifarlab.diagnosis import diagnose

    raw = tmp_path / "x.npy"
    np.save(raw, keras_models["x"].astype(np.float32))  # the question's bug: no / 255
    result = diagnose(model=keras_models["root"] / "scaled-outside.h5", images=raw, labels=keras_models["y"])
    assert result.verdict == "problem"
    top = result.ranked()[0]
    assert top.id == "input-scale" and top.evidence["transform"] == "divide-by-255"
    assert top.fix.startswith("x = x / 255.0")
    assert "not recorded in the model" in result.summary["model_expects"]


def test_diagnose_on_a_dataset_with_other_classes_is_refused(keras_models, cifar100_rebuilt):
    from cifarlab.diagnosis import diagnose

    with pytest.raises(CifarlabError, match="outputs 10 classes but dataset .* has 100"):
        diagnose(model=keras_models["models"]["scaled-outside"], data=cifar100_rebuilt)


def test_diagnose_names_a_double_division_for_a_model_that_rescales(keras_models):
    from cifarlab.diagnosis import diagnose

    result = diagnose(model=keras_models["models"]["rescaling-inside"], images=keras_models["x"] / 255.0,
                      labels=keras_models["y"])
    top = result.ranked()[0]
    assert top.id == "input-scale" and top.evidence["transform"] == "multiply-by-255"
    assert top.evidence["accuracy_corrected"] > top.evidence["accuracy_as_given"] + 0.2
    assert "pass the raw uint8 images" in top.fix and "divides by 255 itself" in top.fix
    assert "Rescaling(scale=0.00392157, offset=0)" in result.summary["model_expects"]


def test_diagnose_on_correct_inputs_is_healthy(keras_models):
    from cifarlab.diagnosis import diagnose

    result = diagnose(model=keras_models["root"] / "scaled-outside.keras",
                      images=keras_models["x"] / 255.0, labels=keras_models["y"])
    assert result.verdict == "healthy", [f.id for f in result.findings]


# ---- sealing -------------------------------------------------------------------------------------

def test_sealed_onnx_takes_uint8_and_matches_keras(keras_models, cifar10_jpeg, cifarlab_home, tmp_path,
                                                   monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from cifarlab.evaluation import evaluate
    from cifarlab.onnx import open_onnx

    monkeypatch.setenv("CIFARLAB_HOME", str(cifarlab_home))
    sealed = tmp_path / "sealed.onnx"
    assert main(["export", str(keras_models["root"] / "scaled-outside.h5"), "--preprocessing", "scale",
                 "--data", str(cifar10_jpeg.source), "--onnx", str(sealed)]) == 0
    assert "onnxruntime vs Keras: max abs output difference" in capsys.readouterr().out
    runner = open_onnx(sealed)
    assert runner.input_spec["dtype"] == "uint8" and runner.classes == list(cifar10_jpeg.classes)
    model = keras_models["models"]["scaled-outside"]
    expected = model.predict(keras_models["x"] / 255.0, verbose=0)
    got = np.exp(runner.logits(keras_models["x"]))  # probabilities come back as log-probabilities
    assert np.abs(got - expected).max() < 1e-4
    report = evaluate(sealed, out_dir=tmp_path / "eval", progress=False)  # no flags needed
    own = model.predict(cifar10_jpeg.test_x / 255.0, verbose=0).argmax(1)
    assert report["accuracy"] == pytest.approx(float((own == cifar10_jpeg.test_y).mean()), abs=1e-6)


def test_predict_classifies_image_files(keras_models, cifar10_jpeg, tmp_path, capsys):
    from PIL import Image

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(keras_models["x"][i]).save(paths[-1])
    assert main(["predict", str(keras_models["root"] / "rescaling-inside.keras"), *map(str, paths),
                 "--data", str(cifar10_jpeg.source), "--json", "--top", "1"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = keras_models["models"]["rescaling-inside"].predict(keras_models["x"][:3].astype("float32"), verbose=0)
    assert [r["top"][0]["id"] for r in results] == expected.argmax(1).tolist()
    assert results[0]["top"][0]["class"] == cifar10_jpeg.classes[expected[0].argmax()]


# ---- what the model says about its inputs ---------------------------------------------------------

def test_leading_preprocessing_layers_compose_to_pixel_units():
    keras = keras_or_skip()
    from cifarlab.keras import leading_preprocessing, output_kind

    layers = keras.layers
    minus1 = keras.Sequential([keras.Input((32, 32, 3)), layers.RandomFlip(), layers.Rescaling(1 / 127.5, offset=-1),
                               layers.Flatten(), layers.Dense(3)])
    pre = leading_preprocessing(minus1)
    assert pre["kind"] == "standardize"
    np.testing.assert_allclose(pre["mean"], [127.5] * 3)
    np.testing.assert_allclose(pre["std"], [127.5] * 3)
    assert output_kind(minus1) == "logits"
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    both = keras.Sequential([keras.Input((32, 32, 3)), layers.Rescaling(1 / 255),
                             layers.Normalization(mean=mean, variance=std**2), layers.Flatten(),
                             layers.Dense(3), layers.Softmax()])
    pre = leading_preprocessing(both)
    np.testing.assert_allclose(pre["mean"], mean * 255, rtol=1e-6)
    np.testing.assert_allclose(pre["std"], std * 255, rtol=1e-5)
    assert output_kind(both) == "probabilities"
    plain = keras.Sequential([keras.Input((32, 32, 3)), layers.Conv2D(2, 3), layers.Flatten(), layers.Dense(3)])
    assert leading_preprocessing(plain) is None


# ---- hostile and broken files -----------------------------------------------------------------

def test_a_lambda_layer_is_refused_and_its_code_never_runs(tmp_path, capsys):
    keras = keras_or_skip()
    marker = tmp_path / "ran"
    # A Python lambda is stored as bytecode in the file; loading it unsafely would run it.
    code = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Lambda(code), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.save(tmp_path / "lambda.keras")
    marker.unlink(missing_ok=True)  # building the model ran it once, here, on purpose
    assert main(["evaluate", str(tmp_path / "lambda.keras"), "--data", "cifar10", "--quiet"]) == 2
    assert "asks to run Python code (Lambda layer 'lambda'" in capsys.readouterr().err
    assert main(["diagnose", "--model", str(tmp_path / "lambda.keras"), "--images", "x.npy"]) == 2
    assert not marker.exists()
    # The threat is real: Keras without safe mode runs the stored code when it loads the file.
    keras.saving.load_model(tmp_path / "lambda.keras", safe_mode=False)
    assert marker.exists()


def test_custom_objects_and_broken_files_get_clear_errors(tmp_path):
    keras = keras_or_skip()
    from cifarlab.keras import load_keras

    @keras.saving.register_keras_serializable(package="mine")
    class Identity(keras.layers.Layer):
        def call(self, x):
            return x

    custom = keras.Sequential([keras.Input((32, 32, 3)), Identity(), keras.layers.Flatten(), keras.layers.Dense(3)])
    custom.save(tmp_path / "custom.keras")
    small = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    small.save(tmp_path / "small.h5")
    small.save(tmp_path / "small.keras")
    import h5py

    with h5py.File(tmp_path / "weights-only.h5", "w") as f:
        f["x"] = np.arange(3)
    (tmp_path / "truncated.h5").write_bytes((tmp_path / "small.h5").read_bytes()[:2000])
    (tmp_path / "truncated.keras").write_bytes((tmp_path / "small.keras").read_bytes()[:2000])
    (tmp_path / "text.keras").write_text("not a model")
    expected = {"custom.keras": "needs custom objects that are not part of Keras (mine>Identity)",
                "weights-only.h5": "not a Keras model (it has no model_config)",
                "truncated.h5": "is not a readable HDF5 file", "truncated.keras": "is not a Keras 3 `.keras` file",
                "text.keras": "is not a Keras 3 `.keras` file", "missing.h5": "Keras model not found"}
    for name, message in expected.items():
        with pytest.raises(ModelFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_keras(tmp_path / name)


def test_a_zip_bomb_posing_as_keras_is_refused_before_expanding(tmp_path):
    keras_or_skip()
    from cifarlab.keras import load_keras

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {}}))
        archive.writestr("model.weights.h5", bytes(64 * 1024**2))  # 64 MiB of zeros, ~64 KiB packed
    (tmp_path / "bomb.keras").write_bytes(buffer.getvalue())
    with pytest.raises(ModelFileError, match="a zip bomb, not a model"):
        load_keras(tmp_path / "bomb.keras")


def test_absurd_layer_sizes_are_refused_before_keras_builds_them(tmp_path):
    keras = keras_or_skip()
    from cifarlab.keras import load_keras

    keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]).save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["config.json"] = members["config.json"].replace(b'"units": 3', b'"units": 3000000000')
    with zipfile.ZipFile(tmp_path / "huge.keras", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ModelFileError, match="units=3000000000"):
        load_keras(tmp_path / "huge.keras")


# ---- the backend and the extra -----------------------------------------------------------------

def test_keras_on_another_backend_or_missing_is_a_clear_error(monkeypatch):
    import sys
    from types import SimpleNamespace

    from cifarlab.keras import import_keras

    monkeypatch.setitem(sys.modules, "keras", SimpleNamespace(backend=SimpleNamespace(backend=lambda: "jax")))
    with pytest.raises(CifarlabError, match="already imported in this process with the 'jax' backend"):
        import_keras()
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with pytest.raises(CifarlabError, match="KERAS_BACKEND is 'tensorflow'"):
        import_keras()
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    monkeypatch.setitem(sys.modules, "keras", None)  # what an absent package looks like to import
    with pytest.raises(CifarlabError, match=r"pip install 'cifarlab\[keras\]'"):
        import_keras()
