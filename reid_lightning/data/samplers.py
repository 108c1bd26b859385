"""The identity (PK) sampler of fast-reid's BoT recipe: every global batch holds P
identities with K images each, split across distributed ranks by the sampler itself."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def distributed_context() -> tuple[int, int]:
    """Returns ``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class IdentitySampler(Sampler[int]):
    """Balanced identity sampler (fast-reid's P x K sampling), finite and rank-aware.

    A global batch holds ``P = batch_size // num_instances`` distinct identities with
    ``K = num_instances`` images each, consecutive per identity. An identity with
    fewer than K images is sampled with replacement; otherwise its images are drawn
    without replacement from a shuffled queue that is refilled when fewer than K
    remain, so every image is used in turn.

    An epoch shuffles the identities and cuts them into groups of P (the
    remainder waits for the next shuffle); by default it holds one such pass,
    ``num_identities // P`` global batches. With ``num_batches`` it chains as many
    passes as needed for that many global batches (fast-reid counts an epoch as
    ``len(train images) // batch_size`` iterations).

    Rank ``r`` of ``world_size`` yields the contiguous slice
    ``[r * B, (r + 1) * B)`` of every global batch, ``B = batch_size // world_size``,
    so a rank-local batch holds whole identities. The global order depends on
    ``seed`` and the epoch (:meth:`set_epoch`) only, never on the world size: the
    union over ranks of a global batch is the single-process batch. Use it with
    ``DataLoader(batch_size=B, sampler=..., drop_last=True)`` and Lightning's
    ``Trainer(use_distributed_sampler=False)``; Lightning calls :meth:`set_epoch`
    at every epoch start.

    Args:
        pids: the identity of every dataset index.
        batch_size: global batch size, P * K.
        num_instances: images per identity in a batch, K.
        seed: base seed of the shuffles.
        rank: this process's rank; default from ``torch.distributed`` or 0.
        world_size: number of processes; default from ``torch.distributed`` or 1.
        num_batches: global batches per epoch; default one pass over the identities.

    Raises:
        ValueError: ``batch_size`` not a multiple of ``world_size * num_instances``,
            fewer identities than P, a rank outside ``0..world_size-1``, or a
            non-positive size.
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_batches: int | None = None,
    ) -> None:
        default_rank, default_world = distributed_context()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if batch_size <= 0 or num_instances <= 0 or self.world_size <= 0:
            raise ValueError(
                "batch_size, num_instances and world_size must be positive; "
                f"got {batch_size}, {num_instances}, {self.world_size}"
            )
        if batch_size % num_instances:
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_instances {num_instances}")
        if batch_size % (self.world_size * num_instances):
            raise ValueError(
                f"global batch_size {batch_size} must be a multiple of world_size * num_instances = "
                f"{self.world_size} * {num_instances} so that every rank gets whole identities"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} lies outside 0..{self.world_size - 1}")
        by_identity: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            by_identity[int(pid)].append(index)
        self.identities = [np.asarray(by_identity[pid]) for pid in sorted(by_identity)]
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.ids_per_batch = batch_size // num_instances
        if len(self.identities) < self.ids_per_batch:
            raise ValueError(
                f"{len(self.identities)} identities cannot fill a batch of {self.ids_per_batch} identities "
                f"(batch_size {batch_size} / num_instances {num_instances}); lower batch_size"
            )
        if num_batches is not None and num_batches <= 0:
            raise ValueError(f"num_batches must be positive, got {num_batches}")
        self.num_batches = num_batches if num_batches is not None else len(self.identities) // self.ids_per_batch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order :meth:`__iter__` yields next.

        Args:
            epoch: epoch number; the order is seeded by ``(seed, epoch)``.
        """
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """Builds the global batches of the current epoch (identical on every rank).

        Returns:
            ``num_batches`` lists of ``batch_size`` dataset indices.
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        queues: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        while len(batches) < self.num_batches:
            order = rng.permutation(len(self.identities))
            for start in range(0, len(order) - self.ids_per_batch + 1, self.ids_per_batch):
                batch: list[int] = []
                for identity in order[start : start + self.ids_per_batch].tolist():
                    batch += self._draw(identity, rng, queues)
                batches.append(batch)
                if len(batches) == self.num_batches:
                    break
        return batches

    def _draw(self, identity: int, rng: np.random.Generator, queues: dict[int, list[int]]) -> list[int]:
        """Takes K images of one identity (with replacement when it has fewer than K)."""
        indices = self.identities[identity]
        if len(indices) < self.num_instances:
            return rng.choice(indices, size=self.num_instances, replace=True).tolist()
        queue = queues.get(identity, [])
        if len(queue) < self.num_instances:
            queue = rng.permutation(indices).tolist()
        queues[identity] = queue[self.num_instances :]
        return queue[: self.num_instances]

    def __iter__(self) -> Iterator[int]:
        local = self.batch_size // self.world_size
        for batch in self.global_batches():
            yield from batch[self.rank * local : (self.rank + 1) * local]

    def __len__(self) -> int:
        return self.num_batches * (self.batch_size // self.world_size)
