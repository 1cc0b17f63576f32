"""Calibrate `cifarlab diagnose` on real models: honest evaluations against the classic bugs.

    python benchmarks/diagnosis_calibration.py \
        --cifar10 ../shared/data/cifar10-jpeg.tar.gz --cifar100 ../shared/data/cifar100-rebuilt.tar.gz
    python benchmarks/diagnosis_calibration.py --train-images 8000 \
        --cifar10 ../shared/data/cifar10-jpeg.tar.gz --cifar100 ../shared/data/cifar100-rebuilt.tar.gz

(1) The corpus: for each dataset, `keras-cnn` (the seed's network, no normalisation layers)
and `airbench-small` (cifarlab's CPU default, BatchNorm) are trained once for
HYP["epochs"] epochs on the training split (--train-images N: a stratified subset of N, for
weaker models: the second command), and the model after each epoch in HYP["snapshots"] is
saved: weak and strong honest models of two families. Saved models are reused by later runs
(`--corpus DIR`, by default one folder per training-set size). Both commands add their rows
to the same --out/calibration.csv, and the tables cover every row there.

(2) The cases: every model is evaluated correctly and with each classic bug, the way a Keras
script holds it (float NHWC pixels / 255 in, logits out; see `cases()`): the /255 missing
or done twice, a mean/std normalisation the model was not trained on, BGR, CIFAR's planar
rows reshaped without a transpose (NCHW data read as NHWC), two mistakes at once, the model
left in training mode, labels shuffled or shifted by one, and on CIFAR-100 fine predictions
scored against coarse labels.

(3) Every case is diagnosed three ways, as a user would: from the confusion matrix alone,
from probabilities + labels, and (for a subset of sizes) from the model + images, on test
subsets of HYP["sizes"] images. One row per (case, size, way): accuracy, the output
statistics, verdict, top finding, and whether that is right.

Prints the tables the README shows and writes --out/calibration.csv and summary.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from train_speed import add_hyp_flags, cpu_model  # the sibling benchmark's helpers

from cifarlab import get_split, load_dataset
from cifarlab.metrics import softmax
from cifarlab.modelfile import Classifier, load_model, save_model
from cifarlab.training import TrainConfig, Trainer

HYP = {
    "archs": ("keras-cnn", "airbench-small"),
    "epochs": 15,  # each model family trains this many epochs (its own recipe otherwise) ...
    "snapshots": (1, 2, 5, 15),  # ... and the model after these epochs joins the corpus
    # A snapshot of a decaying schedule is a mid-training checkpoint (airbench's lr is at its
    # peak after epoch 1). Complete runs of these lengths are trained too, for the archs whose
    # schedule is not constant (keras-cnn's is, so its snapshots are complete runs already).
    "complete_runs": (1, 2, 5),
    # The whole training split (48,000 + the 2,000 held out below); a smaller number trains on a
    # stratified subset. On 2 bf16 CPU cores a 15-epoch family takes about 8 min (each of the two).
    "train_images": 50_000,
    "val_fraction": 0.04,  # 2,000 held-out images: the accuracy recorded in the model file
    "sizes": (500, 2000, 10000),  # test subsets the outputs are diagnosed on (capped at the split)
    "bug_images": 2000,  # the mistakes run on this many of them (the honest case on all the sizes)
    "model_sizes": (1000,),  # test subsets the model + images way runs on (it re-runs the model)
    "model_snapshots": (1, 15),  # ... and only for these snapshots, the weakest and the strongest
    "seed": 0,
}


# ---- the machine ------------------------------------------------------------------------------

def machine() -> str:
    """The CPU and the precision training ran in (diagnose itself runs models in float32)."""
    from cifarlab.training import bf16_is_fast

    return f"{cpu_model()}, training in {'bf16' if bf16_is_fast(torch.device('cpu')) else 'float32'}"


# ---- (1) the corpus ---------------------------------------------------------------------------

def model_path(corpus: Path, dataset: str, arch: str, epoch: int, kind: str = "snapshot") -> Path:
    """kind "snapshot": after `epoch` epochs of the HYP["epochs"] schedule; "run": a complete run."""
    return corpus / f"{dataset}-{arch}-{'epoch' if kind == 'snapshot' else 'run'}{epoch:02d}.safetensors"


def snapshot(trainer: Trainer, path: Path) -> None:
    """The model as it is after this epoch, saved as `finish` would save it."""
    model = copy.deepcopy(trainer.eval_model).to(memory_format=torch.contiguous_format).eval()
    last = trainer.history[-1]
    metrics = {k: last.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
    model.meta = dataclasses.replace(model.meta, metrics={**metrics, "epochs": len(trainer.history)})
    save_model(model, path)


def train_family(dataset, name: str, arch: str, corpus: Path) -> None:
    paths = [model_path(corpus, name, arch, e) for e in HYP["snapshots"]]
    if all(p.exists() for p in paths):
        print(f"{name} {arch}: reusing {len(paths)} models from {corpus}", flush=True)
        return
    cfg = TrainConfig(data=name, model=arch, epochs=HYP["epochs"], max_train_images=HYP["train_images"],
                      val_fraction=HYP["val_fraction"], seed=HYP["seed"])
    # fit() is never called: no run folder, checkpoints or final model, only the snapshots.
    trainer = Trainer(cfg, dataset, run_dir=corpus / "unused", progress=False)
    start = time.perf_counter()
    for epoch in range(1, HYP["epochs"] + 1):
        row = trainer.train_epoch(epoch)
        row.update(trainer.evaluate_val())
        trainer.history.append(row)
        if epoch in HYP["snapshots"]:
            snapshot(trainer, model_path(corpus, name, arch, epoch))
        print(f"{name} {arch} epoch {epoch}: val acc {row['val_acc']:.1%} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


def train_complete(dataset, name: str, arch: str, epochs: int, corpus: Path) -> None:
    """A complete run of `epochs` epochs (its schedule decays to 0 at the end), as `cifarlab train` does."""
    path = model_path(corpus, name, arch, epochs, "run")
    if path.exists():
        return
    cfg = TrainConfig(data=name, model=arch, epochs=epochs, max_train_images=HYP["train_images"],
                      val_fraction=HYP["val_fraction"], seed=HYP["seed"])
    trainer = Trainer(cfg, dataset, run_dir=corpus / "unused", progress=False)
    for epoch in range(1, epochs + 1):
        row = trainer.train_epoch(epoch)
        row.update(trainer.evaluate_val())
        trainer.history.append(row)
    snapshot(trainer, path)
    print(f"{name} {arch} complete {epochs}-epoch run: val acc {trainer.history[-1]['val_acc']:.1%}", flush=True)


def corpus_models(datasets: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    """(dataset, arch, epochs, kind) of every model in the corpus."""
    models = []
    for name in datasets:
        for arch in HYP["archs"]:
            models += [(name, arch, epoch, "snapshot") for epoch in HYP["snapshots"]]
            if arch != "keras-cnn":
                models += [(name, arch, epoch, "run") for epoch in HYP["complete_runs"]]
    return models


def build_corpus(datasets: dict[str, Any], corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for name, dataset in datasets.items():
        for arch in HYP["archs"]:
            train_family(dataset, name, arch, corpus)
    for name, arch, epochs, kind in corpus_models(datasets):
        if kind == "run":
            train_complete(datasets[name], name, arch, epochs, corpus)


# ---- (2) the cases ----------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def planar(x: np.ndarray) -> np.ndarray:
    """NCHW data read as NHWC: CIFAR's planar rows reshaped without the transpose."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(x.shape)


