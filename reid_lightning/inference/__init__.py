"""Use a trained model: features of any images, ONNX/TorchScript export, gallery search.

``from reid_lightning import FeatureExtractor`` (or from this package) gives the extractor;
``scripts/extract.py``, ``scripts/export.py`` and ``scripts/search.py`` run the functions of
:mod:`reid_lightning.cli.inference`.
"""
from .export import (
    ONNX_OPSET,
    ExportCheckError,
    export_model,
    verify_export,
    write_model_info,
)
from .extractor import FeatureExtractor, FolderFeatures, InferenceModel
from .image_files import ImageFiles, collect_image_files, market_labels
from .search import search_gallery

__all__ = [
    "ONNX_OPSET",
    "ExportCheckError",
    "FeatureExtractor",
    "FolderFeatures",
    "ImageFiles",
    "InferenceModel",
    "collect_image_files",
    "export_model",
    "market_labels",
    "search_gallery",
    "verify_export",
    "write_model_info",
]
