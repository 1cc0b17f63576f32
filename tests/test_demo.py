"""`cifarlab demo` end to end on the real CIFAR-10 copy, and its bad-input paths through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CIFAR10_JPEG

from cifarlab.cli import main
from cifarlab.demo import LABEL_CORRECT, LABEL_RAW, run_demo
from cifarlab.metrics import load_confusion_json


@pytest.mark.slow  # about a minute on 2 idle cores: 2 short epochs, two evaluations of 10,000 images, the probes
def test_demo_reproduces_the_forgotten_division_and_names_it(cifar10_jpeg, cifarlab_home, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_HOME", str(cifarlab_home))  # the copy the fixture decoded
    out = tmp_path / "demo"
    summary = run_demo(str(CIFAR10_JPEG), out, epochs=2, max_train_images=10_000, progress=False)
    # The images it really trained on: 1,000 of each class's 4,000 (after the 20% validation split).
    assert summary["trained"]["train_images"] == 10_000 and not summary["trained"]["fitted_to_budget"]

    correct, raw = summary["accuracy_correct"], summary["accuracy_raw_pixels"]
    assert correct > 0.3, f"the demo model trained badly ({correct:.1%})"
    assert raw < correct - 0.15 and raw < 0.6 * correct
    assert summary["top_finding"]["id"] == "input-scale"
    assert summary["top_finding"]["fix"].startswith("x = x / 255.0")
    assert json.loads((out / "diagnosis.json").read_text())["findings"][0]["id"] == "input-scale"

    for folder, label, accuracy in (("eval-correct", LABEL_CORRECT, correct), ("eval-raw-pixels", LABEL_RAW, raw)):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        cm = load_confusion_json(out / folder / "cm.json")
        assert metrics["label"] == label and metrics["accuracy"] == accuracy
        assert cm.sum() == 10_000 and np.trace(cm) / cm.sum() == pytest.approx(accuracy)
        assert (out / folder / "confusion_matrix.png").is_file() and (out / folder / "probs.npy").is_file()
    # The seed's vertical bars: on raw pixels two columns take most of the predictions.
    predicted = np.sort(load_confusion_json(out / "eval-raw-pixels" / "cm.json").sum(0))[::-1]
    assert predicted[:2].sum() > 0.5 * predicted.sum()

    html = (out / "report.html").read_text()
    assert summary["report"] == str(out / "report.html")
    assert LABEL_RAW in html and "input-scale" in html
    assert json.loads((out / "demo.json").read_text()) == summary


def test_missing_data_path_exits_2_and_says_what_to_pass(tmp_path, capsys):
    missing = tmp_path / "no-such-cifar.tar.gz"
    assert main(["demo", "--data", str(missing), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--data PATH" in err
    assert not (tmp_path / "demo" / "run").exists()  # failed before any training


def test_failed_download_says_to_pass_data(tmp_path):
    """A real download attempt that cannot connect (a proxy on a closed port), in a process
    whose home, cache and working directory hold no copy of CIFAR-100."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update(HOME=str(tmp_path), CIFARLAB_HOME=str(tmp_path / "cache"),
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-m", "cifarlab", "demo", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Could not download" in proc.stderr
    assert "cifarlab demo could not get 'cifar100'" in proc.stderr and "--data PATH" in proc.stderr


def test_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "non-empty folder that an earlier demo did not write" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_time_budget_is_refused_before_the_data(tmp_path, capsys):
    assert main(["demo", "--data", "cifar100", "--time-budget", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--time-budget must be a positive number" in capsys.readouterr().err
