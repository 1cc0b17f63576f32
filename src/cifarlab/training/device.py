"""Where training runs and how fast: the device, bf16 autocast where it pays, timing."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cifarlab.errors import CifarlabError


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here: CUDA GPUs, and CPUs whose oneDNN has
    native bf16 (AVX512-BF16 or AMX: on this project's 2-core machines `airbench` trains at
    about 380 images/s in bf16 against 190-200 in float32)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CifarlabError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CifarlabError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return device


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Wall seconds of fn(), waiting for queued GPU work on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
