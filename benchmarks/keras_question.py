"""The founding question with a real Keras model: trained as the question did, evaluated as its
second script did (no / 255), then evaluated, diagnosed and sealed by cifarlab.

    python benchmarks/keras_question.py --data ../shared/data/cifar100-rebuilt.tar.gz \
        --epochs 5 --out runs/keras-question

1. Trains the question's layer stack with Keras 3 on the PyTorch backend (Conv2D 32, 32,
   MaxPool, Dropout, Conv2D 64, 64, MaxPool, Dropout, Dense 1024 tanh, Dropout, Dense softmax;
   Adam 1e-3, batch 32, pixels / 255) for --epochs on the training split, and saves it as
   `cifar100.h5` (the question's file) and `cifar100.keras`.
2. The baseline, in the same run: Keras' own `model.evaluate` on the test split, with / 255 (as
   trained) and without (the question's bug).
3. cifarlab, as a user runs it (real `cifarlab` processes): `evaluate --preprocessing scale`
   (must equal Keras' number), `diagnose` on the raw test pixels (must name the /255), `export
   --preprocessing scale` (the sealed ONNX, its difference from Keras), and `evaluate` of the
   sealed file with no flags, fed raw uint8 pixels.

Prints a markdown table, writes keras_question.csv and the diagnosis text into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ["KERAS_BACKEND"] = "torch"

from cifarlab import load_dataset  # noqa: E402
from cifarlab.keras import import_keras  # noqa: E402


def question_model(keras, num_classes: int):
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(), layers.Dropout(0.25),
        layers.Conv2D(64, 3, padding="same", activation="relu"), layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(), layers.Dropout(0.25),
        layers.Flatten(), layers.Dense(1024, activation="tanh"), layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax")])


def cifarlab(*args: str) -> tuple[int, str]:
    """Run the `cifarlab` command as a user would; (exit status, stdout + stderr)."""
    done = subprocess.run([sys.executable, "-m", "cifarlab", *args], capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def accuracy_in(text: str) -> float:
    return float(re.search(r"^accuracy: ([\d.]+)%", text, re.M).group(1)) / 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the CIFAR-100 archive")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/keras-question"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    keras = import_keras()
    keras.utils.set_random_seed(0)
    ds = load_dataset(args.data, progress=False)
    print(f"command: python {shlex.join(sys.argv)}\nkeras {keras.__version__} on {keras.backend.backend()}\n")

    model = question_model(keras, len(ds.classes))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(ds.train_x / 255.0, ds.train_y, epochs=args.epochs, batch_size=32, verbose=2)
    train_s = time.perf_counter() - start
    h5, sealed = args.out / "cifar100.h5", args.out / "sealed.onnx"
    model.save(h5)
    model.save(args.out / "cifar100.keras")

    rows = []
    _, right = model.evaluate(ds.test_x / 255.0, ds.test_y, verbose=0)
    _, raw = model.evaluate(ds.test_x.astype("float32"), ds.test_y, verbose=0)
    rows.append(("Keras model.evaluate, x / 255 (as trained)", f"{right:.2%}", ""))
    rows.append(("Keras model.evaluate, raw pixels (the question's bug)", f"{raw:.2%}", ""))

    status, text = cifarlab("evaluate", str(h5), "--data", args.data, "--preprocessing", "scale",
                            "--quiet", "--out", str(args.out / "eval-h5"))
    rows.append(("cifarlab evaluate cifar100.h5 --preprocessing scale", f"{accuracy_in(text):.2%}", f"exit {status}"))

    np.save(args.out / "x_raw.npy", ds.test_x.astype(np.float32))
    np.save(args.out / "y.npy", ds.test_y)
    status, text = cifarlab("diagnose", "--model", str(h5), "--images", str(args.out / "x_raw.npy"),
                            "--labels", str(args.out / "y.npy"), "--json")
    (args.out / "diagnosis.json").write_text(text)
    top = json.loads(text)["findings"][0]
    rows.append(("cifarlab diagnose --model cifar100.h5 --images x_raw.npy", top["id"],
                 f"exit {status}; fix: {top['fix']}"))

    status, text = cifarlab("export", str(h5), "--preprocessing", "scale", "--data", args.data,
                            "--onnx", str(sealed))
    diff = re.search(r"max abs output difference (\S+)", text)
    rows.append(("cifarlab export cifar100.h5 --preprocessing scale", "sealed.onnx",
                 f"exit {status}; max abs difference from Keras {diff.group(1) if diff else text.strip()}"))
    status, text = cifarlab("evaluate", str(sealed), "--quiet", "--out", str(args.out / "eval-sealed"))
    rows.append(("cifarlab evaluate sealed.onnx (no flags; raw uint8 in)", f"{accuracy_in(text):.2%}",
                 f"exit {status}"))

    print(f"trained {args.epochs} epochs on {len(ds.train_y):,} images in {train_s:.0f} s\n")
    print("| step | result | notes |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    with open(args.out / "keras_question.csv", "w", newline="") as f:
        csv.writer(f).writerows([("step", "result", "notes"), *rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
