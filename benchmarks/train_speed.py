"""Training speed: the seed's recipe against cifarlab's default, on one machine, in one run.

    python benchmarks/train_speed.py --data ../shared/data/cifar10-jpeg.tar.gz [--seed-epochs 50]
    python benchmarks/train_speed.py --data ../shared/data/cifar100-rebuilt.tar.gz --seed-minutes 10 --skip-throughput

(a) trains the seed's recipe (keras-cnn with its registry recipe: Adam, batch 32, 50 epochs)
and (b) cifarlab's default (`TrainConfig()`, model auto), one after the other, and after
every epoch measures test accuracy against the training clock. The clock counts only
`Trainer.train_epoch` (as the README's training times do): the test evaluation, and the
validation pass and checkpoint that `cifarlab train` adds, are left out for both runs.

(c) times cifarlab's training loop (`Trainer.train_epoch`, unmodified) against a minimal
hand-written PyTorch loop of the same network on the same data and device: both in each
repetition, in alternating order (AB, BA, ...), and the verdict is the median of the
per-repetition ratios, because a shared machine is noisy.

Prints markdown tables and writes into --out: curve.csv, curve.png, throughput.csv, summary.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from cifarlab import get_split, load_dataset
from cifarlab.augment import random_translate_flip
from cifarlab.evaluation import predict_logits_tta
from cifarlab.modelfile import build_classifier
from cifarlab.models import get_model_spec
from cifarlab.training import TrainConfig, Trainer, make_optimizer, pick_device

# Test accuracies whose training time the table reports: CIFAR-10-like, and 100 classes
# (30-70%: the question's Keras recipe aimed at 40%).
THRESHOLDS = {10: (0.70, 0.80, 0.90, 0.93), 100: (0.30, 0.40, 0.50, 0.60, 0.70)}


def thresholds_for(num_classes: int) -> tuple[float, ...]:
    return THRESHOLDS[10] if num_classes <= 10 else THRESHOLDS[100]

SEED_FULL_EPOCHS = get_model_spec("keras-cnn").recipe["epochs"]  # 50, the seed's schedule
REQUIRED_RATIO = 0.95  # the issue: cifarlab's loop at >= 95% of a hand loop's throughput


# ---- the machine ------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(device: torch.device) -> list[str]:
    lines = [f"CPU: {cpu_model()} ({torch.get_num_threads()} torch threads, "
             f"{len(os.sched_getaffinity(0))} cores available)",
             f"torch {torch.__version__}, device {device}",
             # Others' work on a shared machine slows both loops; the load says how noisy it was.
             "load average (1, 5, 15 min) at start: " + ", ".join(f"{v:.1f}" for v in os.getloadavg())]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return lines


def parse_sweep_args(doc: str, hyp: dict, default_out: str) -> argparse.Namespace:
    """The flags of a benchmark that runs named candidates: --data, --out, --only and one flag
    per HYP value (HYP is updated from them); the output folder is made."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--only", help="comma-separated candidate names (default: all)")
    add_hyp_flags(parser, hyp)  # every recipe value is a flag too
    args = parser.parse_args()
    hyp.update({key: getattr(args, key) for key in hyp})
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def add_hyp_flags(parser: argparse.ArgumentParser, hyp: dict) -> None:
    """Every value of a benchmark's HYP dict as a --flag (tuples: comma-separated), default shown."""
    for key, default in hyp.items():
        if isinstance(default, tuple):
            element = type(default[0])
            kind = lambda v, t=element: tuple(map(t, v.split(",")))  # noqa: E731
        else:
            kind = type(default)
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, default=default,
                            help=f"default {default}")


def sync(device: torch.device) -> None:
    # CUDA runs asynchronously: without this the clock would stop before the GPU does.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- (a), (b): test accuracy against training time ------------------------------------------

def test_accuracy(model, test_x: np.ndarray, test_y: np.ndarray) -> float:
    # predict_logits: eval mode, no grad, batches of 1000, and back to train mode afterwards.
    return float((model.predict_logits(test_x).argmax(1) == test_y).mean())


