"""Diagnosis runners and probes on real models: each classic input bug must be named with its fix.

Fast tests use a model trained on the synthetic colour dataset (its classes are colours, so
scale and channel-order mistakes break it). Slow tests train keras-cnn on the real CIFAR-10
and reproduce the bugs on 2,000 real test images, through a float-input ONNX export (like a
Keras model: float 0..1 NHWC) and through the cifarlab model file (raw uint8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import synthetic_dataset

from cifarlab.diagnosis.input_stats import input_findings
from cifarlab.diagnosis.probes import PROBES, prediction_summary, probe_findings, run_probes
from cifarlab.diagnosis.train_mode import train_mode_finding
from cifarlab.errors import InputError
from cifarlab.formats import open_model
from cifarlab.training import TrainConfig, train

IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))


def planar(images: np.ndarray) -> np.ndarray:
    """The bug: CIFAR's planar rows (N, 3072) reshaped straight to (N, 32, 32, 3)."""
    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
    return rows.reshape(len(images), 32, 32, 3)


def best(findings):
    """The most likely cause, as the report ranks it: errors before warnings, then score."""
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: (order[f.severity], -f.score))[0] if findings else None


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"  {'probe':24s} {'accuracy':>8s} {'entropy':>7s} {'classes':>7s} {'conf':>5s} {'agree':>5s}")
    for r in rows:
        if r.get("skipped"):
            print(f"  {r['name']:24s} skipped: {r['skipped']}")
            continue
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        agree = "" if r["agreement_with_as_given"] is None else f"{r['agreement_with_as_given']:.2f}"
        print(f"  {r['name']:24s} {acc:>8s} {r['pred_entropy']:7.2f} {r['classes_predicted']:7d} "
              f"{r['mean_confidence']:5.2f} {agree:>5s}")


# ---- fast: synthetic data -----------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic():
    return synthetic_dataset(n_test_per_class=50)


@pytest.fixture(scope="module")
def small_model(synthetic, tmp_path_factory):
    cfg = TrainConfig(data="synthetic", model="keras-cnn", epochs=2, batch_size=32)
    return train(cfg, dataset=synthetic, run_dir=tmp_path_factory.mktemp("kc"), progress=False)


def test_probe_names_are_stable():
    assert list(PROBES)[0] == "as-given"
    assert set(PROBES) == {
        "as-given", "divide-by-255", "multiply-by-255", "scale-to-minus1-1", "from-minus1-1",
        "standardize-cifar", "standardize-imagenet", "unstandardize-cifar", "unstandardize-imagenet",
        "swap-rgb-bgr", "nhwc-to-nchw", "nchw-to-nhwc", "undo-planar-reshape"}


def test_undo_planar_reshape_inverts_the_bug(synthetic):
    images = synthetic.test_x
    assert np.array_equal(PROBES["undo-planar-reshape"](planar(images)), images)
    assert np.array_equal(PROBES["nchw-to-nhwc"](images.transpose(0, 3, 1, 2)), images)


def test_prediction_summary_of_probe_logits():
    collapsed = np.zeros((100, 10))
    collapsed[:, 3] = 5.0
    assert prediction_summary(collapsed, 10)["pred_entropy"] == 0.0
    assert prediction_summary(collapsed, 10)["mean_confidence"] > 0.9
    uniform = np.eye(10)[np.arange(100) % 10] * 5
    assert prediction_summary(uniform, 10)["pred_entropy"] == pytest.approx(1.0)
    assert prediction_summary(uniform, 10)["classes_predicted"] == 10


def probe_row(name, accuracy, discordant, n=1000, entropy=0.6):
    return {"name": name, "accuracy": accuracy, "pred_entropy": entropy, "classes_predicted": 50,
            "mean_confidence": 0.1, "agreement_with_as_given": 0.01, "discordant_with_as_given": discordant,
            "fix": "x = x / 255.0", "n_images": n}


def test_paired_gain_is_judged_by_images_whose_correctness_changed():
    """McNemar: only images right in one run and wrong in the other count. A weak CIFAR-100
    model (measured: 1.4% -> 12.8% on 1,000 images when the /255 is restored) changes almost
    every prediction, but mostly from one wrong class to another."""
    as_given = {**probe_row("as-given", 0.014, None, entropy=0.02), "agreement_with_as_given": None}
    found = probe_findings([as_given, probe_row("divide-by-255", 0.128, 0.13)], labels_given=True)
    assert [(f.id, f.severity) for f in found] == [("input-scale", "warning")]
    # The same gain carried by few discordant images each way is noise-sized: nothing is named.
    # (z = 0.06 / sqrt(0.5 / 1000) = 2.7 < 4)
    assert probe_findings([as_given, probe_row("divide-by-255", 0.074, 0.5)], labels_given=True) == []


