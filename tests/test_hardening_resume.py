"""Interrupted training, for real: `cifarlab train` processes killed with SIGKILL at random moments,
and a disk that fills up in the middle of a run.

After every kill: each .safetensors file in the run folder loads (none is torn), the checkpoint
holds every epoch the process had reported finished (at most the current epoch is lost), and
`cifarlab train --resume` continues. At the end, the run resumed many times has bit-identical
weights to a run that was never interrupted.

The kill moments are drawn from a seeded generator (printed, so a failure can be replayed):
while the process starts, in the middle of an epoch, while the checkpoint is being written
(its temporary file exists) and while the final model is being written.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from synthetic import synthetic_dataset, write_image_folder

from cifarlab.data import load_dataset
from cifarlab.modelfile import load_model, read_safetensors
from cifarlab.training import read_checkpoint

pytestmark = pytest.mark.slow

EPOCHS = 5
KILLS = ["startup", "checkpoint-write", "mid-epoch", "checkpoint-write", "mid-epoch", "model-write"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """A small ImageFolder, imported into a cache the child processes share."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "shapes"
    write_image_folder(data, synthetic_dataset(n_train_per_class=120, n_test_per_class=5, num_classes=4))
    load_dataset(data, cache_dir=root / "cache", progress=False)
    return {**os.environ, "CIFARLAB_HOME": str(root / "cache"), "PYTHONUNBUFFERED": "1", "DATA": str(data)}


def train_args(env: dict[str, str], run: Path, resume: bool, epochs: int = EPOCHS) -> list[str]:
    if resume:
        return [sys.executable, "-m", "cifarlab", "train", "--resume", str(run)]
    return [sys.executable, "-m", "cifarlab", "train", "--data", env["DATA"], "--model", "keras-cnn",
            "--epochs", str(epochs), "--batch-size", "32", "--device", "cpu", "--out", str(run)]


class Run:
    """A training process whose stdout is collected in the background ("epoch k/E" lines)."""

    def __init__(self, args: list[str], env: dict[str, str], **popen):
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     **popen)
        self.lines: list[str] = []
        self.stderr = ""
        self._readers = [threading.Thread(target=self._read_out), threading.Thread(target=self._read_err)]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def _read_err(self) -> None:
        self.stderr = self.proc.stderr.read()

    def epochs_reported(self) -> int:
        """Epochs the process said were finished (it says so after writing their checkpoint)."""
        return sum(1 for line in list(self.lines) if line.startswith("epoch "))

    def kill(self) -> int:
        reported = self.epochs_reported()  # read before the kill: these must survive it
        self.proc.send_signal(signal.SIGKILL)
        self.wait()
        return reported

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join()
        return code


def wait_for(condition, run: Run, timeout: float = 120, poll: float = 0.001) -> bool:
    """Poll until `condition()` or the process ends; True if the condition came first."""
    deadline = time.time() + timeout
    while time.time() < deadline and run.proc.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def temp_file(run_dir: Path, name: str):
    return lambda: run_dir.is_dir() and any(run_dir.glob(f".{name}.*.tmp"))


def kill_at(mode: str, run: Run, run_dir: Path, rng: random.Random) -> int | None:
    """Kill `run` at a moment of kind `mode`; the epochs it had reported, or None if it finished first."""
    checkpoint = run_dir / "checkpoint.safetensors"
    if mode == "startup":
        # Within a few seconds of the start, but never after the first epoch: on a fast machine
        # the whole run fits in 4 s, and a kill after it leaves nothing for the later moments.
        wait_for(lambda: run.epochs_reported() >= 1, run, timeout=rng.uniform(0.2, 4.0))
    elif mode == "mid-epoch":
        before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
        if not wait_for(lambda: checkpoint.exists() and checkpoint.stat().st_mtime_ns != before, run):
            return None
        time.sleep(rng.uniform(0.05, 0.8))  # into the next epoch
    else:
        name = "model.safetensors" if mode == "model-write" else "checkpoint.safetensors"
        if not wait_for(temp_file(run_dir, name), run):
            return None
    return None if run.proc.poll() is not None else run.kill()


def check_after_kill(run_dir: Path, reported: int) -> int:
    """No torn file; the checkpoint holds at least the reported epochs, contiguously. Returns them."""
    for path in run_dir.glob("*.safetensors"):
        read_safetensors(path)  # raises on a torn or partial file
    if (run_dir / "model.safetensors").exists():
        load_model(run_dir / "model.safetensors")
    if not (run_dir / "checkpoint.safetensors").exists():
        assert reported == 0
        return 0
    history = read_checkpoint(run_dir / "checkpoint.safetensors")[1]["history"]
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
    assert len(history) >= reported, f"reported {reported} epochs finished, the checkpoint has {len(history)}"
    return len(history)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def test_sigkill_at_random_moments_then_resume_loses_nothing(env, tmp_path: Path) -> None:
    seed = int(os.environ.get("CIFARLAB_KILL_SEED", random.SystemRandom().randrange(10**6)))
    print(f"kill seed {seed} (replay with CIFARLAB_KILL_SEED={seed})")
    rng = random.Random(seed)
    run_dir = tmp_path / "killed"
    kills = []
    for mode in KILLS:
        has_checkpoint = (run_dir / "checkpoint.safetensors").exists()
        run = Run(train_args(env, run_dir, resume=has_checkpoint), env)
        reported = kill_at(mode, run, run_dir, rng)
        if reported is None:  # it finished before this kind of moment came
            assert run.wait() == 0, run.stderr
            break
        kills.append((mode, reported, check_after_kill(run_dir, reported)))
    print("kills (moment, epochs reported, epochs in checkpoint):", kills)
    assert len(kills) >= 3, "the run should have been killed several times"

    resumed = Run(train_args(env, run_dir, resume=(run_dir / "checkpoint.safetensors").exists()), env)
    assert resumed.wait() == 0, resumed.stderr
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no temp files left
    history = read_checkpoint(run_dir / "checkpoint.safetensors")[1]["history"]
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))

    reference = Run(train_args(env, tmp_path / "reference", resume=False), env)
    assert reference.wait() == 0, reference.stderr
    want, got = weights(tmp_path / "reference" / "model.safetensors"), weights(run_dir / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def ignore_sigxfsz() -> None:
    """In the child: a write beyond the file-size limit fails with EFBIG instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_disk_full_during_training_keeps_the_last_checkpoint_and_resume_finishes(env, tmp_path: Path) -> None:
    run_dir = tmp_path / "full"
    run = Run(train_args(env, run_dir, resume=False, epochs=3), env, preexec_fn=ignore_sigxfsz)
    checkpoint = run_dir / "checkpoint.safetensors"
    assert wait_for(lambda: run.epochs_reported() >= 1, run, poll=0.01), run.stderr
    size = checkpoint.stat().st_size
    # From now on, no file of this process may grow past half a checkpoint: the next
    # checkpoint write fails with EFBIG, exactly as on a full disk (history.csv still fits).
    resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (size // 2, size // 2))
    assert run.wait() == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "the disk is full" in run.stderr and "The previous checkpoint.safetensors is unchanged" in run.stderr
    assert f"cifarlab train --resume {run_dir}" in run.stderr
    kept = check_after_kill(run_dir, run.epochs_reported())
    assert 1 <= kept < 3
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []

    resumed = Run(train_args(env, run_dir, resume=True), env)
    assert resumed.wait() == 0, resumed.stderr
    history = json.loads(read_safetensors(checkpoint)[1]["cifarlab-checkpoint"])["history"]
    assert len(history) == 3
    assert load_model(run_dir / "model.safetensors")
