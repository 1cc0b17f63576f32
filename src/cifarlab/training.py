"""Training: the whole dataset as one uint8 tensor on the device, batched augmentation, no DataLoader.

A run folder holds config.json, history.csv, checkpoint.safetensors (rewritten atomically
after every epoch; `resume` continues from it) and the final model.safetensors.

Determinism: each epoch's shuffling, augmentation and dropout draw from generators seeded
by (seed, epoch), so a run resumed at an epoch boundary is bit-identical on the CPU to one
that never stopped, without storing any RNG state.

A time budget (`time_budget`, minutes) replaces `epochs`: the trainer times a few steps on
a copy of itself, then fixes the number of epochs, and so the learning-rate schedule; after
the first epoch it corrects that number once, at the pace the epoch really ran at (see
Trainer.replan). A resumed run keeps the final plan. With `ema`, validation and the final model
use an exponential moving average of the weights (WeightEMA).

Under torchrun (WORLD_SIZE > 1, see cifarlab.distributed) every process trains its shard of
each epoch's permutation through DistributedDataParallel; only rank 0 writes the run folder.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cifarlab import __version__, distributed
from cifarlab.augment import alternating_mirror, random_translate_flip
from cifarlab.choices import OPTIMIZERS, SCHEDULES
from cifarlab.config import MIN_MID_EPOCHS, Recipe, TrainConfig
from cifarlab.data import Dataset, get_split, load_dataset, split_indices, split_info
from cifarlab.errors import CifarlabError, InputError, ModelFileError, TrainingInterrupted
from cifarlab.fileio import atomic_write
from cifarlab.modelfile import (
    Classifier,
    atomic_save_safetensors,
    build_classifier,
    input_statistics,
    make_meta,
    read_safetensors,
    save_model,
)
from cifarlab.models import create_model
from cifarlab.optim import Muon
from cifarlab.text import plural

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
CHECKPOINT_KEY = "cifarlab-checkpoint"
# The EMA folds in the weights every EMA_EVERY steps (and at each epoch's end). Its horizon
# is 1/(1 - decay) steps, 100+ for any useful decay, and the weights barely move in 5 steps,
# so the average is practically the same as with per-step updates, while its memory
# traffic (two reads and a write of every weight) drops to a fifth: on a GPU, where an
# airbench step takes milliseconds, a full pass over the weights every step would show.
EMA_EVERY = 5
# airbench's lookahead and whitening-bias timing, as fractions of the run: the whitening
# layer's bias trains for the first 30% of epochs, the lookahead average starts after them.
WARMUP_FRACTION = 0.3
LOOKAHEAD_EVERY = 5
# Planned epochs are costed 5% above the measurement: the progress bar, the history file
# and timing noise are not in it.
PLAN_MARGIN = 1.05
# --fit-budget: the budget is filled with whole epochs, on fewer training images where all of
# them would leave part of an epoch unused or hold fewer than FIT_MIN_EPOCHS epochs. Measured
# by benchmarks/fit_budget.py on CIFAR-100 at a fixed number of image-epochs: with one epoch's
# worth (48,000), 1 epoch of 48,000 images gave 14.5%, 4 of 12,000 15.8%, 16 of 3,000 16.9%; with
# four epochs' worth, 4 of 48,000 gave 40.9%, 8 of 24,000 40.6%, 16 of 12,000 39.6%. So at
# least 4 epochs, and beyond that as many images as fit. Never fewer than
# FIT_MIN_IMAGES_PER_CLASS per class.
FIT_MIN_EPOCHS = 4
FIT_MIN_IMAGES_PER_CLASS = 20


@dataclass
class TrainResult:
    model: Classifier
    run_dir: Path
    model_path: Path
    history: list[dict[str, Any]]


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here: CUDA GPUs, and CPUs whose oneDNN has
    native bf16 (AVX512-BF16 or AMX: on this project's 2-core machines `airbench` trains at
    about 380 images/s in bf16 against 190-200 in float32)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CifarlabError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CifarlabError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return device




def lr_at(progress: float, peak: float, schedule: str) -> float:
    """Learning rate at a fraction `progress` in [0, 1) of training."""
    if schedule == "triangle":  # airbench: 0.2 x peak, up to the peak at 23%, down to 0.07 x peak
        rise = 0.23
        if progress < rise:
            return peak * (0.2 + 0.8 * progress / rise)
        return peak * (1 - 0.93 * (progress - rise) / (1 - rise))
    if schedule == "linear":  # airbench94_muon: from the peak straight down to 0
        return peak * (1 - progress)
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # linear warm-up over 20% of training, then linear decay to 0
        warmup = 0.2
        if progress < warmup:
            return peak * (0.1 + 0.9 * progress / warmup)
        return peak * (1 - progress) / (1 - warmup)
    raise CifarlabError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def plan_epochs(budget_s: float, epoch_s: float, fixed_s: float) -> int:
    """How many epochs of `epoch_s` seconds fit in `budget_s` after `fixed_s` of one-off costs."""
    epochs = math.floor((budget_s - fixed_s) / epoch_s)
    if epochs < 1:
        needed_min = math.ceil((fixed_s + epoch_s) / 6) / 10  # rounded up to 0.1 minute
        raise CifarlabError(
            f"a {budget_s / 60:g}-minute budget does not fit one epoch: an epoch takes {epoch_s:.1f} s "
            f"here, plus {fixed_s:.1f} s of one-off costs (measuring, the final test evaluation). "
            f"Use --time-budget {needed_min:g} or more, or fewer images (--max-train-images)."
        )
    return epochs


# --model auto with a time budget on a CPU: each candidate network's pace, from forward and
# backward passes over AUTO_PROBE_IMAGES random images (about 2 s in all on the bf16 CPU, 8 s
# on the slow kind; the plan is then measured on the real step), and the share of the budget
# that goes to epochs (the rest: measuring, validation, the final evaluation; 0.8-0.9 in the
# README's 10-minute runs, 0.65-0.75 on the slow CPU kind).
AUTO_PROBE_IMAGES = 500
AUTO_TRAIN_SHARE = 0.8


class BudgetEpochs:
    """How many epochs of a model a time budget holds here (config.auto_model's measure)."""

    def __init__(self, device: torch.device, amp: bool, num_classes: int, image_size: tuple[int, int],
                 train_images: int, budget_s: float):
        self.device, self.amp, self.num_classes, self.image_size = device, amp, num_classes, image_size
        self.train_images, self.budget_s = train_images, budget_s
        self.measured: dict[str, float] = {}

    def __call__(self, model: str) -> float:
        net = create_model(model, self.num_classes).to(self.device)
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        images = torch.randn(AUTO_PROBE_IMAGES, 3, *self.image_size, device=self.device)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(self.num_classes, (AUTO_PROBE_IMAGES,), device=self.device)

        def step() -> None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(net(images).float(), labels)
            loss.backward()

        step()  # warm-up: first-call allocations
        image_s = timed(self.device, step) / AUTO_PROBE_IMAGES
        self.measured[model] = AUTO_TRAIN_SHARE * self.budget_s / (image_s * self.train_images)
        return self.measured[model]

    def describe(self) -> str:
        return ", ".join(f"{epochs:.1f} epochs of {model}" for model, epochs in self.measured.items())


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Wall seconds of fn(), waiting for queued GPU work on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class Lookahead:
    """airbench's lookahead: every few steps, average the weights and reset them to the average.

    The average's decay grows from 0 to 0.95^5 over training (cubic in progress), so it
    barely holds the network back early and smooths strongly at the end, where it works
    like a weight average without a second model for evaluation. BatchNorm running
    statistics are averaged with the weights. At every epoch's end the live weights are the
    average, so a run resumed from a checkpoint restarts it exactly from the loaded weights.
    """

    def __init__(self, model: torch.nn.Module):
        state = model.state_dict()
        self._live = [v for v in state.values() if v.is_floating_point()]
        self._average = [v.detach().clone() for v in self._live]

    @torch.no_grad()
    def update(self, progress: float) -> None:
        decay = 0.95 ** LOOKAHEAD_EVERY * progress ** 3
        torch._foreach_lerp_(self._average, self._live, 1 - decay)
        self.reset_live()

    @torch.no_grad()
    def reset_live(self) -> None:
        torch._foreach_copy_(self._live, self._average)


class WeightEMA:
    """A debiased exponential moving average of a model's weights, held in a second model.

    BatchNorm running statistics are averaged like the weights (as timm's ModelEmaV2 does),
    not copied: the live statistics describe the live weights' activations, while averages
    over the same horizon as the weights approximately describe the averaged weights'.
    Recomputing them with a pass over the training data would be exact but costs an epoch's
    forward passes. Integer buffers (BatchNorm's batch counter) are copied.
    """

    def __init__(self, model: Classifier, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        # state_dict tensors share storage with the parameters, so these lists stay live.
        live, average = model.state_dict(), self.model.state_dict()
        floats = [k for k, v in live.items() if v.is_floating_point()]
        ints = [k for k in live if k not in floats]
        self._live, self._average = [live[k] for k in floats], [average[k] for k in floats]
        self._live_ints, self._average_ints = [live[k] for k in ints], [average[k] for k in ints]

    @torch.no_grad()
    def update(self, steps: int, total_steps: int) -> None:
        """Fold in the live weights after `steps` more steps, `total_steps` in all.

        The weight (1 - d^steps) / (1 - d^total) makes the result the decay-weighted mean of
        the weights seen so far, without the initial weights' bias (the first update copies);
        it depends only on the step count, so a resumed run averages exactly the same way.
        """
        weight = (1 - self.decay ** steps) / (1 - self.decay ** total_steps)
        torch._foreach_lerp_(self._average, self._live, weight)
        if self._live_ints:  # _foreach ops refuse empty lists
            torch._foreach_copy_(self._average_ints, self._live_ints)


def make_optimizer(model: Classifier, cfg: Recipe) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "muon":
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    raise CifarlabError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")


def parameter_groups(model: torch.nn.Module, cfg: Recipe) -> list[dict[str, Any]]:
    """Trainable parameters in groups: BatchNorm biases, a whitening layer's bias, the rest.

    The BatchNorm biases' learning rate is scaled up by bias_lr_scale and their weight decay
    down by the same factor, so each step shrinks them by the same fraction as the other
    weights (airbench trains them 64x faster: a BN bias is one number per channel that the
    scale-free convolutions cannot take over). `lr_scale` multiplies the scheduled lr; the
    whitening bias's is set to 0 after the warm-up epochs (see Trainer.train_epoch).
    Frozen parameters (the whitening filters, BatchNorm scales) are left out. With the muon
    optimizer the conv filters (4-D) form a group of their own, orthogonalized (see optim.py),
    at filter_lr and filter_momentum; their norm is fixed, so they take no weight decay.
    """
    scale = cfg.bias_lr_scale
    biases = [m.bias for m in model.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.bias is not None]
    whiten = getattr(getattr(model, "net", model), "whiten", None)
    # The whitening bias has a group of its own: train_epoch stops it after the warm-up.
    whiten_bias = [whiten.bias] if whiten is not None and whiten.bias is not None else []
    special = {id(p) for p in biases + whiten_bias}
    others = [p for p in model.parameters() if id(p) not in special]
    filters = [p for p in others if p.ndim == 4] if cfg.optimizer == "muon" else []
    others = [p for p in others if p.ndim != 4] if filters else others
    groups = [
        {"params": [p for p in filters if p.requires_grad], "lr_scale": (cfg.filter_lr or cfg.lr) / cfg.lr,
         "momentum": cfg.filter_momentum if cfg.filter_momentum is not None else cfg.momentum,
         "weight_decay": 0.0, "orthogonalize": True},
        {"params": [p for p in others if p.requires_grad], "lr_scale": 1.0,
         "weight_decay": cfg.weight_decay},
        {"params": [p for p in biases if p.requires_grad], "lr_scale": scale,
         "weight_decay": cfg.weight_decay / scale},
        {"params": whiten_bias, "lr_scale": 1.0, "weight_decay": cfg.weight_decay, "whiten_bias": True},
    ]
    return [g for g in groups if g["params"]]


def subsample(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced subset of n images (all of them when n is None or too large)."""
    if n is None or n >= len(y):
        return x, y
    _, keep = split_indices(y, val_fraction=n / len(y), seed=seed + 1)
    return x[keep], y[keep]


class Trainer:
    """Holds the state of one run; `fit` trains epochs and writes the run folder."""

    def __init__(self, cfg: TrainConfig, dataset: Dataset, run_dir: Path | None = None,
                 progress: bool = True):
        self.started = time.perf_counter()  # a time budget counts from here
        cfg.validate()
        # Under torchrun (WORLD_SIZE > 1): join the process group, cuda:LOCAL_RANK on GPUs.
        self.device, self.rank, self.world_size = distributed.setup(pick_device(cfg.device))
        self.progress = progress and distributed.is_main()
        self.amp = cfg.amp == "on" or (cfg.amp == "auto" and bf16_is_fast(self.device))
        budget_epochs = self.budget_epochs(cfg, dataset)
        self.cfg = cfg.resolved(self.device, len(dataset.classes), budget_epochs)
        if budget_epochs is not None and self.progress:
            tqdm.write(f"--model auto: {self.cfg.model} (this budget holds about {budget_epochs.describe()} "
                       f"here; airbench-mid needs {MIN_MID_EPOCHS:g})")
        self.dataset = dataset
        # Rank 0's default run folder on every rank (the timestamps could differ).
        self.run_dir = Path(run_dir) if run_dir else distributed.broadcast_object(default_run_dir(self.cfg, dataset))

        train_x = self.select_training_images()
        val_x, val_y = get_split(dataset, "val", cfg.val_fraction, cfg.seed)
        self.val_x, self.val_y = self._to_device(val_x, val_y)

        torch.manual_seed(self.cfg.seed)  # weight init
        self.model = build_classifier(self._model_meta(train_x)).to(self.device)
        self.init_whitening()
        # Preprocess hands the network NHWC-ordered memory; convolutions in that order are
        # faster on GPUs and with oneDNN on CPUs, and no copy is made.
        self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.lookahead: Lookahead | None = None  # made when it starts (see train_epoch)
        self.ema = WeightEMA(self.model, self.cfg.ema) if self.cfg.ema is not None else None
        # Training forward/backward go through train_model: with several processes, a
        # DistributedDataParallel wrapper (gradients averaged across ranks; BatchNorm buffers
        # broadcast from rank 0, broadcast_buffers=True); else the model itself. self.model
        # stays the plain Classifier for evaluation, EMA and saving.
        self.train_model: torch.nn.Module = self.model
        if self.world_size > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            self.train_model = cast(torch.nn.Module, torch.compile(self.train_model))
        self.history: list[dict[str, Any]] = []
        # Batch size per process: the configured (global) batch split over the ranks, so the
        # optimizer sees the same batch size as a single-process run and the recipe's lr fits.
        self.batch_size = self.cfg.batch_size // self.world_size
        if self.batch_size < 1:
            raise CifarlabError(f"--batch-size {self.cfg.batch_size} is smaller than the "
                                f"{self.world_size} processes; it is the global batch, split over them")
        self.steps_per_epoch = self.count_steps()
        if self.cfg.epochs is None:  # a time budget without a plan yet
            # Rank 0 measures (on its own, without the gradient exchange) and every rank
            # follows its plan, so all of them run the same epochs and learning rates.
            planned = distributed.broadcast_object(self.plan_schedule() if distributed.is_main() else None)
            fitted = planned.max_train_images != self.cfg.max_train_images
            self.cfg = planned
            if fitted:  # --fit-budget chose a smaller training set
                self.select_training_images()
                self.steps_per_epoch = self.count_steps()

    def budget_epochs(self, cfg: TrainConfig, dataset: Dataset) -> BudgetEpochs | None:
        """The measure by which `--model auto` picks a network for a time budget on one CPU
        process (see config.auto_model); None where the choice does not depend on it."""
        if cfg.model != "auto" or cfg.time_budget is None or self.device.type != "cpu" \
                or self.world_size > 1 or len(dataset.classes) <= 10:
            return None
        images = round(len(dataset.train_y) * (1 - cfg.val_fraction))
        images = min(images, cfg.max_train_images or images)
        size = (dataset.train_x.shape[1], dataset.train_x.shape[2])
        return BudgetEpochs(self.device, self.amp, len(dataset.classes), size, images, 60 * cfg.time_budget)

    @property
    def budget_minutes(self) -> float:
        if self.cfg.time_budget is None:
            raise RuntimeError("planning needs a time budget")
        return self.cfg.time_budget

    def count_steps(self) -> int:
        """Optimizer steps in an epoch of this process's shard."""
        shard_size = len(distributed.shard(torch.arange(len(self.train_y)), self.rank, self.world_size))
        return math.ceil(shard_size / self.batch_size)

    def select_training_images(self) -> np.ndarray:
        """Put the training split (a stratified subset of max_train_images) on the device.

        Returns it as the host array, for the model's input statistics.
        """
        cfg = self.cfg
        num_classes = len(self.dataset.classes)
        if cfg.max_train_images is not None and cfg.max_train_images < num_classes:
            raise CifarlabError(f"--max-train-images {cfg.max_train_images} is fewer than one image per class "
                                f"({num_classes} classes); give at least {num_classes}, better 10 per class or more")
        train_x, train_y = get_split(self.dataset, "train", cfg.val_fraction, cfg.seed)
        train_x, train_y = subsample(train_x, train_y, cfg.max_train_images, cfg.seed)
        self.train_x, self.train_y = self._to_device(train_x, train_y)
        # Alternating flips: epoch 1 mirrors a random half of the images, each epoch after
        # mirrors the other half (indexed by position in the training split).
        self.first_mirror = torch.rand(len(self.train_y), generator=torch.Generator().manual_seed(
            cfg.seed + 7)) < 0.5
        return train_x

    @torch.no_grad()
    def init_whitening(self, sample_size: int = 5000) -> None:
        """Set a whitening first layer (models that have one) from a random training sample."""
        init_whitening = getattr(self.model.net, "init_whitening", None)
        if init_whitening is None:
            return
        # A random sample: the split keeps the dataset's order, which may be sorted by class.
        pick = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(self.cfg.seed))
        init_whitening(self.model.preprocess(self.train_x[pick[:sample_size].to(self.device)]))

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # A copy: the split may be a read-only view of the memory-mapped cache, and training
        # should read RAM, not page the cache in from disk during the first epoch.
        return (torch.from_numpy(np.array(x, copy=True, order="C")).to(self.device),
                torch.from_numpy(np.array(y, dtype=np.int64)).to(self.device))

    def _model_meta(self, train_x: np.ndarray) -> dict[str, Any]:
        ds, cfg = self.dataset, self.cfg
        return make_meta(
            architecture=cfg.model, arch_args=cfg.arch_args, classes=ds.classes,
            train_stats=input_statistics(train_x), image_size=tuple(train_x.shape[1:3]),
            coarse_classes=ds.coarse_classes, coarse_of_fine=ds.coarse_of_fine,
            dataset={"name": ds.name, "source": ds.source, "spec": dataset_spec(cfg.data)},
            split=split_info(ds, cfg.val_fraction, cfg.seed), cifarlab_version=__version__,
        )

    @property
    def eval_model(self) -> Classifier:
        """The weights that are validated and saved: the average with EMA, else the live ones."""
        return self.ema.model if self.ema is not None else self.model

    # ---- time budget ----------------------------------------------------------------------
    def plan_schedule(self) -> Recipe:
        """The config with `epochs` chosen to fit the time budget, from measured step costs."""
        step_s, image_s, checkpoint_s, first_step_s, test_image_s = self.measure()
        epoch_s = PLAN_MARGIN * (self.steps_per_epoch * step_s + len(self.val_y) * image_s + checkpoint_s)
        # Time spent so far, plus room for `cifarlab evaluate --tta flip+translate` on the test
        # split afterwards (six forward passes per image, through Classifier.predict_logits,
        # which runs in float32: up to 3x slower than the bf16 validation pass on a CPU).
        final_eval_s = 6 * len(self.dataset.test_y) * test_image_s
        fixed_s = time.perf_counter() - self.started + final_eval_s
        if self.cfg.compile:  # the run's own model compiles again on its first step
            fixed_s += first_step_s
        budget_s = 60 * self.budget_minutes
        images = self.fitted_images(budget_s - fixed_s, step_s, epoch_s) if self.cfg.fit_budget else None
        if images is not None:
            steps = math.ceil(images / self.world_size / self.batch_size)
            epoch_s = PLAN_MARGIN * (steps * step_s + len(self.val_y) * image_s + checkpoint_s)
        epochs = plan_epochs(budget_s, epoch_s, fixed_s)
        if self.progress:
            fitted = (f", on {images:,} of the {len(self.train_y):,} training images (--fit-budget: "
                      "whole epochs of them fill the budget)") if images else ""
            tqdm.write(f"planned {plural(epochs, 'epoch')}: {epoch_s:.1f} s/epoch measured, "
                       f"{self.cfg.time_budget:g} min budget{fitted}")
        plan = {"epoch_seconds": round(epoch_s, 3), "fixed_seconds": round(fixed_s, 3),
                "final_eval_seconds": round(final_eval_s, 3), "checkpoint_seconds": round(checkpoint_s, 3)}
        if images is not None:
            plan["fitted_train_images"] = images
            return replace(self.cfg, epochs=epochs, plan=plan, max_train_images=images)
        return replace(self.cfg, epochs=epochs, plan=plan)

    def fitted_images(self, available_s: float, step_s: float, epoch_s: float) -> int | None:
        """The training images that fill `available_s` with whole epochs, at least FIT_MIN_EPOCHS
        of them (all images would leave part of an epoch's time unused, or too few epochs);
        None when whole epochs of all of them fill it already. Refuses when not even
        FIT_MIN_IMAGES_PER_CLASS fit."""
        epochs = max(FIT_MIN_EPOCHS, math.ceil(available_s / epoch_s))
        if epochs * epoch_s <= available_s:
            return None
        per_epoch_fixed_s = epoch_s - PLAN_MARGIN * self.steps_per_epoch * step_s  # validation, checkpoint
        train_s = (available_s / epochs - per_epoch_fixed_s) / PLAN_MARGIN
        # Less half an image per class: the class-balanced subset rounds each class's share.
        steps = int(max(train_s, 0.0) / step_s)
        images = steps * self.batch_size * self.world_size - math.ceil(len(self.dataset.classes) / 2)
        least = FIT_MIN_IMAGES_PER_CLASS * len(self.dataset.classes)
        if images < least:
            raise CifarlabError(
                f"a {self.cfg.time_budget:g}-minute budget does not fit {FIT_MIN_EPOCHS} epochs of even "
                f"{least:,} training images ({FIT_MIN_IMAGES_PER_CLASS} per class) here: a step of "
                f"{self.batch_size} images takes {step_s:.2f} s and each epoch's validation and "
                f"checkpoint {per_epoch_fixed_s:.1f} s. Give a larger --time-budget.")
        return min(images, len(self.train_y))

    def replan(self, first_epoch_s: float) -> Recipe:
        """The plan corrected after the first epoch, at the pace that epoch really ran at
        (`first_epoch_s`: its training and validation, plus the measured checkpoint cost).

        A few probe steps misjudge an epoch by up to ~10% on a CPU (allocator and cache
        warm-up, a neighbour's load; 1-9% in the README's runs), which with the plan's margin
        is one or two epochs of a 10-minute budget: lost time, or an overrun. The first
        epoch's learning rates followed the first plan; the schedule then continues as a
        fraction of the corrected total. The checkpoint
        written after this epoch records the final plan, so a resumed run never re-plans.
        """
        plan = self.cfg.plan or {}
        fixed_s = time.perf_counter() - self.started + plan.get("final_eval_seconds", 0.0)
        try:
            more = plan_epochs(60 * self.budget_minutes, PLAN_MARGIN * first_epoch_s, fixed_s)
        except CifarlabError:  # nothing more fits: stop after this epoch
            more = 0
        epochs = 1 + more
        if self.progress and epochs != self.cfg.epochs:
            tqdm.write(f"re-planned: {plural(epochs, 'epoch')} instead of {self.cfg.epochs} "
                       f"(the first took {first_epoch_s:.1f} s)")
        plan = {**plan, "first_epoch_seconds": round(first_epoch_s, 3), "first_plan_epochs": self.cfg.planned_epochs}
        return replace(self.cfg, epochs=epochs, plan=plan)

    def measure(self) -> tuple[float, float, float, float, float]:
        """Seconds per training step (EMA included), per validated image, per checkpoint, for
        the first step (which includes torch.compile's compilation), and per image of the
        final evaluation (`cifarlab evaluate`'s pass, Classifier.predict_logits).

        Timed on a copy with its own model, optimizer and EMA, so the run itself starts from
        untouched state; the global RNG the copy draws from is reseeded by every epoch.
        """
        cfg = self.cfg
        probe = copy.copy(self)  # shares the data tensors
        probe.model = copy.deepcopy(self.model)
        # No DDP: a collective call on rank 0 alone would hang.
        probe.train_model = cast(torch.nn.Module, torch.compile(probe.model)) if cfg.compile else probe.model
        probe.optimizer = make_optimizer(probe.model, cfg)
        probe.ema = WeightEMA(probe.model, cfg.ema) if cfg.ema is not None else None
        probe.val_x, probe.val_y = self.train_x[:1000], self.train_y[:1000]  # the val split may be empty
        images, labels = self.train_x[:self.batch_size], self.train_y[:self.batch_size]
        gen = torch.Generator().manual_seed(cfg.seed)

        def steps(n: int) -> None:
            for _ in range(n):
                probe.train_step(random_translate_flip(images, cfg.translate, cfg.flip, cfg.fill, gen),
                                 labels, cfg.lr)
            if probe.ema is not None:
                probe.ema.update(n, n)

        probe.model.train()
        # Warm-up: lazy initialisation, first-call allocations and compiling are not per-step costs.
        first_step_s = timed(self.device, lambda: steps(1))
        step_s = timed(self.device, lambda: steps(EMA_EVERY)) / EMA_EVERY
        probe.evaluate_val()  # warm-up of the eval-mode kernels
        image_s = timed(self.device, probe.evaluate_val) / len(probe.val_y)
        test_image_s = timed(self.device, lambda: probe.model.predict_logits(probe.val_x)) / len(probe.val_y)
        with tempfile.TemporaryDirectory() as tmp:  # the run folder is only made by fit()
            probe.run_dir = Path(tmp)
            checkpoint_s = timed(self.device, probe.save_checkpoint)
        return step_s, image_s, checkpoint_s, first_step_s, test_image_s

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        # Every rank trains and validates; only rank 0 writes files (and prints).
        main = distributed.is_main()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.write_config()
        if self.progress:
            tqdm.write(f"run folder: {self.run_dir}  ({self.cfg.model} on {self.device}, "
                       f"{len(self.train_y):,} training images, {len(self.val_y):,} validation)")
        try:
            return self._fit_epochs()
        except KeyboardInterrupt:
            raise TrainingInterrupted(self.run_dir, (self.run_dir / "checkpoint.safetensors").is_file()) from None

    def _fit_epochs(self) -> TrainResult:
        main = distributed.is_main()
        epoch = len(self.history)
        while epoch < self.cfg.planned_epochs:
            epoch += 1
            epoch_start = time.perf_counter()
            row = self.train_epoch(epoch)
            self.check_diverged(epoch, row)  # before anything of this epoch is written
            row.update(self.evaluate_val())
            self.history.append(row)
            if epoch == 1 and self.cfg.plan is not None and "first_epoch_seconds" not in self.cfg.plan:
                # Before the checkpoint, so that it holds the final plan for a resume; every
                # rank follows rank 0's correction (as with the first plan).
                seconds = time.perf_counter() - epoch_start + self.cfg.plan.get("checkpoint_seconds", 0.0)
                self.cfg = distributed.broadcast_object(self.replan(seconds) if main else None)
                if main:
                    self.write_config()
            if main:
                self.write_history()
                self.save_checkpoint()
            if self.progress:
                tqdm.write(format_row(row, self.cfg.planned_epochs))
        result = self.finish()
        distributed.barrier()  # no rank returns before rank 0 has written the model
        return result

    def check_diverged(self, epoch: int, row: dict[str, Any]) -> None:
        """Stop a run whose loss or weights went non-finite; the last checkpoint stays as it was."""
        weights_finite = all(bool(torch.isfinite(p).all()) for p in self.eval_model.parameters())
        if math.isfinite(row["train_loss"]) and weights_finite:
            return
        what = "the weights" if math.isfinite(row["train_loss"]) else f"the loss ({row['train_loss']})"
        kept = (f"The checkpoint of epoch {epoch - 1} in {self.run_dir} is kept as it was"
                if epoch > 1 else "Nothing was saved")
        raise CifarlabError(f"training diverged in epoch {epoch}: {what} became NaN or infinite. {kept}. "
                            "Train again with a lower --lr.")

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout
        order = torch.randperm(len(self.train_y), generator=gen)
        if self.world_size > 1:
            # The same permutation on every rank, each taking its shard of it; augmentation
            # and dropout then draw from a seed of the rank's own.
            order = distributed.shard(order, self.rank, self.world_size)
            gen.manual_seed(distributed.rank_seed(cfg.seed * 1_000_003 + epoch, self.rank))
            torch.manual_seed(distributed.rank_seed(cfg.seed * 1_000_003 + epoch, self.rank))
        order = order.to(self.device)
        mirror = alternating_mirror(self.first_mirror, epoch).to(self.device) if cfg.alternate_flip and cfg.flip else None
        ema, last_step, steps_before = self.ema, self.steps_per_epoch - 1, (epoch - 1) * self.steps_per_epoch
        total_steps = cfg.planned_epochs * self.steps_per_epoch
        warmup_epochs = round(WARMUP_FRACTION * cfg.planned_epochs)
        for group in self.optimizer.param_groups:
            if group.get("whiten_bias"):
                group["lr_scale"] = 1.0 if epoch <= warmup_epochs else 0.0  # lr 0: frozen
        lookahead_on = cfg.lookahead and epoch > warmup_epochs
        # The lookahead's first step after the warm-up makes it; a run resumed after that
        # step remakes it from the loaded weights, which are the average at an epoch's end.
        first_step = (warmup_epochs * self.steps_per_epoch // LOOKAHEAD_EVERY + 1) * LOOKAHEAD_EVERY
        if lookahead_on and self.lookahead is None and steps_before >= first_step:
            self.lookahead = Lookahead(self.model)
        model.train()
        start, seen = time.perf_counter(), 0
        # Sums stay on the device: reading a number back every step would stall a GPU.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        batch_size = self.batch_size
        refresh = 1 if self.device.type == "cpu" else 10
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not self.progress, leave=False, unit="batch")
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            images = random_translate_flip(self.train_x[idx], cfg.translate, cfg.flip, cfg.fill, gen,
                                           mirror=None if mirror is None else mirror[idx])
            labels = self.train_y[idx]
            lr = lr_at((steps_before + step) / total_steps, cfg.lr, cfg.schedule)
            loss, batch_correct = self.train_step(images, labels, lr)
            if lookahead_on:  # before the EMA, which must see the weights the epoch ends with
                self.lookahead_step(steps_before + step + 1, total_steps, end_of_epoch=step == last_step)
            # Updating at each epoch's end too keeps the checkpointed EMA current and resumable.
            if ema is not None and ((step + 1) % EMA_EVERY == 0 or step == last_step):
                ema.update(step % EMA_EVERY + 1, steps_before + step + 1)
            seen += len(labels)
            loss_sum += loss.detach() * len(labels)
            correct += batch_correct
            # Every step on a CPU, where an epoch may be 3-8 slow steps; every 10th on a GPU,
            # where reading the sums back each step would stall it.
            if self.progress and (step % refresh == 0 or step == self.steps_per_epoch - 1):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        if self.world_size > 1:  # the history holds all ranks' images: once an epoch, cheap
            totals = torch.tensor([loss_sum.item(), correct.item(), seen], dtype=torch.float64, device=self.device)
            distributed.all_reduce_sum([totals])
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
        return {"epoch": epoch, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
                "lr": lr, "seconds": time.perf_counter() - start}

    def lookahead_step(self, steps_done: int, total_steps: int, end_of_epoch: bool) -> None:
        if steps_done % LOOKAHEAD_EVERY == 0:
            if self.lookahead is None:
                self.lookahead = Lookahead(self.model)
            else:
                self.lookahead.update(steps_done / total_steps)
        elif end_of_epoch and self.lookahead is not None:
            self.lookahead.reset_live()  # end the epoch on the average (and resume from it)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.train_model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, (logits.argmax(1) == labels).sum()

    @torch.no_grad()
    def evaluate_val(self, batch_size: int = 1000) -> dict[str, Any]:
        if len(self.val_y) == 0:
            return {"val_loss": None, "val_acc": None}
        model = self.eval_model.eval()
        loss_sum, correct = 0.0, 0
        for i in range(0, len(self.val_y), batch_size):
            images, labels = self.val_x[i:i + batch_size], self.val_y[i:i + batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
        return {"val_loss": loss_sum / len(self.val_y), "val_acc": correct / len(self.val_y)}

    # ---- files ----------------------------------------------------------------------------
    def write_config(self) -> None:
        atomic_write(self.run_dir / "config.json", (json.dumps(asdict(self.cfg), indent=2) + "\n").encode())

    def write_history(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: _csv_value(row[k]) for k in HISTORY_COLUMNS})
        atomic_write(self.run_dir / "history.csv", text.getvalue().encode(), what="training history")

    def save_checkpoint(self) -> Path:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        opt_tensors, opt_rest = split_optimizer_state(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        if self.ema is not None:
            tensors.update({f"ema.{k}": v.detach().cpu().contiguous()
                            for k, v in self.ema.model.state_dict().items()})
        state = {"config": asdict(self.cfg), "history": self.history, "optimizer": opt_rest}
        return atomic_save_safetensors(tensors, {CHECKPOINT_KEY: json.dumps(state)},
                                       self.run_dir / "checkpoint.safetensors")

    def load_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore weights, optimizer, EMA and history from read_checkpoint's output."""
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(join_optimizer_state(tensors, state["optimizer"]))
        if self.ema is not None:
            self.ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.history = state["history"]

    def finish(self) -> TrainResult:
        last = self.history[-1] if self.history else {}
        model = self.eval_model.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
        meta = model.meta
        meta["recipe"] = asdict(self.cfg)  # here, not at init: a time budget's plan comes later
        meta["metrics"] = {k: last.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
        meta["metrics"].update(epochs=len(self.history), train_seconds=sum(r["seconds"] for r in self.history),
                               train_images=len(self.train_y))
        meta["created"] = datetime.now().isoformat(timespec="seconds")
        path = self.run_dir / "model.safetensors"
        if distributed.is_main():  # the other ranks return the same model, unsaved
            path = save_model(model, path)
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


def default_run_dir(cfg: TrainConfig | Recipe, dataset: Dataset, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{dataset.name}-{cfg.model}-{stamp}"


def load_run_dataset(cfg: TrainConfig, progress: bool = True) -> Dataset:
    """The dataset a run trains on, imported with the run's --resize/--bad-images options."""
    return load_dataset(cfg.data, progress=progress, resize=cfg.resize, bad_images=cfg.bad_images)


# A folder holding any of these holds a run.
RUN_FILES = ("config.json", "history.csv", "checkpoint.safetensors", "model.safetensors")


def claim_run_folder(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a folder that holds a run, unless `overwrite`: then the old run's
    files go first, with the evaluation folders made from its model (eval-*), so that nothing
    of it is left beside the new model. Nothing else in the folder is touched."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise InputError(f"{run_dir} holds a run already ({', '.join(found)}): continue it with "
                         f"`cifarlab train --resume {run_dir}`, train into another folder (--out), or pass "
                         "--overwrite to replace it (its eval-* folders go with it)")
    # Every torchrun rank may get here: a file another rank removed first is no error.
    for name in found:
        (run_dir / name).unlink(missing_ok=True)
    for folder in run_dir.glob("eval-*"):
        if (folder / "metrics.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)


def train(cfg: TrainConfig, *, dataset: Dataset | None = None, run_dir: str | Path | None = None,
          progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train a model as configured; returns the trained Classifier and where it was written.
    A `run_dir` that holds a run is refused unless `overwrite` (see claim_run_folder)."""
    if run_dir is not None:
        claim_run_folder(Path(run_dir), overwrite)
    dataset = dataset if dataset is not None else load_run_dataset(cfg, progress)
    try:
        return Trainer(cfg, dataset, Path(run_dir) if run_dir else None, progress).fit()
    finally:
        distributed.teardown()  # a no-op without torchrun


def resume(run_dir: str | Path, *, dataset: Dataset | None = None, epochs: int | None = None,
           progress: bool = True) -> TrainResult:
    """Continue an interrupted run from its last checkpoint (optionally to more epochs)."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint.safetensors" if run_dir.is_dir() else run_dir
    if run_dir.is_dir() and not checkpoint.exists():
        raise CifarlabError(f"{run_dir} has no checkpoint yet: the run stopped before its first epoch "
                            "ended, so there is nothing to resume. Start it again with `cifarlab train`.")
    tensors, state = read_checkpoint(checkpoint)
    try:
        cfg = TrainConfig(**state["config"])
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f"{checkpoint}: its recorded training config is not one this cifarlab "
                             f"version can read ({exc}); start the run again") from None
    if epochs is not None:
        cfg.epochs = epochs
    dataset = dataset if dataset is not None else load_run_dataset(cfg, progress)
    try:  # with torchrun, every rank reads the checkpoint (read-only)
        trainer = Trainer(cfg, dataset, checkpoint.parent, progress)
        trainer.load_checkpoint(tensors, state)
        return trainer.fit()
    finally:
        distributed.teardown()  # a no-op without torchrun


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON state (config, history, optimizer) of a checkpoint file."""
    tensors, metadata = read_safetensors(path)
    if CHECKPOINT_KEY not in metadata:
        raise ModelFileError(f"{path} is not a cifarlab training checkpoint")
    return tensors, json.loads(metadata[CHECKPOINT_KEY])