# What the user's script feeds a model held Keras-style (it expects float NHWC pixels / 255).
INPUT_CASES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "honest": lambda x: x / 255.0,
    "no-divide": lambda x: x * 1.0,
    "double-divide": lambda x: x / 255.0 / 255.0,
    "imagenet-normalized": lambda x: (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD,
    "bgr": lambda x: x[..., ::-1] / 255.0,
    "planar-reshape": lambda x: planar(x) / 255.0,
    "bgr+no-divide": lambda x: x[..., ::-1] * 1.0,
    "planar+no-divide": lambda x: planar(x) * 1.0,
    "train-mode": lambda x: x / 255.0,  # fed correctly, to a model left in training mode
}
# The honest outputs scored against the wrong labels.
LABEL_CASES = ("shuffled-labels", "label-shift", "class-order", "coarse-labels")
# The top finding each way should give: from the outputs (cm, probs) and from the model.
EXPECTED = {
    "honest": (None, None),
    "no-divide": ("prediction-collapse", "input-scale"),
    "double-divide": ("prediction-collapse", "input-scale"),
    "imagenet-normalized": ("prediction-collapse", "input-normalization"),
    "bgr": ("prediction-collapse", "channel-order"),
    "planar-reshape": ("prediction-collapse", "input-layout"),
    "bgr+no-divide": ("prediction-collapse", "two-mistakes"),
    "planar+no-divide": ("prediction-collapse", "two-mistakes"),
    "train-mode": ("prediction-collapse", "train-mode-inference"),
    "shuffled-labels": ("near-chance", "near-chance"),
    "label-shift": ("label-permutation", "label-permutation"),
    "class-order": ("label-permutation", "label-permutation"),
    "coarse-labels": ("fine-coarse-labels", "fine-coarse-labels"),
}