def test_probes_reuse_the_as_given_logits_they_are_given(small_model, synthetic):
    runner = open_model(small_model.model_path)
    x, y = synthetic.test_x, synthetic.test_y
    logits = runner.logits(x)
    fake = np.zeros_like(logits)
    fake[:, 0] = 1.0  # "everything is class 0": the as-given rows must show it, not a re-run
    rows = run_probes(runner, x, y, as_given_logits=fake)
    assert rows[0]["name"] == "as-given" and rows[0]["classes_predicted"] == 1
    assert rows[0]["accuracy"] == pytest.approx(float((y == 0).mean()))
    assert run_probes(runner, x, y, as_given_logits=logits)[0] == run_probes(runner, x, y)[0]


def test_cifarlab_runner_runs_inputs_as_given(small_model, synthetic):
    runner = open_model(small_model.model_path)
    x = synthetic.test_x
    assert runner.kind == "cifarlab" and runner.num_classes == 4 and runner.classes == synthetic.classes
    assert runner.input_spec["dtype"] == "uint8" and runner.input_spec["layout"] == "NHWC"
    assert runner.train_stats == small_model.model.meta["train_input_stats"]
    assert runner.trained_accuracy == small_model.model.meta["metrics"]["val_acc"]
    assert np.allclose(runner.logits(x), small_model.model.predict_logits(x), atol=1e-5)
    # 0..1 floats reach the network unchanged (predict would refuse them): that is the bug.
    assert not np.allclose(runner.logits(x / 255.0), runner.logits(x), atol=1e-2)


def test_runner_explains_shapes_it_cannot_run(small_model, synthetic):
    runner = open_model(small_model.model)
    with pytest.raises(InputError, match="NCHW"):
        runner.logits(synthetic.test_x.transpose(0, 3, 1, 2))
    with pytest.raises(InputError, match="rank 3"):
        runner.logits(synthetic.test_x[0])


@pytest.mark.parametrize("held", ["classifier", "live module"])
def test_diagnosing_a_model_in_training_mode_leaves_its_statistics_alone(synthetic, held):
    """The probes feed a train-mode model wrong inputs; its BatchNorm statistics must not follow them."""
    from cifarlab.diagnosis import diagnose
    from cifarlab.modelfile import build_classifier, make_meta

    stats = {"mean": [125.0] * 3, "std": [63.0] * 3, "min": [0.0] * 3, "max": [255.0] * 3}
    meta = make_meta(architecture="airbench-small", arch_args={}, classes=list(synthetic.classes), train_stats=stats)
    classifier = build_classifier(meta)
    model = (classifier if held == "classifier" else classifier.net).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    x, y = synthetic.test_x[:200], synthetic.test_y[:200]
    # The classifier takes NHWC pixels (fed /255: one more mistake); the bare net NCHW floats.
    images = x / 255.0 if held == "classifier" else (x / 255.0 - 0.5).transpose(0, 3, 1, 2) / 0.25
    result = diagnose(model=model, images=images.astype(np.float32), labels=y)
    assert any(f.id == "train-mode-inference" for f in result.findings), result.format_text()
    assert model.training  # diagnosed as it was given
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_module_and_callable_runners(small_model, synthetic):
    x = synthetic.test_x[:40]
    reference = small_model.model.predict_logits(x)
    module = open_model(small_model.model.net.eval(), input_spec={"layout": "NCHW"})
    nchw = (x / 255.0).transpose(0, 3, 1, 2).astype(np.float32)
    assert np.allclose(module.logits(nchw), reference, atol=1e-4)
    assert module.num_classes == 4  # learnt from the first call

    def predict_proba(batch: np.ndarray) -> np.ndarray:  # a Keras-style predict: probabilities
        return torch.softmax(torch.from_numpy(small_model.model.predict_logits(batch)), 1).numpy()

    runner = open_model(predict_proba)
    probs = torch.softmax(torch.from_numpy(runner.logits(x)), 1).numpy()
    assert np.allclose(probs, predict_proba(x), atol=1e-5)


