"""Time budgets, as functions of measured costs: the epochs that fit (`plan_epochs`), the
training images whose whole epochs fill a budget (`fit_images`, --fit-budget), and the pace
probe by which `--model auto` picks a network for a budget (`BudgetEpochs`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cifarlab.errors import CifarlabError
from cifarlab.models import create_model
from cifarlab.training.device import timed

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
# backward passes over AUTO_PROBE_IMAGES random images (a warm-up and two timed passes per
# candidate; the plan is then measured on the real step), and the share of the budget
# that goes to epochs (the rest: measuring, validation, the final evaluation, a partial epoch:
# epochs x seconds per epoch came to 0.65-0.89 of the 10-minute runs in benchmarks/results).
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
        if model in self.measured:
            return self.measured[model]
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
        # The faster of two: one step is short enough for a neighbour's burst to double it.
        image_s = min(timed(self.device, step), timed(self.device, step)) / AUTO_PROBE_IMAGES
        self.measured[model] = AUTO_TRAIN_SHARE * self.budget_s / (image_s * self.train_images)
        return self.measured[model]

    def describe(self) -> str:
        return ", ".join(f"{epochs:.1f} epochs of {model}" for model, epochs in self.measured.items())


def fit_images(available_s: float, step_s: float, epoch_s: float, steps_per_epoch: int, images_per_step: int,
               num_classes: int, train_images: int, budget_minutes: float) -> int | None:
    """The training images whose whole epochs fill `available_s`, at least FIT_MIN_EPOCHS of
    them (all images would leave part of an epoch's time unused, or too few epochs); None
    when whole epochs of all of them fill it already. `epoch_s` is an epoch of all
    `train_images` (`steps_per_epoch` steps of `step_s`, plus validation and a checkpoint).
    Refuses when not even FIT_MIN_IMAGES_PER_CLASS per class fit."""
    epochs = max(FIT_MIN_EPOCHS, math.ceil(available_s / epoch_s))
    if epochs * epoch_s <= available_s:
        return None
    per_epoch_fixed_s = epoch_s - PLAN_MARGIN * steps_per_epoch * step_s  # validation, checkpoint
    train_s = (available_s / epochs - per_epoch_fixed_s) / PLAN_MARGIN
    # Less half an image per class: the class-balanced subset rounds each class's share.
    images = int(max(train_s, 0.0) / step_s) * images_per_step - math.ceil(num_classes / 2)
    least = FIT_MIN_IMAGES_PER_CLASS * num_classes
    if images < least:
        raise CifarlabError(
            f"a {budget_minutes:g}-minute budget does not fit {FIT_MIN_EPOCHS} epochs of even "
            f"{least:,} training images ({FIT_MIN_IMAGES_PER_CLASS} per class) here: a step of "
            f"{images_per_step} images takes {step_s:.2f} s and each epoch's validation and "
            f"checkpoint {per_epoch_fixed_s:.1f} s. Give a larger --time-budget.")
    return min(images, train_images)