def held_keras_style(model: Classifier, train_mode: bool) -> torch.nn.Module:
    from cifarlab.demo import KerasStyleModel

    # In training mode, a copy: forward passes then move BatchNorm's running statistics, and
    # the cases after this one need the model as it was trained.
    held = KerasStyleModel(copy.deepcopy(model) if train_mode else model)
    return held.train() if train_mode else held.eval()


def wrong_labels(case: str, y: np.ndarray, y_coarse: np.ndarray | None, num_classes: int) -> np.ndarray | None:
    rng = np.random.default_rng(HYP["seed"])
    if case == "shuffled-labels":
        return rng.permutation(y)
    if case == "label-shift":
        return (y + 1) % num_classes
    if case == "class-order":  # another class order: the label map is a permutation
        return rng.permutation(num_classes)[y]
    return y_coarse  # coarse-labels: None on a dataset without coarse labels


def subset(n_total: int, n: int) -> np.ndarray:
    """A fixed random subset (ImageFolder test splits are sorted by class)."""
    return np.sort(np.random.default_rng(HYP["seed"] + n).choice(n_total, min(n, n_total), replace=False))


def logits_of(module: torch.nn.Module, fed: np.ndarray, batch: int = 500) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(np.ascontiguousarray(fed[i:i + batch], np.float32)))
                               .float().numpy() for i in range(0, len(fed), batch)])


def diagnosis_row(diagnosis, way: str, expected: str | None, seconds: float) -> dict[str, Any]:
    summary = diagnosis.summary
    ranked = diagnosis.ranked()
    problems = [f for f in ranked if f.severity in ("error", "warning")]
    top = problems[0].id if problems else None
    if expected is None:
        outcome = "ok" if diagnosis.verdict == "healthy" else "FALSE ALARM"
    elif top == expected:
        outcome = "ok"
    else:
        outcome = "not found" if top is None else f"other: {top}"
    row = {"way": way, "verdict": diagnosis.verdict, "top_finding": top,
           "severity": problems[0].severity if problems else None,
           "expected": expected, "outcome": outcome, "seconds": round(seconds, 2)}
    for key in ("accuracy", "pred_entropy", "true_entropy", "prediction_tv", "prediction_tv_excess",
                "top_classes_share", "remapped_accuracy", "classes_predicted"):
        value = summary.get(key)
        row[key] = round(value, 4) if isinstance(value, float) else value
    return row


def timed_diagnose(**kwargs) -> tuple[Any, float]:
    from cifarlab import diagnose

    start = time.perf_counter()
    diagnosis = diagnose(**kwargs)
    return diagnosis, time.perf_counter() - start


def output_rows(logits: np.ndarray, y: np.ndarray, names: list[str] | None, sizes: tuple[int, ...],
                expected: str | None) -> Iterator[dict[str, Any]]:
    """The outputs way: the confusion matrix alone, and probabilities + labels, on each subset."""
    from cifarlab.metrics import confusion_matrix

    num_classes = logits.shape[1]
    for n in sizes:
        if n > len(y):
            continue
        keep = subset(len(y), n)
        cm = confusion_matrix(y[keep], logits[keep].argmax(1), num_classes)
        diagnosis, seconds = timed_diagnose(confusion=cm, class_names=names)
        yield {"n": len(keep), **diagnosis_row(diagnosis, "cm", expected, seconds), "_cm": cm}
        diagnosis, seconds = timed_diagnose(predictions=softmax(logits[keep]), labels=y[keep], class_names=names)
        yield {"n": len(keep), **diagnosis_row(diagnosis, "probs", expected, seconds)}


