"""Train and evaluate the README's results rows on one machine, in one go.

    python benchmarks/readme_results.py --data ../shared/data/cifar10-jpeg.tar.gz [--keras-epochs 10]

Prints a markdown table and writes results.csv into --out. Each row is a full
`cifarlab.train` + `cifarlab.evaluate` on the test split, run one after another so that
they share the machine fairly (nothing else should be running).
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch

from cifarlab import TrainConfig, evaluate, load_dataset, train


def run_row(name: str, cfg: TrainConfig, dataset, out: Path) -> dict:
    start = time.perf_counter()
    result = train(cfg, dataset=dataset, run_dir=out / name, progress=False)
    wall = time.perf_counter() - start
    report = evaluate(result.model, data=dataset, split="test", out_dir=out / name / "eval-test", progress=False)
    metrics = result.model.meta["metrics"]
    return {"row": name, "model": result.model.meta["architecture"], "epochs": metrics["epochs"],
            "test_acc": report["accuracy"], "val_acc": metrics["val_acc"],
            "train_seconds": metrics["train_seconds"], "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keras-epochs", type=int, default=10, help="the seed's recipe ran 50")
    parser.add_argument("--out", type=Path, default=Path("runs/readme-results"))
    args = parser.parse_args()

    dataset = load_dataset(args.data, progress=False)
    rows = [
        ("default", TrainConfig(data=args.data, device=args.device)),
        ("seed-keras-cnn", TrainConfig(data=args.data, model="keras-cnn", epochs=args.keras_epochs,
                                       device=args.device)),
    ]
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    results = [run_row(name, cfg, dataset, args.out) for name, cfg in rows]

    print(f"\nmachine: {machine}, data: {dataset.name}")
    print("| row | model | epochs | test acc | val acc | train s | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['row']} | {r['model']} | {r['epochs']} | {r['test_acc']:.1%} | {r['val_acc']:.1%} "
              f"| {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*results[0], "machine"])
        writer.writeheader()
        writer.writerows({**r, "machine": machine} for r in results)


if __name__ == "__main__":
    main()
