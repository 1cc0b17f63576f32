"""What a training run is: the request (`TrainConfig`, every field a `cifarlab train` flag) and
the resolved recipe (`Recipe`, what the run trains on and records). No torch here, so the CLI
builds its flags from these fields without loading the library."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from cifarlab.choices import AMP_MODES, BAD_IMAGE_POLICIES, FILLS, OPTIMIZERS, SCHEDULES
from cifarlab.errors import CifarlabError
from cifarlab.schema import Fields, describe, matches_annotation


def flag(default: Any, help: str = "", *, choices: tuple[str, ...] | None = None, metavar: str | None = None,
         cli: bool = True, recipe: bool = True) -> Any:
    """A TrainConfig field and the `cifarlab train` option made from it. `recipe`: a None
    default means "the model's recipe value" (else it means "off" or "all")."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar, "cli": cli,
                                            "recipe": recipe})


@dataclass
class TrainConfig:
    """Everything that defines a run, as asked for. None means "take the model's recipe default"
    (`resolved` fills it in). Every field with a `flag` is a `cifarlab train` option of the same
    name, with the help text and choices given here (cli.add_config_flags)."""

    data: str = flag("cifar100", cli=False)  # a data option of its own (cli.add_data_options)
    # How the dataset's images were imported (load_dataset's options), so that `resume`
    # loads it the same way: resize ImageFolder images of another size, skip undecodable ones.
    resize: bool = flag(False, cli=False)
    bad_images: str = flag("refuse", cli=False)
    model: str = flag("auto", "architecture (see `cifarlab models`); auto: airbench on a GPU; on a CPU "
                      "airbench-small, or for more than 10 classes airbench-mid where the time budget "
                      "holds enough of its epochs on this machine")
    arch_args: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    epochs: int | None = flag(None, "passes over the training images (8 for airbench)")
    batch_size: int | None = flag(None, "images per step (2000 for airbench)")
    optimizer: str | None = flag(None, "muon: Muon on the conv filters, SGD on the rest (airbench's)",
                                 choices=OPTIMIZERS)
    lr: float | None = flag(None, "peak learning rate")
    momentum: float | None = flag(None, "SGD/Muon momentum (0.9 unless the recipe says)")
    filter_lr: float | None = flag(None, "muon: peak lr of the orthogonalized conv filter updates")
    filter_momentum: float | None = flag(None, "muon: momentum of the conv filters' updates")
    nesterov: bool | None = flag(None, "Nesterov momentum")
    weight_decay: float | None = flag(None, "weight decay, 0 or more")
    schedule: str | None = flag(None, "learning-rate schedule over the run", choices=SCHEDULES)
    bias_lr_scale: float | None = flag(None, "BatchNorm biases train at lr x this (weight decay / this)")
    lookahead: bool | None = flag(None, "pull the weights towards their running average (see Lookahead)")
    label_smoothing: float | None = flag(None, "in [0, 1) (airbench's is 0.3 for more than 10 classes)")
    translate: int | None = flag(None, "max random shift in pixels")
    flip: bool = flag(True, "random horizontal flips")
    alternate_flip: bool | None = flag(None, "mirror each image every other epoch, not at random")
    fill: str | None = flag(None, "border fill for shifts", choices=FILLS)
    val_fraction: float = flag(0.2, "held-out share of the training images")
    seed: int = flag(0, "weights, split, shuffling and augmentation")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")
    amp: str = flag("auto", "bf16 autocast (auto: on for CUDA and for CPUs with native bf16)", choices=AMP_MODES)
    compile: bool = flag(False, "torch.compile the training step (meant for GPUs; compiling takes a while at "
                                "the start)")
    max_train_images: int | None = flag(None, "train on a class-balanced subset (quick runs)", recipe=False)
    time_budget: float | None = flag(None, "choose the number of epochs (instead of --epochs) so that training, "
                                           "validation and a final test evaluation fit in this many minutes, "
                                           "from step times measured on this machine", metavar="MINUTES",
                                     recipe=False)
    fit_budget: bool = flag(False, "with --time-budget: fill the budget with whole epochs, at least 4, on fewer "
                                   "training images (a class-balanced subset, never more than "
                                   "--max-train-images) where all of them would leave part of an epoch's time "
                                   "unused or fit fewer")
    ema: float | None = flag(None, "validate and save a moving average of the weights (e.g. 0.999; it averages "
                                   "over about 1/(1-DECAY) steps, so keep that well under the run's steps)",
                             metavar="DECAY", recipe=False)
    plan: dict[str, float] | None = field(default=None, metadata={"cli": False})  # a time budget's measurements

    def validate(self) -> None:
        """Refuse bad settings before any data is loaded or time is spent."""
        from cifarlab.models import get_model_spec

        if self.model != "auto":
            get_model_spec(self.model)
        checks = [
            (self.epochs is None or self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr is None or _positive(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.weight_decay is None or (math.isfinite(self.weight_decay) and self.weight_decay >= 0),
             f"--weight-decay must be 0 or more, got {self.weight_decay}"),
            (self.label_smoothing is None or 0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}"),
            (self.max_train_images is None or self.max_train_images >= 1,
             f"--max-train-images must be at least 1, got {self.max_train_images}"),
            (self.optimizer in (None,) + OPTIMIZERS,
             f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.filter_lr is None or _positive(self.filter_lr),
             f"--filter-lr must be a positive number, got {self.filter_lr}"),
            (self.momentum is None or 0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.filter_momentum is None or 0 <= self.filter_momentum < 1,
             f"--filter-momentum must be in [0, 1), got {self.filter_momentum}"),
            (self.schedule in (None,) + SCHEDULES,
             f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.bias_lr_scale is None or _positive(self.bias_lr_scale),
             f"--bias-lr-scale must be a positive number, got {self.bias_lr_scale}"),
            (self.fill in (None,) + FILLS, f"--fill must be one of {', '.join(FILLS)}, got {self.fill!r}"),
            (self.bad_images in BAD_IMAGE_POLICIES,
             f"--bad-images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {self.bad_images!r}"),
            (self.translate is None or 0 <= self.translate < 16, f"--translate must be 0..15 pixels, got {self.translate}"),
            (0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}"),
            (self.time_budget is None or _positive(self.time_budget),
             f"--time-budget must be a positive number of minutes, got {self.time_budget}"),
            # A planned run (resumed from its checkpoint) carries both, the epochs from the plan.
            (self.epochs is None or self.time_budget is None or self.plan is not None,
             "--epochs and --time-budget exclude each other: the budget decides the number of epochs"),
            (not self.fit_budget or self.time_budget is not None,
             "--fit-budget needs --time-budget: it fits the training set to the budget's minutes"),
            (self.ema is None or 0 <= self.ema < 1, f"--ema must be in [0, 1), e.g. 0.999, got {self.ema}"),
            (arch_args_problem(self.arch_args) is None, str(arch_args_problem(self.arch_args))),
            (self.plan is None or all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                      for v in self.plan.values()), "a time budget's plan must map names to numbers"),
        ]
        for ok, message in checks:
            if not ok:
                raise CifarlabError(message)

    @classmethod
    def from_dict(cls, data: Any, where: str, error: type[Exception] = CifarlabError) -> TrainConfig:
        """The config a file recorded (a checkpoint's, a config.json), each field's type checked
        against its annotation and the whole validated, so a damaged file fails here."""
        f = Fields(data, where, "start the run again with `cifarlab train`", error)
        known = {fld.name: str(fld.type) for fld in fields(cls)}
        unknown = [key for key in f.data if key not in known]
        if unknown:
            f.fail(f"{where} has fields this cifarlab does not know: {', '.join(unknown[:8])}")
        for key, value in f.data.items():
            if not matches_annotation(value, known[key]):
                f.fail(f"{where}: {key!r} must be {known[key]}, got {describe(value)}")
        config = cls(**f.data)
        try:
            config.validate()
        except CifarlabError as exc:
            f.fail(f"{where}: {exc}")
        return config

    def resolved(self, device: Any, num_classes: int = 10,
                 epochs_in_budget: Callable[[str], float] | None = None) -> Recipe:
        """The run as it will be trained: the model chosen (`epochs_in_budget`: see auto_model)
        and every None filled from the model's recipe (with its many-class overrides for
        datasets of more than 10 classes, e.g. CIFAR-100)."""
        from cifarlab.models import get_model_spec  # the registry builds torch modules

        model = self.model if self.model != "auto" else auto_model(device, num_classes, epochs_in_budget)
        spec = get_model_spec(model)
        short = (self.model == "auto" and num_classes > 10 and device.type == "cpu" and epochs_in_budget is not None
                 and all(getattr(self, key) is None for key in SHORT_RUN_RECIPE)  # not half a recipe
                 and epochs_in_budget(model) < SHORT_RUN_EPOCHS)
        recipe = {"momentum": 0.9, "nesterov": False, "bias_lr_scale": 1.0, "lookahead": False,
                  "alternate_flip": False, **spec.recipe,
                  **(spec.many_class_recipe if num_classes > 10 else {}), **(SHORT_RUN_RECIPE if short else {})}
        if self.time_budget is not None:
            recipe.pop("epochs", None)  # left None: the trainer plans it from the budget
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in values.items():
            if value is None and key in recipe:
                values[key] = recipe[key]
        values["model"] = model
        missing = [name for name in _RECIPE_FIELDS if values[name] is None]
        if missing:  # a registry entry without a complete recipe: a bug, not a user error
            raise ValueError(f"model {model!r}'s recipe does not set {', '.join(missing)}")
        return Recipe(**values)


