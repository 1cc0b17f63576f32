"""`cifarlab diagnose` end to end: each classic evaluation bug, reproduced on a real model and
real CIFAR-10 images, must come out with the right cause first and the right fix; the correct
pipeline must come out healthy. Also the CLI contract: JSON schema, exit codes 0/1/2, plots.

The model is keras-cnn trained on 8,000 real images and exported to ONNX with a float input,
so, like the seed's Keras model, it expects float 0..1 NHWC pixels (see conftest.cifar_keras).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from cifarlab.diagnosis import diagnose
from cifarlab.metrics import confusion_matrix, save_confusion_json

CIFAR_MEAN, CIFAR_STD = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def correct(x):
    return (x / 255.0).astype(np.float32)


# What each buggy evaluation script fed the model, and what diagnose must say first.
BUGS = {
    "missing /255": (lambda x: x.astype(np.float32), "input-scale", "divide-by-255"),
    "doubled /255": (lambda x: correct(x) / 255.0, "input-scale", "multiply-by-255"),
    "BGR": (lambda x: correct(x)[..., ::-1], "channel-order", "swap-rgb-bgr"),
    "NCHW": (lambda x: correct(x).transpose(0, 3, 1, 2), "input-layout", "nchw-to-nhwc"),
    "ImageNet mean/std": (lambda x: ((correct(x) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32),
                          "input-normalization", None),
}


@pytest.fixture(scope="module")
def onnx_path(cifar_keras):
    return cifar_keras["root"] / "float.onnx"


def test_correct_pipeline_is_healthy(cifar_keras, onnx_path):
    result = diagnose(model=onnx_path, images=correct(cifar_keras["x"]), labels=cifar_keras["y"])
    assert result.verdict == "healthy", result.format_text()
    assert result.summary["accuracy"] > 0.4
    assert result.exit_code == 0


@pytest.mark.parametrize("bug", list(BUGS))
def test_each_input_bug_is_named_with_its_fix(cifar_keras, onnx_path, bug):
    feed, finding_id, transform = BUGS[bug]
    result = diagnose(model=onnx_path, images=feed(cifar_keras["x"]), labels=cifar_keras["y"])
    top = result.ranked()[0]
    assert result.verdict == "problem" and result.exit_code == 1
    assert top.id == finding_id, result.format_text()
    assert top.fix
    if transform:
        assert top.evidence["transform"] == transform
    corrected = top.evidence.get("accuracy_corrected")
    if corrected is not None:  # the correction restores the model's real accuracy
        as_given = top.evidence["accuracy_as_given"] or 0.0  # None: the model could not even run
        assert corrected > 0.4 and corrected > as_given + 0.05


def test_missing_divide_by_255_fix_says_divide(cifar_keras, onnx_path):
    result = diagnose(model=onnx_path, images=cifar_keras["x"].astype(np.float32), labels=cifar_keras["y"])
    top = result.ranked()[0]
    assert "255" in top.fix and "/" in top.fix
    assert "255" in top.title


def test_shuffled_labels_are_near_chance_not_preprocessing(cifar_keras, onnx_path):
    shuffled = np.random.default_rng(0).permutation(cifar_keras["y"])
    result = diagnose(model=onnx_path, images=correct(cifar_keras["x"]), labels=shuffled)
    top = result.ranked()[0]
    assert top.id == "near-chance", result.format_text()
    assert "shuffle" in (top.detail + top.fix).lower()
    assert not any(f.id.startswith("input-") for f in result.findings)


def test_label_shift_is_named_with_its_offset(cifar_keras, onnx_path):
    shifted = (cifar_keras["y"] + 1) % 10  # an off-by-one label map
    result = diagnose(model=onnx_path, images=correct(cifar_keras["x"]), labels=shifted)
    top = result.ranked()[0]
    assert top.id == "label-permutation", result.format_text()
    assert top.evidence["kind"] == "cyclic-shift" and abs(top.evidence["shift"]) == 1
    assert top.evidence["remapped_accuracy"] > 0.4


def test_dropout_left_on_is_train_mode_inference(cifar_keras, tmp_path):
    from cifarlab.export import export_onnx

    path = export_onnx(cifar_keras["result"].model, tmp_path / "train-mode.onnx", input="float",
                       training=True)["path"]
    result = diagnose(model=path, images=correct(cifar_keras["x"]), labels=cifar_keras["y"])
    assert result.ranked()[0].id == "train-mode-inference", result.format_text()
    assert "eval()" in result.ranked()[0].fix


def test_cifarlab_model_fed_scaled_floats(cifar_keras):
    """The other direction: a cifarlab model takes raw uint8; x/255 is the mistake."""
    result = diagnose(model=cifar_keras["result"].model_path, images=correct(cifar_keras["x"]),
                      labels=cifar_keras["y"])
    top = result.ranked()[0]
    assert top.id == "input-scale", result.format_text()
    assert "uint8" in top.fix


def test_weak_and_strong_model_fed_scaled_floats_read_right(cifar_keras, cifar10_jpeg, tmp_path):
    """The title states the verified correction (x255, the accuracy it restores), for a weak model too.

    For a weak model the statistics finding outscores the probe in the merge; the title must
    still be the probe's, not the statistics' std ratio with a clause spliced into it.
    """
    from cifarlab.training import TrainConfig, train

    weak = train(TrainConfig(data="cifar10", model="keras-cnn", epochs=1, batch_size=64, max_train_images=1000,
                             val_fraction=0.1, seed=0, amp="off"),
                 dataset=cifar10_jpeg, run_dir=tmp_path / "weak", progress=False)
    for model in (weak.model_path, cifar_keras["result"].model_path):
        result = diagnose(model=model, images=correct(cifar_keras["x"]), labels=cifar_keras["y"])
        top = result.ranked()[0]
        assert top.id == "input-scale", result.format_text()
        assert top.title.startswith("Evaluation inputs are 255x smaller than the model expects"), top.title
        assert "multiplying them by 255 raises accuracy from" in top.title, top.title
        assert "256x" not in top.title and "probably" not in top.title
        assert "uint8" in top.fix
        # The symptoms point at the cause's fix, not a fix of their own.
        for symptom in (f for f in result.findings if f.id in ("train-eval-gap", "prediction-collapse")):
            assert symptom.fix == top.fix and "eval()" not in symptom.fix


def test_partial_collapse_of_a_seed_style_network_from_cm_json_alone(cifar_keras, onnx_path, tmp_path):
    """The question's picture: keras-cnn (no normalisation layers) fed raw pixels, a partial collapse.

    From cm.json alone it is a prediction-collapse; from the model + images, input-scale.
    """
    raw = cifar_keras["x"].astype(np.float32)
    logits = cifar_keras["onnx"].logits(raw)
    cm = confusion_matrix(cifar_keras["y"], logits.argmax(1), 10)
    accuracy = np.trace(cm) / cm.sum()
    assert 0.15 < accuracy < 0.45  # not a full collapse: the partial one the question shows
    save_confusion_json(cm, tmp_path / "cm.json")
    from_matrix = diagnose(confusion=tmp_path / "cm.json")
    assert from_matrix.verdict == "problem", from_matrix.format_text()
    top = from_matrix.ranked()[0]
    assert top.id == "prediction-collapse", from_matrix.format_text()
    assert "of predictions" in top.title and top.evidence["prediction_tv"] > 0.3
    from_model = diagnose(model=onnx_path, images=raw, labels=cifar_keras["y"])
    assert from_model.ranked()[0].id == "input-scale", from_model.format_text()
    assert from_model.ranked()[0].evidence["transform"] == "divide-by-255"


@pytest.mark.parametrize("mistakes, steps", [
    (lambda x: x[..., ::-1].astype(np.float32), ["swap-rgb-bgr", "divide-by-255"]),
    (lambda x: np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(x.shape).astype(np.float32),
     ["undo-planar-reshape", "divide-by-255"]),
])
def test_two_mistakes_at_once_are_named_as_a_pair(cifar_keras, onnx_path, mistakes, steps):
    """BGR and no /255; CIFAR's planar rows reshaped without a transpose and no /255."""
    result = diagnose(model=onnx_path, images=mistakes(cifar_keras["x"]), labels=cifar_keras["y"])
    top = result.ranked()[0]
    assert top.id == "two-mistakes", result.format_text()
    assert top.evidence["steps"] == steps
    assert top.title.startswith("Two mistakes in the evaluation inputs")
    assert "x / 255.0" in top.fix and ("[..., ::-1]" in top.fix or "transpose" in top.fix)
    assert top.evidence["accuracy_corrected"] > top.evidence["accuracy_best_single"] + 0.05
    # The partial correction (only /255) is not reported beside the pair.
    assert not any(f.id == "input-scale" for f in result.findings if f.severity != "info")


