"""The run folder: config.json, history.csv, checkpoint.safetensors (rewritten atomically
after every epoch) and model.safetensors. Claiming a folder for a new run, and the
checkpoint's tensors plus JSON state (config, history, optimizer), with no pickle."""

from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from cifarlab.config import Recipe, TrainConfig
from cifarlab.data import Dataset
from cifarlab.errors import InputError, ModelFileError
from cifarlab.modelfile import (
    read_safetensors,
)

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


CHECKPOINT_KEY = "cifarlab-checkpoint"


# A folder holding any of these holds a run.
RUN_FILES = ("config.json", "history.csv", "checkpoint.safetensors", "model.safetensors")


def claim_run_folder(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a folder that holds a run, unless `overwrite`: then the old run's
    files go first, with the evaluation folders made from its model (eval-*), so that nothing
    of it is left beside the new model. Nothing else in the folder is touched."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise InputError(f"{run_dir} holds a run already ({', '.join(found)}): continue it with "
                         f"`cifarlab train --resume {run_dir}`, train into another folder (--out), or pass "
                         "--overwrite to replace it (its eval-* folders go with it)")
    # Every torchrun rank may get here: a file another rank removed first is no error.
    for name in found:
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


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def history_csv(history: list[dict[str, Any]]) -> bytes:
    """history.csv: one row per epoch, HISTORY_COLUMNS, empty cells for what was not measured."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: _csv_value(row[k]) for k in HISTORY_COLUMNS})
    return text.getvalue().encode()
