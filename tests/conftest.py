"""Shared fixtures for tests that use the real data in ``<repo>/../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Fixtures defined in helper modules: the HTTP server and the report's evaluation folders.
pytest_plugins = ["http_server", "report_fixtures"]

# The real datasets: $CIFARLAB_SHARED_DATA if set, else ../shared/data beside the repository.
SHARED_DATA_DIR = Path(os.environ.get("CIFARLAB_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
CIFAR10_JPEG = SHARED_DATA_DIR / "cifar10-jpeg.tar.gz"
CIFAR100_REBUILT = SHARED_DATA_DIR / "cifar100-rebuilt.tar.gz"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The folder of real datasets; the test is skipped where it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA_DIR} is absent")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def cifarlab_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache dir the real-data tests share (pass it as CIFARLAB_HOME to subprocesses).

    ``$CIFARLAB_TEST_CACHE`` when set (reused across sessions), else a session tmp dir.
    """
    env = os.environ.get("CIFARLAB_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("cifarlab-cache")


@pytest.fixture(scope="session")
def cifar10_jpeg(shared_data_dir: Path, cifarlab_home: Path):
    """The real CIFAR-10 (60,000 JPEGs) as a cifarlab Dataset, decoded once per session."""
    from cifarlab.data import load_dataset

    if not CIFAR10_JPEG.is_file():
        pytest.skip(f"{CIFAR10_JPEG} is absent")
    return load_dataset(CIFAR10_JPEG, cache_dir=cifarlab_home, progress=False)


@pytest.fixture(scope="session")
def cifar100_rebuilt(shared_data_dir: Path, cifarlab_home: Path):
    """The complete real CIFAR-100 (official pickle layout) as a cifarlab Dataset, decoded once."""
    from cifarlab.data import load_dataset

    if not CIFAR100_REBUILT.is_file():
        pytest.skip(f"{CIFAR100_REBUILT} is absent")
    return load_dataset(CIFAR100_REBUILT, cache_dir=cifarlab_home, progress=False)


@pytest.fixture(scope="session")
def cifar_keras(cifar10_jpeg, tmp_path_factory):
    """keras-cnn ("scale": /255 inside) trained briefly on 8,000 real images, ~50% test accuracy.

    Also exported as a float-input ONNX file: like the seed's Keras model, it expects float
    0..1 NHWC images, and the caller must do the /255.
    """
    pytest.importorskip("onnxruntime")
    from cifarlab.export import export_onnx
    from cifarlab.formats import open_model
    from cifarlab.training import TrainConfig, train

    root = tmp_path_factory.mktemp("cifar-keras")
    # float32 like Keras (amp "auto" would train in bf16 on CPUs with native bf16): the
    # diagnosis tests' expectations were set on this float32 model.
    cfg = TrainConfig(data="cifar10", model="keras-cnn", epochs=3, batch_size=64, max_train_images=8000,
                      val_fraction=0.1, seed=0, amp="off")
    result = train(cfg, dataset=cifar10_jpeg, run_dir=root / "run", progress=False)
    onnx = open_model(export_onnx(result.model, root / "float.onnx", input="float")["path"])
    # A seeded sample: this copy's test set is sorted by class, so the first 2,000 hold 2 classes.
    keep = np.sort(np.random.default_rng(0).choice(len(cifar10_jpeg.test_y), 2000, replace=False))
    x, y = cifar10_jpeg.test_x[keep], cifar10_jpeg.test_y[keep]
    accuracy = float((result.model.predict(x) == y).mean())
    assert accuracy > 0.4, f"the test model trained badly ({accuracy:.1%}); the probes need a real model"
    return {"result": result, "onnx": onnx, "cifarlab": open_model(result.model_path), "x": x, "y": y,
            "root": root}


@pytest.fixture(scope="session")
def cifar100_model(cifar100_rebuilt, tmp_path_factory):
    """airbench-small trained for 3 epochs on 10,000 real CIFAR-100 images (a weak but real
    fine-label model): shared by the CIFAR-100 tests that need a model."""
    from cifarlab.training import TrainConfig, train

    cfg = TrainConfig(data="cifar100", model="airbench-small", epochs=3, max_train_images=10_000,
                      val_fraction=0.02, seed=0)
    return train(cfg, dataset=cifar100_rebuilt, run_dir=tmp_path_factory.mktemp("cifar100-model") / "run",
                 progress=False)
