"""Training: the whole dataset as one uint8 tensor on the device, batched augmentation, no DataLoader.

A run folder holds config.json, history.csv, checkpoint.safetensors (rewritten atomically
after every epoch; `resume` continues from it) and the final model.safetensors.

Determinism: each epoch's shuffling, augmentation and dropout draw from generators seeded
by (seed, epoch), so a run resumed at an epoch boundary is bit-identical on the CPU to one
that never stopped, without storing any RNG state.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cifarlab import __version__
from cifarlab.augment import random_translate_flip
from cifarlab.data import Dataset, get_split, load_dataset, split_info
from cifarlab.errors import CifarlabError, ModelFileError
from cifarlab.modelfile import (Classifier, atomic_save_safetensors, build_classifier,
                                input_statistics, make_meta, read_safetensors, save_model)
from cifarlab.models import get_model_spec

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
CHECKPOINT_KEY = "cifarlab-checkpoint"


@dataclass
class TrainConfig:
    """Everything that defines a run. None means "take the model's recipe default"."""

    data: str = "cifar100"
    model: str = "auto"  # "auto": airbench on CUDA, airbench-small on CPU
    arch_args: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None  # "sgd" or "adam"
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    schedule: str | None = None  # "onecycle", "cosine" or "constant"
    label_smoothing: float | None = None
    translate: int | None = None  # max shift in pixels
    flip: bool = True
    fill: str | None = None  # border fill for shifts: "reflect" or "edge"
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast: "auto" (on with CUDA), "on", "off"
    max_train_images: int | None = None  # a stratified subset, for quick experiments and tests

    def validate(self) -> None:
        """Refuse bad settings before any data is loaded or time is spent."""
        if self.model != "auto":
            get_model_spec(self.model)
        checks = [
            (self.epochs is None or self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.optimizer in (None, "sgd", "adam"), f"--optimizer must be sgd or adam, got {self.optimizer!r}"),
            (self.schedule in (None, "onecycle", "cosine", "constant"),
             f"--schedule must be onecycle, cosine or constant, got {self.schedule!r}"),
            (self.fill in (None, "reflect", "edge"), f"fill must be reflect or edge, got {self.fill!r}"),
            (self.translate is None or 0 <= self.translate < 16, f"--translate must be 0..15 pixels, got {self.translate}"),
            (0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.amp in ("auto", "on", "off"), f"--amp must be auto, on or off, got {self.amp!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CifarlabError(message)

    def resolved(self, device: torch.device) -> "TrainConfig":
        """A copy with the model chosen and every None filled from the model's recipe."""
        model = self.model
        if model == "auto":
            model = "airbench" if device.type == "cuda" else "airbench-small"
        recipe = {"momentum": 0.9, "nesterov": False, **get_model_spec(model).recipe}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in values.items():
            if value is None and key in recipe:
                values[key] = recipe[key]
        values["model"] = model
        return TrainConfig(**values)


@dataclass
class TrainResult:
    model: Classifier
    run_dir: Path
    model_path: Path
    history: list[dict[str, Any]]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CifarlabError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


def lr_at(progress: float, peak: float, schedule: str) -> float:
    """Learning rate at a fraction `progress` in [0, 1) of training."""
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # linear warm-up over 20% of training, then linear decay to 0
        warmup = 0.2
        if progress < warmup:
            return peak * (0.1 + 0.9 * progress / warmup)
        return peak * (1 - progress) / (1 - warmup)
    raise CifarlabError(f"unknown schedule {schedule!r}; expected onecycle, cosine or constant")


