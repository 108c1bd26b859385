"""Process-group helpers that work in one process and under Lightning's DDP strategies.

Lightning's strategies (``ddp``, ``ddp_spawn``, ...) initialise ``torch.distributed``; these
functions read it and fall back to single-process answers when it is not initialised::

    if comm.is_main_process():
        write_file(...)
    comm.all_reduce_mean_(bn_statistics)   # every rank, in the same order
"""
from __future__ import annotations

from collections.abc import Iterable

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


def is_main_process() -> bool:
    """True on global rank 0: the process that writes files and prints."""
    return get_rank() == 0


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over all ranks; a no-op in one process."""
    world_size = get_world_size()
    if world_size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)
