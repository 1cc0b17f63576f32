"""The whole 10-minute command on the slow CPU kind, emulated: which plan and model win there.

    python benchmarks/slow_cpu.py --data ../shared/data/cifar100-rebuilt.tar.gz

Some of this project's 2-core machines (an AMD EPYC with AVX2 only, no AVX-512) train in
float32: issue 13 measured an airbench-small epoch of 50,000 images at 148 s there, idle.
No such machine was lent to the session that wrote this script, so it emulates one on the
bf16 kind: PyTorch's and oneDNN's kernels are capped at AVX2 (`ATEN_CPU_CAPABILITY=avx2`,
`ONEDNN_MAX_CPU_ISA=AVX2`, which also turns bf16 autocast off: oneDNN then reports no native
bf16), and the run gets one thread on one core (`OMP_NUM_THREADS=1`, `taskset`). The script
measures the emulated pace first and prints it beside the real machine's 148 s, so a reader
can judge the emulation.

Each candidate is the user's whole command, run as the user runs it, in its own process:
`cifarlab train --data D --time-budget B --val-fraction 0 ARGS` and then
`cifarlab evaluate RUN/model.safetensors --split test --tta flip+translate`. The table gives
the wall time of both together (the budget covers both) and the test accuracy.

Prints a markdown table; writes --out/slow_cpu.csv and summary.md. `--only none` measures the
emulated pace alone (an airbench-small epoch in batches of 2,000 and of 500).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from train_speed import cpu_model, parse_sweep_args

HYP = {
    "budget": 10.0,  # minutes, the user's --time-budget
    "core": 1,  # the one core the emulated machine runs on
    "real_epoch_s": 148.0,  # airbench-small, 50,000 images, the real AVX2-only EPYC, idle (issue 13)
}

EMULATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1"}

# name: extra `cifarlab train` arguments. "default" is the baseline: what a user gets today.
CANDIDATES: dict[str, list[str]] = {
    "default": [],
    "small": ["--model", "airbench-small"],
    "small-fit": ["--model", "airbench-small", "--fit-budget"],
    "default-fit": ["--fit-budget"],
}

PACE_PROBE = """
import time
from pathlib import Path
from cifarlab import load_dataset
from cifarlab.training import TrainConfig, Trainer
dataset = load_dataset({data!r}, progress=False)
for batch in (2000, 500):  # the recipe's batch and the short-run recipe's
    cfg = TrainConfig(model="airbench-small", epochs=1, val_fraction=0, max_train_images=4000, batch_size=batch)
    trainer = Trainer(cfg, dataset, run_dir=Path("/nonexistent"), progress=False)
    x, y = trainer.train_x[:batch], trainer.train_y[:batch]
    trainer.train_step(x, y, trainer.cfg.lr)  # warm-up
    steps = 4000 // batch
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y, trainer.cfg.lr)
    print((time.perf_counter() - start) / steps * 50000 / batch)  # seconds per epoch of 50,000 images
print(trainer.amp)
"""


def emulated(command: list[str]) -> list[str]:
    return ["taskset", "-c", str(HYP["core"]), *command]


def environment() -> dict[str, str]:
    return {**os.environ, **EMULATION}


def pace(data: str) -> tuple[float, float, str]:
    """Seconds per airbench-small epoch of 50,000 images on the emulated machine, in batches of
    2,000 and of 500, and whether bf16 autocast was on."""
    out = subprocess.run(emulated([sys.executable, "-c", PACE_PROBE.format(data=data)]), env=environment(),
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), out[2]


def run(name: str, args: list[str], data: str, out: Path) -> dict:
    run_dir = out / name
    train = ["cifarlab", "train", "--data", data, "--time-budget", f"{HYP['budget']:g}", "--val-fraction", "0",
             "--out", str(run_dir), "--quiet", *args]
    evaluate = ["cifarlab", "evaluate", str(run_dir / "model.safetensors"), "--split", "test",
                "--tta", "flip+translate", "--out", str(run_dir / "eval"), "--quiet"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run folder each time
    start = time.perf_counter()
    subprocess.run(emulated(train), env=environment(), check=True)
    trained = time.perf_counter() - start
    subprocess.run(emulated(evaluate), env=environment(), check=True)
    total = time.perf_counter() - start
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {"candidate": name, "args": shlex.join(args), "model": config["model"], "epochs": config["epochs"],
            "batch_size": config["batch_size"],
            "train_images": config.get("max_train_images") or 50000,
            "tta_test_acc": round(metrics["accuracy"], 4), "train_s": round(trained, 1),
            "whole_command_s": round(total, 1), "within_budget": total <= 60 * HYP["budget"],
            "load_avg_1min": round(os.getloadavg()[0], 1)}


def table(rows: list[dict]) -> list[str]:
    lines = ["| candidate | model | epochs | batch | training images | test acc (TTA) | train + evaluate | within budget |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['model']} | {r['epochs']} | {r['batch_size']} | {r['train_images']:,} | "
                     f"{r['tta_test_acc']:.1%} | {r['whole_command_s'] / 60:.1f} min | "
                     f"{'yes' if r['within_budget'] else 'no'} |")
    return lines


def main() -> None:
    args = parse_sweep_args(__doc__, HYP, "runs/slow-cpu")
    epoch_s, short_epoch_s, amp = pace(args.data)
    header = [f"CPU: {cpu_model()}, emulating the AVX2-only kind: {' '.join(f'{k}={v}' for k, v in EMULATION.items())}, "
              f"taskset -c {HYP['core']}; bf16 autocast on: {amp}",
              f"airbench-small epoch of 50,000 images, emulated: {epoch_s:.0f} s "
              f"(the real AVX2-only machine, idle: {HYP['real_epoch_s']:.0f} s); in batches of 500: "
              f"{short_epoch_s:.0f} s",
              "load average (1, 5, 15 min) at start: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()),
              f"command: python {shlex.join(sys.argv)}", ""]
    print("\n".join(header), flush=True)
    names = [] if args.only == "none" else args.only.split(",") if args.only else list(CANDIDATES)
    rows = []
    for name in names:
        rows.append(run(name, CANDIDATES[name], args.data, args.out))
        print(rows[-1], flush=True)
        with open(args.out / "slow_cpu.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (args.out / "summary.md").write_text("\n".join(header + table(rows)) + "\n")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
