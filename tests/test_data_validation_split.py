"""Held-out validation identities (data.val_identities): the split's rules, its errors and
its place in ReIDDataModule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_data_module import DEMO, make_datamodule

from reid_lightning.data import ReIDDataModule, Sample
from reid_lightning.data.validation_split import (
    hold_out_identities,
    resolve_identity_count,
)


def synthetic_train() -> list[Sample]:
    """30 identities labelled 0..29: ids 0-19 have 2-4 images in each of 2-3 cameras, ids 20-24
    one camera only, ids 25-29 one image in each of two cameras (no gallery image left after the
    queries): only ids 0-19 can be evaluated under the Market rule."""
    samples = []
    for pid in range(20):
        for camid in range(2 + pid % 2):
            samples += [Sample(f"{pid}_{camid}_{n}.jpg", pid, camid) for n in range(2 + (pid + camid) % 3)]
    for pid in range(20, 25):
        samples += [Sample(f"{pid}_0_{n}.jpg", pid, 0) for n in range(4)]
    for pid in range(25, 30):
        samples += [Sample(f"{pid}_{camid}_0.jpg", pid, camid) for camid in range(2)]
    return samples


def test_held_out_identities_are_disjoint_multi_camera_and_relabelled() -> None:
    train = synthetic_train()
    kept, val = hold_out_identities(train, 6, seed=3)
    held = {s.pid for s in val.query}
    assert len(held) == 6 and held <= set(range(20)) and {s.pid for s in val.gallery} == held
    kept_paths = {s.path for s in kept}
    val_paths = [s.path for s in [*val.query, *val.gallery]]
    # every image lands in exactly one place, the held-out ids never in training
    assert len(val_paths) == len(set(val_paths)) and not kept_paths & set(val_paths)
    assert len(kept) + len(val_paths) == len(train)
    assert {s.path for s in train if s.pid in held} == set(val_paths)
    # remaining identities relabelled 0..23 in the order of their old labels, cameras unchanged
    assert sorted({s.pid for s in kept}) == list(range(24))
    old = {s.path: s for s in train}
    old_order = sorted({old[s.path].pid for s in kept})
    assert all(s.pid == old_order.index(old[s.path].pid) and s.camid == old[s.path].camid for s in kept)
    assert val.train == [] and val.name == "validation"


def test_one_query_per_identity_and_camera_each_with_a_gallery_match() -> None:
    train = synthetic_train()
    _, val = hold_out_identities(train, 10, seed=0)
    pairs = Counter((s.pid, s.camid) for s in val.query)
    assert set(pairs.values()) == {1}
    assert set(pairs) == {(s.pid, s.camid) for s in train if s.pid in {p for p, _ in pairs}}
    # Market rule: some query of every identity has a gallery image from another camera
    for pid in {s.pid for s in val.query}:
        assert any(
            g.pid == pid and g.camid != q.camid for q in val.query if q.pid == pid for g in val.gallery
        ), pid


def test_the_split_depends_on_the_seed_only() -> None:
    train = synthetic_train()
    first = hold_out_identities(train, 5, seed=7)
    assert hold_out_identities(list(reversed(train)), 5, seed=7)[1] == first[1]
    assert hold_out_identities(train, 5, seed=7) == first
    others = [hold_out_identities(train, 5, seed=seed)[1].query for seed in range(1, 6)]
    assert any(query != first[1].query for query in others)


def test_fractions_zero_and_bad_counts() -> None:
    assert resolve_identity_count(0.1, 751) == 75 and resolve_identity_count(0.001, 30) == 1
    assert resolve_identity_count(12, 30) == 12 and resolve_identity_count(3.0, 30) == 3
    train = synthetic_train()
    kept, val = hold_out_identities(train, 0)
    assert kept == train and not val.query and not val.gallery
    assert len({s.pid for s in hold_out_identities(train, 0.2)[1].query}) == 6
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ValueError, match=f"data.val_identities must be .*got {bad!r}"):
            hold_out_identities(train, bad)


def test_too_many_identities_says_how_many_can_be_held_out() -> None:
    with pytest.raises(ValueError, match=r"asks for 21 .*only 20 of the 30 training identities .*at most 20"):
        hold_out_identities(synthetic_train(), 21)
    with pytest.raises(ValueError, match="holds out all 20 training identities"):
        hold_out_identities([s for s in synthetic_train() if s.pid < 20], 20)


def test_datamodule_trains_on_the_rest_and_validates_on_the_held_out_split(tmp_path: Path) -> None:
    plain = make_datamodule(tmp_path)
    dm = make_datamodule(tmp_path, val_identities=4)
    val = dm.val_split
    assert dm.val_set_names == ["validation"] and plain.val_split is None and plain.val_set_names == ["demo"]
    assert dm.num_classes == plain.num_classes - 4 == 8
    assert len(dm.splits.train) + len(val.query) + len(val.gallery) == len(plain.splits.train)
    # validation loads the held-out split, the test loader the test split
    val_loader = dm.val_dataloader()
    assert len(val_loader.dataset) == len(val.query) + len(val.gallery)
    assert sum(int(b["is_query"].sum()) for b in val_loader) == len(val.query)
    assert len(dm.test_dataloader().dataset) == len(plain.test_samples)
    assert {b for batch in dm.train_dataloader() for b in batch["targets"].tolist()} <= set(range(8))


def test_datamodule_names_the_setting_when_too_many_identities(tmp_path: Path) -> None:
    dm = ReIDDataModule(dataset="demo", root=str(tmp_path), dataset_kwargs=DEMO, val_identities=13, num_workers=0)
    dm.prepare_data()
    with pytest.raises(ValueError, match="data.val_identities=13"):
        dm.setup("fit")
