"""The end of the image pipeline run on a whole batch, on the device the batch is on: uint8 to
float, normalisation, random erasing.

A loader built with ``normalize=False`` transforms (``ReIDDataModule(normalize_on_device=True)``)
collates uint8 images, a quarter of the float32 bytes to collate, share between processes, pin
and copy to the GPU; :meth:`ReIDDataModule.on_after_batch_transfer
<reid_lightning.data.ReIDDataModule.on_after_batch_transfer>` then calls::

    batch = normalize_batch(batch)   # {"images": uint8 (B, 3, H, W), "erase_box": (B, 4), ...}
    batch["images"]                  # float32, normalised, erased; "erase_box" removed

The result equals, image for image, what the per-image pipeline of
:mod:`reid_lightning.data.transforms` gives with the same random numbers: the same torchvision
conversion and normalisation functions run on the stacked images, and the rectangles are the
ones :class:`~reid_lightning.data.transforms.RandomErasingBox` drew.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torchvision.transforms.v2 import functional as F

from reid_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

ERASE_BOX = "erase_box"


def erase_boxes(images: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """Fills one rectangle per image with ``value``, in one pass over the batch.

    Args:
        images: ``(B, C, H, W)`` images.
        boxes: ``(B, 4)`` integer ``(top, left, height, width)`` per image; height or width 0
            erases nothing.
        value: the fill (0: the mean pixel of normalised images).

    Returns:
        A new tensor, ``images`` with the rectangles filled.
    """
    top, left, height, width = boxes.to(images.device).unbind(dim=1)
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    inside = in_rows[:, :, None] & in_cols[:, None, :]
    return images.masked_fill(inside[:, None], value)


def normalize_batch(
    batch: Any, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Any:
    """Turns a batch of uint8 ``"images"`` into the model's input where the batch is: float in
    [0, 1], normalised with ``mean``/``std``, then the ``"erase_box"`` rectangles (when the batch
    has them) filled with 0. Any other batch (float images, no ``"images"``, not a mapping)
    comes back as it is.

    Args:
        batch: a collated batch dict.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Returns:
        A new dict with float32 ``"images"`` and without ``"erase_box"``, or ``batch`` itself.
    """
    if not isinstance(batch, Mapping) or not torch.is_tensor(batch.get("images")) or batch["images"].dtype != torch.uint8:
        return batch
    images = F.normalize(F.to_dtype(batch["images"], torch.float32, scale=True), list(mean), list(std))
    if ERASE_BOX in batch:
        images = erase_boxes(images, batch[ERASE_BOX])
    return {**{key: value for key, value in batch.items() if key != ERASE_BOX}, "images": images}
