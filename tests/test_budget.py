"""Fast training: a time budget that plans the epochs, and test-time augmentation.

Timings are measured for real but never asserted tightly: the machine may be busy.
"""

import json
import time

import numpy as np
import pytest
import torch
from synthetic import synthetic_dataset

from cifarlab.cli import main
from cifarlab.errors import CifarlabError
from cifarlab.evaluation import evaluate, predict_logits_tta
from cifarlab.modelfile import load_model
from cifarlab.training import TrainConfig, Trainer, plan_epochs, resume, train

# One step of 32 images per epoch: the planned runs stay short however many epochs fit.
TINY = dict(model="airbench-small", batch_size=32, lr=0.2, seed=0, device="cpu")


def tiny_dataset():
    return synthetic_dataset(n_train_per_class=10, n_test_per_class=5)


def test_plan_epochs_splits_the_budget_after_fixed_costs():
    assert plan_epochs(600, 23.1, 10) == 25  # (600 - 10) / 23.1 = 25.5
    assert plan_epochs(100, 10, 0) == 10
    assert plan_epochs(100, 30, 40) == 2  # 60 s left: 2 whole epochs, not 2.4


def test_plan_epochs_gives_at_least_one_epoch_or_says_what_would_fit():
    assert plan_epochs(60, 45, 10) == 1
    with pytest.raises(CifarlabError, match=r"an epoch takes 50\.0 s.*--time-budget 1\.1 or more"):
        plan_epochs(60, 50, 15)  # 65 s needed: 1.1 minutes, rounded up
    with pytest.raises(CifarlabError, match="does not fit one epoch"):
        plan_epochs(60, 10, 70)  # the fixed costs alone exceed the budget


@pytest.mark.parametrize("cfg,message", [
    (dict(epochs=3, time_budget=1.0), "exclude each other"),
    (dict(time_budget=0.0), "--time-budget must be a positive number"),
])
def test_bad_budgets_are_refused(cfg, message):
    with pytest.raises(CifarlabError, match=message):
        TrainConfig(**cfg).validate()


