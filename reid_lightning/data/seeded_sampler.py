"""Per-item augmentation seeds: the training augmentation as a function of (seed, epoch, rank,
position in the epoch), whatever process draws it.

Used by :meth:`ReIDDataModule.build_train_loader <reid_lightning.data.ReIDDataModule.build_train_loader>`::

    sampler = SeededSampler(NaiveIdentitySampler(pids, 64, 4, seed=0), seed=0, rank=0)
    loader = DataLoader(ImageDataset(train, transform), batch_size=64, sampler=sampler)
    # the loader asks ImageDataset for (index, item_seed) keys; the transform runs under torch_seeded(item_seed)

Without it the random flips, crops and erasings come from the generators of whichever process
runs the transform: the main process (``num_workers=0``) or a loader worker, whose generators
Lightning seeds once per worker and, with ``persistent_workers``, never again. A run resumed from
a checkpoint then starts new workers whose generators differ from the uninterrupted run's, and
the number of workers changes the augmentation. With item seeds drawn in the main process from
``(seed, epoch, rank)``, a resumed epoch repeats the uninterrupted one exactly.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Sampler


class SeededSampler(Sampler[tuple[int, int]]):
    """Pairs every index of ``sampler`` with its own augmentation seed.

    The seeds of an epoch come from ``numpy.random.default_rng([seed, epoch, rank])`` in the order
    the indices are yielded, so an index drawn twice in one epoch gets two seeds. ``set_epoch``
    (called by Lightning at each epoch start) is passed on to ``sampler``.

    Args:
        sampler: a sampler of dataset indices (an ``IdentitySampler``).
        seed: base seed.
        rank: the process's rank (its share of a global batch gets its own seeds).
    """

    def __init__(self, sampler: Sampler[int], seed: int = 0, rank: int = 0) -> None:
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, position) of resume_at

    def resume_at(self, epoch: int, position: int) -> None:
        """Makes the next iteration, if it is one of epoch ``epoch``, start at its item ``position``:
        the items before it are left out, the others keep their indices and seeds. A run resumed
        from a checkpoint written during an epoch thus draws the rest of that epoch, not its start
        again. ``len`` stays the whole epoch's (Lightning counts the batches already done).

        Args:
            epoch: the epoch being resumed.
            position: items of that epoch already drawn (0: from its start).
        """
        self._resume = (epoch, position) if position > 0 else None

    def resume_position(self) -> int:
        """Where the next iteration starts in the current epoch (see :meth:`resume_at`)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def clear_resume(self) -> None:
        """Forgets :meth:`resume_at`: the next iteration starts at the epoch's first item."""
        self._resume = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch of the next iteration, here and in the wrapped sampler."""
        self.epoch = epoch
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.resume_position()
        self._resume = None  # once
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        for position, index in enumerate(self.sampler):
            seed = int(rng.integers(2**63))
            if position >= start:
                yield int(index), seed

    def __len__(self) -> int:
        return len(self.sampler)


@contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """Runs the block on torch's default CPU generator seeded with ``seed``, then puts its state back.

    CUDA generators are left alone (the transforms run on CPU tensors and PIL images).
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)