def test_train_mode_module_is_caught(small_model, synthetic):
    net = small_model.model.net
    nchw = (synthetic.test_x / 255.0).transpose(0, 3, 1, 2).astype(np.float32)
    try:
        finding = train_mode_finding(open_model(net.train()), nchw)
        assert finding is not None and finding.id == "train-mode-inference" and finding.severity == "error"
        assert "eval()" in finding.fix
        assert train_mode_finding(open_model(net.eval()), nchw) is None
    finally:
        net.eval()
    assert train_mode_finding(open_model(small_model.model_path), synthetic.test_x) is None


def test_synthetic_bgr_and_double_scale_are_named(small_model, synthetic):
    runner = open_model(small_model.model_path)
    x, y = synthetic.test_x, synthetic.test_y
    bgr = best(probe_findings(run_probes(runner, x[..., ::-1], y), labels_given=True))
    assert bgr.id == "channel-order" and bgr.evidence["transform"] == "swap-rgb-bgr"
    scaled = best(probe_findings(run_probes(runner, x / 255.0, y), labels_given=True))
    assert scaled.id == "input-scale" and scaled.evidence["transform"] == "multiply-by-255"
    assert "raw uint8" in scaled.fix
    assert probe_findings(run_probes(runner, x, y), labels_given=True) == []


def test_input_findings_need_training_statistics(small_model, synthetic):
    def logits(batch):
        return small_model.model.predict_logits(batch)

    assert input_findings(synthetic.test_x / 255.0, open_model(logits)) == []


# ---- ONNX runners --------------------------------------------------------------------------

onnx_deps = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime")),
    reason="needs pip install 'cifarlab[onnx]'")


@onnx_deps
def test_onnx_runner_reads_the_graph_and_metadata(small_model, synthetic, tmp_path):
    from cifarlab.export import export_onnx

    runner = open_model(export_onnx(small_model.model, tmp_path / "m.onnx", input="float")["path"])
    assert runner.kind == "onnx" and runner.num_classes == 4 and runner.classes == synthetic.classes
    assert runner.input_spec["dtype"] == "float32" and runner.input_spec["layout"] == "NHWC"
    assert runner.input_spec["preprocessing"]["applied_by"] == "caller"
    assert runner.train_stats == small_model.model.meta["train_input_stats"]
    x = synthetic.test_x
    assert np.allclose(runner.logits(x / 255.0), small_model.model.predict_logits(x), atol=1e-4)
    with pytest.raises(InputError, match="NCHW"):
        runner.logits((x / 255.0).transpose(0, 3, 1, 2))


@onnx_deps
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notice
def test_onnx_graphs_diagnosis_cannot_use_are_explained(tmp_path):
    class TwoInputs(torch.nn.Module):
        def forward(self, a, b):
            return a.flatten(1) + b.flatten(1)

    class Flat(torch.nn.Module):
        def forward(self, x):
            return x[:, :10]

    torch.onnx.export(TwoInputs(), (torch.zeros(1, 32, 32, 3), torch.zeros(1, 32, 32, 3)),
                      str(tmp_path / "two.onnx"), dynamo=False, input_names=["a", "b"])
    torch.onnx.export(Flat(), (torch.zeros(1, 3072),), str(tmp_path / "flat.onnx"), dynamo=False,
                      input_names=["pixels"])
    with pytest.raises(InputError, match=r"2 inputs \(a: tensor\(float\)"):
        open_model(tmp_path / "two.onnx")
    with pytest.raises(InputError, match="rank 2"):
        open_model(tmp_path / "flat.onnx")


# ---- slow: a real keras-cnn on the real CIFAR-10 ------------------------------------------

def diagnose_inputs(runner, images, labels=None):
    """Probe and statistics findings together, as `cifarlab diagnose` combines them."""
    rows = run_probes(runner, images, labels)
    return rows, probe_findings(rows, labels is not None) + input_findings(images, runner)


@pytest.mark.slow
def test_missing_divide_by_255_is_named(cifar_keras):
    runner, x, y = cifar_keras["onnx"], cifar_keras["x"], cifar_keras["y"]
    rows, findings = diagnose_inputs(runner, x.astype(np.float32), y)
    print_table("keras-cnn (float ONNX, expects 0..1) fed raw 0..255 pixels:", rows)
    cause = best(findings)
    assert cause.id == "input-scale" and cause.fix.startswith("x = x / 255.0")
    probe = next(f for f in findings if f.evidence.get("transform"))
    assert probe.id == "input-scale" and probe.evidence["transform"] == "divide-by-255"
    # Without labels the probes alone find it from the skew of the predicted classes.
    unlabelled = probe_findings(run_probes(runner, x.astype(np.float32)), labels_given=False)
    assert unlabelled and unlabelled[0].id == "input-scale"
    assert unlabelled[0].evidence["transform"] == "divide-by-255"