@dataclass(frozen=True)
class Recipe:
    """A run as it is trained: `TrainConfig` (the request) with the model chosen and every
    hyperparameter filled in from the model's recipe. The same fields, none of the recipe's
    left None; `epochs` is None only until a time budget has been planned (`plan` then holds
    the measurements behind it), and the muon-only filter settings are None for the others.
    This is what the run folder's config.json, the checkpoint and the model file record."""

    data: str
    resize: bool
    bad_images: str
    model: str
    arch_args: dict[str, Any]
    epochs: int | None
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    filter_lr: float | None
    filter_momentum: float | None
    nesterov: bool
    weight_decay: float
    schedule: str
    bias_lr_scale: float
    lookahead: bool
    label_smoothing: float
    translate: int
    flip: bool
    alternate_flip: bool
    fill: str
    val_fraction: float
    seed: int
    device: str
    amp: str
    compile: bool
    max_train_images: int | None
    time_budget: float | None
    fit_budget: bool
    ema: float | None
    plan: dict[str, float] | None

    @property
    def planned_epochs(self) -> int:
        if self.epochs is None:
            raise RuntimeError("the number of epochs is planned from the time budget first (Trainer.plan_schedule)")
        return self.epochs


# Recipe fields that resolving must fill (the others may stay None, as Recipe says).
_RECIPE_FIELDS = ("batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                  "bias_lr_scale", "lookahead", "label_smoothing", "translate", "alternate_flip", "fill")


# `--model auto` on a CPU for more than 10 classes, with a time budget: the widest network of
# which the budget holds at least this many epochs. MIN_MID_EPOCHS is bracketed by measurements
# on the real CIFAR-100 at equal training time: with 9 epochs airbench-mid beat
# airbench-small's 18 (65.5% against 63.5% with TTA, README "Results"); with 3.65 (rounded down
# to 3) it lost to airbench-small's 7 (46.0% against 53.3%,
# benchmarks/results/recipe_sweep_crossover.md); with about 1.7, the slow CPU kind's 10
# minutes, it reached 20.2% where airbench-small's 3 reached 37.1% (benchmarks/slow_cpu.py).
MIN_MID_EPOCHS = 6.0
# Short runs: where a time budget holds fewer than SHORT_RUN_EPOCHS epochs of the network auto
# chose, the recipe's batch of 2,000 leaves few steps (3 epochs of CIFAR-100 are 75). A batch of
# 500, with the head and bias lr scaled with it (the loss is a batch mean) and Muon's
# fixed-size filter step cut by sqrt(4), won at every length measured on CIFAR-100 (TTA):
# airbench-small, 3 epochs: 44.9% against 37.3% (batch 1,000: 42.7%); 6 epochs: 54.6% against
# 50.3% (benchmarks/results/recipe_sweep_short.md); the bf16 CPU's whole 10-minute command with
# airbench-mid: 68.5% (11 epochs) against 64.6% (8), the two in the same session
# (benchmarks/results/time_budget_batch_cifar100.md). An epoch in batches of 500 also costs
# less on a CPU. Beyond 11 epochs only the batch of 2,000 was measured, so it stays there.
SHORT_RUN_EPOCHS = 12.0
SHORT_RUN_RECIPE = {"batch_size": 500, "lr": 0.415, "filter_lr": 0.12}
AUTO_CPU_CANDIDATES: tuple[tuple[str, float], ...] = (("airbench-mid", MIN_MID_EPOCHS), ("airbench-small", 0.0))


def auto_model(device: Any, num_classes: int, epochs_in_budget: Callable[[str], float] | None = None) -> str:
    """`--model auto`: the full airbench network on a GPU; on a CPU, airbench-small for up to
    10 classes, and for more the widest of AUTO_CPU_CANDIDATES whose epochs a time budget
    holds enough of (`epochs_in_budget(model)`, measured on this machine), or airbench-mid
    when the epochs are given (the wider network learns more per epoch with 100 classes)."""
    if device.type == "cuda":
        return "airbench"
    if num_classes <= 10:
        return "airbench-small"
    if epochs_in_budget is None:
        return "airbench-mid"
    return next(name for name, least in AUTO_CPU_CANDIDATES if epochs_in_budget(name) >= least)


# Architecture arguments (widths, hidden units, kernel sizes, rates) are bounded before anything
# is built: 8x the widest registered network's 256 channels, lists of at most 8 layers.
MAX_ARCH_VALUE = 2048
MAX_ARCH_LAYERS = 8


def arch_args_problem(arch_args: Any) -> str | None:
    """What is wrong with recorded architecture arguments, or None: each must be a finite number
    in [0, MAX_ARCH_VALUE] or a list of at most MAX_ARCH_LAYERS positive integers up to it."""
    if not isinstance(arch_args, dict):
        return f"arch_args must be an object, got {describe(arch_args)}"

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= MAX_ARCH_VALUE

    for key, value in arch_args.items():
        ok = number(value) or (isinstance(value, (list, tuple)) and 0 < len(value) <= MAX_ARCH_LAYERS
                               and all(number(v) and isinstance(v, int) and v >= 1 for v in value))
        if not ok:
            return (f"arch_args {key!r} must be a number in [0, {MAX_ARCH_VALUE}] or a list of at most "
                    f"{MAX_ARCH_LAYERS} layer sizes of 1..{MAX_ARCH_VALUE}, got {describe(value)}")
    return None


def _positive(value: float) -> bool:
    """A positive finite number (inf and NaN are not)."""
    return math.isfinite(value) and value > 0


