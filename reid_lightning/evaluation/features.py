"""Evaluation features of a batch: the model's eval-mode output, optionally averaged with the flip test."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor


def extract_features(
    model: Callable[[Tensor], Tensor], images: Tensor, flip: bool = False, autocast: bool = False
) -> Tensor:
    """Features of a batch, optionally averaged with those of the mirrored batch.

    Called as ``extract_features(model, images, flip=True)`` inside the caller's
    ``torch.no_grad()``/``inference_mode()`` and with the model in eval mode. With
    ``flip`` the result is ``(model(images) + model(images.flip(3))) / 2``, not
    renormalised (fast-reid normalises in place twice; the distance normalises anyway
    for cosine).

    Args:
        model: maps ``(batch, channels, height, width)`` images to ``(batch, dim)`` features.
        images: NCHW image batch.
        flip: also run the horizontally flipped batch and average.
        autocast: False (default): autocast is switched off on ``images``' device, so a
            float32 model gives float32 features even inside a mixed-precision context (as
            fast-reid's evaluator); True: keep the caller's autocast (faster, bf16/fp16
            features).

    Returns:
        ``(batch, dim)`` features.
    """
    if images.dim() != 4:
        raise ValueError(f"extract_features expects NCHW images, got shape {tuple(images.shape)}.")
    with nullcontext() if autocast else torch.autocast(images.device.type, enabled=False):
        features = model(images)
        if flip:
            features = (features + model(torch.flip(images, dims=[3]))) / 2
    return features
