"""ONNX and TorchScript export: dynamic batch, parity with PyTorch, model.json, verification."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reid_lightning.inference import (
    ONNX_OPSET,
    ExportCheckError,
    FeatureExtractor,
    export_model,
    verify_export,
    write_model_info,
)


@pytest.fixture(scope="module")
def extractor(tiny_checkpoint) -> FeatureExtractor:
    return FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu")


def random_batches(size: tuple[int, int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, *size, generator=gen) for n in (1, 7, 64)]


@pytest.fixture(scope="module")
def onnx_file(extractor, tmp_path_factory):
    pytest.importorskip("onnxscript", reason="ONNX export needs the deploy extra: pip install -e '.[deploy]'")
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_model(extractor, path, "onnx", include_normalize=False)


def test_onnx_runs_batches_1_7_64_from_one_file_like_pytorch(extractor, onnx_file):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the deploy extra: pip install -e '.[deploy]'")
    import onnx

    model = onnx.load(str(onnx_file))
    assert model.opset_import[0].version == ONNX_OPSET
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("images", "features")
    assert inp.shape[1:] == [3, 64, 32] and not isinstance(inp.shape[0], int)
    for batch in random_batches(extractor.size):
        got = session.run(None, {"images": batch.numpy()})[0]
        expected = extractor(batch, normalize=False).numpy()
        assert got.shape == (len(batch), 512)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_model_json_tells_what_to_feed(extractor, onnx_file):
    info = write_model_info(extractor, onnx_file, "onnx", include_normalize=False, checkpoint="tiny.ckpt")
    written = json.loads(onnx_file.with_suffix(".json").read_text())
    assert written == info
    assert written["opset"] == ONNX_OPSET and written["file"] == "model.onnx"
    assert written["input"]["name"] == "images" and written["input"]["shape"] == ["batch", 3, 64, 32]
    assert written["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert written["input"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert "bicubic" in written["input"]["preprocess"]
    assert written["output"] == {"name": "features", "shape": ["batch", 512], "dtype": "float32", "l2_normalized": False}
    assert written["checkpoint"] == "tiny.ckpt"


def test_include_normalize_puts_the_l2_norm_in_the_graph(extractor, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the deploy extra: pip install -e '.[deploy]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs the deploy extra: pip install -e '.[deploy]'")
    path = export_model(extractor, tmp_path / "normed.onnx", "onnx", include_normalize=True)
    batch = random_batches(extractor.size)[1]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": batch.numpy()})[0]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, extractor(batch).numpy(), rtol=0, atol=1e-5)
    assert write_model_info(extractor, path, "onnx", include_normalize=True)["output"]["l2_normalized"] is True


def test_torchscript_parity_on_batches_1_7_64(extractor, tmp_path):
    path = export_model(extractor, tmp_path / "model.pt", "torchscript", include_normalize=False)
    scripted = torch.jit.load(str(path))
    for batch in random_batches(extractor.size):
        with torch.no_grad():
            torch.testing.assert_close(scripted(batch), extractor(batch, normalize=False), rtol=0, atol=1e-5)


def test_verification_passes_the_same_model_and_fails_one_that_differs(extractor, tmp_path):
    path = export_model(extractor, tmp_path / "model.pt", "torchscript", include_normalize=False)
    assert verify_export(extractor, path, "torchscript", False, random_batches(extractor.size)[:2]).keys() == {1, 7}
    other = FeatureExtractor(extractor.model.model, extractor.size, device="cpu", flip=True)
    with pytest.raises(ExportCheckError, match=r"model.pt: features of batch 7 differ from PyTorch by"):
        verify_export(other, path, "torchscript", False, random_batches(extractor.size)[1:2])
    with pytest.raises(ExportCheckError, match="not unit-norm"):
        verify_export(extractor, path, "torchscript", True, random_batches(extractor.size)[1:2])


def test_unknown_format_is_named(extractor, tmp_path):
    with pytest.raises(ValueError, match="format must be one of .* got 'tflite'"):
        export_model(extractor, tmp_path / "m.tflite", "tflite")


def test_model_json_names_the_distance_of_the_checkpoints_run(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["reid_config"]["evaluation"]["metric"] = "euclidean"
    torch.save(ckpt, tmp_path / "euclidean.ckpt")
    extractor = FeatureExtractor.from_checkpoint(tmp_path / "euclidean.ckpt", device="cpu")
    assert write_model_info(extractor, tmp_path / "model.pt", "torchscript", include_normalize=False)["distance"] == "euclidean"
    cosine = FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu")
    assert write_model_info(cosine, tmp_path / "model.pt", "torchscript", include_normalize=False)["distance"] == "cosine"


def test_export_with_nothing_to_verify_on_says_so_before_writing(tiny_checkpoint, tmp_path):
    from omegaconf import OmegaConf

    from reid_lightning.cli.inference import run_export

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["reid_config"]["data"]["root"] = str(tmp_path / "gone")  # its query images are not on this machine
    torch.save(ckpt, tmp_path / "moved.ckpt")
    cfg = OmegaConf.create({
        "ckpt_path": str(tmp_path / "moved.ckpt"), "model": None, "input_size": None, "format": "torchscript",
        "output": str(tmp_path / "model.pt"), "include_normalize": False, "flip": None, "verify": True, "atol": 1e-4,
        "verify_batch_sizes": [], "verify_input": None, "paths": {"output_dir": str(tmp_path)},
    })
    with pytest.raises(ValueError, match=r"nothing to verify .*verify_batch_sizes.*verify_input.*verify=false"):
        run_export(cfg)
    assert not (tmp_path / "model.pt").exists()


def test_verification_does_not_generate_a_missing_demo_set(tiny_checkpoint, tmp_path, caplog):
    from omegaconf import OmegaConf

    from reid_lightning.cli.inference import _verification_inputs

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["reid_config"]["data"].update(dataset="demo", root=str(tmp_path / "data"), dataset_kwargs={"seed": 0})
    torch.save(ckpt, tmp_path / "demo.ckpt")
    extractor = FeatureExtractor.from_checkpoint(tmp_path / "demo.ckpt", device="cpu")
    inputs = _verification_inputs(extractor, OmegaConf.create({"verify_batch_sizes": [2], "verify_input": None}))
    assert [len(batch) for batch in inputs] == [2]  # random only
    assert not (tmp_path / "data").exists()  # no demo set written just to check an export
