"""Real evaluation folders for the report tests, made in a few seconds.

A tiny model is trained on the synthetic colour dataset (written as an ImageFolder on disk so
that `cifarlab evaluate --data FOLDER` can read it too), with two superclasses so the report
has a coarse view. It is then evaluated twice through `evaluate` itself: on the right images,
and on images divided by 255 before being stored as uint8 (all black) — the broken evaluation
a report must set apart at a glance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from synthetic import synthetic_dataset, write_image_folder

from cifarlab.data import Dataset, load_dataset
from cifarlab.evaluation import evaluate
from cifarlab.training import TrainConfig, train

CORRECT_LABEL = "correct"
BROKEN_LABEL = "raw <pixels> & /255"  # markup on purpose: the page must escape it


@dataclass
class ReportRun:
    data_dir: Path  # the ImageFolder
    cache: Path  # CIFARLAB_HOME for CLI calls
    dataset: Dataset
    model_path: Path
    correct: Path  # evaluation folders
    broken: Path


def label_evaluation(folder: Path, label: str) -> None:
    """What `cifarlab demo` does: name the evaluation in its metrics.json."""
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics, "label": label}))


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> ReportRun:
    root = tmp_path_factory.mktemp("report-run")
    data_dir = write_image_folder(root / "colours", synthetic_dataset(num_classes=4))
    cache = root / "home"
    ds = load_dataset(data_dir, cache_dir=cache, progress=False)
    ds.coarse_classes = ["warm", "cold"]  # classes 0, 1 -> warm; 2, 3 -> cold
    ds.train_y_coarse, ds.test_y_coarse = ds.train_y // 2, ds.test_y // 2
    result = train(TrainConfig(data=str(data_dir), model="airbench-small", epochs=2, batch_size=32,
                               device="cpu"), dataset=ds, run_dir=root / "run", progress=False)
    correct = Path(evaluate(result.model_path, data=ds, out_dir=root / "eval-correct", progress=False)["out_dir"])
    black = replace(ds, test_x=ds.test_x // 255)  # what /255 then a cast to uint8 leaves
    broken = Path(evaluate(result.model_path, data=black, out_dir=root / "eval-broken", progress=False)["out_dir"])
    label_evaluation(correct, CORRECT_LABEL)
    label_evaluation(broken, BROKEN_LABEL)
    return ReportRun(data_dir, cache, ds, result.model_path, correct, broken)
