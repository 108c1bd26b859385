"""Data set parsers: layouts, junk/distractor rules, relabelling, camera mapping, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PIL import Image

from reid_lightning.data import ReIDSplits, Sample, build_dataset
from reid_lightning.data.datasets import DATASETS

SHARED = Path(__file__).resolve().parents[2] / "shared"


def write_images(folder: Path, names: list[str]) -> None:
    """Writes a tiny JPEG for every name (names may contain sub-folders)."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 8), (10, 20, 30)).save(path)


def market_tree(base: Path, cams: int = 6) -> None:
    """A Market-style tree: train pids 2, 7 (plus junk), test pids 3, 5, distractor 0, junk -1."""
    write_images(
        base / "bounding_box_train",
        ["0007_c1s1_000001_00.jpg", "0007_c2s1_000002_00.jpg", "0002_c3s1_000003_00.jpg", "-1_c1s1_000004_00.jpg"],
    )
    write_images(base / "query", ["0003_c1s1_000010_00.jpg", f"0005_c{cams}s1_000011_00.jpg"])
    write_images(
        base / "bounding_box_test",
        ["0003_c2s1_000020_00.jpg", "0005_c1s1_000021_00.jpg", "0000_c3s1_000022_00.jpg", "-1_c4s1_000023_00.jpg"],
    )


def names(samples: list[Sample]) -> list[str]:
    return [Path(s.path).name for s in samples]


def test_market1501_rules(tmp_path: Path) -> None:
    market_tree(tmp_path / "Market-1501-v15.09.15")
    splits = build_dataset("market1501", tmp_path)
    assert isinstance(splits, ReIDSplits)
    # train: junk dropped, pids 2, 7 relabelled 0, 1 in sorted order; cameras 1..6 -> 0..5
    assert sorted((Path(s.path).name[:4], s.pid, s.camid) for s in splits.train) == [
        ("0002", 0, 2),
        ("0007", 1, 0),
        ("0007", 1, 1),
    ]
    assert sorted((s.pid, s.camid) for s in splits.query) == [(3, 0), (5, 5)]
    # gallery keeps original pids and the distractor, drops the junk
    assert sorted((s.pid, s.camid) for s in splits.gallery) == [(0, 2), (3, 1), (5, 0)]
    assert splits.num_train_pids == 2 and splits.num_train_cams == 3
    table = splits.summary_table()
    assert "# ids" in table and "# images" in table and "# cameras" in table
    assert [line.split("|")[0].strip() for line in table.splitlines()[3:]] == ["train", "query", "gallery"]
    assert [c.strip() for c in table.splitlines()[5].split("|")] == ["gallery", "3", "3", "3"]


def test_market1501_lookup_order(tmp_path: Path) -> None:
    market_tree(tmp_path / "market1501")
    assert names(build_dataset("market1501", tmp_path).query)  # root/market1501
    market_tree(tmp_path / "Market-1501-v15.09.15")
    (tmp_path / "Market-1501-v15.09.15" / "query" / "0005_c6s1_000011_00.jpg").unlink()
    assert len(build_dataset("market1501", tmp_path).query) == 1  # the versioned folder wins
    direct = tmp_path / "direct"
    market_tree(direct)
    assert len(build_dataset("market1501", direct).query) == 2  # the root itself


def test_dukemtmc_eight_cameras(tmp_path: Path) -> None:
    market_tree(tmp_path / "DukeMTMC-reID", cams=8)
    splits = build_dataset("dukemtmc", tmp_path)
    assert sorted(s.camid for s in splits.query) == [0, 7]
    market_tree(tmp_path / "bad" / "DukeMTMC-reID", cams=9)
    with pytest.raises(ValueError, match="camera 9 .*0005_c9s1_000011_00.jpg.*1..8"):
        build_dataset("dukemtmc", tmp_path / "bad")


