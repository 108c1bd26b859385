"""Synthetic demo set: layout and counts, determinism, generation time, marker handling."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

from reid_lightning.data import build_dataset, generate_demo_dataset
from reid_lightning.data.datasets.demo import demo_dir
from reid_lightning.data.demo_generator import MARKER_FILE

SMALL = {"num_ids": 8, "images_per_id": 4, "num_cams": 3, "size": (32, 16), "num_distractors": 3, "num_junk": 2}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    start = time.perf_counter()
    out = generate_demo_dataset(tmp_path_factory.mktemp("demo") / "set", seed=0)
    return out, time.perf_counter() - start


def test_default_set_size_and_time(default_set: tuple[Path, float]) -> None:
    out, seconds = default_set
    assert seconds < 60, f"generation took {seconds:.1f} s"
    files = [p for p in out.rglob("*.jpg")]
    assert 2000 <= len(files) <= 3000
    assert (out / MARKER_FILE).is_file()


def test_default_set_structure(default_set: tuple[Path, float]) -> None:
    out, _ = default_set
    splits = build_dataset("market1501", out)  # Market layout and names
    assert splits.num_train_pids == 60
    query_ids, gallery_ids = {s.pid for s in splits.query}, {s.pid for s in splits.gallery}
    original_train_ids = {int(Path(s.path).name[:4]) for s in splits.train}
    assert len(query_ids) == 60 and not query_ids & original_train_ids
    assert gallery_ids == query_ids | {0}
    assert sum(s.pid == 0 for s in splits.gallery) == 100
    assert len(list((out / "bounding_box_test").glob("-1_*.jpg"))) == 40
    cams_of = defaultdict(set)
    for s in splits.gallery:
        cams_of[s.pid].add(s.camid)
    seen = set()
    for s in splits.query:  # one query per identity and camera, each with a gallery match in another camera
        assert (s.pid, s.camid) not in seen
        seen.add((s.pid, s.camid))
        assert cams_of[s.pid] - {s.camid}
    assert {s.camid for s in splits.train} == {0, 1, 2, 3}


def contents(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*.jpg")}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = contents(generate_demo_dataset(tmp_path / "a", seed=7, **SMALL))
    assert first == contents(generate_demo_dataset(tmp_path / "b", seed=7, **SMALL))
    assert first != contents(generate_demo_dataset(tmp_path / "c", seed=8, **SMALL))


def test_complete_set_is_reused_and_incomplete_or_different_is_regenerated(tmp_path: Path) -> None:
    out = generate_demo_dataset(tmp_path / "set", seed=0, **SMALL)
    probe = next(out.rglob("*.jpg"))
    stamp = probe.stat().st_mtime_ns
    generate_demo_dataset(out, seed=0, **SMALL)
    assert probe.stat().st_mtime_ns == stamp  # complete: nothing written
    (out / MARKER_FILE).unlink()
    (out / "query" / "stray.jpg").write_bytes(b"half written")
    generate_demo_dataset(out, seed=0, **SMALL)
    assert (out / MARKER_FILE).is_file() and not (out / "query" / "stray.jpg").exists()
    generate_demo_dataset(out, seed=0, **{**SMALL, "num_ids": 10})  # other arguments: replaced
    assert build_dataset("market1501", out).num_train_pids == 5
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no partial folder left


def test_build_dataset_demo_generates_under_root(tmp_path: Path) -> None:
    splits = build_dataset("demo", tmp_path, seed=3, **SMALL)
    assert (demo_dir(tmp_path, 3) / MARKER_FILE).is_file()
    assert splits.name == "demo" and splits.num_train_pids == 4
    assert {s.camid for s in [*splits.train, *splits.query, *splits.gallery]} <= {0, 1, 2}


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_cams=12"):
        generate_demo_dataset(tmp_path / "x", num_cams=12)
