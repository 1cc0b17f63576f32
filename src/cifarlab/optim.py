"""Muon for convolution filters, SGD for everything else, in one optimizer.

Muon (Keller Jordan, 2024; used by airbench94_muon to reach 94% on CIFAR-10 in 8 epochs
where SGD needs 10) replaces each filter bank's momentum update by the nearest semi-
orthogonal matrix: all directions of the update move at the same rate, so the rare ones
that plain SGD barely moves get trained too. The orthogonalisation is a few Newton-Schulz
iterations on the (out_channels, in_channels x k x k) matrix, a few matrix products per
layer per step: under 1% of a training step here.

Before each update a filter bank is rescaled to a fixed norm (sqrt(out_channels)). The
network is scale-invariant in those weights (BatchNorm follows every convolution), so the
norm only sets the effective step size; fixing it replaces weight decay for them and keeps
the step size what the schedule says.

PyTorch has torch.optim.Muon since 2.9, but it accepts only 2-D parameters and applies
decoupled weight decay, not the normalisation; this class takes conv filters as they are.
Groups with `orthogonalize: True` get the Muon update; the other groups plain SGD with
(Nesterov) momentum and L2 weight decay, exactly as torch.optim.SGD computes it. One
optimizer, so a checkpoint stores one state dict and resumes bit-identically.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch

# Coefficients of the quintic Newton-Schulz iteration tuned for Muon: they push small
# singular values up fast, at the price of leaving all of them in about [0.7, 1.2] rather
# than exactly 1, which training does not mind.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the singular vectors of `matrix` (2-D)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float() / (matrix.norm() + eps)  # singular values <= 1: inside the iteration's range
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon on groups marked `orthogonalize`, SGD (torch.optim.SGD's update) on the rest."""

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 3):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, orthogonalize=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["orthogonalize"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon orthogonalizes matrices and filter banks (2-D or more), "
                                 "not vectors: put biases in a group without orthogonalize")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["orthogonalize"]:
                    self._muon_update(p, group)
                else:
                    self._sgd_update(p, group)
        return None

    def _momentum(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """The momentum buffer updated with `grad`, and the direction to step in."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()  # as torch.optim.SGD: the first step is the gradient
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
        buf = state["momentum_buffer"]
        return grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf

    def _sgd_update(self, p: torch.Tensor, group: dict) -> None:
        grad = cast(torch.Tensor, p.grad)  # step() only updates parameters that have one
        if group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        p.add_(self._momentum(p, grad, group), alpha=-group["lr"])

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        direction = self._momentum(p, cast(torch.Tensor, p.grad), group)
        p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))  # a fixed norm instead of weight decay
        update = orthogonalize(direction.reshape(len(p), -1), group["ns_steps"])
        p.add_(update.view_as(p).to(p.dtype), alpha=-group["lr"])
