"""The optimizer with its parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch

from cifarlab.choices import OPTIMIZERS, SCHEDULES
from cifarlab.config import Recipe
from cifarlab.errors import CifarlabError
from cifarlab.modelfile import (
    Classifier,
)
from cifarlab.optim import Muon


def lr_at(progress: float, peak: float, schedule: str) -> float:
    """Learning rate at a fraction `progress` in [0, 1) of training."""
    if schedule == "triangle":  # airbench: 0.2 x peak, up to the peak at 23%, down to 0.07 x peak
        rise = 0.23
        if progress < rise:
            return peak * (0.2 + 0.8 * progress / rise)
        return peak * (1 - 0.93 * (progress - rise) / (1 - rise))
    if schedule == "linear":  # airbench94_muon: from the peak straight down to 0
        return peak * (1 - progress)
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # linear warm-up over 20% of training, then linear decay to 0
        warmup = 0.2
        if progress < warmup:
            return peak * (0.1 + 0.9 * progress / warmup)
        return peak * (1 - progress) / (1 - warmup)
    raise CifarlabError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def make_optimizer(model: Classifier, cfg: Recipe) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "muon":
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    raise CifarlabError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")


def parameter_groups(model: torch.nn.Module, cfg: Recipe) -> list[dict[str, Any]]:
    """Trainable parameters in groups: BatchNorm biases, a whitening layer's bias, the rest.

    The BatchNorm biases' learning rate is scaled up by bias_lr_scale and their weight decay
    down by the same factor, so each step shrinks them by the same fraction as the other
    weights (airbench trains them 64x faster: a BN bias is one number per channel that the
    scale-free convolutions cannot take over). `lr_scale` multiplies the scheduled lr; the
    whitening bias's is set to 0 after the warm-up epochs (see Trainer.train_epoch).
    Frozen parameters (the whitening filters, BatchNorm scales) are left out. With the muon
    optimizer the conv filters (4-D) form a group of their own, orthogonalized (see optim.py),
    at filter_lr and filter_momentum; their norm is fixed, so they take no weight decay.
    """
    scale = cfg.bias_lr_scale
    biases = [m.bias for m in model.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.bias is not None]
    whiten = getattr(getattr(model, "net", model), "whiten", None)
    # The whitening bias has a group of its own: train_epoch stops it after the warm-up.
    whiten_bias = [whiten.bias] if whiten is not None and whiten.bias is not None else []
    special = {id(p) for p in biases + whiten_bias}
    others = [p for p in model.parameters() if id(p) not in special]
    filters = [p for p in others if p.ndim == 4] if cfg.optimizer == "muon" else []
    others = [p for p in others if p.ndim != 4] if filters else others
    groups = [
        {"params": [p for p in filters if p.requires_grad], "lr_scale": (cfg.filter_lr or cfg.lr) / cfg.lr,
         "momentum": cfg.filter_momentum if cfg.filter_momentum is not None else cfg.momentum,
         "weight_decay": 0.0, "orthogonalize": True},
        {"params": [p for p in others if p.requires_grad], "lr_scale": 1.0,
         "weight_decay": cfg.weight_decay},
        {"params": [p for p in biases if p.requires_grad], "lr_scale": scale,
         "weight_decay": cfg.weight_decay / scale},
        {"params": whiten_bias, "lr_scale": 1.0, "weight_decay": cfg.weight_decay, "whiten_bias": True},
    ]
    return [g for g in groups if g["params"]]
