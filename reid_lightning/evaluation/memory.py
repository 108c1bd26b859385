"""Memory a computation may use: what is available on a device, and a clear refusal when it falls short."""

from __future__ import annotations

from pathlib import Path

import torch

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: memory.max and memory.current of this container
MIB = 2**20
GIB = 2**30


def _cgroup_headroom() -> int | None:
    limit, used = CGROUP / "memory.max", CGROUP / "memory.current"
    try:
        text = limit.read_text().strip()
        if text == "max":
            return None
        return max(0, int(text) - int(used.read_text()))
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes that a new allocation on ``device`` can still get, or None when unknown.

    Called as ``available_bytes(features.device)``. CPU: ``MemAvailable`` of
    ``/proc/meminfo``, lowered to the container's cgroup headroom when that is smaller;
    None off Linux. CUDA: free device memory (``torch.cuda.mem_get_info``) plus what
    PyTorch's caching allocator has reserved but not handed out.

    Args:
        device: the device the allocation would be made on.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    if "MemAvailable" not in fields:
        return None
    available = int(fields["MemAvailable"].split()[0]) * 1024
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


def ensure_fits(needed: int, device: torch.device | str, what: str, hint: str = "") -> None:
    """Raise ``MemoryError`` naming ``what`` when ``needed`` bytes exceed :func:`available_bytes`.

    Called before a large allocation, e.g.
    ``ensure_fits(4 * num_q * num_g, device, "the 3,368 x 15,913 distance matrix")``.
    Does nothing when the available memory cannot be determined.

    Args:
        needed: estimated bytes of the computation.
        device: where it would allocate.
        what: what needs the memory, for the message.
        hint: how to avoid the need, appended to the message.
    """
    available = available_bytes(device)
    if available is not None and needed > available:
        raise MemoryError(
            f"{what} needs about {needed / GIB:.2f} GiB on {torch.device(device)}, but only "
            f"{available / GIB:.2f} GiB is available. {hint}".rstrip()
        )