def model_rows(module: torch.nn.Module, fed: np.ndarray, y: np.ndarray, names: list[str],
               expected: str | None) -> Iterator[dict[str, Any]]:
    """The model way: the held model and exactly what the script fed it (the probes re-run it)."""
    for n in HYP["model_sizes"]:
        keep = subset(len(y), n)
        diagnosis, seconds = timed_diagnose(model=module, images=fed[keep].astype(np.float32), labels=y[keep],
                                            class_names=names, max_images=n)
        yield {"n": len(keep), **diagnosis_row(diagnosis, "model", expected, seconds)}


def model_cases(dataset, model: Classifier, with_model_way: bool) -> Iterator[dict[str, Any]]:
    """Every case of one model: each input mistake, then the honest outputs with wrong labels."""
    test_x, test_y = get_split(dataset, "test")
    names, num_classes = list(model.classes), len(model.classes)
    pool = subset(len(test_y), max(HYP["sizes"]))  # the honest pool; the mistakes use a part of it
    x, y = test_x[pool], test_y[pool]
    bug_pool = subset(len(pool), HYP["bug_images"])  # random: an ImageFolder test split is sorted by class
    honest_logits = None
    for case, feed in INPUT_CASES.items():
        module = held_keras_style(model, train_mode=case == "train-mode")
        rows_x, rows_y = (x, y) if case == "honest" else (x[bug_pool], y[bug_pool])
        fed = feed(rows_x.astype(np.float64))
        logits = logits_of(module, fed)
        honest_logits = logits if case == "honest" else honest_logits
        outputs_expected, model_expected = EXPECTED[case]
        sizes = HYP["sizes"] if case == "honest" else tuple(s for s in HYP["sizes"] if s <= len(rows_y))
        for row in output_rows(logits, rows_y, names, sizes, outputs_expected):
            yield {"case": case, **row}
        if with_model_way:
            for row in model_rows(module, fed, rows_y, names, model_expected):
                yield {"case": case, **row}
    coarse = getattr(dataset, "test_y_coarse", None)
    for case in LABEL_CASES:
        labels = wrong_labels(case, y, None if coarse is None else coarse[pool], num_classes)
        if labels is None:
            continue
        outputs_expected, model_expected = EXPECTED[case]
        for row in output_rows(honest_logits, labels, names, HYP["sizes"], outputs_expected):
            yield {"case": case, **row}
        if with_model_way:
            module = held_keras_style(model, train_mode=False)
            for row in model_rows(module, x / 255.0, labels, names, model_expected):
                yield {"case": case, **row}


