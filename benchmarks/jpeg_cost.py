"""What one JPEG step costs in accuracy: an estimate for the CIFAR-10 JPEG copy.

    python benchmarks/jpeg_cost.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --lossless ../shared/data/cifar100-test-first20.npz

airbench94's 94% is measured on the official (lossless) CIFAR-10; this project only has a
copy re-encoded as JPEG, so its accuracies are not directly comparable. Without the lossless
training set the first JPEG step cannot be undone, but a second step of the same size can be
added and measured. The benchmark

1. finds the quality the copy was saved at: re-encoding an image at its own quality changes it
   least (JPEG is close to idempotent there);
2. measures, on the few lossless images at hand, the pixel error (RMSE, 0-255 scale) of the
   first step (lossless -> copy's quality) and of a second step (copy -> --requality), so the
   two can be seen to be of the same size;
3. trains cifarlab's default recipe for --epochs on the copy as it is and on the copy with the
   second step applied to train and test images alike, one after the other in this run, and
   reports test accuracy (plain and with flip+translate TTA) for both.

The accuracy lost to the second step is the estimate of what the first one cost. It is an
estimate, not a measurement: the first step removes detail the second no longer finds.
Prints a markdown table and writes jpeg_cost.csv into --out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifarlab import load_dataset
from cifarlab.evaluation import predict_logits_tta
from cifarlab.training import TrainConfig, Trainer


def jpeg_round_trip(images: np.ndarray, quality: int) -> np.ndarray:
    """Encode each uint8 NHWC image as JPEG at `quality` (Pillow's defaults otherwise) and decode it."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def saved_quality(images: np.ndarray, candidates: range) -> tuple[int, dict[int, float]]:
    errors = {q: rmse(images, jpeg_round_trip(images, q)) for q in candidates}
    return min(errors, key=errors.get), errors


def train_and_test(dataset, epochs: int, seed: int, run_dir: Path, max_train_images: int | None) -> dict:
    cfg = TrainConfig(data="(in memory)", val_fraction=0.0, epochs=epochs, seed=seed,
                      max_train_images=max_train_images)
    trainer = Trainer(cfg, dataset, run_dir=run_dir, progress=False)
    start = time.perf_counter()
    model = trainer.fit().model
    seconds = time.perf_counter() - start
    plain = float((model.predict_logits(dataset.test_x).argmax(1) == dataset.test_y).mean())
    tta = float((predict_logits_tta(model, dataset.test_x, "flip+translate").argmax(1) == dataset.test_y).mean())
    return {"model": trainer.cfg.model, "epochs": epochs, "test_acc": round(plain, 4),
            "test_acc_tta": round(tta, 4), "fit_s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the JPEG copy (any dataset cifarlab reads)")
    parser.add_argument("--lossless", required=True, help=".npz with lossless uint8 images under x_test")
    parser.add_argument("--requality", type=int, default=50, help="quality of the added second step")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-images", type=int, default=None, help="for quick checks")
    parser.add_argument("--sample", type=int, default=2000, help="test images used to find the copy's quality")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-jpeg-cost"))
    args = parser.parse_args()
    print("command: python " + shlex.join(sys.argv), flush=True)

    dataset = load_dataset(args.data, progress=False)
    pick = np.random.default_rng(args.seed).choice(len(dataset.test_x), args.sample, replace=False)
    quality, errors = saved_quality(dataset.test_x[pick], range(50, 100, 5))
    print("RMSE of re-encoding the copy at quality q: "
          + ", ".join(f"q{q} {e:.2f}" for q, e in errors.items()) + f" -> saved at quality {quality}", flush=True)

    lossless = np.load(args.lossless)["x_test"]
    first = jpeg_round_trip(lossless, quality)
    print(f"on {len(lossless)} lossless images: RMSE lossless -> q{quality} {rmse(lossless, first):.2f}, "
          f"q{quality} -> q{args.requality} {rmse(first, jpeg_round_trip(first, args.requality)):.2f}", flush=True)

    degraded = dataclasses.replace(dataset, train_x=jpeg_round_trip(dataset.train_x, args.requality),
                                   test_x=jpeg_round_trip(dataset.test_x, args.requality))
    rows = []
    for i, (name, data) in enumerate([(f"copy (q{quality})", dataset), (f"copy + q{args.requality} step", degraded)]):
        rows.append({"data": name, **train_and_test(data, args.epochs, args.seed, args.out / f"run{i}",
                                                     args.max_train_images)})
        print(f"  {name}: {rows[-1]}", flush=True)

    lines = ["| data | model | epochs | test acc | with TTA | fit s |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['data']} | {r['model']} | {r['epochs']} | {r['test_acc']:.2%} | {r['test_acc_tta']:.2%} | "
              f"{r['fit_s']:.0f} |" for r in rows]
    cost = rows[0]["test_acc_tta"] - rows[1]["test_acc_tta"]
    lines += ["", f"accuracy lost to the second JPEG step (TTA): {cost:.2%}"]
    print("\n" + "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "jpeg_cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'jpeg_cost.csv'}")


if __name__ == "__main__":
    main()