def test_cuhk03_np_subsets(tmp_path: Path) -> None:
    for subset in ("detected", "labeled"):
        write_images(
            tmp_path / "cuhk03-np" / subset / "bounding_box_train",
            ["0010_c1s1_000001_00.jpg", "0010_c2s1_000002_00.jpg", "0004_c2s1_000003_00.jpg"],
        )
        write_images(tmp_path / "cuhk03-np" / subset / "query", ["0001_c1s1_000004_00.jpg"])
        write_images(tmp_path / "cuhk03-np" / subset / "bounding_box_test", ["0001_c2s1_000005_00.jpg"])
    (tmp_path / "cuhk03-np" / "labeled" / "bounding_box_train" / "0004_c2s1_000003_00.jpg").unlink()
    detected = build_dataset("cuhk03_np", tmp_path)
    labeled = build_dataset("cuhk03_np", tmp_path, subset="labeled")
    assert (len(detected.train), len(labeled.train)) == (3, 2)
    assert sorted((s.pid, s.camid) for s in detected.train) == [(0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="subset"):
        build_dataset("cuhk03_np", tmp_path, subset="both")


def msmt_tree(base: Path, train_dir: str, test_dir: str) -> None:
    train_lines = [
        "0000/0000_000_01_0303morning_0015_0.jpg 0",
        "0000/0000_001_15_0303morning_0016_0.jpg 0",
        "0007/0007_000_03_0303noon_0100_1.jpg 7",
    ]
    val_lines = ["0004/0004_000_05_0303noon_0200_0.jpg 4"]
    query_lines = ["0000/0000_000_02_0113morning_0010_0.jpg 0", "0011/0011_002_10_0113noon_0500_0.jpg 11"]
    gallery_lines = ["0000/0000_003_04_0113morning_0020_0.jpg 0", "0011/0011_000_12_0113noon_0600_0.jpg 11"]
    for folder, lines in ((train_dir, train_lines + val_lines), (test_dir, query_lines + gallery_lines)):
        write_images(base / folder, [line.split()[0] for line in lines])
    lists = {"train": train_lines, "val": val_lines, "query": query_lines, "gallery": gallery_lines}
    for list_name, lines in lists.items():
        (base / f"list_{list_name}.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("version", "train_dir", "test_dir"),
    [("MSMT17_V2", "mask_train_v2", "mask_test_v2"), ("MSMT17_V1", "train", "test")],
)
def test_msmt17_versions(tmp_path: Path, version: str, train_dir: str, test_dir: str) -> None:
    msmt_tree(tmp_path / version, train_dir, test_dir)
    splits = build_dataset("msmt17", tmp_path)
    # train = list_train + list_val, pids 0, 4, 7 relabelled 0, 1, 2; camera is the third name field
    assert sorted((s.pid, s.camid) for s in splits.train) == [(0, 0), (0, 14), (1, 4), (2, 2)]
    assert all(Path(s.path).is_file() and f"/{version}/{train_dir}/" in s.path for s in splits.train)
    assert sorted((s.pid, s.camid) for s in splits.query) == [(0, 1), (11, 9)]
    assert sorted((s.pid, s.camid) for s in splits.gallery) == [(0, 3), (11, 11)]


def test_msmt17_prefers_v2_and_reports_missing_list(tmp_path: Path) -> None:
    msmt_tree(tmp_path / "MSMT17_V1", "train", "test")
    msmt_tree(tmp_path / "MSMT17_V2", "mask_train_v2", "mask_test_v2")
    assert "MSMT17_V2" in build_dataset("msmt17", tmp_path).train[0].path
    (tmp_path / "MSMT17_V2" / "list_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_val.txt"):
        build_dataset("msmt17", tmp_path)
    with pytest.raises(FileNotFoundError, match="MSMT17_V2.*MSMT17_V1.*REID_DATA"):
        build_dataset("msmt17", tmp_path / "MSMT17_V1" / "train")


def test_folder_market_named(tmp_path: Path) -> None:
    market_tree(tmp_path)
    splits = build_dataset("folder", tmp_path)
    # cameras 1, 2, 3, 6 (junk's 4 ignored) -> 0..3
    assert sorted((s.pid, s.camid) for s in splits.gallery) == [(0, 2), (3, 1), (5, 0)]
    assert sorted((s.pid, s.camid) for s in splits.query) == [(3, 0), (5, 3)]
    custom = tmp_path / "custom"
    write_images(custom / "bounding_box_train", ["p12-cam3-a.png", "p12-cam4-b.png", "p8-cam3-c.png"])
    write_images(custom / "query", ["p1-cam3-d.png"])
    write_images(custom / "bounding_box_test", ["p1-cam4-e.png"])
    splits = build_dataset("folder", custom, pattern=r"p(\d+)-cam(\d+)")
    assert sorted((s.pid, s.camid) for s in splits.train) == [(0, 0), (1, 0), (1, 1)]


def test_folder_market_named_with_ten_or_more_cameras(tmp_path: Path) -> None:
    # c1, c11 and c12 are three cameras: read as one (c(\d) takes the first digit), the
    # evaluation would drop the query's true matches from cameras 11 and 12 as same-camera ones
    write_images(tmp_path / "bounding_box_train", ["0001_c1s1_000001_00.jpg", "0001_c12s1_000002_00.jpg"])
    write_images(tmp_path / "query", ["0002_c1s1_000003_00.jpg"])
    write_images(tmp_path / "bounding_box_test", ["0002_c11s1_000004_00.jpg", "0002_c12s1_000005_00.jpg"])
    splits = build_dataset("folder", tmp_path)
    def cameras(samples: list) -> dict[str, int]:
        return {Path(s.path).name.split("s1")[0]: s.camid for s in samples}

    assert cameras(splits.train) == {"0001_c1": 0, "0001_c12": 2}
    assert cameras(splits.query) == {"0002_c1": 0}
    assert cameras(splits.gallery) == {"0002_c11": 1, "0002_c12": 2}


@pytest.mark.parametrize(
    ("form", "option", "value", "message"),
    [
        ("flat", "pattern", r"(\d+)_c", "folder pattern '.*' needs 2 group"),
        ("flat", "pattern", r"([", "folder pattern '.*' is not a valid regular expression"),
        ("identity", "camera_pattern", r"c\d+", "folder camera_pattern '.*' needs 1 group"),
        ("identity", "camera_pattern", r"((", "folder camera_pattern '.*' is not a valid regular expression"),
    ],
)
def test_folder_bad_patterns_are_named(tmp_path: Path, form: str, option: str, value: str, message: str) -> None:
    # data.dataset_kwargs.pattern=... from the command line: an IndexError ("no such group") or a
    # re.error deep in the parser named neither the option nor the data set entry
    if form == "flat":
        write_images(tmp_path / "bounding_box_train", ["0001_c1s1_000001_00.jpg"])
        write_images(tmp_path / "query", ["0002_c1s1_000002_00.jpg"])
        write_images(tmp_path / "bounding_box_test", ["0002_c2s1_000003_00.jpg"])
    else:
        write_images(tmp_path / "bounding_box_train", ["alice/a_c1.jpg"])
        write_images(tmp_path / "query", ["bob/b_c1.jpg"])
        write_images(tmp_path / "bounding_box_test", ["bob/b_c2.jpg"])
    with pytest.raises(ValueError, match=message):
        build_dataset("folder", tmp_path, **{option: value})


@pytest.mark.parametrize("name", ["market1501", "folder"])
def test_hidden_files_and_folders_are_skipped(tmp_path: Path, name: str) -> None:
    # a set copied from a Mac to an exFAT drive holds a ._<name> resource file (not an image) beside
    # every image; a notebook leaves .ipynb_checkpoints. fast-reid's glob('*.jpg') skips both.
    write_images(tmp_path / "bounding_box_train", ["0001_c1s1_000001_00.jpg", "0002_c2s1_000002_00.jpg"])
    write_images(tmp_path / "query", ["0003_c1s1_000003_00.jpg"])
    write_images(tmp_path / "bounding_box_test", ["0003_c2s1_000004_00.jpg"])
    for image in list(tmp_path.glob("*/*.jpg")):
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "bounding_box_train" / ".ipynb_checkpoints").mkdir()
    splits = build_dataset(name, tmp_path)
    assert (len(splits.train), len(splits.query), len(splits.gallery)) == (2, 1, 1)
    assert not any(Path(s.path).name.startswith(".") for s in [*splits.train, *splits.query, *splits.gallery])


