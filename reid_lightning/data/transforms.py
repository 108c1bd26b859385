"""Image transforms of fast-reid's BoT recipe, built from torchvision.transforms.v2.

Both pipelines take a PIL RGB image and return a normalised float32 tensor of
shape ``(3, height, width)``. Each starts with the deterministic resize and conversion to a
uint8 tensor, which :func:`split_deterministic` separates from the rest so that a dataset can
keep their result in memory (``ImageDataset(cache=SharedImageCache(...))``).

With ``normalize=False`` they stop at uint8 and leave the float conversion, the normalisation
and the random erasing to :class:`~reid_lightning.data.batch_normalize.BatchNormalizer`, which
runs on a whole batch on the model's device; the training pipeline then draws each erasing
rectangle (:class:`RandomErasingBox`) with the same random numbers as ``v2.RandomErasing``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_DETERMINISTIC = (v2.Resize, v2.ToImage)


def _resized_uint8(size: tuple[int, int]) -> list[v2.Transform]:
    return [v2.Resize(size, interpolation=InterpolationMode.BICUBIC), v2.ToImage()]


def _normalised(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


class RandomErasingBox(v2.RandomErasing):
    """Draws random erasing's rectangle without erasing: the last stage of a training pipeline
    that hands uint8 images to :class:`~reid_lightning.data.batch_normalize.BatchNormalizer`.

    It consumes torch's random numbers exactly as ``v2.RandomErasing(p, scale, ratio)`` does
    (the apply draw, then the area, aspect ratio and position draws), so that both pipelines
    erase the same rectangle of the same image. Called as ``RandomErasingBox(p=0.5)(image)``
    with a ``(3, H, W)`` tensor; returns ``{"images": image, "erase_box": box}``, ``box`` an
    int64 tensor ``(top, left, height, width)``, all 0 when nothing is to be erased.
    """

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        box = torch.zeros(4, dtype=torch.int64)
        if torch.rand(1) < self.p:
            params = self.make_params([image])
            if params["v"] is not None:  # v2.RandomErasing erases nothing without a fitting rectangle
                box = torch.tensor([params["i"], params["j"], params["h"], params["w"]])
        return {"images": image, "erase_box": box}


def split_deterministic(transform: v2.Compose) -> tuple[v2.Compose, v2.Compose]:
    """Splits a pipeline of this module into its leading deterministic stages (bicubic resize,
    conversion to a uint8 tensor) and the rest, so that
    ``rest(prefix(image))`` equals ``transform(image)`` and ``prefix(image)`` can be cached.

    Called as ``prepare, augment = split_deterministic(build_train_transforms((256, 128)))``.
    """
    stages = list(transform.transforms)
    cut = 0
    while cut < len(stages) and isinstance(stages[cut], _DETERMINISTIC):
        cut += 1
    return v2.Compose(stages[:cut]), v2.Compose(stages[cut:])


def build_train_transforms(
    size: tuple[int, int] = (256, 128),
    flip_prob: float = 0.5,
    padding: int = 10,
    erasing_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize: bool = True,
) -> v2.Compose:
    """Builds the training augmentation of fast-reid's Base-bagtricks config.

    Stages, in order: bicubic resize to ``size`` and conversion to a uint8 tensor; horizontal
    flip with ``flip_prob``; zero padding by ``padding`` pixels then a random crop of
    ``size``; conversion to float in [0, 1]; normalisation with ``mean``/``std``;
    random erasing with ``erasing_prob`` (torchvision's default area 0.02-0.33 and
    aspect ratio 0.3-3.3) filling with 0. Filling with 0 after normalising equals
    fast-reid's filling with the mean pixel before normalising:
    ``(mean - mean) / std = 0``. A stage whose probability or padding is 0 is left out.

    With ``normalize=False`` the pipeline ends after the crop, with the uint8 image, or with
    ``{"images": uint8 image, "erase_box": rectangle}`` when ``erasing_prob > 0``
    (:class:`RandomErasingBox`); :class:`~reid_lightning.data.batch_normalize.BatchNormalizer`
    of the collated batch then gives the normalised pipeline's images exactly.

    Args:
        size: output (height, width).
        flip_prob: probability of a horizontal flip.
        padding: pixels of constant-0 padding on each side before the random crop.
        erasing_prob: probability of random erasing.
        mean: per-channel mean of the normalisation (ImageNet by default).
        std: per-channel standard deviation of the normalisation.
        normalize: convert to float, normalise and erase here; False leaves them to the batch.

    Returns:
        A callable mapping a PIL image to a ``(3, height, width)`` float32 tensor (uint8, or the
        dict above, with ``normalize=False``).

    Raises:
        ValueError: a probability outside [0, 1] or a negative padding.
    """
    if not (0.0 <= flip_prob <= 1.0 and 0.0 <= erasing_prob <= 1.0) or padding < 0:
        raise ValueError(
            f"flip_prob and erasing_prob must lie in [0, 1] and padding must be >= 0; "
            f"got flip_prob={flip_prob}, erasing_prob={erasing_prob}, padding={padding}"
        )
    size = (int(size[0]), int(size[1]))
    stages: list[v2.Transform] = _resized_uint8(size)  # flip and crop give the same pixels on PIL or tensor
    if flip_prob > 0:
        stages.append(v2.RandomHorizontalFlip(p=flip_prob))
    if padding > 0:
        stages.append(v2.RandomCrop(size, padding=padding, fill=0, padding_mode="constant"))
    if not normalize:
        if erasing_prob > 0:
            stages.append(RandomErasingBox(p=erasing_prob))
        return v2.Compose(stages)
    stages += _normalised(mean, std)
    if erasing_prob > 0:
        stages.append(v2.RandomErasing(p=erasing_prob, value=0))
    return v2.Compose(stages)


def build_test_transforms(
    size: tuple[int, int] = (256, 128),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize: bool = True,
) -> v2.Compose:
    """Builds the evaluation transform: bicubic resize to ``size``, float in [0, 1],
    normalisation with ``mean``/``std``.

    Args:
        size: output (height, width).
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.
        normalize: False stops at the resized uint8 image, to be normalised as a batch by
            :class:`~reid_lightning.data.batch_normalize.BatchNormalizer`.

    Returns:
        A callable mapping a PIL image to a ``(3, height, width)`` float32 tensor (uint8 with
        ``normalize=False``).
    """
    size = (int(size[0]), int(size[1]))
    return v2.Compose([*_resized_uint8(size), *(_normalised(mean, std) if normalize else [])])