def accuracy_curve(name: str, cfg: TrainConfig, dataset, out: Path, rows: list[dict],
                   max_minutes: float | None = None) -> Trainer:
    """Train epoch by epoch, testing after each one outside the clock; appends to rows.

    With max_minutes, stops after the first epoch that ends past that much training time.
    """
    # fit() is never called, so nothing is written to run_dir: no checkpoints inside the clock.
    trainer = Trainer(cfg, dataset, run_dir=out / name, progress=False)
    test_x, test_y = get_split(dataset, "test")
    clock = 0.0
    print(f"{name}: {trainer.cfg.model}, {len(trainer.train_y):,} training images, "
          f"{epochs(trainer.cfg.epochs)} on {trainer.device}", flush=True)
    for epoch in range(1, trainer.cfg.epochs + 1):
        sync(trainer.device)
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        sync(trainer.device)
        clock += time.perf_counter() - start
        acc = test_accuracy(trainer.model, test_x, test_y)
        rows.append({"run": name, "epoch": epoch, "train_seconds": round(clock, 3), "test_acc": round(acc, 5)})
        write_csv(out / "curve.csv", rows)  # after every epoch, so a stopped run keeps its curve
        print(f"  epoch {epoch}/{trainer.cfg.epochs}: {clock:7.1f} s  test acc {acc:.2%}", flush=True)
        if max_minutes is not None and clock > 60 * max_minutes and epoch < trainer.cfg.epochs:
            print(f"  stopped: past --seed-minutes {max_minutes:g}", flush=True)
            break
    if name == "default":  # the flip+translate test-time augmentation `cifarlab evaluate --tta` offers
        start = time.perf_counter()
        logits = predict_logits_tta(trainer.model, test_x, "flip+translate")
        tta_s = time.perf_counter() - start
        rows[-1]["tta_test_acc"] = round(float((logits.argmax(1) == test_y).mean()), 5)
        rows[-1]["tta_seconds"] = round(tta_s, 3)
        write_csv(out / "curve.csv", rows)
        print(f"  with flip+translate TTA: test acc {rows[-1]['tta_test_acc']:.2%} ({tta_s:.1f} s)", flush=True)
    return trainer


def epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def time_to(rows: list[dict], threshold: float) -> str:
    for row in rows:
        if row["test_acc"] >= threshold:
            return f"{row['train_seconds']:.0f} s (epoch {row['epoch']})"
    return "not reached"


def curve_table(runs: list[tuple[str, TrainConfig]], rows: list[dict], thresholds: tuple[float, ...]) -> list[str]:
    lines = ["| run | model | recipe | epochs | final test acc | with TTA | train s | "
             + " | ".join(f"to {t:.0%}" for t in thresholds) + " |",
             "| --- " * (7 + len(thresholds)) + "|"]
    for name, cfg in runs:
        mine = [r for r in rows if r["run"] == name]
        recipe = f"{cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, {cfg.schedule}"
        reached = " | ".join(time_to(mine, t) for t in thresholds)
        tta = f"{mine[-1]['tta_test_acc']:.1%}" if "tta_test_acc" in mine[-1] else "-"
        lines.append(f"| {name} | {cfg.model} | {recipe} | {len(mine)} | {mine[-1]['test_acc']:.1%} | {tta} | "
                     f"{mine[-1]['train_seconds']:.0f} | {reached} |")
    return lines


def plot_curves(runs: list[tuple[str, TrainConfig]], rows: list[dict], path: Path, title: str,
                thresholds: tuple[float, ...]) -> None:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for name, cfg in runs:
        mine = [r for r in rows if r["run"] == name]
        ax.plot([r["train_seconds"] for r in mine], [100 * r["test_acc"] for r in mine], marker="o",
                markersize=3, label=f"{name}: {cfg.model}, {epochs(len(mine))}")
    for t in thresholds:
        ax.axhline(100 * t, color="grey", linestyle=":", linewidth=0.8)
    # Log time: the two runs differ by an order of magnitude, and the early epochs matter.
    ax.set_xscale("log")
    # Ticks at 1, 2, 5 x 10^k written as plain seconds (20, 50, 100), not 2x10^1.
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training seconds (log scale; test evaluation not counted)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150)


# ---- (c): throughput of cifarlab's loop against a hand-written one --------------------------

