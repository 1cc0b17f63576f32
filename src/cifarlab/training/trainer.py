"""The training loop: the whole dataset as one uint8 tensor on the device, batched augmentation, no DataLoader.

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
import json
import math
import tempfile
import time
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
from cifarlab.config import MIN_MID_EPOCHS, SHORT_RUN_EPOCHS, Recipe, TrainConfig
from cifarlab.data import Dataset, get_split, load_dataset, split_indices, split_info
from cifarlab.errors import CifarlabError, ModelFileError, TrainingInterrupted
from cifarlab.fileio import atomic_write
from cifarlab.history import history_csv
from cifarlab.modelfile import (
    Classifier,
    atomic_save_safetensors,
    build_classifier,
    input_statistics,
    make_meta,
    save_model,
)
from cifarlab.modelmeta import ModelMeta
from cifarlab.text import plural
from cifarlab.training.averaging import EMA_EVERY, LOOKAHEAD_EVERY, WARMUP_FRACTION, Lookahead, WeightEMA
from cifarlab.training.device import bf16_is_fast, pick_device, timed
from cifarlab.training.optimizer import lr_at, make_optimizer
from cifarlab.training.plan import (
    PLAN_MARGIN,
    BudgetEpochs,
    fit_images,
    plan_epochs,
)
from cifarlab.training.runfolder import (
    CHECKPOINT_KEY,
    RESTART_HINT,
    CheckpointState,
    claim_run_folder,
    dataset_spec,
    default_run_dir,
    join_optimizer_state,
    read_checkpoint,
    split_optimizer_state,
)


@dataclass
class TrainResult:
    model: Classifier
    run_dir: Path
    model_path: Path
    history: list[dict[str, Any]]


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
            short = f", the short-run recipe (batch {self.cfg.batch_size})" \
                if budget_epochs(self.cfg.model) < SHORT_RUN_EPOCHS else ""
            tqdm.write(f"--model auto: {self.cfg.model}{short} (this budget holds about {budget_epochs.describe()} "
                       f"here; airbench-mid needs {MIN_MID_EPOCHS:g}, the batch of 2,000 {SHORT_RUN_EPOCHS:g})")
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

    def _model_meta(self, train_x: np.ndarray) -> ModelMeta:
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
        images = fit_images(budget_s - fixed_s, step_s, epoch_s, self.steps_per_epoch,
                            self.batch_size * self.world_size, len(self.dataset.classes), len(self.train_y),
                            self.budget_minutes) if self.cfg.fit_budget else None
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
        atomic_write(self.run_dir / "history.csv", history_csv(self.history), what="training history")

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

    def load_checkpoint(self, tensors: dict[str, torch.Tensor], state: CheckpointState, path: Path) -> None:
        """Restore weights, optimizer, EMA and history from a checkpoint's tensors and state."""
        try:
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.optimizer.load_state_dict(join_optimizer_state(tensors, state.optimizer))
            if self.ema is not None:
                self.ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise ModelFileError(f"{path}: its weights or optimizer state do not fit the run it records "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); {RESTART_HINT}") from None
        self.history = list(state.history)

    def finish(self) -> TrainResult:
        last = self.history[-1] if self.history else {}
        model = self.eval_model.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
        metrics = {k: last.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
        metrics.update(epochs=len(self.history), train_seconds=sum(r["seconds"] for r in self.history),
                       train_images=len(self.train_y))
        # Here, not at init: a time budget's plan comes later.
        model.meta = replace(model.meta, recipe=asdict(self.cfg), metrics=metrics,
                             created=datetime.now().isoformat(timespec="seconds"))
        path = self.run_dir / "model.safetensors"
        if distributed.is_main():  # the other ranks return the same model, unsaved
            path = save_model(model, path)
        return TrainResult(model, self.run_dir, path, self.history)


def format_row(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.3f} "
            f"acc {row['train_acc']:.3f}")
    if row.get("val_acc") is not None:
        text += f"  val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}"
    return text + f"  lr {row['lr']:.3g}  {row['seconds']:.1f}s"


def load_run_dataset(cfg: TrainConfig, progress: bool = True) -> Dataset:
    """The dataset a run trains on, imported with the run's --resize/--bad-images options."""
    return load_dataset(cfg.data, progress=progress, resize=cfg.resize, bad_images=cfg.bad_images)


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
    tensors, raw_state = read_checkpoint(checkpoint)
    state = CheckpointState.from_dict(raw_state, str(checkpoint))
    cfg = state.config
    if epochs is not None:
        cfg.epochs = epochs
    dataset = dataset if dataset is not None else load_run_dataset(cfg, progress)
    try:  # with torchrun, every rank reads the checkpoint (read-only)
        trainer = Trainer(cfg, dataset, checkpoint.parent, progress)
        trainer.load_checkpoint(tensors, state, checkpoint)
        return trainer.fit()
    finally:
        distributed.teardown()  # a no-op without torchrun
