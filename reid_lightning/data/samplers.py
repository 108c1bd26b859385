"""The identity (PK) samplers of fast-reid's BoT recipe: every global batch holds P
identities with K images each, split across distributed ranks by the sampler itself.

Built by :meth:`ReIDDataModule.build_train_loader <reid_lightning.data.ReIDDataModule.build_train_loader>`
(``data.sampler``)::

    sampler = build_identity_sampler("naive", pids, batch_size=64, num_instances=4, seed=0)
    sampler.set_epoch(epoch)          # Lightning calls it at every epoch start
    indices = list(sampler)           # this rank's share of the epoch's global batches

``naive`` (:class:`NaiveIdentitySampler`) is fast-reid's ``NaiveIdentitySampler``: identities are
drawn in proportion to their image count. ``balanced`` (:class:`BalancedIdentitySampler`) is
fast-reid's ``BalancedIdentitySampler``: every identity one slot per pass over the identities,
its images from different cameras (``camids``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Any, Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def distributed_context() -> tuple[int, int]:
    """Returns ``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class IdentitySampler(Sampler[int], ABC):
    """Finite, rank-aware P x K sampler; subclasses choose the global batches of an epoch.

    A global batch holds ``P = batch_size // num_instances`` distinct identities with
    ``K = num_instances`` images each, consecutive per identity. An epoch holds
    ``num_batches`` global batches (default: :meth:`default_num_batches` of the subclass).

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
        num_batches: global batches per epoch; default :meth:`default_num_batches`.
        camids: the camera of every dataset index, kept per identity in ``cameras`` for the
            samplers that use it (``balanced``); None: one camera for all.

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
        camids: Sequence[int] | None = None,
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
        self.num_images = len(pids)
        if camids is not None and len(camids) != self.num_images:
            raise ValueError(f"camids holds {len(camids)} cameras for {self.num_images} images")
        cameras = np.zeros(self.num_images, dtype=np.int64) if camids is None else np.asarray(camids)
        self.cameras = [cameras[indices] for indices in self.identities]
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
        self.num_batches = num_batches if num_batches is not None else self.default_num_batches()
        self.seed = seed
        self.epoch = 0

    @abstractmethod
    def default_num_batches(self) -> int:
        """Global batches per epoch when ``num_batches`` is not given."""

    @abstractmethod
    def global_batches(self) -> list[list[int]]:
        """Builds the global batches of the current epoch (identical on every rank).

        Returns:
            ``num_batches`` lists of ``batch_size`` dataset indices.
        """

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order :meth:`__iter__` yields next.

        Args:
            epoch: epoch number; the order is a function of ``(seed, epoch)``.
        """
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        local = self.batch_size // self.world_size
        for batch in self.global_batches():
            yield from batch[self.rank * local : (self.rank + 1) * local]

    def __len__(self) -> int:
        return self.num_batches * (self.batch_size // self.world_size)


class NaiveIdentitySampler(IdentitySampler):
    """fast-reid's ``NaiveIdentitySampler``: identities drawn in proportion to their images.

    The sampler is an endless stream of passes. A pass starts with every identity in
    the pool and, for each identity, its images shuffled (an identity with fewer than K
    images: K drawn with replacement). Each global batch draws P identities from the
    pool without replacement; each gives its next K unused images and leaves the pool
    when fewer than K remain. The pass ends when fewer than P identities are left, so an
    identity with n >= K images appears ``n // K`` times per pass (nearly every image
    once) and one with fewer images once.

    Pass ``p`` is a function of ``(seed, p)``; epoch ``e`` takes the global batches
    ``[e * num_batches, (e + 1) * num_batches)`` of the concatenated passes, so a pass
    can straddle two epochs, as in fast-reid's endless loader, while :meth:`set_epoch`
    alone fixes an epoch's batches (a resumed run repeats them). The lengths of the
    passes already built are kept, so an epoch only builds the passes it touches (after
    a resume at epoch e, the passes before it once).

    Unlike fast-reid under DDP (which draws each rank's identities separately), the P
    identities of a global batch are distinct across ranks; a single process draws the
    same way as fast-reid.

    The default epoch is fast-reid's: ``len(pids) // batch_size`` global batches (at least 1).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pass_lengths: list[int] = []
        self._last_pass: tuple[int, list[list[int]]] | None = None

    def default_num_batches(self) -> int:
        return max(1, self.num_images // self.batch_size)

    def pass_batches(self, index: int) -> list[list[int]]:
        """The global batches of pass ``index`` (a function of ``(seed, index)``).

        Args:
            index: pass number, from 0.

        Returns:
            lists of ``batch_size`` dataset indices; at least one.
        """
        if self._last_pass is not None and self._last_pass[0] == index:
            return self._last_pass[1]
        rng = np.random.default_rng([self.seed, index])
        k = self.num_instances
        # each identity's images in a random order (fewer than K: K drawn with replacement)
        queues = [
            (rng.permutation(images) if len(images) >= k else rng.choice(images, size=k, replace=True)).tolist()
            for images in self.identities
        ]
        taken = [0] * len(queues)
        pool = list(range(len(queues)))
        batches: list[list[int]] = []
        while len(pool) >= self.ids_per_batch:
            chosen = [pool[i] for i in rng.permutation(len(pool))[: self.ids_per_batch].tolist()]
            batch: list[int] = []
            for identity in chosen:
                start = taken[identity]
                batch += queues[identity][start : start + k]
                taken[identity] = start = start + k
                if len(queues[identity]) - start < k:
                    pool.remove(identity)
            batches.append(batch)
        self._last_pass = (index, batches)
        return batches

    def _pass_length(self, index: int) -> int:
        while len(self._pass_lengths) <= index:
            self._pass_lengths.append(len(self.pass_batches(len(self._pass_lengths))))
        return self._pass_lengths[index]

    def global_batches(self) -> list[list[int]]:
        start = self.epoch * self.num_batches
        stop = start + self.num_batches
        index, offset = 0, 0  # pass number and the stream position of its first batch
        while offset + self._pass_length(index) <= start:
            offset += self._pass_length(index)
            index += 1
        batches: list[list[int]] = []
        while offset < stop:
            passed = self.pass_batches(index)
            batches += passed[max(0, start - offset) : stop - offset]
            offset += len(passed)
            index += 1
        return batches


class BalancedIdentitySampler(IdentitySampler):
    """fast-reid's ``BalancedIdentitySampler``: every identity once per pass, its K images
    spread over cameras.

    A pass shuffles the identities and cuts them into groups of P (the remainder is dropped,
    as fast-reid does). Each identity of a group gives one random image and K - 1 images
    of its own from the other cameras (or, when it was seen by one camera only, its other
    images; an identity with a single image repeats it). Those K - 1 are drawn without
    replacement when there are at least K - 1 to draw from, else with replacement. (fast-reid
    replaces when there are fewer than K, so an identity with exactly K - 1 candidates can
    repeat an image while another goes unused; this sampler uses them all.)

    Epoch ``e`` chains passes seeded by ``(seed, e)`` until it holds ``num_batches`` global
    batches; by default one pass, ``num_identities // P`` (the data module passes fast-reid's
    epoch, ``len(images) // batch_size``). Without ``camids`` all images count as one camera,
    so the K - 1 images come from the identity's other images.
    """

    def default_num_batches(self) -> int:
        return len(self.identities) // self.ids_per_batch

    def global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        while len(batches) < self.num_batches:
            order = rng.permutation(len(self.identities))
            for start in range(0, len(order) - self.ids_per_batch + 1, self.ids_per_batch):
                batch: list[int] = []
                for identity in order[start : start + self.ids_per_batch].tolist():
                    batch += self._draw(identity, rng)
                batches.append(batch)
                if len(batches) == self.num_batches:
                    break
        return batches

    def _draw(self, identity: int, rng: np.random.Generator) -> list[int]:
        """One random image of the identity, then K - 1 from its other cameras (else its other images)."""
        indices, cameras = self.identities[identity], self.cameras[identity]
        first = int(rng.integers(len(indices)))
        candidates = indices[cameras != cameras[first]]
        if not len(candidates):
            candidates = np.delete(indices, first)
        if not len(candidates):
            return [int(indices[first])] * self.num_instances
        rest = rng.choice(candidates, size=self.num_instances - 1, replace=len(candidates) < self.num_instances - 1)
        return [int(indices[first]), *rest.tolist()]


SAMPLERS: dict[str, type[IdentitySampler]] = {"naive": NaiveIdentitySampler, "balanced": BalancedIdentitySampler}


def build_identity_sampler(
    name: str,
    pids: Sequence[int],
    batch_size: int,
    num_instances: int,
    camids: Sequence[int] | None = None,
    **kwargs: Any,
) -> IdentitySampler:
    """Builds the identity sampler registered as ``name`` in :data:`SAMPLERS`.

    Args:
        name: ``"naive"`` (fast-reid's, the BoT default) or ``"balanced"``.
        pids: the identity of every dataset index.
        batch_size: global batch size, P * K.
        num_instances: K.
        camids: the camera of every dataset index, for the samplers that use it (``balanced``).
        **kwargs: ``seed``, ``rank``, ``world_size``, ``num_batches`` (see :class:`IdentitySampler`).

    Raises:
        ValueError: for an unknown ``name`` (the message lists the known ones).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown data.sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](pids, batch_size, num_instances, camids=camids, **kwargs)