class HandLoop:
    """The minimal loop: uint8 data tensor, augmentation, forward, loss, zero_grad/backward/step."""

    def __init__(self, trainer: Trainer):
        cfg = self.cfg = trainer.cfg
        self.device, self.amp = trainer.device, trainer.amp
        self.x, self.y = trainer.train_x, trainer.train_y  # the very same tensors on the same device
        torch.manual_seed(cfg.seed)
        # The same Classifier (Preprocess + network) and memory format as the Trainer builds.
        self.model = build_classifier(trainer.model.meta).to(self.device, memory_format=torch.channels_last)
        self.model.train()
        # The same optimizer and parameter groups (Muon on the conv filters, BatchNorm biases
        # at their own rate): the update rule is the recipe, not loop overhead. Set once: no schedule.
        self.opt = make_optimizer(self.model, cfg)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"]

    def run(self, steps: int, seed: int) -> None:
        cfg, bs = self.cfg, self.cfg.batch_size
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.y), generator=gen).to(self.device)
        for step in range(steps):
            idx = order[step * bs:(step + 1) * bs]
            images = random_translate_flip(self.x[idx], cfg.translate, cfg.flip, cfg.fill, gen)
            # Same precision as the Trainer (bf16 autocast where it is fast), or the comparison is moot.
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(self.model(images), self.y[idx], label_smoothing=cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def throughput_trainer(args, dataset) -> Trainer:
    # An epoch of `steps` batches, so that train_epoch itself -- cifarlab's loop with its
    # shuffling, schedule and bookkeeping -- is what gets timed. (The stratified subset rounds
    # per class, so an odd --steps may add one short batch; both loops run the same batches.)
    batch = TrainConfig(data=args.data, device=args.device).resolved(pick_device(args.device)).batch_size
    # No validation split: the whole training split is there to draw the steps from (the
    # default 20% hold-out capped --steps at 20 batches of 2,000 whatever was asked).
    cfg = TrainConfig(data=args.data, device=args.device, val_fraction=0.0, max_train_images=args.steps * batch)
    return Trainer(cfg, dataset, run_dir=args.out / "throughput", progress=False)


def warm_up_cifarlab(trainer: Trainer, steps: int) -> None:
    cfg, bs = trainer.cfg, trainer.cfg.batch_size
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = slice(step * bs, (step + 1) * bs)
        images = random_translate_flip(trainer.train_x[idx], cfg.translate, cfg.flip, cfg.fill, gen)
        trainer.train_step(images, trainer.train_y[idx], cfg.lr)


def timed(device: torch.device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure_throughput(args, dataset) -> list[dict]:
    trainer = throughput_trainer(args, dataset)
    hand = HandLoop(trainer)
    steps, images, device = trainer.steps_per_epoch, len(trainer.train_y), trainer.device
    print(f"throughput: {trainer.cfg.model}, batch {trainer.cfg.batch_size}, {steps} timed steps "
          f"({images:,} images) after {args.warmup} warm-up, {args.repeats} x AB/BA on {device}", flush=True)

    def run_cifarlab() -> float:
        warm_up_cifarlab(trainer, args.warmup)
        return timed(device, lambda: trainer.train_epoch(1))

    def run_hand(rep: int) -> float:
        hand.run(args.warmup, seed=1)
        return timed(device, lambda: hand.run(steps, seed=rep))

    rows = []
    for rep in range(1, args.repeats + 1):
        # Both loops in every repetition, so a slow spell of a shared machine hits them alike,
        # and in alternating order (AB, BA, ...), so that going first or second favours neither.
        order = ["cifarlab", "hand"] if rep % 2 else ["hand", "cifarlab"]
        for loop in order:
            seconds = run_cifarlab() if loop == "cifarlab" else run_hand(rep)
            rows.append({"rep": rep, "loop": loop, "steps": steps, "images": images,
                         "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)})
            print(f"  rep {rep} {loop:8s} {rows[-1]['images_per_s']:8.1f} images/s", flush=True)
    return rows


def throughput_table(rows: list[dict]) -> tuple[list[str], float]:
    speeds = {loop: [r["images_per_s"] for r in rows if r["loop"] == loop] for loop in ("cifarlab", "hand")}
    median = {loop: statistics.median(v) for loop, v in speeds.items()}
    # The verdict uses the ratio within each repetition (two runs back to back), whose median
    # is steadier on a noisy machine than the ratio of the two loops' separate medians.
    paired = [a / b for a, b in zip(speeds["cifarlab"], speeds["hand"])]
    ratio = statistics.median(paired)
    verdict = "PASS" if ratio >= REQUIRED_RATIO else "FAIL"
    lines = ["| loop | images/s (median) | best | runs |", "| --- | --- | --- | --- |"]
    for loop, v in speeds.items():
        lines.append(f"| {loop} | {median[loop]:.1f} | {max(v):.1f} | {', '.join(f'{x:.0f}' for x in v)} |")
    lines += ["", f"ratio cifarlab/hand: {ratio:.3f}, the median of the per-repetition ratios "
              f"({', '.join(f'{r:.3f}' for r in paired)}; required >= {REQUIRED_RATIO}): {verdict}; "
              f"{median['cifarlab'] / median['hand']:.3f} of the medians"]
    return lines, ratio


# ---- files ------------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        # The union of the rows' keys, in first-seen order: the last row of a run adds the TTA columns.
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def notes(args, runs: list[tuple[str, TrainConfig]], rows: list[dict]) -> list[str]:
    lines = []
    seed_epochs = sum(r["run"] == "seed" for r in rows)
    if "seed" in dict(runs) and seed_epochs < SEED_FULL_EPOCHS:
        why = f"stopped by --seed-minutes {args.seed_minutes:g}" if args.seed_minutes else "--seed-epochs"
        lines.append(f"- seed: {seed_epochs} of the seed's {SEED_FULL_EPOCHS} epochs ({why}). Its learning "
                     "rate is constant, so these are exactly the first epochs of the full schedule.")
    default_cfg = dict(runs).get("default")
    if default_cfg and default_cfg.epochs != get_model_spec(default_cfg.model).recipe["epochs"]:
        lines.append(f"- default: {epochs(default_cfg.epochs)} (--default-epochs), not the recipe's; the one-cycle "
                     "schedule is stretched or squeezed to fit, so this is a different run, not a prefix.")
    if args.max_train_images:
        lines.append(f"- curves trained on a class-balanced subset of {args.max_train_images:,} images "
                     "(--max-train-images): a quick check, not a result.")
    lines.append("- train s: the sum of `Trainer.train_epoch` times only; the test evaluation after each epoch, "
                 "and the validation pass and checkpoint that `cifarlab train` adds, are not counted.")
    if runs:
        held_out = runs[0][1].val_fraction
        lines.append("- both runs train on " + (f"the training split minus a {held_out:.0%} validation split"
                     if held_out else "the whole training split (--val-fraction 0)")
                     + " and are tested on the full test split after every epoch.")
        lines.append("- with TTA: the default run's final model under `cifarlab evaluate --tta flip+translate` "
                     "(6 views per image); its time is in tta_seconds of curve.csv, not in train s.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed-epochs", type=int, default=SEED_FULL_EPOCHS,
                        help=f"epochs of the seed's recipe (its full schedule: {SEED_FULL_EPOCHS})")
    parser.add_argument("--default-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--seed-minutes", type=float, default=None,
                        help="stop the seed's run after the epoch that passes this much training time")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="held-out share of the training split (default 0: train on all of it)")
    parser.add_argument("--max-train-images", type=int, default=None, help="for quick checks of the curves")
    parser.add_argument("--skip-curves", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per throughput run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each throughput run")
    parser.add_argument("--repeats", type=int, default=4,
                        help="repetitions of both loops (AB, BA, ...; even keeps the order balanced)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, the same for every run (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-train-speed"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    command = "python " + shlex.join(sys.argv)
    dataset = load_dataset(args.data, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = ["# Training speed", "", *(f"- {line}" for line in machine_lines(device)),
               f"- data: {dataset.name} ({args.data})", f"- command: `{command}`", ""]

    runs: list[tuple[str, TrainConfig]] = []
    if not args.skip_curves:
        rows: list[dict] = []
        base = dict(data=args.data, device=args.device, max_train_images=args.max_train_images,
                    val_fraction=args.val_fraction)
        for name, cfg in [("seed", TrainConfig(model="keras-cnn", epochs=args.seed_epochs, **base)),
                          ("default", TrainConfig(epochs=args.default_epochs, **base))]:
            limit = args.seed_minutes if name == "seed" else None
            runs.append((name, accuracy_curve(name, cfg, dataset, args.out, rows, limit).cfg))
        thresholds = thresholds_for(len(dataset.classes))
        table = curve_table(runs, rows, thresholds)
        plot_curves(runs, rows, args.out / "curve.png",
                    f"{dataset.name}: test accuracy against training time — {cpu_model()}, "
                    f"{args.threads} threads" + (f", {torch.cuda.get_device_name(device)}"
                                                 if device.type == "cuda" else ""), thresholds)
        summary += ["## Test accuracy against training time", "", *table, "", *notes(args, runs, rows), ""]
        print("\n" + "\n".join(table + [""] + notes(args, runs, rows)))

    if not args.skip_throughput:
        rows = measure_throughput(args, dataset)
        write_csv(args.out / "throughput.csv", rows)
        table, _ = throughput_table(rows)
        summary += ["## Training throughput: cifarlab's loop against a hand-written loop", "",
                    f"{rows[0]['steps']} timed steps after {args.warmup} warm-up, {args.repeats} repetitions "
                    "in alternating order; the ratio is the median of the per-repetition ratios.", "", *table, ""]
        print("\n" + "\n".join(table))

    summary.append("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print(f"\nwrote {args.out}/ ({', '.join(sorted(p.name for p in args.out.iterdir() if p.is_file()))})")


if __name__ == "__main__":
    main()
