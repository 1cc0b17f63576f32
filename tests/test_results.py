"""The evaluation result record: what `evaluate` returns, its folder, and reading it back.

Uses the real evaluation folders of report_fixtures (a model trained and evaluated by
`evaluate` itself) and damages them one field at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import CORRECT_LABEL, ReportRun

from cifarlab.errors import InputError
from cifarlab.report import load_evaluation
from cifarlab.results import ConfusedExamples, EvaluationResult


def test_the_folder_reads_back_as_the_record_evaluate_wrote(report_run: ReportRun) -> None:
    result = EvaluationResult.from_folder(report_run.correct)
    on_disk = json.loads((report_run.correct / "metrics.json").read_text())
    assert result.to_dict() == on_disk  # the file format is the record's dict, key for key
    assert result.label == CORRECT_LABEL and result.out_dir == report_run.correct
    assert result.classes == report_run.dataset.classes
    np.testing.assert_array_equal(result.confusion_matrix, json.loads((report_run.correct / "cm.json").read_text()))
    assert result.accuracy == pytest.approx(np.trace(result.confusion_matrix) / result.confusion_matrix.sum())
    assert result.coarse is not None and result.coarse.classes == ["warm", "cold"]
    # The mapping view is metrics.json's keys plus out_dir, as evaluate's dict was.
    assert result["accuracy"] == on_disk["accuracy"] and result["out_dir"] == str(report_run.correct)


def test_to_folder_then_from_folder_round_trips(report_run: ReportRun, tmp_path: Path) -> None:
    result = EvaluationResult.from_folder(report_run.correct)
    probs = np.load(report_run.correct / "probs.npy")
    labels = np.load(report_run.correct / "labels.npy")
    written = result.to_folder(tmp_path / "copy", probs, labels)
    assert written.out_dir == tmp_path / "copy"
    assert EvaluationResult.from_folder(tmp_path / "copy") == written
    np.testing.assert_array_equal(np.load(tmp_path / "copy" / "labels.npy"), labels)
    assert not list((tmp_path / "copy").glob(".*.tmp"))  # atomic writes leave no temp files


def _damaged(report_run: ReportRun, tmp_path: Path, change) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(report_run.broken, folder)  # its mistakes fill most_confused
    metrics = json.loads((folder / "metrics.json").read_text())
    change(metrics)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(accuracy="0.9"), "'accuracy' must be a number in [0, 1], got str '0.9'"),
    (lambda m: m.update(accuracy=1.5), "'accuracy' must be a number in [0, 1]"),
    (lambda m: m.update(accuracy=True), "'accuracy' must be a number"),
    (lambda m: m["per_class"][0].update(support=-1), "per_class[0]: 'support' must be an integer"),
    (lambda m: m["per_class"][1].update(id=0), "per_class must list classes 0..C-1 once each"),
    (lambda m: m["per_class"].pop(), "the confusion matrix is 4x4 but 3 classes are listed"),
    (lambda m: m.update(per_class={"a": 1}), "'per_class' must be a list"),
    (lambda m: m["most_confused"][0].update(true_id=99), "most_confused[0]: 'true_id' must be an integer in [0, 3]"),
    (lambda m: m.update(confusion_matrix=[[0.5, 0], [0, 1]]), "must contain integer counts"),
    (lambda m: m["coarse"].update(classes=["warm"]), "the confusion matrix is 2x2 but 1 classes are listed"),
    (lambda m: m.update(label=["x"]), "'label' must be a string"),
    (lambda m: m.update(top9_accuracy="high"), "'top9_accuracy' must be a number"),
    (lambda m: m.update(dataset="cifar10"), "'dataset' must hold a JSON object"),
])
def test_each_damaged_field_is_named(report_run: ReportRun, tmp_path: Path, change, message: str) -> None:
    folder = _damaged(report_run, tmp_path, change)
    with pytest.raises(InputError) as info:
        load_evaluation(folder)
    assert message in str(info.value)
    assert "cifarlab evaluate" in str(info.value)  # and what to do


def test_a_document_without_a_matrix_takes_cm_json(report_run: ReportRun, tmp_path: Path) -> None:
    folder = _damaged(report_run, tmp_path, lambda m: m.pop("confusion_matrix"))
    result = EvaluationResult.from_folder(folder)
    np.testing.assert_array_equal(result.confusion_matrix, EvaluationResult.from_folder(report_run.broken).confusion_matrix)
    (folder / "cm.json").unlink()
    with pytest.raises(InputError, match="has no confusion_matrix and there is no cm.json"):
        EvaluationResult.from_folder(folder)


def test_confused_examples_are_checked(report_run: ReportRun, tmp_path: Path) -> None:
    examples = ConfusedExamples.load(report_run.broken / "confused_examples.npz", 4)
    assert examples is not None and examples.images.dtype == np.uint8 and len(examples.images) > 0
    bad = tmp_path / "bad.npz"
    fields = {k: getattr(examples, k) for k in ("images", "true_ids", "predicted_ids", "indices", "confidence", "pair")}
    np.savez(bad, **{**fields, "true_ids": np.full(len(examples.true_ids), 7)})
    with pytest.raises(InputError, match="true_ids must be class ids 0..3"):
        ConfusedExamples.load(bad, 4)
    np.savez(bad, **{**fields, "images": examples.images.astype(np.float32)})
    with pytest.raises(InputError, match="images must be uint8"):
        ConfusedExamples.load(bad, 4)
    np.savez(bad, **{k: v for k, v in fields.items() if k != "pair"})
    with pytest.raises(InputError, match="cannot be read"):
        ConfusedExamples.load(bad, 4)
    assert ConfusedExamples.load(tmp_path / "absent.npz", 4) is None  # folders from before examples