def test_one_mistake_is_not_reported_as_two(cifar_keras, onnx_path):
    result = diagnose(model=onnx_path, images=cifar_keras["x"].astype(np.float32), labels=cifar_keras["y"])
    assert [f.id for f in result.ranked()][0] == "input-scale"
    assert not any(f.id == "two-mistakes" for f in result.findings)
    assert any("steps" in row for row in result.probes)  # pairs were tried, and lost


@pytest.mark.slow
def test_fine_label_model_scored_on_coarse_labels(cifar100_rebuilt, cifar100_model, tmp_path):
    """Real CIFAR-100: a fine-label model, its predictions compared with the coarse labels."""
    from cifarlab.data.cifar import CIFAR100_COARSE_OF_FINE

    assert list(CIFAR100_COARSE_OF_FINE) == cifar100_rebuilt.coarse_of_fine
    result = cifar100_model
    keep = np.sort(np.random.default_rng(0).choice(10_000, 3000, replace=False))
    x, fine, coarse = (cifar100_rebuilt.test_x[keep], cifar100_rebuilt.test_y[keep],
                       cifar100_rebuilt.test_y_coarse[keep])
    pred = result.model.predict(x)
    cm = confusion_matrix(coarse, pred, 100)  # the mistake, as a script would write cm.json
    save_confusion_json(cm, tmp_path / "cm.json")
    for diagnosis in (diagnose(confusion=tmp_path / "cm.json"),
                      diagnose(model=result.model_path, images=x, labels=coarse)):
        top = diagnosis.ranked()[0]
        assert top.id == "fine-coarse-labels", diagnosis.format_text()
        assert top.evidence["coarse_accuracy"] > 2 * top.evidence["accuracy"]
        assert "fine_labels" in top.fix
    # The right labels: no such finding.
    honest = diagnose(model=result.model_path, images=x, labels=fine)
    assert not any(f.id == "fine-coarse-labels" for f in honest.findings), honest.format_text()


