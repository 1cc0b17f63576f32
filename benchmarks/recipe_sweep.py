"""Which recipe for many classes: a sweep on the real CIFAR-100, at a training time fixed in advance.

    python benchmarks/recipe_sweep.py --data ../shared/data/cifar100-rebuilt.tar.gz

Each candidate in CANDIDATES changes the default (`TrainConfig()` on a CPU: airbench-small with
its many-class recipe) in one respect: the width, the epochs that a 10-minute budget holds for
that width, label smoothing, batch size, EMA. Each trains on the whole training split
(val fraction 0) and is tested on the test split, plain and with the flip+translate TTA that
`cifarlab evaluate --tta` offers.

Time: a candidate's epochs are chosen so that its training takes about HYP["minutes"] on the
machine the README's targets are for (the bf16 2-core CPU: an airbench-small epoch of 50,000
images takes about 30 s there, and the widths below cost in proportion to their measured
throughput, see `throughput`). So accuracy is compared at equal training time, and the
machine may be busy while the sweep runs: the seconds columns say how busy it was.

Prints a markdown table; writes --out/recipe_sweep.csv and summary.md.
"""

from __future__ import annotations

import csv
import os
import shlex
import sys
import time
from pathlib import Path

from train_speed import machine_lines, parse_sweep_args, pick_device

from cifarlab import get_split, load_dataset
from cifarlab.evaluation import predict_logits_tta
from cifarlab.training import TrainConfig, Trainer

HYP = {
    "minutes": 9.0,  # training time each candidate is given (of a 10-minute budget: the rest is
    # measuring, validation and the final TTA evaluation)
    "small_epoch_s": 30.0,  # airbench-small, one epoch of 50,000 images, bf16 2-core CPU (README)
    "seed": 0,
    "max_train_images": 0,  # 0: the whole split; fewer only to try the script out
    "epochs": 0,  # every candidate trains this many epochs (0: as many as `minutes` holds for its width);
    # the slow CPU kind's 10-minute budget holds 3 of airbench-small (benchmarks/slow_cpu.py)
}

# Width: cost of an epoch relative to airbench-small, measured by `throughput` below on the
# bf16 CPU (images per second of a training step at batch 2000).
WIDTHS = {"small": (32, 128, 128), "mid": (48, 192, 192), "full": (64, 256, 256)}

# name: (width, TrainConfig overrides). Epochs are filled in from the time per epoch.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "default": ("small", {}),
    "mid-width": ("mid", {}),
    "full-width": ("full", {}),
    "label-smoothing-0.2": ("small", {"label_smoothing": 0.2}),
    "ema-0.99": ("small", {"ema": 0.99}),
    # Smaller batches for short runs: 3 epochs of 2,000-image batches are only 75 steps. The
    # head and bias lr follow the batch linearly (the loss is a mean over the batch, and the
    # weight decay per step shrinks with them); Muon's filter step has a fixed size whatever
    # the batch, so with 4x the steps it is cut by sqrt(4) or by 4.
    "batch-1000": ("small", {"batch_size": 1000, "lr": 0.83, "filter_lr": 0.17}),
    "batch-500": ("small", {"batch_size": 500, "lr": 0.415, "filter_lr": 0.12}),
    "batch-500-filter-lr-0.06": ("small", {"batch_size": 500, "lr": 0.415, "filter_lr": 0.06}),
    "batch-500-filter-lr-0.24": ("small", {"batch_size": 500, "lr": 0.415, "filter_lr": 0.24}),
}


def throughput(dataset, width: str, steps: int = 5) -> float:
    """Seconds per training step of 2000 images for one width (the trainer's own step)."""
    cfg = TrainConfig(arch_args={"widths": WIDTHS[width]}, epochs=1, val_fraction=0, max_train_images=4000)
    trainer = Trainer(cfg, dataset, run_dir=Path("/nonexistent"), progress=False)  # fit() never runs
    images, labels = trainer.train_x[:2000], trainer.train_y[:2000]
    trainer.train_step(images, labels, trainer.cfg.lr)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images, labels, trainer.cfg.lr)
    return (time.perf_counter() - start) / steps


def run(name: str, width: str, overrides: dict, epochs: int, dataset) -> dict:
    cfg = TrainConfig(arch_args={"widths": WIDTHS[width]}, epochs=epochs, val_fraction=0,
                      seed=HYP["seed"], max_train_images=HYP["max_train_images"] or None, **overrides)
    trainer = Trainer(cfg, dataset, run_dir=Path("/nonexistent"), progress=False)  # fit() writes files
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        trainer.train_epoch(epoch)
    seconds = time.perf_counter() - start
    test_x, test_y = get_split(dataset, "test")
    model = trainer.eval_model
    plain = float((model.predict_logits(test_x).argmax(1) == test_y).mean())
    tta = float((predict_logits_tta(model, test_x, "flip+translate").argmax(1) == test_y).mean())
    return {"candidate": name, "widths": "-".join(map(str, WIDTHS[width])), "epochs": epochs,
            **{k: getattr(trainer.cfg, k) for k in ("batch_size", "lr", "filter_lr", "label_smoothing", "ema")},
            "test_acc": round(plain, 4), "tta_test_acc": round(tta, 4), "train_seconds": round(seconds, 1),
            "load_avg_1min": round(os.getloadavg()[0], 1)}


def table(rows: list[dict]) -> list[str]:
    lines = ["| candidate | widths | epochs | batch | lr | filter lr | label smoothing | EMA | test acc | with TTA "
             "| train s (this machine) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: -r["tta_test_acc"]):
        lines.append(f"| {r['candidate']} | {r['widths']} | {r['epochs']} | {r['batch_size']} | {r['lr']} | "
                     f"{r['filter_lr']} | {r['label_smoothing']} | {r['ema'] or '-'} | {r['test_acc']:.1%} | "
                     f"{r['tta_test_acc']:.1%} | {r['train_seconds']} |")
    return lines


def main() -> None:
    args = parse_sweep_args(__doc__, HYP, "runs/recipe-sweep")
    dataset = load_dataset(args.data, progress=False)
    header = [*machine_lines(pick_device("auto")), f"command: python {shlex.join(sys.argv)}", ""]
    print("\n".join(header), flush=True)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    # airbench-small's cost too: the reference the other widths' epochs are scaled by.
    cost = {w: throughput(dataset, w) for w in sorted({CANDIDATES[n][0] for n in names} | {"small"})}
    print("seconds per step of 2000 images:", {w: round(s, 3) for w, s in cost.items()}, flush=True)
    rows = []
    for name in names:
        width, overrides = CANDIDATES[name]
        # The width's epoch on the reference machine, scaled by the throughput measured here.
        epoch_s = HYP["small_epoch_s"] * cost[width] / cost["small"]
        epochs = HYP["epochs"] or max(1, int(60 * HYP["minutes"] / epoch_s))
        rows.append(run(name, width, overrides, epochs, dataset))
        print(rows[-1], flush=True)
        with open(args.out / "recipe_sweep.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    lines = header + [f"relative epoch cost: {', '.join(f'{w} {cost[w] / min(cost.values()):.2f}x' for w in cost)}",
                      ""] + table(rows)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
