"""Training loop pieces, determinism, the run folder, and resume after a real SIGKILL."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from synthetic import QUICK, synthetic_dataset, write_image_folder

from cifarlab.data import load_dataset
from cifarlab.errors import CifarlabError, ModelFileError
from cifarlab.modelfile import load_model, read_safetensors, save_model
from cifarlab.training import (
    EMA_EVERY,
    TrainConfig,
    Trainer,
    WeightEMA,
    join_optimizer_state,
    lr_at,
    read_checkpoint,
    resume,
    split_optimizer_state,
    train,
)


def weights(path):
    tensors, _ = read_safetensors(path)
    return tensors


def test_lr_schedules():
    assert lr_at(0.0, 1.0, "onecycle") == pytest.approx(0.1)
    assert lr_at(0.2, 1.0, "onecycle") == pytest.approx(1.0)
    assert lr_at(0.6, 1.0, "onecycle") == pytest.approx(0.5)
    assert lr_at(0.5, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(0.9, 0.3, "constant") == 0.3


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, rest = split_optimizer_state(opt.state_dict())
    json.dumps(rest)  # the non-tensor part must be plain JSON
    restored = join_optimizer_state(tensors, rest)
    for pid, entries in opt.state_dict()["state"].items():
        for name, value in entries.items():
            torch.testing.assert_close(restored["state"][pid][name], value)


def test_run_folder_contents(tmp_path):
    ds = synthetic_dataset(n_train_per_class=100)  # 30 steps: enough for BatchNorm's running stats
    result = train(TrainConfig(**QUICK), dataset=ds, run_dir=tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "history.csv", "checkpoint.safetensors",
                                               "model.safetensors"}
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    model = load_model(result.model_path)
    meta = model.meta
    assert meta["split"]["n_val"] == 80 and meta["split"]["n_train"] == 320  # 20% of 4 x 100, stratified
    assert meta["metrics"]["epochs"] == 3
    assert meta["metrics"]["val_acc"] == pytest.approx(float(rows[-1]["val_acc"]), abs=1e-5)
    # The colours are easy: a working loop separates them within 3 epochs.
    assert meta["metrics"]["val_acc"] > 0.9
    assert (model.predict(ds.test_x) == ds.test_y).mean() > 0.9
    np.testing.assert_allclose(meta["train_input_stats"]["mean"],
                               ds.train_x.reshape(-1, 3).mean(0), atol=2.0)


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    ds = synthetic_dataset()
    cfg = dict(QUICK, epochs=1)
    a = train(TrainConfig(**cfg), dataset=ds, run_dir=tmp_path / "a", progress=False)
    b = train(TrainConfig(**cfg), dataset=ds, run_dir=tmp_path / "b", progress=False)
    c = train(TrainConfig(**dict(cfg, seed=1)), dataset=ds, run_dir=tmp_path / "c", progress=False)
    wa, wb, wc = weights(a.model_path), weights(b.model_path), weights(c.model_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_continues_to_the_same_model(tmp_path):
    # QUICK takes the recipe's optimizer, Muon: its per-filter momentum resumes too.
    ds = synthetic_dataset()
    full = train(TrainConfig(**QUICK), dataset=ds, run_dir=tmp_path / "full", progress=False)
    # Interrupt after epoch 1 by training a 1-epoch-long prefix of the same 3-epoch run...
    short = TrainConfig(**QUICK)
    trainer = Trainer(short, ds, tmp_path / "part", progress=False)
    trainer.run_dir.mkdir()
    trainer.history.append({**trainer.train_epoch(1), **trainer.evaluate_val()})
    trainer.save_checkpoint()
    # ...then resume it from the checkpoint file alone.
    resumed = resume(tmp_path / "part", dataset=ds, progress=False)
    wf, wr = weights(full.model_path), weights(resumed.model_path)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_resume_while_the_lookahead_runs_continues_to_the_same_model(tmp_path):
    # 4 epochs: the whitening bias trains in epoch 1, the lookahead runs from epoch 2 on, so
    # an interruption after epoch 2 must rebuild the lookahead from the checkpointed weights.
    ds = synthetic_dataset()
    # (airbench94's SGD recipe; the muon default runs without a lookahead.)
    cfg = dict(QUICK, epochs=4, optimizer="sgd", schedule="triangle", lookahead=True)
    full = train(TrainConfig(**cfg), dataset=ds, run_dir=tmp_path / "full", progress=False)
    trainer = Trainer(TrainConfig(**cfg), ds, tmp_path / "part", progress=False)
    trainer.run_dir.mkdir()
    for epoch in (1, 2):
        trainer.history.append({**trainer.train_epoch(epoch), **trainer.evaluate_val()})
    trainer.save_checkpoint()
    resumed = resume(tmp_path / "part", dataset=ds, progress=False)
    wf, wr = weights(full.model_path), weights(resumed.model_path)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    ds = synthetic_dataset()
    # SGD, not the muon default: Muon's orthogonalisation lifts a gradient's small singular
    # directions ~40x, rounding differences included, so after 100 steps its weights differ by
    # a few percent between any two kernel choices (the loss still agrees, checked below).
    cfg = dict(QUICK, epochs=1, amp="off", optimizer="sgd", schedule="triangle", lookahead=True)
    eager = train(TrainConfig(**cfg), dataset=ds, run_dir=tmp_path / "eager", progress=False)
    compiled = train(TrainConfig(**cfg, compile=True), dataset=ds, run_dir=tmp_path / "compiled", progress=False)
    we, wc = weights(eager.model_path), weights(compiled.model_path)
    # Fused kernels round differently; an epoch later the weights still agree closely.
    assert all(torch.allclose(we[k].float(), wc[k].float(), atol=1e-3, rtol=1e-2) for k in we)
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-3)
    muon = dict(QUICK, epochs=1, amp="off")
    eager = train(TrainConfig(**muon), dataset=ds, run_dir=tmp_path / "eager-muon", progress=False)
    compiled = train(TrainConfig(**muon, compile=True), dataset=ds, run_dir=tmp_path / "compiled-muon", progress=False)
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-3)


# 48 training images in batches of 8: 6 steps an epoch, so the EMA also folds in a partial
# group of steps (6 = 5 + 1) at each epoch's end.
EMA_RUN = dict(QUICK, batch_size=8, epochs=2)


def ema_dataset():
    return synthetic_dataset(n_train_per_class=15)


def test_ema_update_weights_and_decay_zero_copies():
    live = torch.nn.Linear(3, 2)
    ema = WeightEMA(live, 0.9)
    with torch.no_grad():
        ema.model.weight.zero_()
    ema.update(EMA_EVERY, EMA_EVERY)  # the first update copies: no bias towards the initial weights
    assert torch.equal(ema.model.weight, live.weight)
    with torch.no_grad():
        live.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(1, EMA_EVERY + 1)
    weight = (1 - 0.9) / (1 - 0.9 ** (EMA_EVERY + 1))
    torch.testing.assert_close(ema.model.weight, before + weight * (live.weight - before))
    zero = WeightEMA(live, 0.0)
    zero.update(1, 100)
    assert torch.equal(zero.model.weight, live.weight)


def test_ema_with_decay_zero_is_the_live_model(tmp_path):
    trainer = Trainer(TrainConfig(**dict(EMA_RUN, epochs=1), ema=0.0), ema_dataset(), tmp_path / "run",
                      progress=False)
    result = trainer.fit()
    live = trainer.model.state_dict()
    assert all(torch.equal(v, live[k]) for k, v in result.model.state_dict().items())


def test_ema_is_validated_and_saved_and_resumes_exactly(tmp_path):
    ds = ema_dataset()
    full = Trainer(TrainConfig(**EMA_RUN, ema=0.9), ds, tmp_path / "full", progress=False)
    result = full.fit()
    saved, live = weights(result.model_path), full.model.state_dict()
    assert not torch.equal(saved["net.head.weight"], live["net.head.weight"])
    assert all(torch.equal(saved[k], v) for k, v in full.ema.model.state_dict().items())
    checkpoint = weights(tmp_path / "full" / "checkpoint.safetensors")
    assert all(torch.equal(checkpoint[f"ema.{k}"], v) for k, v in saved.items())
    # The validation numbers are the saved (EMA) model's.
    val_x, val_y = full.val_x.numpy(), full.val_y.numpy()
    assert (result.model.predict(val_x) == val_y).mean() == pytest.approx(result.history[-1]["val_acc"])
    # Interrupted after epoch 1, then resumed from the checkpoint: the same EMA, bit for bit.
    part = Trainer(TrainConfig(**EMA_RUN, ema=0.9), ds, tmp_path / "part", progress=False)
    part.run_dir.mkdir()
    part.history.append({**part.train_epoch(1), **part.evaluate_val()})
    part.save_checkpoint()
    resumed = resume(tmp_path / "part", dataset=ds, progress=False)
    assert all(torch.equal(v, saved[k]) for k, v in weights(resumed.model_path).items())


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    data = tmp_path / "shapes"
    write_image_folder(data, synthetic_dataset(n_train_per_class=200, num_classes=4))
    env = {**os.environ, "CIFARLAB_HOME": str(tmp_path / "cache")}
    os.environ["CIFARLAB_HOME"] = env["CIFARLAB_HOME"]
    try:
        ds = load_dataset(data, progress=False)
        args = ["--data", str(data), "--model", "keras-cnn", "--epochs", "6", "--batch-size", "32",
                "--device", "cpu", "--quiet"]
        run = tmp_path / "killed"
        proc = subprocess.Popen([sys.executable, "-m", "cifarlab", "train", *args, "--out", str(run)], env=env)
        checkpoint = run / "checkpoint.safetensors"
        deadline = time.time() + 120
        while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        epochs_done = len(json.loads(read_safetensors(checkpoint)[1]["cifarlab-checkpoint"])["history"])
        assert 1 <= epochs_done < 6, "the kill should land mid-run"
        resumed = resume(run, dataset=ds, progress=False)
        full = subprocess.run([sys.executable, "-m", "cifarlab", "train", *args, "--out", str(tmp_path / "full")],
                              env=env, capture_output=True, text=True)
        assert full.returncode == 0, full.stderr
        wf, wr = weights(tmp_path / "full" / "model.safetensors"), weights(resumed.model_path)
        assert all(torch.equal(wf[k], wr[k]) for k in wf)
    finally:
        del os.environ["CIFARLAB_HOME"]


def test_a_diverging_run_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path):
    # A learning rate of 1e30 makes the loss NaN in the second epoch (the first still ends finite).
    cfg = TrainConfig(**dict(QUICK, lr=1e30, epochs=2))
    with pytest.raises(CifarlabError, match=r"training diverged in epoch 2: the loss \(nan\).*epoch 1.*kept"):
        train(cfg, dataset=synthetic_dataset(n_train_per_class=10, n_test_per_class=5), run_dir=tmp_path / "run",
              progress=False)
    tensors, state = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert [row["epoch"] for row in state["history"]] == [1]
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no model from a diverged run


def test_a_model_file_with_non_finite_weights_is_refused(tmp_path):
    result = train(TrainConfig(**dict(QUICK, epochs=1)), dataset=synthetic_dataset(), run_dir=tmp_path / "run",
                   progress=False)
    model = result.model
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(ModelFileError, match="hold NaN or infinite values"):
        load_model(tmp_path / "nan.safetensors")