def cifarlab(*args):
    return subprocess.run([sys.executable, "-m", "cifarlab", "diagnose", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_json_schema_and_exit_codes(cifar_keras, onnx_path, tmp_path):
    np.save(tmp_path / "raw.npy", cifar_keras["x"].astype(np.float32))  # the seed's bug
    np.save(tmp_path / "ok.npy", correct(cifar_keras["x"]))
    np.save(tmp_path / "y.npy", cifar_keras["y"])
    bad = cifarlab("--model", onnx_path, "--images", tmp_path / "raw.npy", "--labels", tmp_path / "y.npy",
                   "--json", "--plot", tmp_path / "plots")
    assert bad.returncode == 1, bad.stderr
    doc = json.loads(bad.stdout)
    assert set(doc) == {"verdict", "summary", "findings", "probes"} and doc["verdict"] == "problem"
    for finding in doc["findings"]:
        assert set(finding) == {"id", "severity", "title", "detail", "evidence", "fix"}
        assert finding["severity"] in ("error", "warning", "info")
    assert doc["findings"][0]["id"] == "input-scale"
    assert doc["findings"][0]["evidence"]["transform"] == "divide-by-255"
    assert doc["probes"][0]["name"] == "as-given"
    assert all({"name", "accuracy", "pred_entropy"} <= set(p) for p in doc["probes"] if not p.get("skipped"))
    assert (tmp_path / "plots" / "confusion_matrix.png").is_file()
    assert (tmp_path / "plots" / "class_histogram.png").is_file()

    good = cifarlab("--model", onnx_path, "--images", tmp_path / "ok.npy", "--labels", tmp_path / "y.npy")
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("verdict: HEALTHY")


# ---- without a model: confusion matrices and predictions (fast, constructed) -------------

def seed_like_confusion(num_classes=100, n=10_000, seed=0):
    """The seed's picture: almost every image predicted as one of two classes."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n // num_classes)
    pred = np.where(rng.random(len(y)) < 0.61, rng.choice([13, 58], len(y)), rng.integers(0, num_classes, len(y)))
    return confusion_matrix(y, pred, num_classes)


def test_cli_confusion_only(tmp_path):
    save_confusion_json(seed_like_confusion(), tmp_path / "cm.json")
    proc = cifarlab("--confusion", tmp_path / "cm.json", "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["findings"][0]["id"] == "prediction-collapse"
    assert "2 of 100 classes" in doc["findings"][0]["title"]


def test_cli_predictions_of_a_healthy_model_exit_0(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 100, 5000)
    pred = np.where(rng.random(5000) < 0.3, y, rng.integers(0, 100, 5000))  # weak but honest: 30%
    probs = np.full((5000, 100), 0.5 / 99)
    probs[np.arange(5000), pred] = 0.5
    np.save(tmp_path / "probs.npy", probs)
    np.savetxt(tmp_path / "y.csv", y, fmt="%d", delimiter=",")
    proc = cifarlab("--predictions", tmp_path / "probs.npy", "--labels", tmp_path / "y.csv")
    assert proc.returncode == 0, proc.stdout
    assert "HEALTHY" in proc.stdout


@pytest.mark.parametrize("content,message", [
    ([[1, 2, 3], [4, 5, 6]], "square"),
    ([[5, -1], [0, 5]], "negative"),
])
def test_cli_bad_confusion_matrix_exits_2(tmp_path, content, message):
    (tmp_path / "cm.json").write_text(json.dumps(content))
    proc = cifarlab("--confusion", tmp_path / "cm.json")
    assert proc.returncode == 2
    assert message in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_cli_nothing_to_diagnose_exits_2():
    proc = cifarlab()
    assert proc.returncode == 2 and "nothing to diagnose" in proc.stderr


def test_a_diagnosis_is_drawn_from_what_it_was_computed_from(tmp_path):
    """Computing and drawing are separate: the figures come from Diagnosis.counts, on the
    caller's demand, and diagnose(plot_dir=) only saves them."""
    from cifarlab.diagnosis.figures import diagnosis_figures, save_diagnosis_plots

    collapsed = np.zeros((10, 10), dtype=np.int64)
    collapsed[:, 3] = 100  # every image predicted as class 3: the seed's vertical bar
    diagnosis = diagnose(confusion=collapsed)
    assert diagnosis.counts is not None and diagnosis.counts.predicted.tolist() == [0, 0, 0, 1000] + [0] * 6
    figures = diagnosis_figures(diagnosis)
    assert sorted(figures) == ["class_histogram.png", "confusion_matrix.png"]
    assert "outlined" in figures["confusion_matrix.png"].axes[0].get_title()
    assert list(diagnosis.to_dict()) == ["verdict", "summary", "findings", "probes"]  # JSON unchanged

    without_labels = diagnose(predictions=np.full(50, 2))
    assert without_labels.counts is not None and without_labels.counts.confusion is None
    assert sorted(diagnosis_figures(without_labels)) == ["class_histogram.png"]
    saved = save_diagnosis_plots(without_labels, tmp_path / "plots")
    assert [p.name for p in saved] == ["class_histogram.png"] and saved[0].stat().st_size > 1000
