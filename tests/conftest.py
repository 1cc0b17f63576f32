"""Shared fixtures for tests that use the real data in ``<repo>/../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_JPEG = SHARED_DATA_DIR / "cifar10-jpeg.tar.gz"


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