def test_cli_refuses_epochs_with_a_time_budget(capsys):
    assert main(["train", "--epochs", "2", "--time-budget", "1"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_a_budgeted_run_records_its_plan(tmp_path, monkeypatch):
    # Whether the run fits the budget is the plan's arithmetic (tested above with injected
    # costs); the real clock belongs to benchmarks: a loaded machine here took 26-28 s of
    # one-off costs alone.
    budget_min = 0.2
    result = train(TrainConfig(**TINY, time_budget=budget_min), dataset=tiny_dataset(),
                   run_dir=tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    recipe = load_model(result.model_path).meta["recipe"]
    epochs = len(result.history)
    assert epochs >= 1 and config["epochs"] == recipe["epochs"] == epochs
    assert config["time_budget"] == budget_min and recipe["plan"] == config["plan"]
    assert config["plan"]["epoch_seconds"] > 0 and config["plan"]["fixed_seconds"] > 0
    assert config["plan"]["first_epoch_seconds"] > 0  # corrected after the first epoch
    # Resuming keeps the plan rather than measuring again on a possibly different machine.
    monkeypatch.setattr(Trainer, "measure", lambda self: pytest.fail("resume re-planned"))
    resumed = resume(tmp_path / "run", dataset=tiny_dataset(), progress=False)
    assert resumed.model.meta["recipe"]["epochs"] == epochs and len(resumed.history) == epochs


def test_the_plan_is_corrected_after_the_first_epoch():
    plan = {"epoch_seconds": 8.0, "fixed_seconds": 9.0, "final_eval_seconds": 5.0}
    cfg = TrainConfig(**TINY, time_budget=1.0, epochs=3, plan=plan)
    trainer = Trainer(cfg, tiny_dataset(), progress=False)
    trainer.started = time.perf_counter() - 20  # 20 s of the 60 spent, 5 kept for the final evaluation
    # The first epoch took 10 s: 35 s left hold 3 more at 10.5 s (PLAN_MARGIN), not the 2 planned.
    corrected = trainer.replan(first_epoch_s=10.0)
    assert corrected.epochs == 4
    assert corrected.plan == {**plan, "first_epoch_seconds": 10.0, "first_plan_epochs": 3}
    # A first epoch slower than the rest of the budget: the run stops after it.
    assert trainer.replan(first_epoch_s=40.0).epochs == 1


def test_measuring_leaves_the_run_untouched(tmp_path):
    ds = tiny_dataset()
    plain = train(TrainConfig(**TINY, epochs=1), dataset=ds, run_dir=tmp_path / "plain", progress=False)
    trainer = Trainer(TrainConfig(**TINY, epochs=1), ds, tmp_path / "measured", progress=False)
    assert all(seconds > 0 for seconds in trainer.measure())
    measured = trainer.fit()
    a, b = plain.model.state_dict(), measured.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def fitted_trainer(monkeypatch, time_budget: float, fit_budget: bool = True) -> Trainer:
    """A planned Trainer on 320 training images (10 steps of 32) whose measured costs are
    injected: 100 s a step, nothing else. The real one-off costs (setup, seconds at most)
    are small against them."""
    monkeypatch.setattr(Trainer, "measure", lambda self: (100.0, 0.0, 0.0, 0.0, 0.0))
    cfg = TrainConfig(**TINY, time_budget=time_budget, fit_budget=fit_budget)
    return Trainer(cfg, synthetic_dataset(n_train_per_class=40, num_classes=10), progress=False)


def test_fit_budget_trains_on_as_many_images_as_four_epochs_hold(monkeypatch):
    # 3,000 s: an epoch of all 320 images (10 steps, 1,050 s with the 5% margin) fits twice.
    assert fitted_trainer(monkeypatch, 50.0, fit_budget=False).cfg.epochs == 2
    # With --fit-budget, 4 epochs of 7 steps (735 s each) fit: 7 x 32 images, less 5 for the
    # rounding of each class's share.
    trainer = fitted_trainer(monkeypatch, 50.0)
    assert trainer.cfg.epochs == 4 and trainer.steps_per_epoch == 7
    assert trainer.cfg.max_train_images == trainer.cfg.plan["fitted_train_images"] == 219
    assert len(trainer.train_y) == len(trainer.first_mirror) == 220  # the stratified subset: 22 per class
    assert np.ptp(np.bincount(trainer.train_y.numpy(), minlength=10)) <= 1  # class-balanced


def test_fit_budget_fills_the_budget_with_whole_epochs(monkeypatch):
    # 4,800 s hold 4.57 epochs of all images (1,050 s): 4 would leave 600 s unused, so
    # 5 epochs of 9 steps (945 s each) run, on 9 x 32 - 5 images.
    assert fitted_trainer(monkeypatch, 80.0, fit_budget=False).cfg.epochs == 4
    trainer = fitted_trainer(monkeypatch, 80.0)
    assert trainer.cfg.epochs == 5 and trainer.steps_per_epoch == 9
    assert trainer.cfg.plan["fitted_train_images"] == 283 and len(trainer.train_y) == 280


def test_fit_budget_refuses_when_not_even_20_images_per_class_fit(monkeypatch):
    with pytest.raises(CifarlabError, match=r"does not fit 4 epochs of even 200 training images"):
        fitted_trainer(monkeypatch, 10.0)  # 150 s an epoch: one step, 32 images


def test_fit_budget_needs_a_time_budget(capsys):
    with pytest.raises(CifarlabError, match="--fit-budget needs --time-budget"):
        TrainConfig(fit_budget=True, epochs=2).validate()
    assert main(["train", "--fit-budget", "--epochs", "2"]) == 2
    assert "--fit-budget needs --time-budget" in capsys.readouterr().err


# ---- test-time augmentation ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ds = synthetic_dataset(n_train_per_class=20)  # 8 steps of 8 images learn the colours
    run = tmp_path_factory.mktemp("tta") / "run"
    return train(TrainConfig(**dict(TINY, batch_size=8, epochs=2)), dataset=ds, run_dir=run, progress=False), ds


def test_tta_of_mirror_symmetric_images_equals_plain_logits(trained):
    model = trained[0].model
    half = np.random.default_rng(0).integers(0, 256, size=(8, 32, 16, 3), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
    np.testing.assert_array_equal(predict_logits_tta(model, symmetric, "flip"), model.predict_logits(symmetric))


def test_tta_views_are_averaged(trained):
    model, images = trained[0].model, trained[1].test_x[:16]
    expected = (model.predict_logits(images) + model.predict_logits(images[:, :, ::-1])) / 2
    np.testing.assert_allclose(predict_logits_tta(model, images, "flip"), expected, rtol=1e-5, atol=1e-6)
    assert predict_logits_tta(model, images, "flip+translate").shape == expected.shape


@pytest.mark.parametrize("tta", ["flip", "flip+translate"])
def test_tta_does_not_lose_accuracy_and_is_recorded(trained, tta, tmp_path):
    result, ds = trained
    plain = evaluate(result.model, data=ds, out_dir=tmp_path / "plain", progress=False)
    report = evaluate(result.model, data=ds, out_dir=tmp_path / "tta", progress=False, tta=tta)
    assert report["accuracy"] >= plain["accuracy"] - 0.02
    assert json.loads((tmp_path / "tta" / "metrics.json").read_text())["tta"] == tta
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["tta"] is None


def test_cli_evaluate_tta(trained, tmp_path, monkeypatch, capsys):
    result, ds = trained
    # The model file names the in-memory dataset "cifar100"; hand the CLI the synthetic one.
    monkeypatch.setattr("cifarlab.data.load_dataset", lambda *args, **kwargs: ds)
    out = tmp_path / "eval"
    assert main(["evaluate", str(result.model_path), "--data", "synthetic", "--tta", "flip", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["tta"] == "flip"
    assert "test-time augmentation: flip" in capsys.readouterr().out


@pytest.mark.parametrize("cfg,flag", [
    (dict(lr=float("nan")), "--lr"), (dict(lr=float("inf")), "--lr"), (dict(lr=0.0), "--lr"),
    (dict(weight_decay=-1e-4), "--weight-decay"), (dict(weight_decay=float("nan")), "--weight-decay"),
    (dict(label_smoothing=1.0), "--label-smoothing"), (dict(label_smoothing=-0.1), "--label-smoothing"),
    (dict(seed=-1), "--seed"), (dict(seed=2**63), "--seed"),
    (dict(time_budget=float("inf")), "--time-budget"), (dict(time_budget=float("nan")), "--time-budget"),
    (dict(max_train_images=0), "--max-train-images"), (dict(epochs=0), "--epochs"),
    (dict(val_fraction=float("nan")), "--val-fraction"),
])
def test_out_of_range_settings_are_refused_naming_the_flag(cfg, flag):
    with pytest.raises(CifarlabError, match=flag):
        TrainConfig(**cfg).validate()


@pytest.mark.parametrize("device", ["meta", "tpu", "nonsense", "cpu:x"])
def test_unknown_devices_are_refused(device, capsys):
    assert main(["train", "--device", device, "--data", "cifar10"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_fewer_training_images_than_classes_is_refused():
    with pytest.raises(CifarlabError, match="fewer than one image per class"):
        Trainer(TrainConfig(**TINY, epochs=1, max_train_images=3), tiny_dataset(), progress=False)
