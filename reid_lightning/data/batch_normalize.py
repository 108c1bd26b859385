"""The end of the image pipeline run on a whole batch, on the device the batch is on: uint8 to
float, normalisation, random erasing.

A loader built with ``normalize=False`` transforms (``ReIDDataModule(normalize_on_device=True)``)
collates uint8 images, a quarter of the float32 bytes to collate, share between processes, pin
and copy to the GPU (and packs the integer fields in one tensor,
:mod:`~reid_lightning.data.packed_batch`); :meth:`ReIDDataModule.on_after_batch_transfer
<reid_lightning.data.ReIDDataModule.on_after_batch_transfer>` then calls::

    normalize = BatchNormalizer()    # ImageNet mean and std
    batch = normalize(batch)         # {"images": uint8 (B, 3, H, W), "erase_box": (B, 4), ...}
    batch["images"]                  # float32, normalised, erased; "erase_box" removed

The result equals, image for image, what the per-image pipeline of
:mod:`reid_lightning.data.transforms` gives with the same random numbers: the same arithmetic as
torchvision's ``to_dtype`` and ``normalize`` runs on the stacked images, and the rectangles are
the ones :class:`~reid_lightning.data.transforms.RandomErasingBox` drew. Nothing here waits for
the GPU: the mean and std reach each device once, the rectangles become a mask there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from reid_lightning.data.packed_batch import unpack_integer_fields
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


class BatchNormalizer:
    """Turns a batch of uint8 ``"images"`` into the model's input where the batch is: float in
    [0, 1], normalised with ``mean``/``std``, then the ``"erase_box"`` rectangles (when the batch
    has them) filled with 0. Any other batch (float images, no ``"images"``, not a mapping)
    comes back as it is. Called as ``batch = BatchNormalizer()(batch)``.

    Args:
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Raises:
        ValueError: a standard deviation of 0.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if not all(std):
            raise ValueError(f"std {list(std)} holds a 0: the normalisation would divide by zero")
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on ``device``, copied there once (a copy from pageable memory waits for the GPU)."""
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __call__(self, batch: Any) -> Any:
        """Returns a new dict with float32 ``"images"`` and without ``"erase_box"``, or ``batch`` itself;
        the integer fields of a :func:`~reid_lightning.data.packed_batch.collate_packed` batch
        unpacked first."""
        batch = unpack_integer_fields(batch)
        if not isinstance(batch, Mapping) or not torch.is_tensor(batch.get("images")) or batch["images"].dtype != torch.uint8:
            return batch
        mean, std = self._stats(batch["images"].device)
        # torchvision's to_dtype(scale=True) and normalize, step for step
        images = batch["images"].to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
        if ERASE_BOX in batch:
            images = erase_boxes(images, batch[ERASE_BOX])
        return {**{key: value for key, value in batch.items() if key != ERASE_BOX}, "images": images}
