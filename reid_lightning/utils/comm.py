"""Process-group helpers that work in one process and under Lightning's DDP strategies.

Lightning's strategies (``ddp``, ``ddp_spawn``, ...) initialise ``torch.distributed``; these
functions read it and fall back to single-process answers when it is not initialised::

    if comm.is_main_process():
        write_file(...)
    per_rank = comm.all_gather(len(my_items))   # [n_rank0, n_rank1, ...] on every rank

Collective calls (``synchronize``, ``all_gather``, ``all_reduce_mean_``) must be made by every
rank, in the same order.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if _initialized() else 1


def get_rank() -> int:
    """Global rank of this process (0 without torch.distributed)."""
    return dist.get_rank() if _initialized() else 0


def get_local_rank() -> int:
    """Rank of this process on its machine.

    Read from ``LOCAL_RANK`` (set by Lightning's launchers and torchrun), else ``SLURM_LOCALID``;
    else the global rank (one machine); 0 without torch.distributed.
    """
    if not _initialized():
        return 0
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in os.environ:
            return int(os.environ[name])
    return dist.get_rank()


def is_main_process() -> bool:
    """True on global rank 0: the process that writes files and prints."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all ranks; a no-op in one process."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (any picklable object), in rank order.

    Args:
        obj: this rank's object.

    Returns:
        ``[obj_rank0, obj_rank1, ...]`` on every rank; ``[obj]`` in one process.
    """
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over all ranks; a no-op in one process."""
    world_size = get_world_size()
    if world_size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)
