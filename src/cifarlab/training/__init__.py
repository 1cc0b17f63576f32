"""Training, one concern per module:

    trainer.py    the loop (`Trainer`), `train` and `resume`
    plan.py       time budgets from measured costs: epochs, --fit-budget's images, --model auto's pace
    optimizer.py  the optimizer, its parameter groups, the learning-rate schedules
    averaging.py  lookahead and the EMA of the weights
    runfolder.py  the run folder: claiming it, history.csv, the checkpoint's tensors and state
    device.py     the device, bf16 autocast where it pays, timing

What a run is (the request `TrainConfig`, the resolved `Recipe`) lives in cifarlab.config.
"""

from cifarlab.config import Recipe, TrainConfig
from cifarlab.history import HISTORY_COLUMNS
from cifarlab.training.averaging import EMA_EVERY, LOOKAHEAD_EVERY, WARMUP_FRACTION, Lookahead, WeightEMA
from cifarlab.training.device import bf16_is_fast, pick_device, timed
from cifarlab.training.optimizer import OPTIMIZERS, SCHEDULES, lr_at, make_optimizer, parameter_groups
from cifarlab.training.plan import (
    FIT_MIN_EPOCHS,
    FIT_MIN_IMAGES_PER_CLASS,
    PLAN_MARGIN,
    BudgetEpochs,
    fit_images,
    plan_epochs,
)
from cifarlab.training.runfolder import (
    CHECKPOINT_KEY,
    RUN_FILES,
    claim_run_folder,
    default_run_dir,
    join_optimizer_state,
    read_checkpoint,
    split_optimizer_state,
)
from cifarlab.training.trainer import Trainer, TrainResult, load_run_dataset, resume, train

__all__ = [
    "Recipe", "TrainConfig", "EMA_EVERY", "LOOKAHEAD_EVERY", "WARMUP_FRACTION", "Lookahead", "WeightEMA",
    "bf16_is_fast", "pick_device", "timed", "OPTIMIZERS", "SCHEDULES", "lr_at", "make_optimizer",
    "parameter_groups", "FIT_MIN_EPOCHS", "FIT_MIN_IMAGES_PER_CLASS", "PLAN_MARGIN", "BudgetEpochs",
    "fit_images", "plan_epochs", "CHECKPOINT_KEY", "HISTORY_COLUMNS", "RUN_FILES", "claim_run_folder",
    "default_run_dir", "join_optimizer_state", "read_checkpoint", "split_optimizer_state", "Trainer",
    "TrainResult", "load_run_dataset", "resume", "train",
]
