"""Multi-process training through torch.distributed, as launched by torchrun.

`torchrun --nproc_per_node=N -m cifarlab train ...` starts N copies of the command with
RANK, LOCAL_RANK and WORLD_SIZE in their environment. With WORLD_SIZE > 1 the Trainer calls
`setup`, wraps its model in DistributedDataParallel and trains on its shard of each epoch's
permutation; rank 0 alone writes the run folder. Without torchrun (WORLD_SIZE unset or 1)
every function here is a no-op and a run is exactly the single-process one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(device: torch.device) -> tuple[torch.device, int, int]:
    """Join the process group torchrun describes; returns (device, rank, world_size).

    On CUDA each process takes the GPU cuda:LOCAL_RANK and the nccl backend; on the CPU, gloo.
    Idempotent: a second Trainer in the same process reuses the group.
    """
    if env_world_size() <= 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not active():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def is_main() -> bool:
    return not active() or dist.get_rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable objects: a plan, a path)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place."""
    if active():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of a permutation: every world_size-th index from `rank`, truncated
    so that every rank gets the same number (DDP needs the same number of steps everywhere;
    at most world_size - 1 images of the epoch are dropped)."""
    if world_size == 1:
        return order
    return order[rank::world_size][:len(order) // world_size]


def rank_seed(base: int, rank: int) -> int:
    """A seed of its own for each rank's augmentation and dropout, from the epoch's seed."""
    return (base * 1_000_003 + rank + 1) % (2 ** 63)
