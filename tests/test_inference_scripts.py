"""scripts/extract.py, search.py and export.py as a user runs them, and parity with scripts/eval.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

from reid_lightning.evaluation import compute_distance, draw_rank_strip
from reid_lightning.inference import FeatureExtractor

pytestmark = pytest.mark.slow


def test_extractor_features_equal_those_of_eval_py(tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "eval"
    run_script("eval.py", [f"ckpt_path={tiny_checkpoint}", "export_features=true", "cmc_curve=false",
                           "trainer=cpu", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    with np.load(run_dir / "features.npz") as saved:
        paths, features = list(saved["paths"]), torch.from_numpy(saved["features"])
    assert len(paths) > 10
    ours = FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu")(paths, normalize=False)
    torch.testing.assert_close(ours, features, rtol=0, atol=1e-6)


@pytest.fixture
def photos(tiny_market_root, tmp_path) -> Path:
    """The gallery of the tiny data set in a nested folder, plus one corrupt file."""
    folder = tmp_path / "photos"
    shutil.copytree(tiny_market_root / "bounding_box_test", folder / "cam_all")
    (folder / "broken.png").write_bytes(b"\x89PNG not an image")
    return folder


def test_extract_then_search(tiny_checkpoint, tiny_market_root, photos, tmp_path):
    bad = run_script("extract.py", [f"ckpt_path={tiny_checkpoint}", f"input={photos}", "output=bad.npz", "num_workers=0"],
                     cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "broken.png" in bad.stderr
    assert not (tmp_path / "bad.npz").exists()

    run_script("extract.py", [f"ckpt_path={tiny_checkpoint}", f"input={photos}", "output=index.npz", "skip_bad=true",
                              "dtype=float16"], cwd=tmp_path)
    with np.load(tmp_path / "index.npz") as index:
        index = {key: index[key] for key in index.files}
    names = sorted(p.name for p in (photos / "cam_all").glob("*.jpg"))
    assert list(index["paths"]) == [f"cam_all/{n}" for n in names]
    assert list(index["skipped"]) == ["broken.png"]
    assert index["features"].dtype == np.float16 and index["features"].shape == (len(names), 512)
    assert index["pids"].tolist() == [int(n.split("_")[0]) for n in names]
    assert index["camids"].tolist() == [int(n.split("_c")[1][0]) - 1 for n in names]
    extractor = FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu")
    expected = extractor([photos / "cam_all" / n for n in names])
    torch.testing.assert_close(torch.from_numpy(index["features"]).float(), expected, rtol=0, atol=2e-3)

    query = tiny_market_root / "query"
    out = tmp_path / "search"
    run_script("search.py", ["index=index.npz", f"query={query}", "top_k=5", "rank_list_size=3", f"output_dir={out}"],
               cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    q_names = sorted(p.name for p in query.glob("*.jpg"))
    assert list(results) == q_names
    dist = compute_distance(extractor([query / n for n in q_names]), torch.from_numpy(index["features"]))
    for q, name in enumerate(q_names):
        top = np.argsort(dist[q].numpy(), kind="stable")[:5]
        assert [path for path, _ in results[name]] == [index["paths"][g] for g in top]
        np.testing.assert_allclose([d for _, d in results[name]], dist[q, top].numpy(), atol=1e-5)
    pictures = sorted((out / "rank_lists").glob("*.png"))
    assert len(pictures) == len(q_names)
    # each picture shows the first rank_list_size results (the query, then 3 gallery images)
    three = draw_rank_strip(query / q_names[0], [], [], "query", top_k=3, size=extractor.size)
    assert all(Image.open(picture).size == three.size for picture in pictures)


def test_extract_rejects_an_empty_folder_and_a_missing_checkpoint(tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_script("extract.py", [f"ckpt_path={tiny_checkpoint}", "input=empty"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "empty holds no images" in proc.stderr
    proc = run_script("search.py", ["index=none.npz", "query=empty"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "index none.npz does not exist" in proc.stderr
    proc = run_script("export.py", ["ckpt_path=gone.ckpt"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "checkpoint not found: " in proc.stderr and "gone.ckpt" in proc.stderr


def test_export_py_writes_a_verified_onnx_file_and_its_json(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime", reason="export verification needs the deploy extra: pip install -e '.[deploy]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs the deploy extra: pip install -e '.[deploy]'")
    proc = run_script("export.py", [f"ckpt_path={tiny_checkpoint}", "output=deploy/reid.onnx", "include_normalize=true",
                                    "verify_batch_sizes=[1,7]"], cwd=tmp_path)
    info = json.loads((tmp_path / "deploy" / "reid.json").read_text())
    assert (tmp_path / "deploy" / "reid.onnx").is_file()
    assert info["output"]["l2_normalized"] is True and info["input"]["shape"] == ["batch", 3, 64, 32]
    assert 0 <= info["verified_max_abs_diff"] <= 1e-4
    assert "random inputs only" not in proc.stdout + proc.stderr  # the checkpoint's query images were used


def test_export_py_fails_and_removes_the_file_when_the_check_fails(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime", reason="export verification needs the deploy extra: pip install -e '.[deploy]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs the deploy extra: pip install -e '.[deploy]'")
    # atol=0: onnxruntime's kernels never reproduce PyTorch's 512 float32 outputs bit for bit
    proc = run_script("export.py", [f"ckpt_path={tiny_checkpoint}", "output=strict.onnx", "atol=0", "verify_batch_sizes=[7]"],
                     cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "strict.onnx: features of batch 7 differ from PyTorch by" in proc.stderr and "file was removed" in proc.stderr
    assert not (tmp_path / "strict.onnx").exists() and not (tmp_path / "strict.json").exists()
