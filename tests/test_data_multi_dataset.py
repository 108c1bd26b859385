"""Several data sets (data.train_sets / data.test_sets): list entries, the combined label
space, one evaluation loader per set, errors naming the set."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train
from hydra.utils import instantiate
from test_data_parsers import market_tree, write_images

from reid_lightning.data import ReIDDataModule, build_dataset
from reid_lightning.data.multi_dataset import combine_train_sets, parse_entries

TINY_DEMO = {"seed": 0, "num_ids": 16, "images_per_id": 5, "num_cams": 3, "size": (32, 16), "num_distractors": 2, "num_junk": 1}


def two_sets(root: Path) -> tuple[Path, Path]:
    """Market-1501 (the parsers' tree: train ids 2 and 7, 3 cameras) under ``root`` and a folder
    set ``root/mine`` (the same tree plus one image: its id 7 can be held out for validation)."""
    market_tree(root / "Market-1501-v15.09.15")
    market_tree(root / "mine")
    write_images(root / "mine" / "bounding_box_train", ["0007_c1s1_000009_00.jpg"])
    return root / "Market-1501-v15.09.15", root / "mine"


def test_entries_take_names_or_mappings() -> None:
    entries = parse_entries(
        ["market1501", {"name": "folder", "root": "/my/data"}, {"name": "cuhk03_np", "subset": "labeled", "label": "cuhk_l"}],
        "data.test_sets", "/data", defaults={"market1501": {"x": 1}},
    )
    assert [(e.name, e.root, e.kwargs, e.label, e.where) for e in entries] == [
        ("market1501", "/data", {"x": 1}, "market1501", "data.test_sets[0]"),
        ("folder", "/my/data", {}, "folder", "data.test_sets[1]"),
        ("cuhk03_np", "/data", {"subset": "labeled"}, "cuhk_l", "data.test_sets[2]"),
    ]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], r"data.train_sets must be a non-empty list"),
        ("market1501", r"data.train_sets must be a non-empty list"),
        (["market1501", {"root": "/x"}], r"data.train_sets\[1\] must be a data set name or a mapping with a 'name' key"),
        (["folder", {"name": "folder", "root": "/x"}], r"names 'folder' more than once; give each entry its own 'label'"),
    ],
)
def test_bad_lists_name_the_key(items: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_entries(items, "data.train_sets", "/data")


def test_combined_label_space_is_disjoint_and_contiguous(tmp_path: Path) -> None:
    market, mine = two_sets(tmp_path)
    first, second = build_dataset("market1501", tmp_path), build_dataset("folder", mine)
    combined = combine_train_sets([first, second])
    assert len(combined) == len(first.train) + len(second.train)
    # set 0 keeps labels 0..1, set 1 follows with 2..3; cameras of set 1 follow set 0's (0..2 -> 3..5)
    assert [(s.pid, s.camid) for s in combined[: len(first.train)]] == [(s.pid, s.camid) for s in first.train]
    shifted = [(s.pid + 2, s.camid + 3) for s in second.train]
    assert [(s.pid, s.camid) for s in combined[len(first.train):]] == shifted
    assert sorted({s.pid for s in combined}) == [0, 1, 2, 3]
    assert {s.path for s in combined} == {s.path for s in [*first.train, *second.train]}


def test_datamodule_trains_on_all_sets_and_tests_each(tmp_path: Path) -> None:
    market, mine = two_sets(tmp_path)
    options = dict(root=str(tmp_path), batch_size=2, num_instances=1, test_batch_size=4, num_workers=0, height=16, width=8)
    dm = ReIDDataModule(
        dataset="market1501", train_sets=["market1501", {"name": "folder", "root": str(mine)}],
        test_sets=["market1501", {"name": "folder", "root": str(mine), "label": "mine"}], **options,
    )
    dm.setup("fit")
    assert dm.num_classes == 4 and dm.test_set_names == ["market1501", "mine"] == dm.val_set_names
    loaders = dm.test_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [5, 5]
    assert [loader.dataset.dataset.samples for loader in loaders] == [
        [*split.query, *split.gallery] for split in dm.test_splits.values()
    ]
    assert all(str(mine) in s.path for s in loaders[1].dataset.dataset.samples)
    assert len(dm.val_dataloader()) == 2
    # held-out identities come from the combined label space
    held = ReIDDataModule(dataset="market1501", train_sets=["market1501", {"name": "folder", "root": str(mine)}],
                          val_identities=1, seed=0, **options)
    held.setup("fit")
    assert held.num_classes == 3 and held.val_set_names == ["validation"]
    assert held.test_set_names == ["market1501", "folder"]  # test_sets default: the training sets
    # an entry named like data.dataset keeps data.dataset_kwargs
    demo = ReIDDataModule(dataset="demo", dataset_kwargs=TINY_DEMO, test_sets=["market1501", "demo"], **options)
    assert [e.kwargs for e in demo.test_entries] == [{}, TINY_DEMO] and demo.train_entries[0].kwargs == TINY_DEMO


def test_single_set_stays_the_default(tmp_path: Path) -> None:
    two_sets(tmp_path)
    dm = ReIDDataModule(dataset="market1501", root=str(tmp_path), num_workers=0)
    dm.setup("fit")
    assert dm.test_set_names == ["market1501"] and not isinstance(dm.test_dataloader(), list)
    assert dm.splits.train == build_dataset("market1501", tmp_path).train


def test_a_missing_set_is_named_with_its_key(tmp_path: Path) -> None:
    two_sets(tmp_path)
    dm = ReIDDataModule(dataset="market1501", root=str(tmp_path), train_sets=["market1501", "dukemtmc"])
    with pytest.raises(FileNotFoundError, match=r"data.train_sets\[1\] \(dukemtmc\): data set 'dukemtmc' not found"):
        dm.setup("fit")
    dm = ReIDDataModule(dataset="market1501", root=str(tmp_path), test_sets=["market1501", "msmt18"])
    with pytest.raises(ValueError, match=r"data.test_sets\[1\] \(msmt18\): unknown data set 'msmt18'"):
        dm.setup("test")


def test_test_stage_reads_only_the_test_sets(tmp_path: Path) -> None:
    market, mine = two_sets(tmp_path)
    dm = ReIDDataModule(dataset="market1501", root=str(tmp_path), train_sets=["dukemtmc"], test_sets=["market1501"])
    dm.setup("test")  # the missing training set is not read
    assert dm.test_set_names == ["market1501"] and len(dm.test_samples) == 5


def test_config_lists_compose_and_build(tmp_path: Path) -> None:
    market, mine = two_sets(tmp_path)
    cfg = compose_train(
        ["data=market1501", f"paths.data_dir={tmp_path}", "data.num_workers=0",
         f"data.test_sets=[market1501,{{name:folder,root:'{mine}',label:mine}}]"],
        output_dir=tmp_path,
    )
    assert cfg.data.train_sets is None and cfg.data.val_identities == 0
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    assert dm.test_set_names == ["market1501", "mine"] and dm.test_entries[1].root == str(mine)
    assert dm.num_classes == 2