def make_optimizer(model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise CifarlabError(f"unknown optimizer {cfg.optimizer!r}; expected sgd or adam")


def subsample(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced subset of n images (all of them when n is None or too large)."""
    if n is None or n >= len(y):
        return x, y
    from cifarlab.data import split_indices
    _, keep = split_indices(y, val_fraction=n / len(y), seed=seed + 1)
    return x[keep], y[keep]


class Trainer:
    """Holds the state of one run; `fit` trains epochs and writes the run folder."""

    def __init__(self, cfg: TrainConfig, dataset: Dataset, run_dir: Path | None = None,
                 progress: bool = True):
        cfg.validate()
        self.device = pick_device(cfg.device)
        self.cfg = cfg.resolved(self.device)
        self.dataset = dataset
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(self.cfg, dataset)
        self.progress = progress
        self.amp = self.cfg.amp == "on" or (self.cfg.amp == "auto" and self.device.type == "cuda")

        train_x, train_y = get_split(dataset, "train", cfg.val_fraction, cfg.seed)
        train_x, train_y = subsample(train_x, train_y, cfg.max_train_images, cfg.seed)
        val_x, val_y = get_split(dataset, "val", cfg.val_fraction, cfg.seed)
        self.train_x, self.train_y = self._to_device(train_x, train_y)
        self.val_x, self.val_y = self._to_device(val_x, val_y)

        torch.manual_seed(self.cfg.seed)  # weight init
        self.model = build_classifier(self._model_meta(train_x)).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.history: list[dict[str, Any]] = []
        self.steps_per_epoch = math.ceil(len(self.train_y) / self.cfg.batch_size)

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.ascontiguousarray(x)).to(self.device),
                torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device))

    def _model_meta(self, train_x: np.ndarray) -> dict[str, Any]:
        ds, cfg = self.dataset, self.cfg
        return make_meta(
            architecture=cfg.model, arch_args=cfg.arch_args, classes=ds.classes,
            train_stats=input_statistics(train_x), image_size=tuple(train_x.shape[1:3]),
            coarse_classes=ds.coarse_classes, coarse_of_fine=ds.coarse_of_fine,
            dataset={"name": ds.name, "source": ds.source, "spec": dataset_spec(cfg.data)},
            split=split_info(ds, cfg.val_fraction, cfg.seed),
            recipe=asdict(cfg), cifarlab_version=__version__,
        )

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        if self.progress:
            tqdm.write(f"run folder: {self.run_dir}  ({self.cfg.model} on {self.device}, "
                       f"{len(self.train_y):,} training images, {len(self.val_y):,} validation)")
        for epoch in range(len(self.history) + 1, self.cfg.epochs + 1):
            row = self.train_epoch(epoch)
            row.update(self.evaluate_val())
            self.history.append(row)
            self.write_history()
            self.save_checkpoint()
            if self.progress:
                tqdm.write(format_row(row, self.cfg.epochs))
        return self.finish()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout
        order = torch.randperm(len(self.train_y), generator=gen).to(self.device)
        model.train()
        start, seen = time.perf_counter(), 0
        # Sums stay on the device: reading a number back every step would stall a GPU.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not self.progress, leave=False, unit="batch")
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            images = random_translate_flip(self.train_x[idx], cfg.translate, cfg.flip, cfg.fill, gen)
            labels = self.train_y[idx]
            lr = lr_at(((epoch - 1) * self.steps_per_epoch + step) / (cfg.epochs * self.steps_per_epoch),
                       cfg.lr, cfg.schedule)
            loss, batch_correct = self.train_step(images, labels, lr)
            seen += len(labels)
            loss_sum += loss.detach() * len(labels)
            correct += batch_correct
            if self.progress and (step % 10 == 0 or step == self.steps_per_epoch - 1):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        return {"epoch": epoch, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
                "lr": lr, "seconds": time.perf_counter() - start}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, (logits.argmax(1) == labels).sum()

    @torch.no_grad()
    def evaluate_val(self, batch_size: int = 1000) -> dict[str, Any]:
        if len(self.val_y) == 0:
            return {"val_loss": None, "val_acc": None}
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for i in range(0, len(self.val_y), batch_size):
            images, labels = self.val_x[i:i + batch_size], self.val_y[i:i + batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
        return {"val_loss": loss_sum / len(self.val_y), "val_acc": correct / len(self.val_y)}

    # ---- files ----------------------------------------------------------------------------
    def write_history(self) -> None:
        with open(self.run_dir / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: _csv_value(row[k]) for k in HISTORY_COLUMNS})

    def save_checkpoint(self) -> Path:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        opt_tensors, opt_rest = split_optimizer_state(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        state = {"config": asdict(self.cfg), "history": self.history, "optimizer": opt_rest}
        return atomic_save_safetensors(tensors, {CHECKPOINT_KEY: json.dumps(state)},
                                       self.run_dir / "checkpoint.safetensors")

    def load_checkpoint(self, path: Path) -> None:
        tensors, metadata = read_safetensors(path)
        if CHECKPOINT_KEY not in metadata:
            raise ModelFileError(f"{path} is not a cifarlab training checkpoint")
        state = json.loads(metadata[CHECKPOINT_KEY])
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(join_optimizer_state(tensors, state["optimizer"]))
        self.history = state["history"]

    def finish(self) -> TrainResult:
        last = self.history[-1] if self.history else {}
        self.model.meta["metrics"] = {k: last.get(k) for k in
                                      ("train_loss", "train_acc", "val_loss", "val_acc")}
        self.model.meta["metrics"].update(epochs=len(self.history),
                                          train_seconds=sum(r["seconds"] for r in self.history))
        self.model.meta["created"] = datetime.now().isoformat(timespec="seconds")
        model = self.model.to(memory_format=torch.contiguous_format).eval()
        path = save_model(model, self.run_dir / "model.safetensors")
        return TrainResult(model, self.run_dir, path, self.history)


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors tensors plus a JSON-able rest (no pickle)."""
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in rest["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def dataset_spec(data: str) -> str:
    """What to pass to load_dataset later: a name as given, a path made absolute."""
    return str(Path(data).resolve()) if Path(data).exists() else data


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def format_row(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.3f} "
            f"acc {row['train_acc']:.3f}")
    if row.get("val_acc") is not None:
        text += f"  val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}"
    return text + f"  lr {row['lr']:.3g}  {row['seconds']:.1f}s"


def default_run_dir(cfg: TrainConfig, dataset: Dataset, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{dataset.name}-{cfg.model}-{stamp}"


def train(cfg: TrainConfig, *, dataset: Dataset | None = None, run_dir: str | Path | None = None,
          progress: bool = True) -> TrainResult:
    """Train a model as configured; returns the trained Classifier and where it was written."""
    dataset = dataset if dataset is not None else load_dataset(cfg.data, progress=progress)
    return Trainer(cfg, dataset, run_dir, progress).fit()


def resume(run_dir: str | Path, *, dataset: Dataset | None = None, epochs: int | None = None,
           progress: bool = True) -> TrainResult:
    """Continue an interrupted run from its last checkpoint (optionally to more epochs)."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint.safetensors" if run_dir.is_dir() else run_dir
    run_dir = checkpoint.parent
    _, metadata = read_safetensors(checkpoint)
    if CHECKPOINT_KEY not in metadata:
        raise ModelFileError(f"{checkpoint} is not a cifarlab training checkpoint")
    cfg = TrainConfig(**json.loads(metadata[CHECKPOINT_KEY])["config"])
    if epochs is not None:
        cfg.epochs = epochs
    dataset = dataset if dataset is not None else load_dataset(cfg.data, progress=progress)
    trainer = Trainer(cfg, dataset, run_dir, progress)
    trainer.load_checkpoint(checkpoint)
    return trainer.fit()
