"""``SharedImageCache``: decoded, resized training images kept once in memory that every loader
worker reads and fills (``data.cache_images``).

Built by :class:`~reid_lightning.data.ReIDDataModule` before its loader workers start, and
handed to :class:`~reid_lightning.data.image_dataset.ImageDataset`::

    cache = SharedImageCache(len(samples), (3, 256, 128))
    dataset = ImageDataset(samples, build_train_transforms((256, 128)), cache=cache)
    image = cache.get(i)      # None until some process has stored image i
    cache.put(i, image)       # (3, 256, 128) uint8

The images live in one anonymous shared memory mapping: workers forked from the process that
built the cache (the DataLoader's default on Linux) all see it, so an image decoded by one worker
serves every other one from then on, and the memory is one copy of the training set, however
many workers there are. It is not a file under ``/dev/shm``, so a container's small ``/dev/shm``
does not limit it. Pages are taken as images arrive; ``count x 3 x height x width`` bytes at
most (Market-1501 at 256x128: 1.3 GB).

Two workers may decode the same image at once; both write the same bytes. An image's slot is
written before its flag is set, and flags are set and read under one lock, which orders the two
on every architecture.

A process that receives the cache by pickling (a ``spawn`` or ``forkserver`` worker, a
``ddp_spawn`` rank) gets an empty cache of its own, shared only with the workers it forks.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
from pathlib import Path
from typing import Any

import torch

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_limit_bytes() -> int:
    """This machine's physical memory, or the memory limit of this process's control group
    (a container's) where that is lower."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            limit = min(limit, int(value))
    return limit


def cache_bytes(count: int, shape: tuple[int, ...]) -> int:
    """The bytes of ``count`` uint8 images of ``shape``: a full :class:`SharedImageCache`'s ``nbytes``."""
    return count * math.prod(shape)


class SharedImageCache:
    """``count`` uint8 images of one ``shape``, in memory shared with forked processes.

    Args:
        count: number of images (the training set's size).
        shape: the shape of every image, ``(3, height, width)``.

    Attributes:
        count, shape: as given.
        nbytes: the images' size when all are stored.

    Raises:
        ValueError: ``count`` or a dimension of ``shape`` is not positive.
        MemoryError: the system refuses the mapping (set ``data.cache_images=false``).
    """

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.count = int(count)
        self.shape = tuple(int(size) for size in shape)
        if self.count <= 0 or not self.shape or min(self.shape) <= 0:
            raise ValueError(f"SharedImageCache needs a positive count and shape, got {count} and {shape}")
        image_bytes = math.prod(self.shape)
        self.nbytes = cache_bytes(self.count, self.shape)
        try:
            self._memory = mmap.mmap(-1, self.count * (1 + image_bytes))  # anonymous, MAP_SHARED
        except OSError as error:
            raise MemoryError(f"cannot map {self.nbytes / 2**30:.2f} GB for the image cache: {error}") from error
        self._filled = torch.frombuffer(self._memory, dtype=torch.uint8, count=self.count)
        self._images = torch.frombuffer(
            self._memory, dtype=torch.uint8, count=self.count * image_bytes, offset=self.count
        ).view(self.count, *self.shape)
        self._lock = multiprocessing.Lock()

    def __len__(self) -> int:
        """The number of images stored so far, by any process sharing the cache."""
        with self._lock:
            return int(self._filled.sum())

    def get(self, index: int) -> torch.Tensor | None:
        """Image ``index`` (a view of the shared memory: do not modify it), or None if not stored yet."""
        with self._lock:
            stored = bool(self._filled[index])
        return self._images[index] if stored else None

    def put(self, index: int, image: torch.Tensor) -> None:
        """Stores image ``index``.

        Raises:
            ValueError: ``image`` is not a uint8 tensor of the cache's shape.
        """
        if image.dtype != torch.uint8 or tuple(image.shape) != self.shape:
            raise ValueError(
                f"SharedImageCache holds uint8 images of shape {self.shape}; "
                f"got {image.dtype} {tuple(image.shape)} for image {index}"
            )
        self._images[index].copy_(image)
        with self._lock:
            self._filled[index] = 1

    def __getstate__(self) -> dict[str, Any]:
        return {"count": self.count, "shape": self.shape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["count"], state["shape"])
