"""The run folder: config.json, history.csv, checkpoint.safetensors (rewritten atomically
after every epoch) and model.safetensors. Claiming a folder for a new run, and the
checkpoint's tensors plus JSON state (config, history, optimizer), with no pickle."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from cifarlab.config import Recipe, TrainConfig
from cifarlab.data import Dataset
from cifarlab.errors import InputError, ModelFileError
from cifarlab.history import epochs_in_order, history_row
from cifarlab.modelfile import (
    read_safetensors,
)
from cifarlab.schema import Fields

CHECKPOINT_KEY = "cifarlab-checkpoint"


# The files of a run folder; one holding a checkpoint or a model holds work worth keeping (a run
# stopped before its first checkpoint left only a config and maybe a history row).
RUN_FILES = ("config.json", "history.csv", "checkpoint.safetensors", "model.safetensors")
WORK_FILES = ("checkpoint.safetensors", "model.safetensors")


def claim_run_folder(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a folder that holds a run's work (a checkpoint or a model) unless
    `overwrite`; then, or where a run stopped before its first checkpoint, the old run's files
    go first, with the evaluation folders made from its model (eval-*), so that nothing of it
    is left beside the new model. Nothing else in the folder is touched."""
    work = [name for name in WORK_FILES if (run_dir / name).exists()]
    if work and not overwrite:
        raise InputError(f"{run_dir} holds a run already ({', '.join(work)}): continue it with "
                         f"`cifarlab train --resume {run_dir}`, train into another folder (--out), or pass "
                         "--overwrite to replace it (its eval-* folders go with it)")
    # Every torchrun rank may get here: a file another rank removed first is no error.
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in run_dir.glob("eval-*"):
        if (folder / "metrics.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)


def default_run_dir(cfg: TrainConfig | Recipe, dataset: Dataset, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{dataset.name}-{cfg.model}-{stamp}"


def dataset_spec(data: str) -> str:
    """What to pass to load_dataset later: a name as given, a path made absolute."""
    return str(Path(data).resolve()) if Path(data).exists() else data


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors tensors plus a JSON-able rest (no pickle)."""
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in rest["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON state (config, history, optimizer) of a checkpoint file."""
    tensors, metadata = read_safetensors(path)
    if CHECKPOINT_KEY not in metadata:
        raise ModelFileError(f"{path} is not a cifarlab training checkpoint")
    return tensors, json.loads(metadata[CHECKPOINT_KEY])


RESTART_HINT = "the checkpoint was damaged or edited; start the run again with `cifarlab train`"


@dataclass(frozen=True)
class CheckpointState:
    """A checkpoint's JSON state, checked: the run's config, its history (one row per
    finished epoch, 1..n), the optimizer's non-tensor state."""

    config: TrainConfig
    history: list[dict[str, Any]]
    optimizer: dict[str, Any]

    @classmethod
    def from_dict(cls, state: Any, where: str) -> CheckpointState:
        f = Fields(state, where, RESTART_HINT, ModelFileError)
        f.require("config", "history", "optimizer")
        config = TrainConfig.from_dict(state["config"], f"{where}: config", ModelFileError)
        history = [history_row(row) for row in f.objects("history")]
        if not epochs_in_order(history):
            f.fail(f"{where}: the history's epochs must be 1..{len(history)} in order")
        optimizer = f.object("optimizer")
        optimizer.require("param_groups", "scalars")
        optimizer.objects("param_groups")
        optimizer.object("scalars")
        return cls(config, history, optimizer.data)
