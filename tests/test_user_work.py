"""Never lose the user's work, never mix two results in one place (issue 15, item 5).

A tiny model on the synthetic colour dataset, trained and evaluated through the CLI's
`main` in-process (the rules are the API's; the flags only pass them on); the broken pipe
and Ctrl-C checks need real processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import QUICK, synthetic_dataset, write_image_folder

from cifarlab.cli import main
from cifarlab.errors import InputError
from cifarlab.evaluation import default_out_dir, evaluate
from cifarlab.training import TrainConfig, train


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("colours") / "data", synthetic_dataset(num_classes=4))


def train_cli(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--model", "airbench-small", "--epochs", "1",
                 "--batch-size", "32", "--device", "cpu", "--quiet", *extra])


def test_a_finished_run_is_not_replaced_without_overwrite(colours: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert train_cli(colours, run) == 0
    assert main(["evaluate", str(run / "model.safetensors"), "--data", str(colours), "--quiet"]) == 0
    model_bytes = (run / "model.safetensors").read_bytes()
    capsys.readouterr()

    assert train_cli(colours, run) == 2
    err = capsys.readouterr().err
    assert "holds a run already" in err and f"cifarlab train --resume {run}" in err and "--overwrite" in err
    assert (run / "model.safetensors").read_bytes() == model_bytes  # untouched
    assert (run / "eval-model-test" / "metrics.json").is_file()

    (run / "notes.txt").write_text("mine")
    assert train_cli(colours, run, "--overwrite", "--seed", "1") == 0
    assert (run / "model.safetensors").read_bytes() != model_bytes
    assert not (run / "eval-model-test").exists()  # the old model's evaluation went with it
    assert (run / "notes.txt").read_text() == "mine"  # nothing else is touched


def test_one_folder_holds_one_evaluation(colours: Path, tmp_path: Path) -> None:
    result = train(TrainConfig(data=str(colours), **QUICK), run_dir=tmp_path / "run", progress=False)
    out = tmp_path / "eval"
    first = evaluate(result.model_path, split="test", out_dir=out, progress=False)
    again = evaluate(result.model_path, split="test", out_dir=out, progress=False)  # the same evaluation
    assert again == first
    with pytest.raises(InputError, match="holds the evaluation of airbench-small on data test split; this one "
                                         "is of airbench-small on data val split"):
        evaluate(result.model_path, split="val", out_dir=out, progress=False)
    with pytest.raises(InputError, match="--overwrite"):
        evaluate(result.model_path, split="test", tta="flip", out_dir=out, progress=False)
    assert json.loads((out / "metrics.json").read_text())["tta"] is None  # still the first one
    flipped = evaluate(result.model_path, split="test", tta="flip", out_dir=out, progress=False, overwrite=True)
    assert flipped.tta == "flip" and json.loads((out / "metrics.json").read_text())["tta"] == "flip"


def test_default_folders_of_one_run_never_collide() -> None:
    run = Path("runs/c10")
    names = {default_out_dir(run / "model.safetensors", "test"), default_out_dir(run / "model.onnx", "test"),
             default_out_dir(run / "model.safetensors", "test", "flip"),
             default_out_dir(run / "model.safetensors", "val")}
    assert len(names) == 4
    assert default_out_dir(run / "model.safetensors", "test") == run / "eval-model-test"  # as the README shows


def test_export_checks_its_path_before_working(tmp_path: Path, capsys) -> None:
    model = tmp_path / "absent.safetensors"  # never read: the path is wrong first
    assert main(["export", str(model), "--onnx", str(tmp_path / "model.txt")]) == 2
    assert "name ends in .onnx, this one in .txt; e.g. --onnx" in capsys.readouterr().err
    assert main(["export", str(model), "--onnx", str(tmp_path / "no" / "such" / "m.onnx")]) == 2
    assert f"the folder {tmp_path / 'no' / 'such'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_a_reader_that_leaves_does_not_change_the_exit_status(tmp_path: Path) -> None:
    cm = tmp_path / "cm.json"  # a collapsed matrix: diagnose exits 1 (an error finding)
    cm.write_text(json.dumps([[100] + [0] * 9 for _ in range(10)]))  # every image predicted as class 0
    command = [sys.executable, "-m", "cifarlab", "diagnose", "--confusion", str(cm)]
    alone = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 1, alone.stderr
    piped = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert piped.stdout is not None and piped.stderr is not None
    piped.stdout.close()  # the reader is gone before the first line (`| head -0`)
    stderr = piped.stderr.read().decode()
    assert piped.wait(timeout=120) == 1, stderr
    assert "Broken pipe" not in stderr and "BrokenPipeError" not in stderr


def test_ctrl_c_gives_the_exact_resume_command(colours: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = [sys.executable, "-m", "cifarlab", "train", "--data", str(colours), "--out", str(run),
               "--model", "airbench-small", "--epochs", "200", "--batch-size", "32", "--device", "cpu"]
    with open(tmp_path / "stderr.txt", "w") as err:  # a file: the progress bars cannot fill a pipe
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout is not None
        # The first epoch's row is printed after its checkpoint is written: then interrupt.
        # Read line by line, however long the machine takes (no clock); EOF means it died.
        for line in proc.stdout:
            if line.startswith("epoch 1/"):
                break
        else:
            pytest.fail(f"training ended before its first epoch: {(tmp_path / 'stderr.txt').read_text()}")
        assert (run / "checkpoint.safetensors").is_file()
        proc.send_signal(signal.SIGINT)
        proc.stdout.read()
        proc.wait()
    assert proc.returncode == 130
    assert f"continue with: cifarlab train --resume {run}" in (tmp_path / "stderr.txt").read_text()
