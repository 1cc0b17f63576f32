"""How long `cifarlab diagnose --plot` takes with many classes, against the same command
without --plot measured in the same run (the baseline: reading, analysing, printing).

    python benchmarks/diagnose_many_classes.py --classes 100 1000 10000 --out runs/many-classes

For each class count: N = 20 x classes predictions (at least 200,000), half of them correct
and half random, as .npy files; then `cifarlab diagnose --predictions P --labels Y` without
and with `--plot DIR`, each a real process, timed by wall clock. Prints a markdown table and
writes diagnose_many_classes.csv into --out. Run it with PYTHONPATH=<other checkout>/src to
time another version of the code.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--out", type=Path, default=Path("runs/many-classes"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"command: python {shlex.join(sys.argv)}\n")
    print("| classes | predictions | diagnose s | diagnose --plot s | plot / baseline |\n| --- | --- | --- | --- | --- |")
    rows = []
    for classes in args.classes:
        rng = np.random.default_rng(0)
        n = max(200_000, 20 * classes)
        labels = rng.integers(0, classes, n)
        predictions = np.where(rng.random(n) < 0.5, labels, rng.integers(0, classes, n))
        pred_path, label_path = args.out / f"p{classes}.npy", args.out / f"y{classes}.npy"
        np.save(pred_path, predictions)
        np.save(label_path, labels)
        base = [sys.executable, "-m", "cifarlab", "diagnose", "--predictions", str(pred_path),
                "--labels", str(label_path)]
        plain = timed(base)
        plotted = timed(base + ["--plot", str(args.out / f"plots{classes}")])
        rows.append((classes, n, round(plain, 1), round(plotted, 1), round(plotted / plain, 2)))
        print(f"| {classes:,} | {n:,} | {plain:.1f} | {plotted:.1f} | {plotted / plain:.2f} |", flush=True)
    with open(args.out / "diagnose_many_classes.csv", "w", newline="") as f:
        csv.writer(f).writerows([("classes", "predictions", "diagnose_s", "diagnose_plot_s", "ratio"), *rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
