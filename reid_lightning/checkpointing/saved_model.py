"""Rebuild a trained model from a checkpoint written by ``scripts/train.py``.

Used by ``scripts/eval.py`` (through :func:`reid_lightning.cli.evaluate.evaluate`) and by
:class:`reid_lightning.inference.FeatureExtractor`::

    ckpt = load_checkpoint("outputs/.../checkpoints/last.ckpt")
    model = rebuild_model(ckpt, source="last.ckpt")   # a Baseline with the trained weights
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from torch import nn

from reid_lightning.checkpointing.load import load_model_weights, num_classes_of
from reid_lightning.modeling import RandomInitWarning


def rebuild_model(
    ckpt: dict[str, Any], source: str, strict: bool = True, model_cfg: Mapping[str, Any] | None = None
) -> nn.Module:
    """Instantiate the model of the config stored in ``ckpt["reid_config"]`` and load its weights.

    The model is built without pretrained weights (the checkpoint holds them all) and with as
    many classes as the checkpoint's classifier; it is returned in train mode, as built.

    Args:
        ckpt: a checkpoint read by :func:`reid_lightning.checkpointing.load.load_model_checkpoint`
            (ours, or a fast-reid one mapped onto our key names).
        source: where the checkpoint comes from, for messages.
        strict: see :func:`reid_lightning.checkpointing.load.load_model_weights`.
        model_cfg: the ``model`` config to build instead of the saved one (needed for a fast-reid
            checkpoint, which holds none).

    Returns:
        The model (the ``model`` attribute of the ``ReIDModule`` that was saved).
    """
    if model_cfg is None:
        model_cfg = ckpt["reid_config"]["model"]
    with warnings.catch_warnings():  # random only until the checkpoint's weights are loaded below
        warnings.simplefilter("ignore", RandomInitWarning)
        model = instantiate(model_cfg, num_classes=num_classes_of(ckpt), pretrained="none", _convert_="all")
    # the checkpoint's keys are those of ReIDModule: "model.<name>"
    load_model_weights(nn.ModuleDict({"model": model}), ckpt["state_dict"], source=source, strict=strict)
    return model
