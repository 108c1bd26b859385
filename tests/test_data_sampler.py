"""IdentitySampler: P x K batches, rank slicing, lengths, determinism, validation."""

from __future__ import annotations

import pytest

from reid_lightning.data import IdentitySampler

# 10 identities with 1..10 images each (identity 0 has fewer than K images)
PIDS = [pid for pid in range(10) for _ in range(pid + 1)]


def batches(sampler: IdentitySampler, size: int) -> list[list[int]]:
    order = list(sampler)
    assert len(order) == len(sampler)
    return [order[i : i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize("num_batches", [None, 7])
def test_every_global_batch_is_p_identities_times_k(num_batches: int | None) -> None:
    sampler = IdentitySampler(PIDS, batch_size=12, num_instances=4, seed=3, num_batches=num_batches)
    result = batches(sampler, 12)
    assert len(result) == (num_batches or 10 // 3)
    for batch in result:
        groups = [batch[i : i + 4] for i in range(0, 12, 4)]
        pids_per_group = [{PIDS[i] for i in group} for group in groups]
        assert all(len(p) == 1 for p in pids_per_group)  # K consecutive images of one identity
        assert len(set.union(*pids_per_group)) == 3  # P distinct identities
        for group in groups:
            if PIDS[group[0]] >= 3:  # at least K images: no repeats
                assert len(set(group)) == 4


def test_long_epoch_cycles_through_images() -> None:
    pids = [0] * 8 + [1] * 8
    sampler = IdentitySampler(pids, batch_size=8, num_instances=4, num_batches=4)
    seen = list(sampler)
    # every identity appears once per batch and takes 4 fresh images: 2 batches use all 8
    for pid in (0, 1):
        assert sorted(i for i in seen[:16] if pids[i] == pid) == [i for i in range(16) if pids[i] == pid]


def test_ranks_are_disjoint_slices_of_the_single_process_batch() -> None:
    single = batches(IdentitySampler(PIDS, batch_size=12, num_instances=2, seed=5, rank=0, world_size=1), 12)
    for world_size in (2, 3, 6):
        samplers = [
            IdentitySampler(PIDS, batch_size=12, num_instances=2, seed=5, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        per_rank = [batches(sampler, 12 // world_size) for sampler in samplers]
        assert len({len(b) for b in per_rank}) == 1
        for step, global_batch in enumerate(single):
            parts = [per_rank[r][step] for r in range(world_size)]
            assert sum(parts, []) == global_batch
            for part in parts:  # identity aligned: a rank holds whole identities
                assert all(PIDS[part[i]] == PIDS[part[i + 1]] for i in range(0, len(part), 2))
            assert len({PIDS[i] for i in parts[0]} & {PIDS[i] for i in parts[1]}) == 0


def test_length_equal_on_every_rank() -> None:
    lengths = {len(IdentitySampler(PIDS, batch_size=8, num_instances=2, rank=r, world_size=4)) for r in range(4)}
    assert lengths == {(10 // 4) * 2}


def test_deterministic_per_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = IdentitySampler(PIDS, batch_size=8, num_instances=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    sampler = IdentitySampler(PIDS, batch_size=8, num_instances=4)
    first = list(sampler)
    assert list(sampler) == first  # re-iterating an epoch repeats it


def test_defaults_without_distributed() -> None:
    sampler = IdentitySampler(PIDS, batch_size=8, num_instances=4)
    assert (sampler.rank, sampler.world_size) == (0, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 10, "num_instances": 4}, "not a multiple of num_instances 4"),
        ({"batch_size": 8, "num_instances": 4, "world_size": 4, "rank": 0}, "multiple of world_size \\* num_instances"),
        ({"batch_size": 44, "num_instances": 4}, "10 identities cannot fill a batch of 11"),
        ({"batch_size": 8, "num_instances": 4, "world_size": 2, "rank": 2}, "rank 2 lies outside 0..1"),
        ({"batch_size": 8, "num_instances": 4, "num_batches": 0}, "num_batches must be positive"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IdentitySampler(PIDS, **kwargs)
