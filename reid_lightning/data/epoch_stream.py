"""``EpochStream``: the training loader that ``trainer.fit`` iterates, epoch after epoch from one
loader iterator, so that the workers fetch the next epoch's first batches while the current epoch
ends (fast-reid's training sampler is infinite for the same reason).

Built by :meth:`ReIDDataModule.train_dataloader <reid_lightning.data.ReIDDataModule.train_dataloader>`
(``data.stream_epochs``)::

    stream = EpochStream(sampler, make_loader)   # make_loader(sampler): the one-epoch training loader
    for epoch in range(3):
        stream.sampler.set_epoch(epoch)     # what Lightning does at each epoch start
        for batch in stream:                # the same batches as make_loader(sampler) of that epoch
            ...

A plain ``DataLoader`` starts every epoch from an empty pipeline, even with persistent workers:
the step waits while each worker decodes and augments its first batch (on an H200 with batch 256,
2.0 of 4.8 s).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Sampler

from reid_lightning.data.seeded_sampler import SeededSampler


class _EpochChain(Sampler[tuple[int, int]]):
    """The ``(index, seed)`` keys of ``sampler``'s epochs one after the other, from ``start`` on."""

    def __init__(self, sampler: SeededSampler, start: int) -> None:
        self.sampler = sampler
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.start
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.sampler
            epoch += 1


class EpochStream:
    """Iterates the epochs of ``sampler`` from one loader iterator.

    Each ``iter()`` yields one epoch, ``len(make_loader(sampler))`` batches (from its resume
    position on when ``sampler.resume_at`` names that epoch): the epoch
    ``sampler.set_epoch`` last selected (Lightning calls it at each epoch start). When that epoch
    follows the one the stream just completed, the stream goes on; otherwise (the first epoch, a
    resumed run, after an epoch cut short by ``limit_train_batches`` or ``max_steps``) it starts
    again at that epoch. The batches are those of ``make_loader(sampler)`` after
    ``sampler.set_epoch(epoch)``, whatever the path.

    Args:
        sampler: the training sampler, a :class:`SeededSampler` that yields whole batches (the
            identity samplers do).
        make_loader: builds the training loader over a sampler of ``(index, seed)`` keys; the
            stream calls it with ``sampler`` (to learn the epoch's length) and with a sampler
            chaining ``sampler``'s epochs (the loader it iterates).

    Attributes:
        sampler: ``sampler`` (``set_epoch`` and ``epoch``, as on a training loader).
        batch_size, dataset: those of ``make_loader(sampler)``.

    Raises:
        TypeError: ``sampler`` is not a :class:`SeededSampler`.
        ValueError: its epoch does not divide into whole batches.
    """

    def __init__(self, sampler: SeededSampler, make_loader: Callable[[Sampler], DataLoader]) -> None:
        if not isinstance(sampler, SeededSampler):
            raise TypeError(f"EpochStream needs a SeededSampler, got {type(sampler).__name__}")
        epoch_loader = make_loader(sampler)
        if len(sampler) % epoch_loader.batch_size:
            raise ValueError(
                f"EpochStream needs whole batches per epoch: the sampler yields {len(sampler)} "
                f"indices for batches of {epoch_loader.batch_size}"
            )
        self.sampler = sampler
        self.batch_size = epoch_loader.batch_size
        self.dataset = epoch_loader.dataset
        self._length = len(epoch_loader)
        self._make_loader = make_loader
        self._stream: Iterator[Any] | None = None
        self._loader: DataLoader | None = None
        self._next_epoch: int | None = None  # the epoch the stream goes on with; None: it must restart

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Any]:
        epoch = self.sampler.epoch
        start = 0
        if self._stream is None or epoch != self._next_epoch:
            # a resumed epoch (SeededSampler.resume_at) starts at its first batch not yet drawn
            start = self.sampler.resume_position() // self.batch_size
            self._restart(epoch)
            self.sampler.clear_resume()  # the restarted chain holds it
        self._next_epoch = None
        for position in range(start, self._length):
            batch = next(self._stream)
            if position == self._length - 1:  # complete before the consumer stops asking
                self._next_epoch = epoch + 1
            yield batch

    def _restart(self, epoch: int) -> None:
        self.close()
        self._loader = self._make_loader(_EpochChain(copy.deepcopy(self.sampler), start=epoch))
        self._stream = iter(self._loader)

    def close(self) -> None:
        """Drops the iterator (its workers exit); the next ``iter()`` starts a new one."""
        self._stream = self._loader = None
        self._next_epoch = None
