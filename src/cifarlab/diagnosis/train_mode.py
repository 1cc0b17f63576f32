"""A model left in training mode: the same images predicted twice, or in another batch, disagree."""

from __future__ import annotations

import numpy as np

from cifarlab.diagnosis.probes import (
    channel_axis,
)
from cifarlab.diagnosis.report import Finding
from cifarlab.errors import InputError
from cifarlab.runner import ModelRunner


def train_mode_finding(runner: ModelRunner, images: np.ndarray, n: int = 256,
                       batch_size: int = 64) -> Finding | None:
    """Predict the same images twice, and once in other batches: an eval-mode model agrees.

    Dropout left on changes the logits between identical calls; BatchNorm in training mode
    normalises with each batch's statistics, so a different batch composition changes them.
    """
    batch = _runnable_sample(runner, np.asarray(images), n)
    if batch is None:
        return None
    first = runner.logits(batch, batch_size)
    again = runner.logits(batch, batch_size)
    order = np.random.default_rng(0).permutation(len(batch))
    regrouped = np.empty_like(first)
    regrouped[order] = runner.logits(batch[order], batch_size)
    scale = max(1.0, float(np.abs(first).max()))
    diff_again, diff_regrouped = (float(np.abs(x - first).max()) for x in (again, regrouped))
    if max(diff_again, diff_regrouped) <= 1e-3 * scale:  # float noise from kernel choices is far below
        return None
    changed = float(np.mean((again.argmax(1) != first.argmax(1)) | (regrouped.argmax(1) != first.argmax(1))))
    evidence = {"images": len(batch), "max_logit_diff_same_batches": diff_again,
                "max_logit_diff_other_batches": diff_regrouped, "logit_scale": scale,
                "changed_predictions": changed}
    cause = ("dropout is active (identical calls differ)" if diff_again > 1e-3 * scale
             else "BatchNorm uses batch statistics (the result depends on which images share a batch)")
    return Finding("train-mode-inference", "error",
                   f"The model runs in training mode: predicting the same images again moves the logits "
                   f"by up to {max(diff_again, diff_regrouped):.3g} and changes {changed:.0%} of the predictions",
                   f"Predictions of {len(batch)} images were repeated and regrouped into other batches; "
                   f"logits moved by up to {max(diff_again, diff_regrouped):.3g} (scale {scale:.3g}): {cause}.",
                   evidence,
                   "call model.eval() before predicting (PyTorch) / use model(x, training=False) or "
                   "model.predict (Keras); re-export ONNX files from a model in eval mode", 1.0)


def _runnable_sample(runner: ModelRunner, images: np.ndarray, n: int) -> np.ndarray | None:
    """The first n images, transposed if that is the only way the model can run them."""
    sample = images[:n]
    candidates = [sample]
    if channel_axis(sample) == 1:
        candidates.append(sample.transpose(0, 2, 3, 1))
    elif channel_axis(sample) == -1:
        candidates.append(sample.transpose(0, 3, 1, 2))
    for candidate in candidates:
        try:
            runner.check_input(candidate)
            return candidate
        except InputError:
            continue
    return None