def test_folder_identity_form_skips_hidden_folders_and_files(tmp_path: Path) -> None:
    write_images(tmp_path / "bounding_box_train", ["alice/a_c1.jpg", "alice/._a_c1.jpg", ".ipynb_checkpoints/x_c1.jpg"])
    write_images(tmp_path / "query", ["bob/b_c1.jpg"])
    write_images(tmp_path / "bounding_box_test", ["bob/b_c2.jpg"])
    (tmp_path / "query" / "._bob.jpg").write_bytes(b"AppleDouble")
    splits = build_dataset("folder", tmp_path)
    assert [Path(s.path).name for s in splits.train] == ["a_c1.jpg"]
    assert len(splits.query) == 1


def test_folder_identity_folders_with_cameras(tmp_path: Path) -> None:
    write_images(tmp_path / "bounding_box_train", ["alice/img_c1_0.jpg", "alice/img_c2_1.jpg", "bob/img_c2_0.jpg"])
    write_images(tmp_path / "query", ["carol/q_c1.jpg", "dave/q_c2.jpg"])
    write_images(tmp_path / "bounding_box_test", ["carol/g_c2.jpg", "dave/g_c1.jpg", "dave/g_c1_b.jpg"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = build_dataset("folder", tmp_path)
    train = sorted((Path(s.path).parent.name, s.pid, s.camid) for s in splits.train)
    assert train == [("alice", 0, 0), ("alice", 0, 1), ("bob", 1, 1)]
    query_pids = {Path(s.path).parent.name: s.pid for s in splits.query}
    gallery_pids = {Path(s.path).parent.name: s.pid for s in splits.gallery}
    assert query_pids == gallery_pids and query_pids["carol"] != query_pids["dave"]
    assert sorted(s.camid for s in splits.gallery) == [0, 0, 1]


def test_folder_identity_folders_single_camera(tmp_path: Path) -> None:
    write_images(tmp_path / "bounding_box_train", ["12/a.jpg", "12/b.jpg", "40/a.jpg"])
    write_images(tmp_path / "query", ["3/a.jpg"])
    write_images(tmp_path / "bounding_box_test", ["3/b.jpg", "5/a.jpg"])
    with pytest.warns(UserWarning, match="one camera.*query images get camera 0 and gallery images camera 1"):
        splits = build_dataset("folder", tmp_path)
    assert [s.pid for s in splits.train] == [0, 0, 1]
    assert {s.camid for s in splits.train} == {0}
    assert [(s.pid, s.camid) for s in splits.query] == [(3, 0)]  # integer folder names kept as pids
    assert sorted((s.pid, s.camid) for s in splits.gallery) == [(3, 1), (5, 1)]


def test_folder_mixed_forms(tmp_path: Path) -> None:
    market_tree(tmp_path)
    write_images(tmp_path / "query", ["7/a.jpg"])
    with pytest.raises(ValueError, match="mixes images and identity sub-folders"):
        build_dataset("folder", tmp_path)


def test_unknown_dataset_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data set 'market'") as info:
        build_dataset("market", tmp_path)
    for name in DATASETS:
        assert name in str(info.value)


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for name in ("market1501", "dukemtmc", "cuhk03_np", "folder", "msmt17"):
        with pytest.raises(FileNotFoundError, match=f"{missing}.*paths.data_dir.*REID_DATA"):
            build_dataset(name, missing)


def test_root_without_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}"):
        build_dataset("market1501", tmp_path)


def test_missing_split_folder(tmp_path: Path) -> None:
    market_tree(tmp_path)
    for image in (tmp_path / "query").iterdir():
        image.unlink()
    (tmp_path / "query").rmdir()
    with pytest.raises(FileNotFoundError, match=f"missing {tmp_path / 'query'}.*REID_DATA"):
        build_dataset("market1501", tmp_path)


def test_empty_split(tmp_path: Path) -> None:
    market_tree(tmp_path)
    for image in (tmp_path / "bounding_box_test").iterdir():
        image.unlink()
    (tmp_path / "bounding_box_test" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"{tmp_path / 'bounding_box_test'} holds no images"):
        build_dataset("market1501", tmp_path)


def test_unparsable_name(tmp_path: Path) -> None:
    market_tree(tmp_path)
    write_images(tmp_path / "query", ["holiday.jpg"])
    with pytest.raises(ValueError, match="holiday.jpg"):
        build_dataset("market1501", tmp_path)


def test_query_identity_absent_from_gallery(tmp_path: Path) -> None:
    market_tree(tmp_path)
    write_images(tmp_path / "query", ["0042_c1s1_000030_00.jpg", "0043_c1s1_000031_00.jpg"])
    with pytest.warns(UserWarning, match=r"2 query identities have no gallery image \(42, 43\)"):
        build_dataset("market1501", tmp_path)


def test_image_extensions(tmp_path: Path) -> None:
    market_tree(tmp_path)
    for frame, (suffix, image_format) in enumerate(((".jpeg", "JPEG"), (".PNG", "PNG"), (".bmp", "BMP"))):
        Image.new("RGB", (4, 8)).save(tmp_path / "query" / f"0003_c3s1_00005{frame}_00{suffix}", format=image_format)
    (tmp_path / "query" / "0003_c3s1_000060_00.gif").write_bytes(b"GIF89a")
    assert len(build_dataset("market1501", tmp_path).query) == 5  # 2 + 3, the .gif ignored


@pytest.mark.skipif(not (SHARED / "data" / "mini_market1501").is_dir(), reason="shared mini_market1501 absent")
def test_shared_mini_market1501() -> None:
    splits = build_dataset("market1501", SHARED / "data" / "mini_market1501")
    assert len(splits.train) + len(splits.query) + len(splits.gallery) == 96
    assert splits.num_train_pids == 16
    assert sorted({s.pid for s in splits.train}) == list(range(16))
    assert {s.pid for s in splits.query} <= {s.pid for s in splits.gallery}
    assert all(0 <= s.camid < 6 for s in [*splits.train, *splits.query, *splits.gallery])


@pytest.mark.skipif(not (SHARED / "data" / "cuhk03-np" / "detected").is_dir(), reason="shared cuhk03-np absent")
def test_shared_cuhk03_np_detected() -> None:
    splits = build_dataset("cuhk03_np", SHARED / "data", subset="detected")
    assert (len(splits.train), splits.num_train_pids, len(splits.query), len(splits.gallery)) == (7365, 767, 1400, 5332)
    assert {s.camid for s in splits.query} == {0, 1}
    assert len({s.pid for s in splits.gallery}) == 700