def run_cases(datasets: dict[str, Any], corpus: Path, out: Path) -> list[dict[str, Any]]:
    """All rows; also writes the honest confusion matrices (honest_cms.npz, the tests' fixtures).

    Rows of models already in out/calibration.csv are kept and those models are not re-run.
    """
    rows = read_csv(out / "calibration.csv")
    for row in rows:
        row["kind"] = row.get("kind") or "snapshot"  # rows written before complete runs existed
    done = {(r["dataset"], r["arch"], int(r["epochs"]), r["kind"]) for r in rows
            if r.get("train_images") == HYP["train_images"]}
    cms_path, all_cms_path = out / "honest_cms.npz", out / "cms.npz"
    honest_cms: dict[str, np.ndarray] = dict(np.load(cms_path)) if cms_path.exists() else {}
    # Every case's confusion matrix, so that a new statistic can be tried on the corpus
    # without re-running the models.
    all_cms: dict[str, np.ndarray] = dict(np.load(all_cms_path)) if all_cms_path.exists() else {}
    for name, arch, epoch, kind in corpus_models(datasets):
        if (name, arch, epoch, kind) in done:
            continue
        if not model_path(corpus, name, arch, epoch, kind).exists():
            continue  # trained with another --snapshots
        model = load_model(model_path(corpus, name, arch, epoch, kind))
        head = {"dataset": name, "train_images": HYP["train_images"], "arch": arch, "epochs": epoch,
                "kind": kind, "val_acc": round(model.meta["metrics"]["val_acc"], 4)}
        with_model_way = epoch in HYP["model_snapshots"] and kind == "snapshot"
        before = len(rows)
        for row in model_cases(datasets[name], model, with_model_way):
            cm = row.pop("_cm", None)
            if cm is not None and row["case"] == "honest":
                honest_cms[f"{name}-{HYP['train_images']}-{arch}-{kind}{epoch:02d}-n{row['n']}"] = cm
            if cm is not None:
                all_cms[f"{name}-{HYP['train_images']}-{arch}-{kind}{epoch:02d}-{row['case']}-n{row['n']}"] = cm
            rows.append({**head, **row})
        write_csv(out / "calibration.csv", rows)  # after every model: a stopped run keeps its rows
        np.savez_compressed(cms_path, **honest_cms)
        np.savez_compressed(all_cms_path, **all_cms)
        bad = [r for r in rows[before:] if r["outcome"] != "ok"]
        print(f"{name} {arch} {kind} {epoch} (val acc {head['val_acc']:.1%}): {len(rows) - before} rows, "
              f"{len(bad)} not ok", flush=True)
    return rows


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows written by an earlier run, numbers parsed back."""
    if not path.exists():
        return []
    def parse(value: str) -> Any:
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return None if value == "" else value
    with path.open() as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# ---- (3) the tables -----------------------------------------------------------------------------

def mid_run(row: dict[str, Any]) -> bool:
    """A snapshot taken before the end of a decaying schedule (keras-cnn's lr is constant)."""
    return row["kind"] == "snapshot" and row["arch"] != "keras-cnn" and int(row["epochs"]) < HYP["epochs"]


def case_label(row: dict[str, Any]) -> str:
    """The case, with honest models split into the end of a run and mid-run checkpoints."""
    if row["case"] != "honest":
        return row["case"]
    return "honest, mid-run checkpoint" if mid_run(row) else "honest, end of a run"


CASE_LABELS = ("honest, end of a run", "honest, mid-run checkpoint", *list(EXPECTED)[1:])


def outcome_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per case and way: how many diagnoses gave the expected answer, and what the others gave."""
    lines = ["| case | way | expected top finding | right | not found | other finding | false alarm |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for case in CASE_LABELS:
        for way in ("cm", "probs", "model"):
            mine = [r for r in rows if case_label(r) == case and r["way"] == way]
            if not mine:
                continue
            count = lambda pred, mine=mine: sum(1 for r in mine if pred(r["outcome"]))  # noqa: E731
            others = sorted({r["outcome"][7:] for r in mine if r["outcome"].startswith("other")})
            lines.append(f"| {case} | {way} | {mine[0]['expected'] or 'none (healthy)'} | "
                         f"{count(lambda o: o == 'ok')}/{len(mine)} | {count(lambda o: o == 'not found')} | "
                         f"{count(lambda o: o.startswith('other'))}{' (' + ', '.join(others) + ')' if others else ''}"
                         f" | {count(lambda o: o == 'FALSE ALARM')} |")
    return lines


def entropy_deficit(row: dict[str, Any]) -> float:
    return float(row["true_entropy"]) - float(row["pred_entropy"])


def barely_trained(row: dict[str, Any]) -> bool:
    """Validation accuracy closes less than 10% of the gap from chance to 100%."""
    chance = 1 / (100 if row["dataset"] == "cifar100" else 10)
    return (float(row["val_acc"]) - chance) / (1 - chance) < 0.10


OWN_MARGIN = 0.02  # about the spread of one model's deficit between subsets of 2,000 images


def model_key(row: dict[str, Any]) -> tuple:
    return row["dataset"], row.get("train_images"), row["arch"], row["epochs"], row["kind"], row["n"]


def verdict_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per dataset and way: false alarms on honest models, and the broken cases caught.

    A broken input case counts as revealable from the outputs when its entropy deficit is
    above every honest end-of-run model's on that dataset and above its own model's honest
    deficit by more than OWN_MARGIN (a mistake that leaves the outputs where they were, such
    as training mode on a model whose BatchNorm statistics barely moved, shows nothing);
    label mix-ups always are. Broken cases of mid-run checkpoints are counted apart: their
    honest outputs already look collapsed, so the symptom cannot single out the mistake.
    """
    lines = ["| dataset | way | honest end-of-run: false alarms | barely trained: flagged | mid-run checkpoints: "
             "flagged | broken, revealable: right top finding | broken, not revealable from the outputs | "
             "broken, mid-run checkpoints: right top finding | broken, under 10 images per class |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dataset in sorted({r["dataset"] for r in rows}):
        for way in ("cm", "probs", "model"):
            mine = [r for r in rows if r["dataset"] == dataset and r["way"] == way]
            if not mine:
                continue
            classes = 100 if dataset == "cifar100" else 10
            honest = [r for r in mine if case_label(r) == "honest, end of a run" and not barely_trained(r)]
            weak = [r for r in mine if r["case"] == "honest" and barely_trained(r)]
            mid = [r for r in mine if case_label(r) == "honest, mid-run checkpoint" and not barely_trained(r)]
            worst = max((entropy_deficit(r) for r in honest if r["way"] == way), default=0.0)
            # Below 10 images per class the outputs checks do not run (MIN_SAMPLES_PER_CLASS).
            few = [r for r in mine if r["case"] != "honest" and way != "model" and int(r["n"]) < 10 * classes]
            broken = [r for r in mine if r["case"] != "honest" and not barely_trained(r) and r not in few]
            broken_mid = [r for r in broken if mid_run(r)]
            broken = [r for r in broken if not mid_run(r)]
            own = {model_key(r): entropy_deficit(r) for r in mine if r["case"] == "honest"}
            revealable = [r for r in broken if way == "model" or r["case"] in LABEL_CASES
                          or entropy_deficit(r) > max(worst, own[model_key(r)] + OWN_MARGIN)]
            hidden = [r for r in broken if r not in revealable]
            flagged = lambda group: f"{sum(r['verdict'] == 'problem' for r in group)}/{len(group)}"  # noqa: E731
            right = lambda group: f"{sum(r['outcome'] == 'ok' for r in group)}/{len(group)}"  # noqa: E731
            hidden_cases = sorted({r["case"] for r in hidden})
            lines.append(f"| {dataset} | {way} | {sum(r['outcome'] != 'ok' for r in honest)}/{len(honest)} | "
                         f"{flagged(weak)} | {flagged(mid)} | {right(revealable)} | "
                         f"{len(hidden)} ({', '.join(hidden_cases)}) | {right(broken_mid)} | {len(few)} |")
    return lines


def margin_table(rows: list[dict[str, Any]]) -> list[str]:
    """The collapse statistic, the entropy deficit, from the confusion matrix: honest cases against each mistake."""
    cm_rows = [r for r in rows if r["way"] == "cm" and r["pred_entropy"] is not None]
    lines = ["| dataset | case | cases | accuracy (range) | entropy deficit: min | median | max |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for dataset in sorted({r["dataset"] for r in cm_rows}):
        for case in CASE_LABELS[:2] + tuple(list(INPUT_CASES)[1:]):
            mine = [r for r in cm_rows if r["dataset"] == dataset and case_label(r) == case and not barely_trained(r)]
            if not mine:
                continue
            deficit = np.array([entropy_deficit(r) for r in mine])
            acc = [float(r["accuracy"]) for r in mine]
            lines.append(f"| {dataset} | {case} | {len(mine)} | {min(acc):.1%}-{max(acc):.1%} | "
                         f"{deficit.min():.3f} | {np.median(deficit):.3f} | {deficit.max():.3f} |")
    return lines


def speed_rows() -> list[dict[str, Any]]:
    """`diagnose` with all probes on 10,000 images, for airbench (untrained weights cost the same)."""
    from cifarlab.modelfile import build_classifier, make_meta

    rows = []
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10_000, 32, 32, 3)).astype(np.float32)  # raw pixels to a /255 model
    labels = rng.integers(0, 10, 10_000)
    for arch in ("airbench-small", "airbench"):
        stats = {"mean": [125.0] * 3, "std": [63.0] * 3, "min": [0.0] * 3, "max": [255.0] * 3}
        meta = make_meta(architecture=arch, arch_args={}, classes=[str(i) for i in range(10)], train_stats=stats)
        module = held_keras_style(build_classifier(meta), train_mode=False)
        start = time.perf_counter()
        logits_of(module, images)  # the baseline: one pass over the images, which diagnose needs anyway
        one_pass = time.perf_counter() - start
        diagnosis, seconds = timed_diagnose(model=module, images=images, labels=labels)
        probes = [p for p in diagnosis.probes if not p.get("skipped")]
        rows.append({"arch": arch, "images": len(images), "probes_run": len(probes),
                     "probe_images": sum(p["n_images"] for p in probes), "seconds": round(seconds, 1),
                     "one_pass_seconds": round(one_pass, 1)})
        print(f"diagnose --model ({arch}) on 10,000 images: {seconds:.1f} s ({one_pass:.1f} s for one pass "
              f"of the model over them), {len(probes)} probes run", flush=True)
    return rows


# ---- the README's worked example ----------------------------------------------------------------

def write_example(dataset, corpus: Path, out: Path) -> None:
    """The files behind the README's `cifarlab diagnose` example, from the CIFAR-100 corpus.

    cm.json: the question's situation, keras-cnn (the end of its schedule) held as the Keras
    script held it and fed the raw pixels of the whole test split, written as a script writes
    it (`json.dump(cm.tolist(), f)`). x.npy, y.npy: the test split divided by 255, what a
    script feeds airbench-small's model file, which divides by 255 itself.
    """
    from cifarlab.metrics import confusion_matrix, save_confusion_json

    folder = out / "example"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = get_split(dataset, "test")
    keras = load_model(model_path(corpus, "cifar100", "keras-cnn", HYP["epochs"]))
    raw = logits_of(held_keras_style(keras, train_mode=False), x.astype(np.float64)).argmax(1)
    save_confusion_json(confusion_matrix(y, raw, len(keras.classes)), folder / "cm.json")
    np.save(folder / "x.npy", (x / 255.0).astype(np.float32))
    np.save(folder / "y.npy", y)
    airbench = model_path(corpus, "cifar100", "airbench-small", HYP["epochs"])
    print(f"keras-cnn on raw pixels: accuracy {(raw == y).mean():.1%}\n"
          f"cifarlab diagnose --confusion {folder / 'cm.json'}\n"
          f"cifarlab diagnose --model {airbench} --images {folder / 'x.npy'} --labels {folder / 'y.npy'}")


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar10", help="CIFAR-10 (e.g. ../shared/data/cifar10-jpeg.tar.gz)")
    parser.add_argument("--cifar100", help="CIFAR-100 (e.g. ../shared/data/cifar100-rebuilt.tar.gz)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="where the trained models are kept and reused "
                             "(default: runs/diagnosis-corpus-<train images>)")
    parser.add_argument("--out", type=Path, default=Path("runs/diagnosis-calibration"))
    parser.add_argument("--stage", choices=("corpus", "speed", "tables", "example", "all"), default="all",
                        help="corpus: only train the models; speed: only time diagnose on 10,000 images; "
                             "tables: print the tables of --out/calibration.csv again; example: write the "
                             "README's diagnose example files (--cifar100) into --out/example")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the 10,000-image timing")
    add_hyp_flags(parser, HYP)  # every recipe value is a flag too
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    HYP.update({key: getattr(args, key) for key in HYP})
    # One folder per training-set size: the file names do not say which size trained them.
    args.corpus = args.corpus or Path(f"runs/diagnosis-corpus-{HYP['train_images']}")
    torch.manual_seed(HYP["seed"])
    paths = {"cifar10": args.cifar10, "cifar100": args.cifar100}
    datasets = {name: load_dataset(path, progress=False) for name, path in paths.items() if path}
    if not datasets and args.stage in ("corpus", "all"):
        sys.exit("give --cifar10 and/or --cifar100")
    print(f"CPU: {machine()}, {torch.get_num_threads()} torch threads; "
          f"command: python {shlex.join(sys.argv)}", flush=True)
    if args.stage == "tables":  # the tables again from calibration.csv, nothing re-run
        rows = read_csv(args.out / "calibration.csv")
        for row in rows:
            row["kind"] = row.get("kind") or "snapshot"
        print("\n".join([*verdict_table(rows), "", *outcome_table(rows), "", *margin_table(rows)]))
        return
    if args.stage == "example":
        if "cifar100" not in datasets:
            sys.exit("--stage example needs --cifar100")
        write_example(datasets["cifar100"], args.corpus, args.out)
        return
    if args.stage == "speed":  # nothing else running: the timing is only meaningful on an idle machine
        write_csv(args.out / "speed.csv", speed_rows())
        return
    build_corpus(datasets, args.corpus)
    if args.stage == "corpus":
        return
    speed = [] if args.skip_speed else speed_rows()
    if speed:
        write_csv(args.out / "speed.csv", speed)
    rows = run_cases(datasets, args.corpus, args.out)
    lines = [f"CPU: {machine()}; command: python {shlex.join(sys.argv)}", "",
             *verdict_table(rows), "", *outcome_table(rows), "", *margin_table(rows), "",
             "| model | images | probes run | images run through the model | seconds | one pass over the images, s |",
             "| --- | --- | --- | --- | --- | --- |",
             *[f"| {r['arch']} | {r['images']:,} | {r['probes_run']} | {r['probe_images']:,} | {r['seconds']} | "
               f"{r['one_pass_seconds']} |" for r in speed]]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
