"""End to end through real processes: train on the real CIFAR-10 copy, evaluate, predict, fail well."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CIFAR10_JPEG
from PIL import Image
from synthetic import synthetic_dataset

from cifarlab.cli import main
from cifarlab.errors import CifarlabError, InputError
from cifarlab.evaluation import evaluate
from cifarlab.metrics import load_confusion_json
from cifarlab.modelfile import load_model
from cifarlab.training import TrainConfig, train


def cifarlab(*args, home=None, check=True):
    env = dict(os.environ)
    if home is not None:
        env["CIFARLAB_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "cifarlab", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="session")
def real_model(cifar10_jpeg, cifarlab_home, tmp_path_factory):
    """A small model trained by the CLI on 5,000 real CIFAR-10 images for 2 epochs of batch 128 (~20 s).

    In float32 (--amp off): training validates in the precision it trains in, `evaluate` in
    float32, and bf16 flips a few borderline images, which would blur the exact comparison
    of the recorded and re-evaluated validation accuracy below."""
    run = tmp_path_factory.mktemp("run")
    cifarlab("train", "--data", CIFAR10_JPEG, "--model", "airbench-small", "--epochs", 2, "--batch-size", 128,
             "--max-train-images", 5000, "--amp", "off", "--quiet", "--out", run, home=cifarlab_home)
    return run / "model.safetensors"


def test_trained_model_file_records_everything(real_model, cifar10_jpeg):
    meta = load_model(real_model).meta
    assert meta["classes"] == cifar10_jpeg.classes
    assert meta["dataset"]["name"] == "cifar10-jpeg"
    assert meta["split"]["n_val"] == 10_000 and meta["split"]["seed"] == 0
    assert meta["preprocessing"]["kind"] == "standardize"
    # Per-channel statistics of the real training pixels (test mean is 0.494, 0.485, 0.450 x 255).
    np.testing.assert_allclose(meta["train_input_stats"]["mean"], [126, 124, 115], atol=3)
    assert meta["metrics"]["val_acc"] > 0.35  # chance is 0.10


def test_evaluate_test_split_writes_consistent_files(real_model, cifarlab_home, tmp_path):
    out = tmp_path / "eval"
    proc = cifarlab("evaluate", real_model, "--split", "test", "--out", out, "--quiet", home=cifarlab_home)
    metrics = json.loads((out / "metrics.json").read_text())
    cm = load_confusion_json(out / "cm.json")
    assert cm.shape == (10, 10)
    assert cm.sum(1).tolist() == [1000] * 10  # the real test split: 1,000 images per class
    assert metrics["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert 0.35 < metrics["accuracy"] < metrics["top5_accuracy"]
    assert len(metrics["per_class"]) == 10 and len(metrics["most_confused"]) == 10
    assert f"accuracy: {metrics['accuracy']:.2%}" in proc.stdout
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.width > 500


def test_evaluate_val_reproduces_the_accuracy_recorded_at_training(real_model, cifar10_jpeg, tmp_path):
    report = evaluate(real_model, data=cifar10_jpeg, split="val", out_dir=tmp_path, progress=False)
    assert report["num_samples"] == 10_000
    assert report["accuracy"] == pytest.approx(load_model(real_model).meta["metrics"]["val_acc"], abs=1e-4)


def test_the_seeds_bug_is_an_error_not_a_wrong_answer(real_model, cifar10_jpeg):
    model = load_model(real_model)
    images = cifar10_jpeg.test_x[:100]
    with pytest.raises(InputError, match="already scaled"):
        model.predict(images / 255.0)
    assert (model.predict(images) == cifar10_jpeg.test_y[:100]).mean() > 0.3


def test_predict_image_files(real_model, cifar10_jpeg, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.asarray(cifar10_jpeg.test_x[i])).save(paths[-1])
    proc = cifarlab("predict", real_model, *paths, "--json", "--top", 3)
    results = json.loads(proc.stdout)
    expected = load_model(real_model).predict(cifar10_jpeg.test_x[:3])
    assert [r["top"][0]["id"] for r in results] == expected.tolist()
    assert all(len(r["top"]) == 3 and r["top"][0]["probability"] >= r["top"][1]["probability"]
               for r in results)
    text = cifarlab("predict", real_model, paths[0]).stdout
    assert text.startswith(str(paths[0])) and cifar10_jpeg.classes[expected[0]] in text


def test_coarse_labels_give_a_superclass_view(tmp_path):
    ds = synthetic_dataset(num_classes=4)
    ds.coarse_classes = ["warm", "cold"]
    ds.train_y_coarse, ds.test_y_coarse = ds.train_y // 2, ds.test_y // 2
    result = train(TrainConfig(model="keras-cnn", epochs=1, batch_size=32, device="cpu"),
                   dataset=ds, run_dir=tmp_path / "run", progress=False)
    assert result.model.meta["coarse_of_fine"] == [0, 0, 1, 1]
    report = evaluate(result.model_path, data=ds, split="test", out_dir=tmp_path / "eval", progress=False)
    coarse = np.asarray(report["coarse"]["confusion_matrix"])
    assert coarse.shape == (2, 2) and coarse.sum(1).tolist() == [20, 20]
    assert (tmp_path / "eval" / "coarse_confusion_matrix.png").is_file()


def test_models_and_data_commands(cifarlab_home, cifar10_jpeg):
    listing = cifarlab("models").stdout
    assert "keras-cnn" in listing and "airbench-small" in listing
    summary = cifarlab("data", CIFAR10_JPEG, home=cifarlab_home).stdout
    assert "50,000 train + 10,000 test" in summary and "10 classes" in summary


@pytest.mark.parametrize("args,message", [
    (["evaluate", "missing.safetensors"], "model file not found"),
    (["train", "--data", "/no/such/data"], "neither a known name"),
    (["train", "--data", "cifar10", "--model", "nope"], "unknown model 'nope'"),
    (["predict", __file__, __file__], "not a readable safetensors file"),
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(args, message, tmp_path):
    proc = cifarlab(*args, home=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = cifarlab("--debug", "evaluate", tmp_path / "missing.safetensors", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_debug_after_the_subcommand_works_too(tmp_path, capsys):
    with pytest.raises(CifarlabError, match="model file not found"):  # raised, not reported: --debug
        main(["evaluate", str(tmp_path / "missing.safetensors"), "--debug"])
    assert main(["evaluate", str(tmp_path / "missing.safetensors")]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_submodules_are_reachable_after_a_plain_import():
    import cifarlab

    assert callable(cifarlab.demo.run_demo) and callable(cifarlab.metrics.softmax)


def test_predict_rejects_non_images(real_model, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    proc = cifarlab("predict", real_model, text_file, check=False)
    assert proc.returncode == 2 and "cannot be read as an image" in proc.stderr


def test_a_mistyped_option_names_the_close_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "model.safetensors", "--splitt", "test"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --splitt test (did you mean --split" in capsys.readouterr().err


def test_counts_are_printed_with_the_right_plural():
    from cifarlab.text import plural

    assert [plural(n, "epoch") for n in (0, 1, 2, 1500)] == ["0 epochs", "1 epoch", "2 epochs", "1,500 epochs"]
