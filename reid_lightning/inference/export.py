"""Export a :class:`FeatureExtractor`'s model to ONNX or TorchScript with a dynamic batch axis,
describe its input in a JSON file next to it, and check the exported file against PyTorch.

Called as::

    extractor = FeatureExtractor.from_checkpoint(ckpt, device="cpu")
    path = export_model(extractor, "model.onnx", fmt="onnx", include_normalize=False)
    info = write_model_info(extractor, path, fmt="onnx", include_normalize=False)   # model.json
    verify_export(extractor, path, "onnx", include_normalize=False, inputs=[images])

ONNX uses torch's ``torch.export``-based exporter (``dynamo=True``, needs ``onnxscript``) at
opset :data:`ONNX_OPSET`; the batch axis is a ``torch.export.Dim``, height and width are fixed.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reid_lightning.inference.extractor import FeatureExtractor, InferenceModel

log = logging.getLogger(__name__)

ONNX_OPSET = 18
FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "images", "features"


class ExportCheckError(RuntimeError):
    """The exported model's features differ from PyTorch's by more than the tolerance."""


def _deploy_module(extractor: FeatureExtractor, include_normalize: bool) -> InferenceModel:
    """The extractor's computation on the CPU in float32, with the L2 normalisation in the graph if asked."""
    model = InferenceModel(extractor.model.model, flip=extractor.flip, normalize=include_normalize)
    return model.to("cpu").float().eval()


def _example(extractor: FeatureExtractor, batch: int = 2) -> Tensor:
    # batch 2, not 1: torch.export specialises a dimension of size 1
    return torch.randn(batch, 3, *extractor.size, generator=torch.Generator().manual_seed(0))


def _require(module: str, extra: str = "deploy") -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"{module} is not installed: pip install -e \".[{extra}]\"") from err


def export_model(extractor: FeatureExtractor, path: str | Path, fmt: str = "onnx", include_normalize: bool = False) -> Path:
    """Write the extractor's model to ``path`` with a dynamic batch axis.

    Args:
        extractor: the model to export (its flip setting is part of the graph).
        path: output file (its folder is created).
        fmt: ``"onnx"`` (input ``images``, output ``features``, opset :data:`ONNX_OPSET`) or
            ``"torchscript"`` (``torch.jit.trace``; load with ``torch.jit.load``).
        include_normalize: L2-normalise the features inside the exported graph.

    Returns:
        ``path``.

    Raises:
        ValueError: an unknown ``fmt``.
        ImportError: ONNX export without ``onnx``/``onnxscript`` installed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _deploy_module(extractor, include_normalize)
    example = _example(extractor)
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        traced.save(str(path))
        return path
    _require("onnx")
    _require("onnxscript")
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True, verbose=False,
    )
    program.save(str(path))
    return path


def feature_dim(extractor: FeatureExtractor) -> int:
    """Length of the extractor's feature vectors (one forward pass of a random image)."""
    return int(extractor.forward_batch(_example(extractor, 1).to(extractor.device)).shape[1])


def write_model_info(extractor: FeatureExtractor, path: str | Path, fmt: str, include_normalize: bool, **extra: Any) -> dict[str, Any]:
    """Write what a deployer must feed the exported model to ``<path without suffix>.json``.

    Args:
        extractor: the exported extractor.
        path: the exported model file.
        fmt: its format.
        include_normalize: whether the graph L2-normalises the features.
        **extra: further entries (e.g. ``checkpoint``).

    Returns:
        The written dict.
    """
    height, width = extractor.size
    info = {
        "format": fmt,
        "file": Path(path).name,
        **({"opset": ONNX_OPSET} if fmt == "onnx" else {}),
        "input": {
            "name": INPUT_NAME, "shape": ["batch", 3, height, width], "dtype": "float32", "layout": "NCHW",
            "channels": "RGB",
            "preprocess": (f"resize to {height}x{width} (bicubic), scale pixels to [0, 1], "
                           "subtract mean and divide by std per channel"),
            "mean": list(extractor.mean), "std": list(extractor.std),
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", feature_dim(extractor)], "dtype": "float32",
                   "l2_normalized": include_normalize},
        "flip_test_in_graph": extractor.flip,
        # the distance the checkpoint's run evaluated with (evaluation.metric)
        "distance": extractor.config.get("evaluation", {}).get("metric", "cosine"),
        **extra,
    }
    Path(path).with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_runtime(path: str | Path, fmt: str, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Load an exported model as ``run(images: float32 NCHW array) -> features array``.

    ONNX runs in onnxruntime on the CPU provider; TorchScript through ``torch.jit.load``.

    Args:
        path: the exported file.
        fmt: ``"onnx"`` or ``"torchscript"``.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice); TorchScript
            uses torch's own setting (``torch.set_num_threads``).
    """
    if fmt == "onnx":
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    scripted = torch.jit.load(str(path), map_location="cpu")

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(images)).numpy()

    return run


def verify_export(
    extractor: FeatureExtractor,
    path: str | Path,
    fmt: str,
    include_normalize: bool,
    inputs: Sequence[Tensor],
    atol: float = 1e-4,
) -> dict[int, float]:
    """Compare the exported model with PyTorch on each batch of ``inputs``.

    Both sides' features are L2-normalised before comparing (so the check has the same
    meaning with and without ``include_normalize``).

    Args:
        extractor: the exported extractor.
        path: the exported file.
        fmt: its format.
        include_normalize: whether the graph normalises (then its output must already have
            unit norm).
        inputs: preprocessed float32 ``(N, 3, H, W)`` batches.
        atol: largest allowed absolute difference.

    Returns:
        ``{batch size: max abs difference}``.

    Raises:
        ExportCheckError: a batch differs by more than ``atol``, has the wrong number of
            rows, or (``include_normalize``) is not unit-norm.
    """
    run = load_runtime(path, fmt)
    module = _deploy_module(extractor, include_normalize=False)
    diffs = {}
    for images in inputs:
        with torch.no_grad():
            expected = F.normalize(module(images.float()), dim=1).numpy()
        got = np.asarray(run(np.ascontiguousarray(images.float().numpy())), dtype=np.float32)
        if got.shape != expected.shape:
            raise ExportCheckError(f"{path}: batch {len(images)} gave features of shape {got.shape}, expected {expected.shape}")
        if include_normalize and not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=atol):
            raise ExportCheckError(f"{path}: include_normalize=true but the features of batch {len(images)} are not unit-norm")
        got = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
        diffs[len(images)] = float(np.abs(got - expected).max())
        if diffs[len(images)] > atol:
            raise ExportCheckError(
                f"{path}: features of batch {len(images)} differ from PyTorch by {diffs[len(images)]:.3g} (> {atol})"
            )
    return diffs