@pytest.mark.slow
@pytest.mark.parametrize("bug, cause, transform", [
    ("double-scale", "input-scale", "multiply-by-255"),
    ("bgr", "channel-order", "swap-rgb-bgr"),
    ("nchw", "input-layout", "nchw-to-nhwc"),
    ("imagenet", "input-normalization", "unstandardize-"),
    ("planar", "input-layout", "undo-planar-reshape"),
])
def test_float_model_bugs_are_named(cifar_keras, bug, cause, transform):
    x, y = cifar_keras["x"], cifar_keras["y"]
    unit = x.astype(np.float32) / 255.0
    images = {"double-scale": unit / 255.0, "bgr": unit[..., ::-1], "nchw": unit.transpose(0, 3, 1, 2),
              "imagenet": (unit - IMAGENET[0]) / IMAGENET[1], "planar": planar(unit)}[bug]
    rows = run_probes(cifar_keras["onnx"], images, y)
    found = probe_findings(rows, labels_given=True)
    assert found, f"no probe finding for {bug}: {rows}"
    assert found[0].id == cause and found[0].evidence["transform"].startswith(transform)
    before = found[0].evidence["accuracy_as_given"]  # None for NCHW: the model cannot run it at all
    assert found[0].evidence["accuracy_corrected"] > (before or 0.0)


@pytest.mark.slow
def test_correct_pipeline_has_no_finding(cifar_keras):
    x, y = cifar_keras["x"], cifar_keras["y"]
    unit = x.astype(np.float32) / 255.0
    for labels in (y, None):
        rows = run_probes(cifar_keras["onnx"], unit, labels)
        assert probe_findings(rows, labels is not None) == []
    assert input_findings(unit, cifar_keras["onnx"]) == []
    assert input_findings(x, cifar_keras["cifarlab"]) == []
    assert probe_findings(run_probes(cifar_keras["cifarlab"], x, y), True) == []


@pytest.mark.slow
@pytest.mark.parametrize("bug, cause, fix", [
    ("scaled", "input-scale", "pass the raw uint8 images"),
    ("double-scale", "input-scale", "pass the raw uint8 images"),
    ("imagenet", "input-normalization", "pass the raw uint8 images"),
    ("bgr", "channel-order", "x = x[..., ::-1]"),
    ("nchw", "input-layout", "x.transpose(0, 2, 3, 1)"),
])
def test_cifarlab_model_input_findings(cifar_keras, bug, cause, fix):
    """The cifarlab file takes raw uint8; its stored training statistics name the mistake."""
    x = cifar_keras["x"]
    unit = x.astype(np.float32) / 255.0
    images = {"scaled": unit, "double-scale": unit / 255.0, "imagenet": (unit - IMAGENET[0]) / IMAGENET[1],
              "bgr": x[..., ::-1], "nchw": x.transpose(0, 3, 1, 2)}[bug]
    finding = best(input_findings(images, cifar_keras["cifarlab"]))
    assert finding is not None and finding.id == cause and fix in finding.fix
    assert "train_mean" in finding.evidence or "model_layout" in finding.evidence


@pytest.mark.slow
def test_cifarlab_model_probes_agree(cifar_keras):
    x, y = cifar_keras["x"], cifar_keras["y"]
    found = probe_findings(run_probes(cifar_keras["cifarlab"], x / 255.0, y), labels_given=True)
    assert found[0].id == "input-scale" and "raw uint8" in found[0].fix


@pytest.mark.slow
def test_model_exported_in_training_mode_is_caught(cifar_keras):
    from cifarlab.export import export_onnx

    unit = cifar_keras["x"].astype(np.float32) / 255.0
    path = export_onnx(cifar_keras["result"].model, cifar_keras["root"] / "train.onnx", input="float",
                       training=True)["path"]
    finding = train_mode_finding(open_model(path), unit)
    assert finding is not None and finding.id == "train-mode-inference"
    assert finding.evidence["max_logit_diff_same_batches"] > 1e-3  # dropout
    assert train_mode_finding(cifar_keras["onnx"], unit) is None
