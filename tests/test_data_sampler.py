"""Identity samplers: P x K batches, rank slicing, lengths, determinism, validation (both
kinds); fast-reid's draw frequencies (naive) and the uniform one with images spread over
cameras (balanced)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from reid_lightning.data import (
    BalancedIdentitySampler,
    IdentitySampler,
    NaiveIdentitySampler,
    build_identity_sampler,
)

# 10 identities with 1..10 images each (identity 0 has fewer than K images)
PIDS = [pid for pid in range(10) for _ in range(pid + 1)]
KINDS = [NaiveIdentitySampler, BalancedIdentitySampler]
# long-tailed: 100 identities with 2..40 images, most with few (a third below K = 4)
LONG_TAIL_COUNTS = [round(2 + 38 * (i / 99) ** 3) for i in range(100)]
LONG_TAIL = [pid for pid, n in enumerate(LONG_TAIL_COUNTS) for _ in range(n)]


def batches(sampler: IdentitySampler, size: int) -> list[list[int]]:
    order = list(sampler)
    assert len(order) == len(sampler)
    return [order[i : i + size] for i in range(0, len(order), size)]


def epoch_order(kind: type[IdentitySampler], epoch: int, **kwargs) -> list[int]:
    sampler = kind(**kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_batches", [None, 7])
def test_every_global_batch_is_p_identities_times_k(kind: type[IdentitySampler], num_batches: int | None) -> None:
    sampler = kind(PIDS, batch_size=12, num_instances=4, seed=3, num_batches=num_batches)
    result = batches(sampler, 12)
    default = len(PIDS) // 12 if kind is NaiveIdentitySampler else 10 // 3
    assert len(result) == (num_batches or default)
    for batch in result:
        groups = [batch[i : i + 4] for i in range(0, 12, 4)]
        pids_per_group = [{PIDS[i] for i in group} for group in groups]
        assert all(len(p) == 1 for p in pids_per_group)  # K consecutive images of one identity
        assert len(set.union(*pids_per_group)) == 3  # P distinct identities
        for group in groups:
            if PIDS[group[0]] >= 3:  # at least K images: no repeats
                assert len(set(group)) == 4


def test_naive_long_epoch_cycles_through_images() -> None:
    pids = [0] * 8 + [1] * 8
    sampler = NaiveIdentitySampler(pids, batch_size=8, num_instances=4, num_batches=4)
    seen = list(sampler)
    # every identity appears once per batch and takes 4 fresh images: 2 batches use all 8
    for pid in (0, 1):
        assert sorted(i for i in seen[:16] if pids[i] == pid) == [i for i in range(16) if pids[i] == pid]


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_are_disjoint_slices_of_the_single_process_batch(kind: type[IdentitySampler]) -> None:
    single = batches(kind(PIDS, batch_size=12, num_instances=2, seed=5, rank=0, world_size=1), 12)
    for world_size in (2, 3, 6):
        samplers = [
            kind(PIDS, batch_size=12, num_instances=2, seed=5, rank=r, world_size=world_size)
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


@pytest.mark.parametrize(
    ("kind", "global_batches"), [(NaiveIdentitySampler, 55 // 8), (BalancedIdentitySampler, 10 // 4)]
)
def test_length_equal_on_every_rank(kind: type[IdentitySampler], global_batches: int) -> None:
    lengths = {len(kind(PIDS, batch_size=8, num_instances=2, rank=r, world_size=4)) for r in range(4)}
    assert lengths == {global_batches * 2}


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed_and_epoch(kind: type[IdentitySampler]) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        return epoch_order(kind, epoch, pids=PIDS, batch_size=8, num_instances=4, seed=seed)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    sampler = kind(PIDS, batch_size=8, num_instances=4)
    first = list(sampler)
    assert list(sampler) == first  # re-iterating an epoch repeats it


def test_defaults_without_distributed() -> None:
    sampler = NaiveIdentitySampler(PIDS, batch_size=8, num_instances=4)
    assert (sampler.rank, sampler.world_size) == (0, 1)


@pytest.mark.parametrize("kind", KINDS)
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
def test_invalid_arguments(kind: type[IdentitySampler], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kind(PIDS, **kwargs)


def test_build_identity_sampler_names_the_choices() -> None:
    assert isinstance(build_identity_sampler("naive", PIDS, 8, 4, seed=1), NaiveIdentitySampler)
    assert isinstance(build_identity_sampler("balanced", PIDS, 8, 4), BalancedIdentitySampler)
    with pytest.raises(ValueError, match="unknown data.sampler 'random': choose one of naive, balanced"):
        build_identity_sampler("random", PIDS, 8, 4)


# ---------------------------------------------------------------- naive: fast-reid's frequencies
def identity_draws(order: list[int], pids: list[int], k: int) -> Counter:
    """How many K-groups each identity got in ``order``."""
    return Counter(pids[order[i]] for i in range(0, len(order), k))


def test_naive_draws_identities_in_proportion_to_their_images() -> None:
    sampler = NaiveIdentitySampler(LONG_TAIL, batch_size=16, num_instances=4, seed=0)
    assert sampler.num_batches == len(LONG_TAIL) // 16  # fast-reid's epoch
    draws = identity_draws(list(sampler), LONG_TAIL, 4)
    counts = [draws[pid] for pid in range(len(LONG_TAIL_COUNTS))]
    assert np.corrcoef(counts, LONG_TAIL_COUNTS)[0, 1] > 0.7
    # the balanced sampler over the same epoch: every identity about equally often
    balanced = BalancedIdentitySampler(
        LONG_TAIL, batch_size=16, num_instances=4, seed=0, num_batches=sampler.num_batches
    )
    uniform = identity_draws(list(balanced), LONG_TAIL, 4)
    assert max(uniform.values()) - min(uniform.values()) <= 1


def test_naive_pass_uses_every_image_about_once_and_pads_small_identities() -> None:
    sampler = NaiveIdentitySampler(LONG_TAIL, batch_size=16, num_instances=4, seed=2)
    for index in range(3):
        used = [i for batch in sampler.pass_batches(index) for i in batch]
        groups = [used[i : i + 4] for i in range(0, len(used), 4)]
        per_identity: dict[int, list[int]] = {}
        for group in groups:
            assert len({LONG_TAIL[i] for i in group}) == 1
            per_identity.setdefault(LONG_TAIL[group[0]], []).append(group)
        for pid, n in enumerate(LONG_TAIL_COUNTS):
            images = [i for group in per_identity.get(pid, []) for i in group]
            if n < 4:  # padded with replacement to K, once per pass
                assert len(per_identity[pid]) == 1 and len(images) == 4 and len(set(images)) <= n
            else:  # at most n // K groups of distinct images
                assert len(images) == len(set(images)) and len(per_identity.get(pid, [])) <= n // 4
        distinct = {i for i in used if LONG_TAIL_COUNTS[LONG_TAIL[i]] >= 4}
        coverable = sum(4 * (n // 4) for n in LONG_TAIL_COUNTS if n >= 4)  # n % K images stay unused
        assert len(distinct) > 0.9 * coverable


def test_naive_epochs_are_consecutive_slices_of_the_pass_stream() -> None:
    kwargs = dict(pids=LONG_TAIL, batch_size=16, num_instances=4, seed=4, num_batches=30)
    sampler = NaiveIdentitySampler(**kwargs)
    stream = [i for index in range(6) for batch in sampler.pass_batches(index) for i in batch]
    epochs = [epoch_order(NaiveIdentitySampler, epoch, **kwargs) for epoch in range(6)]
    assert sum(epochs, []) == stream[: 6 * 30 * 16]
    boundaries = np.cumsum([len(sampler.pass_batches(index)) for index in range(6)])
    assert any(end % 30 for end in boundaries if end < 6 * 30)  # a pass straddles two epochs
    # one sampler walking the epochs in order (training) equals fresh samplers (resume)
    walker = NaiveIdentitySampler(**kwargs)
    for epoch in range(6):
        walker.set_epoch(epoch)
        assert list(walker) == epochs[epoch]


# ------------------------------------------------------------ balanced: fast-reid's camera spread
def test_balanced_takes_one_image_then_others_from_other_cameras() -> None:
    # identity 0: cameras 0,0,0,1,1,2 (other cameras exist); identity 1: one camera, 5 images;
    # identity 2: a single image; identity 3: camera 0 once, cameras 1,2,3 once each (exactly K - 1)
    pids = [0] * 6 + [1] * 5 + [2] + [3] * 4
    camids = [0, 0, 0, 1, 1, 2] + [4] * 5 + [0] + [0, 1, 2, 3]
    sampler = BalancedIdentitySampler(pids, batch_size=16, num_instances=4, seed=1, camids=camids, num_batches=50)
    for batch in batches(sampler, 16):
        for start in range(0, 16, 4):
            first, *rest = batch[start : start + 4]
            pid = pids[first]
            assert {pids[i] for i in rest} == {pid}
            if pid == 0:
                assert all(camids[i] != camids[first] for i in rest)
            elif pid == 1:
                assert first not in rest and len(set(rest)) == 3  # its other images, 4 >= K - 1
            elif pid == 2:
                assert rest == [first] * 3
            elif camids[first] == 0:  # identity 3 from camera 0: the three other cameras, each once
                assert sorted(camids[i] for i in rest) == [1, 2, 3]


def test_balanced_draws_with_replacement_below_k_minus_1_candidates() -> None:
    pids, camids = [0] * 3 + [1] * 3, [0, 1, 1, 0, 0, 0]
    sampler = BalancedIdentitySampler(pids, batch_size=8, num_instances=4, seed=0, camids=camids, num_batches=20)
    groups = [group for batch in batches(sampler, 8) for group in (batch[:4], batch[4:])]
    assert all(len(group) == 4 and len({pids[i] for i in group}) == 1 for group in groups)
    assert any(len(set(group)) < 4 for group in groups)


def test_balanced_camids_must_match_the_images() -> None:
    with pytest.raises(ValueError, match="camids holds 3 cameras for 55 images"):
        BalancedIdentitySampler(PIDS, batch_size=8, num_instances=4, camids=[0, 1, 2])


def test_build_identity_sampler_hands_the_cameras_to_the_balanced_sampler() -> None:
    camids = [i % 3 for i in range(len(PIDS))]
    sampler = build_identity_sampler("balanced", PIDS, 8, 4, camids=camids)
    assert [c.tolist() for c in sampler.cameras] == [[camids[i] for i in ids] for ids in sampler.identities]
    assert isinstance(build_identity_sampler("naive", PIDS, 8, 4, camids=camids), NaiveIdentitySampler)
