"""Features of any images from a trained checkpoint.

Called as::

    from reid_lightning import FeatureExtractor

    extractor = FeatureExtractor.from_checkpoint("outputs/quickstart/runs/<date_time>/checkpoints/last.ckpt")
    features = extractor(["a.jpg", "b.jpg"])           # (2, D) float32, L2-normalised
    result = extractor.extract_folder("photos/")        # every image below photos/
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from reid_lightning.checkpointing.load import load_model_checkpoint
from reid_lightning.checkpointing.saved_model import rebuild_model
from reid_lightning.data.image_dataset import read_image
from reid_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transforms,
)
from reid_lightning.evaluation import extract_features
from reid_lightning.inference.image_files import ImageFiles, collect_image_files
from reid_lightning.inference.progress import images_progress

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
FASTREID_TEST_SIZE = (256, 128)  # fast-reid's default INPUT.SIZE_TEST, for its checkpoints


class InferenceModel(nn.Module):
    """The deployed computation: eval-mode features, optionally averaged with the flip test
    and L2-normalised. ``InferenceModel(model, flip, normalize)(images) -> (N, D)``.

    Args:
        model: maps normalised ``(N, 3, H, W)`` images to ``(N, D)`` features in eval mode.
        flip: average with the features of the mirrored images
            (:func:`reid_lightning.evaluation.extract_features`).
        normalize: divide each feature by its L2 norm.
        autocast: run the model under the caller's autocast (``FeatureExtractor``'s
            ``precision``); False switches autocast off, float32 features as in evaluation.
    """

    def __init__(self, model: nn.Module, flip: bool = False, normalize: bool = False, autocast: bool = False) -> None:
        super().__init__()
        self.model = model
        self.flip = flip
        self.normalize = normalize
        self.autocast = autocast

    def forward(self, images: Tensor) -> Tensor:
        features = extract_features(self.model, images, flip=self.flip, autocast=self.autocast)
        return F.normalize(features, dim=1) if self.normalize else features


@dataclass
class FolderFeatures:
    """Result of :meth:`FeatureExtractor.extract_folder`.

    Attributes:
        features: ``(N, D)`` float32 features of the images that were read, in file order.
        files: those images (``paths`` absolute, ``names`` relative to the input).
        skipped: ``(name, reason)`` of each unreadable file left out (``skip_bad=True``).
    """

    features: Tensor
    files: ImageFiles
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _ImageFileDataset(Dataset):
    """``dataset[i] -> (image tensor, i, error)``; with ``skip_bad`` an unreadable file gives
    a zero image and its error message instead of raising."""

    def __init__(self, files: ImageFiles, transform: Any, size: tuple[int, int], skip_bad: bool) -> None:
        self.files, self.transform, self.size, self.skip_bad = files, transform, size, skip_bad

    def __len__(self) -> int:
        return len(self.files.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        try:
            return self.transform(read_image(str(self.files.paths[index]))), index, ""
        except RuntimeError as error:
            if not self.skip_bad:
                raise
            return torch.zeros(3, *self.size), index, str(error)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FeatureExtractor:
    """Runs a trained re-id model on images: paths, PIL images, uint8 arrays or a tensor batch.

    Build it with :meth:`from_checkpoint`; the constructor takes an already built model.

    Args:
        model: maps normalised ``(N, 3, H, W)`` images to ``(N, D)`` features in eval mode
            (put into eval mode and onto ``device`` here).
        size: input ``(height, width)``.
        mean: per-channel mean of the input normalisation.
        std: per-channel standard deviation of the input normalisation.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        precision: ``"32"`` (no autocast), ``"bf16"`` or ``"16"`` (autocast to that type;
            features are returned in float32 either way).
        flip: average each feature with that of the mirrored image.
        batch_size: images per forward pass.
        config: the run config stored in the checkpoint, kept as ``extractor.config``.
    """

    def __init__(
        self,
        model: nn.Module,
        size: tuple[int, int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: str | torch.device = "auto",
        precision: str = "32",
        flip: bool = False,
        batch_size: int = 64,
        config: dict[str, Any] | None = None,
    ) -> None:
        if str(precision) not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.size = (int(size[0]), int(size[1]))
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.precision = str(precision)
        self.batch_size = int(batch_size)
        self.config = config or {}
        # extract_features switches autocast off unless told: precision "bf16"/"16" must reach the model
        self.model = InferenceModel(model, flip=flip, autocast=PRECISIONS[self.precision] is not None).to(self.device).eval()
        self.transform = build_test_transforms(self.size, self.mean, self.std)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        precision: str = "32",
        flip: bool | None = None,
        batch_size: int = 64,
        strict: bool = True,
        model: Mapping[str, Any] | None = None,
        size: Sequence[int] | None = None,
    ) -> FeatureExtractor:
        """Rebuild the model of a checkpoint written by ``scripts/train.py`` or by fast-reid, as
        ``scripts/eval.py`` does.

        The checkpoint is read with ``torch.load(weights_only=True)``; the model, the input
        size and the flip setting come from the config stored in it (``reid_config``). A
        fast-reid checkpoint (``model_final.pth``) stores none: pass ``model`` (the ``model``
        config it was trained with, e.g. conf/model/bot_r50.yaml composed); its input size is
        fast-reid's default ``INPUT.SIZE_TEST`` 256x128 unless ``size`` says otherwise.

        Args:
            path: the ``.ckpt`` file, a fast-reid ``.pth``, or an ``http(s)://`` URL of either.
            device: see the class.
            precision: see the class.
            flip: the flip test; ``None`` takes ``evaluation.flip`` of the checkpoint's config.
            batch_size: images per forward pass.
            strict: every weight must fit the model (see ``scripts/eval.py strict_load``).
            model: the ``model`` config to build instead of the saved one (required for a
                fast-reid checkpoint).
            size: input ``(height, width)`` instead of the saved one.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a readable reid_lightning or fast-reid checkpoint, or a fast-reid
                one without ``model``.
        """
        ckpt = load_model_checkpoint(str(path))
        config = ckpt["reid_config"] or {}
        if model is None and "model" not in config:
            raise ValueError(
                f"{path} is a fast-reid checkpoint (no saved config of ours): pass the model it was trained with "
                "(model=bot_r50, model=bot_r50_ibn, ... on the command line; FeatureExtractor.from_checkpoint(..., "
                "model=<model config>))"
            )
        net = rebuild_model(ckpt, source=str(path), strict=strict, model_cfg=model)
        if flip is None:
            flip = bool(config.get("evaluation", {}).get("flip", False))
        if size is None:
            data = config.get("data", {})
            size = (data["height"], data["width"]) if "height" in data else FASTREID_TEST_SIZE
        if len(size) != 2:
            raise ValueError(f"size must be (height, width), got {size!r}")
        return cls(net, tuple(size), device=device, precision=precision, flip=flip, batch_size=batch_size, config=config)

    @property
    def flip(self) -> bool:
        """Whether features are averaged with those of the mirrored images."""
        return self.model.flip

    def preprocess(self, images: Sequence[ImageInput], offset: int = 0) -> Tensor:
        """Read and transform images into one ``(N, 3, H, W)`` model input batch.

        Args:
            images: paths, PIL images or uint8 arrays (see :meth:`__call__`).
            offset: position of ``images[0]`` in the caller's input, for error messages.
        """
        return torch.stack([self.transform(self._to_pil(offset + i, item)) for i, item in enumerate(images)])

    def _to_pil(self, index: int, item: ImageInput) -> Image.Image:
        if isinstance(item, (str, Path)):
            return read_image(str(item))
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3))):
                raise ValueError(
                    f"image {index}: arrays must be HxWx3 (RGB), HxWx1 or HxW uint8, got shape {item.shape} dtype {item.dtype}"
                )
            return Image.fromarray(item.squeeze(2) if item.ndim == 3 and item.shape[2] == 1 else item).convert("RGB")
        raise TypeError(f"image {index}: expected a path, a PIL image or a uint8 array, got {type(item).__name__}")

    def _check_batch(self, images: Tensor) -> Tensor:
        expected = (3, *self.size)
        if not images.is_floating_point() or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"a tensor input must be a float batch of shape (N, {', '.join(map(str, expected))}), already "
                f"resized and normalised as extractor.transform does; got {tuple(images.shape)} {images.dtype}"
            )
        return images

    @torch.inference_mode()
    def forward_batch(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Features of one preprocessed ``(N, 3, H, W)`` batch, float32 on the CPU."""
        dtype = PRECISIONS[self.precision]
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with autocast:
            features = self.model(images.to(self.device, non_blocking=True))
        features = features.float()
        return (F.normalize(features, dim=1) if normalize else features).cpu()

    def __call__(
        self, images: Sequence[ImageInput] | Tensor, normalize: bool = True, batch_size: int | None = None
    ) -> Tensor:
        """Features of ``images``, in input order.

        Args:
            images: a sequence of image paths, PIL images or uint8 arrays (HxWx3 RGB, HxWx1 or
                HxW), in any mix; or a float tensor batch ``(N, 3, H, W)`` already resized and
                normalised (``extractor.transform`` of each image, stacked).
            normalize: L2-normalise each feature (``False``: the model's raw features, as
                ``scripts/eval.py`` exports them).
            batch_size: images per forward pass (default ``extractor.batch_size``).

        Returns:
            An ``(N, D)`` float32 tensor on the CPU.

        Raises:
            RuntimeError: an image file cannot be read (the message names it).
            ValueError / TypeError: an input of the wrong kind, shape or type (named by position).
        """
        step = batch_size or self.batch_size
        if isinstance(images, Tensor):
            batch = self._check_batch(images)
            return torch.cat([self.forward_batch(batch[i:i + step], normalize) for i in range(0, len(batch), step)])
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            raise TypeError("pass a list of images (a single image as [image]) or a tensor batch")
        if len(images) == 0:
            raise ValueError("no images given")
        return torch.cat([
            self.forward_batch(self.preprocess(images[start:start + step], offset=start), normalize)
            for start in range(0, len(images), step)
        ])

    def extract_folder(
        self,
        source: str | Path | Sequence[str | Path],
        normalize: bool = True,
        batch_size: int | None = None,
        num_workers: int = 0,
        skip_bad: bool = False,
        progress: bool = False,
    ) -> FolderFeatures:
        """Features of every image of a folder (recursive), an image list file, or several.

        Args:
            source: see :func:`reid_lightning.inference.image_files.collect_image_files`.
            normalize: L2-normalise each feature.
            batch_size: images per forward pass (default ``extractor.batch_size``).
            num_workers: DataLoader worker processes that read and transform the images.
            skip_bad: leave out unreadable files (listed in ``skipped`` and logged) instead
                of raising.
            progress: show a rich progress bar with the images/s.

        Raises:
            FileNotFoundError / ValueError: see ``collect_image_files`` (missing input, empty folder).
            RuntimeError: an unreadable file without ``skip_bad`` (named), or no readable file at all.
        """
        files = collect_image_files(source)
        dataset = _ImageFileDataset(files, self.transform, self.size, skip_bad)
        loader = DataLoader(
            dataset, batch_size=batch_size or self.batch_size, num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
        )
        chunks, kept, skipped = [], [], []
        with images_progress(len(dataset), enabled=progress) as advance:
            for images, indices, errors in loader:
                ok = torch.tensor([not e for e in errors], dtype=torch.bool)
                skipped += [(files.names[int(i)], e) for i, e in zip(indices, errors) if e]
                if ok.any():
                    chunks.append(self.forward_batch(images[ok], normalize))
                    kept += indices[ok].tolist()
                advance(len(indices))
        for name, reason in skipped:
            log.warning("skipped %s: %s", name, reason)
        if not kept:
            raise RuntimeError(f"none of the {len(dataset)} input images could be read; first error: {skipped[0][1]}")
        kept_files = ImageFiles([files.paths[i] for i in kept], [files.names[i] for i in kept])
        return FolderFeatures(torch.cat(chunks), kept_files, skipped)
