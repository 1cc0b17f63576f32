"""When a time budget cannot hold the whole training split for long: more images or more epochs?

    python benchmarks/fit_budget.py --data ../shared/data/cifar100-rebuilt.tar.gz

A budget buys a number of image-epochs (an epoch's time is proportional to its images: the
README's pace, 0.6 ms per image on the bf16 CPU, 3 ms on the AVX2 one). For each amount of
work in HYP["work"] (image-epochs), the default model trains HYP["epochs"] epochs on
work / epochs images (a stratified subset; the whole split at most), and the table gives the
test accuracy of each shape. `cifarlab train --fit-budget` and the demo use the winner: when
the budget holds fewer than that many epochs of the training images, they train on fewer
images (training.FIT_MIN_EPOCHS).

Accuracy, not time, is the measured quantity, so the machine may be busy; the seconds column
is the training time on this machine, for the record.
Prints a markdown table and writes --out/fit_budget.csv and summary.md.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

from train_speed import add_hyp_flags, machine_lines, pick_device, test_accuracy

from cifarlab import get_split, load_dataset
from cifarlab.training import TrainConfig, train

HYP = {
    "work": (48_000, 192_000),  # image-epochs: one epoch of the whole split, and four
    "epochs": (1, 2, 4, 8, 16),  # the shapes tried for each amount (where the images exist)
    "min_images_per_class": 20,  # fewer is not a training set
    "seed": 0,
}


def shapes(work: int, train_images: int, num_classes: int) -> list[tuple[int, int]]:
    """(epochs, images) for one amount of work, within the split and above the per-class floor."""
    out = []
    for epochs in HYP["epochs"]:
        images = work // epochs
        if images <= train_images and images >= HYP["min_images_per_class"] * num_classes:
            out.append((epochs, images))
    return out


def run(data: str, dataset, epochs: int, images: int, out: Path) -> dict:
    cfg = TrainConfig(data=data, epochs=epochs, max_train_images=images, val_fraction=0, seed=HYP["seed"])
    start = time.perf_counter()
    result = train(cfg, dataset=dataset, run_dir=out / f"e{epochs}-n{images}", progress=False)
    seconds = time.perf_counter() - start
    test_x, test_y = get_split(dataset, "test")
    acc = test_accuracy(result.model, test_x, test_y)
    return {"work": epochs * images, "epochs": epochs, "images": images, "test_acc": round(acc, 4),
            "train_seconds": round(seconds, 1), "model": result.model.meta["architecture"]}


def table(rows: list[dict]) -> list[str]:
    lines = ["| image-epochs | epochs | images | test accuracy | seconds (this machine) |",
             "| --- | --- | --- | --- | --- |"]
    for work in sorted({r["work"] for r in rows}):
        mine = [r for r in rows if r["work"] == work]
        best = max(r["test_acc"] for r in mine)
        for r in mine:
            mark = " **best**" if r["test_acc"] == best else ""
            lines.append(f"| {work:,} | {r['epochs']} | {r['images']:,} | {r['test_acc']:.1%}{mark} | "
                         f"{r['train_seconds']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/fit-budget"))
    add_hyp_flags(parser, HYP)  # every recipe value is a flag too
    args = parser.parse_args()
    HYP.update({key: getattr(args, key) for key in HYP})
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(args.data, progress=False)
    train_images, num_classes = len(get_split(dataset, "train", 0.0, 0)[1]), len(dataset.classes)
    header = [*machine_lines(pick_device("auto")), f"command: python {shlex.join(sys.argv)}", ""]
    print("\n".join(header), flush=True)
    rows = []
    for work in HYP["work"]:
        for epochs, images in shapes(work, train_images, num_classes):
            rows.append(run(args.data, dataset, epochs, images, args.out))
            print(rows[-1], flush=True)
            with open(args.out / "fit_budget.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    lines = header + table(rows)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
