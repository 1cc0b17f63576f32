"""The complete real CIFAR-100 (../shared/data/cifar100-rebuilt.tar.gz) through the loader,
`evaluate`'s 20-superclass view, `predict` on real image files and the demo.

Every test skips cleanly where ../shared is absent; the archive is decoded once per session
(conftest.cifar100_rebuilt) and the model is trained once (conftest.cifar100_model).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED_DATA_DIR
from PIL import Image

from cifarlab.data.cifar import CIFAR100_COARSE_OF_FINE
from cifarlab.evaluation import evaluate
from cifarlab.metrics import load_confusion_json

FIRST20 = SHARED_DATA_DIR / "cifar100-test-first20.npz"


@pytest.fixture(scope="module")
def first20(shared_data_dir):
    """The first 20 official test images from lossless PNG originals (an independent source)."""
    if not FIRST20.is_file():
        pytest.skip(f"{FIRST20} is absent")
    return dict(np.load(FIRST20))


def test_loader_reads_the_whole_archive_in_the_official_order(cifar100_rebuilt, first20):
    ds = cifar100_rebuilt
    assert (ds.train_x.shape, ds.test_x.shape) == ((50_000, 32, 32, 3), (10_000, 32, 32, 3))
    assert ds.train_x.dtype == np.uint8 and ds.test_x.dtype == np.uint8
    assert len(ds.classes) == 100 and len(ds.coarse_classes) == 20
    assert list(ds.classes) == [str(n) for n in first20["fine_label_names"]]
    assert list(ds.coarse_classes) == [str(n) for n in first20["coarse_label_names"]]
    assert ds.train_y[:5].tolist() == [19, 29, 0, 11, 1]  # the official first training labels
    assert np.bincount(ds.train_y, minlength=100).tolist() == [500] * 100
    assert np.bincount(ds.test_y, minlength=100).tolist() == [100] * 100
    # Pixel for pixel and label for label against the lossless originals.
    assert np.array_equal(ds.test_x[:20], first20["x_test"])
    assert ds.test_y[:20].tolist() == first20["y_test"].tolist()
    assert ds.test_y_coarse[:20].tolist() == first20["y_test_coarse"].tolist()
    # The fine-to-coarse table cifarlab ships (used by diagnose) is the archive's.
    assert ds.coarse_of_fine == list(CIFAR100_COARSE_OF_FINE)


@pytest.mark.slow  # trains the shared CIFAR-100 model (~30 s on 2 bf16 cores, ~90 s in float32)
def test_evaluate_coarse_view_agrees_with_the_archive_coarse_labels(cifar100_rebuilt, cifar100_model, tmp_path):
    report = evaluate(cifar100_model.model_path, data=cifar100_rebuilt, out_dir=tmp_path / "eval", progress=False)
    pred = np.load(tmp_path / "eval" / "probs.npy").argmax(1)
    coarse = report["coarse"]
    assert coarse["classes"] == list(cifar100_rebuilt.coarse_classes)
    # The superclass view computed from fine predictions, scored against the archive's own
    # coarse labels (not derived from the fine ones): the two must agree exactly.
    expected = float((np.asarray(CIFAR100_COARSE_OF_FINE)[pred] == cifar100_rebuilt.test_y_coarse).mean())
    assert coarse["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert report["accuracy"] == pytest.approx(float((pred == cifar100_rebuilt.test_y).mean()), abs=1e-12)
    # A model that learned something: above chance on both views, and coarser is easier.
    assert report["accuracy"] > 0.05 and coarse["accuracy"] > report["accuracy"] and coarse["accuracy"] > 0.15
    coarse_cm = np.asarray(coarse["confusion_matrix"])
    assert coarse_cm.shape == (20, 20) and coarse_cm.sum() == 10_000
    assert coarse_cm.sum(1).tolist() == [500] * 20  # 5 fine classes of 100 test images each
    assert (tmp_path / "eval" / "coarse_confusion_matrix.png").is_file()
    assert load_confusion_json(tmp_path / "eval" / "cm.json").shape == (100, 100)


@pytest.mark.slow  # shares the trained model above
def test_predict_cli_on_real_cifar100_png_files(cifar100_model, first20, tmp_path):
    paths = []
    for i, image in enumerate(first20["x_test"][:8]):
        paths.append(tmp_path / f"test{i:02d}.png")
        Image.fromarray(image).save(paths[-1])
    proc = subprocess.run([sys.executable, "-m", "cifarlab", "predict", str(cifar100_model.model_path),
                           *map(str, paths), "--top", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    # PNG is lossless: the files give exactly the predictions of the arrays they were made from.
    probs = cifar100_model.model.predict_proba(first20["x_test"][:8])
    for result, path, row in zip(results, paths, probs):
        assert result["path"] == str(path)
        assert [t["id"] for t in result["top"]] == np.argsort(-row)[:3].tolist()
        assert [t["class"] for t in result["top"]] == [cifar100_model.model.classes[i] for i in np.argsort(-row)[:3]]
        assert result["top"][0]["probability"] == pytest.approx(float(row.max()), abs=1e-5)


@pytest.mark.slow  # about a minute: 2 short epochs, two evaluations of 10,000 images, the probes
def test_demo_shows_the_bars_on_100_classes(cifar100_rebuilt, cifarlab_home, tmp_path, monkeypatch):
    from conftest import CIFAR100_REBUILT

    from cifarlab.demo import run_demo

    monkeypatch.setenv("CIFARLAB_HOME", str(cifarlab_home))  # the copy the fixture decoded
    out = tmp_path / "demo"
    summary = run_demo(str(CIFAR100_REBUILT), out, epochs=2, max_train_images=10_000, progress=False)

    correct, raw = summary["accuracy_correct"], summary["accuracy_raw_pixels"]
    assert correct > 0.08 and raw < 0.5 * correct, summary
    assert summary["top_finding"]["id"] == "input-scale"
    assert summary["coarse_accuracy_correct"] > summary["coarse_accuracy_raw_pixels"]
    # The bars: on raw pixels a few of the 100 classes take most of the predictions, and the
    # summary names them.
    predicted = np.sort(load_confusion_json(out / "eval-raw-pixels" / "cm.json").sum(0))[::-1]
    assert predicted[:5].sum() > 0.5 * predicted.sum()
    assert "of 100 classes" in summary["raw_pixel_predictions"]
    assert (out / "eval-correct" / "coarse_confusion_matrix.png").is_file()
