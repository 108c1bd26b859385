"""scripts/search.py's body (run_search) in-process: every query keeps its own results."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from reid_lightning.cli.inference import run_extract, run_search


def _extract(ckpt: Path, source, output: Path) -> Path:
    return run_extract(OmegaConf.create({
        "ckpt_path": str(ckpt), "input": source, "output": str(output), "dtype": "float32", "normalize": True,
        "flip": None, "device": "cpu", "precision": "32", "batch_size": 8, "num_workers": 0, "skip_bad": False,
        "progress": False,
    }))


def _search(index: Path, query, out: Path, top_k: int = 3, metric: str | None = "cosine") -> dict:
    run_search(OmegaConf.create({
        "index": str(index), "query": query, "top_k": top_k, "metric": metric, "backend": "torch", "ckpt_path": None,
        "device": "cpu", "batch_size": 8, "num_workers": 0, "skip_bad": False, "rank_lists": False,
        "rank_list_size": 10, "output_dir": str(out),
    }))
    return json.loads((out / "results.json").read_text())


def test_queries_and_gallery_items_of_the_same_name_in_two_folders_stay_apart(
    tiny_checkpoint, tiny_market_root, tmp_path, caplog
):
    # two cameras' folders, each with a "p.jpg" of another person
    queries = sorted((tiny_market_root / "query").glob("*.jpg"))
    for camera, source in zip(["camA", "camB"], [queries[0], queries[-1]]):
        (tmp_path / camera).mkdir()
        shutil.copy(source, tmp_path / camera / "p.jpg")
    folders = [str(tmp_path / "camA"), str(tmp_path / "camB")]
    index = _extract(tiny_checkpoint, folders, tmp_path / "index.npz")

    with caplog.at_level(logging.WARNING, logger="reid_lightning.cli.inference"):
        results = _search(index, folders, tmp_path / "search", top_k=2)
    a, b = str((tmp_path / "camA" / "p.jpg").resolve()), str((tmp_path / "camB" / "p.jpg").resolve())
    assert sorted(results) == sorted([a, b])  # both queries, not one overwriting the other
    # each query finds itself first, named apart from its namesake in the other folder
    assert results[a][0][0] == a and results[b][0][0] == b
    assert {results[a][1][0], results[b][1][0]} == {a, b}
    assert "same name" in caplog.text

    # unique names keep the short names
    results = _search(index, str(tmp_path / "camA"), tmp_path / "one", top_k=1)
    assert list(results) == ["p.jpg"]


def test_extract_writes_the_output_file_it_was_given(tiny_checkpoint, tiny_market_root, tmp_path):
    # numpy's savez appends .npz to other names: the log, the return value and search's index= then miss
    for name in ("gallery.features", "gallery"):
        written = _extract(tiny_checkpoint, str(tiny_market_root / "query"), tmp_path / name)
        assert written == tmp_path / name and written.is_file()
        assert not (tmp_path / f"{name}.npz").exists()
        assert list(_search(written, str(tiny_market_root / "query"), tmp_path / f"search_{name}", top_k=1))


def test_a_moved_checkpoint_of_the_index_names_the_index_and_ckpt_path(tiny_checkpoint, tiny_market_root, tmp_path):
    moved = tmp_path / "moved.ckpt"
    shutil.copy(tiny_checkpoint, moved)
    index = _extract(moved, str(tiny_market_root / "query"), tmp_path / "index.npz")
    moved.unlink()  # the index went to another machine, or the run folder was cleaned
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {moved} recorded in {index} does not exist: pass ckpt_path="):
        _search(index, str(tiny_market_root / "query"), tmp_path / "search")
    _search_with = OmegaConf.create({
        "index": str(index), "query": str(tiny_market_root / "query"), "top_k": 1, "metric": "cosine",
        "backend": "torch", "ckpt_path": str(tiny_checkpoint), "device": "cpu", "batch_size": 8, "num_workers": 0,
        "skip_bad": False, "rank_lists": False, "rank_list_size": 10, "output_dir": str(tmp_path / "given"),
    })
    assert run_search(_search_with).is_file()


def test_a_second_search_into_the_same_folder_leaves_no_pictures_of_the_first(tiny_checkpoint, tiny_market_root, tmp_path):
    index = _extract(tiny_checkpoint, str(tiny_market_root / "query"), tmp_path / "index.npz")
    queries = sorted((tiny_market_root / "query").glob("*.jpg"))

    def search(query):
        run_search(OmegaConf.create({
            "index": str(index), "query": query, "top_k": 2, "metric": "cosine", "backend": "torch", "ckpt_path": None,
            "device": "cpu", "batch_size": 8, "num_workers": 0, "skip_bad": False, "rank_lists": True,
            "rank_list_size": 2, "output_dir": str(tmp_path / "out"),
        }))
        return sorted(p.name for p in (tmp_path / "out" / "rank_lists").glob("*.png"))

    assert len(search(str(tiny_market_root / "query"))) == len(queries) > 1
    (tmp_path / "out" / "rank_lists" / "mine.png").write_bytes(b"the user's own file")
    assert search(str(queries[-1])) == [f"0000_{queries[-1].stem}.png", "mine.png"]


def test_extract_and_search_take_a_checkpoint_url(tiny_checkpoint, tiny_market_root, tmp_path, monkeypatch):
    import torch

    url = "https://example.org/models/tiny.ckpt"
    requested = []

    def fake_download(location, **kwargs):
        requested.append(location)
        return torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    index = _extract(url, str(tiny_market_root / "query"), tmp_path / "index.npz")
    with np.load(index) as saved:
        assert str(saved["ckpt_path"]) == url  # as given, not made into a local path
    results = _search(index, str(tiny_market_root / "query"), tmp_path / "search", top_k=1)
    assert requested == [url, url] and all(hits[0][0] == query for query, hits in results.items())


def test_search_ranks_with_the_checkpoints_metric_unless_told(tiny_checkpoint, tiny_market_root, tmp_path):
    import torch

    from reid_lightning.evaluation import compute_distance

    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["reid_config"]["evaluation"]["metric"] = "euclidean"
    euclidean_ckpt = tmp_path / "euclidean.ckpt"
    torch.save(ckpt, euclidean_ckpt)
    queries = tiny_market_root / "query"
    index = run_extract(OmegaConf.create({
        "ckpt_path": str(euclidean_ckpt), "input": str(queries), "output": str(tmp_path / "index.npz"),
        "dtype": "float32", "normalize": False, "flip": None, "device": "cpu", "precision": "32", "batch_size": 8,
        "num_workers": 0, "skip_bad": False, "progress": False,
    }))
    features = torch.from_numpy(np.load(index)["features"])
    names = [str(n) for n in np.load(index)["paths"]]
    for metric, expected in ((None, "euclidean"), ("cosine", "cosine")):
        results = _search(index, str(queries), tmp_path / f"search_{metric}", top_k=len(names), metric=metric)
        dist = compute_distance(features, features, expected)
        first = names[0]
        got = {name: d for name, d in results[first]}
        assert all(got[name] == pytest.approx(float(dist[0, i]), abs=1e-4) for i, name in enumerate(names))
