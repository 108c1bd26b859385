"""Reading reid_lightning checkpoints safely (``torch.load(weights_only=True)``).

Called by ``scripts/eval.py`` through :func:`reid_lightning.engine.evaluate.evaluate`::

    ckpt = load_checkpoint("outputs/.../checkpoints/last.ckpt")
    model_cfg = ckpt["reid_config"]["model"]
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

CLASSIFIER_KEY = "model.head.classifier.weight"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint written by ``scripts/train.py`` without running pickled code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds arbitrary pickled objects (refused, not executed), or it
            is not a reid_lightning checkpoint (no ``state_dict`` / ``reid_config``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds pickled objects that weights_only loading does not allow "
            f"(a checkpoint from another program, or a tampered file). Details: {str(err).splitlines()[-1]}"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "reid_config" not in ckpt:
        raise ValueError(
            f"{path} is not a reid_lightning checkpoint: it lacks 'state_dict' or 'reid_config' "
            "(write checkpoints with scripts/train.py)"
        )
    return ckpt


def num_classes_of(ckpt: dict[str, Any]) -> int:
    """Number of training identities, read from the classifier weight of the checkpoint."""
    try:
        return int(ckpt["state_dict"][CLASSIFIER_KEY].shape[0])
    except KeyError as err:
        raise ValueError(f"checkpoint has no {CLASSIFIER_KEY!r}: not a BoT model checkpoint") from err


def load_model_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load ``state_dict`` into ``module``; a mismatch raises an error naming the differing keys.

    Args:
        strict: with False, missing and unexpected keys are tolerated (fine-tuning from
            another architecture); shape mismatches always fail.
    """
    own = module.state_dict()
    wrong_shape = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if wrong_shape or (strict and (missing or unexpected)):
        details = []
        for label, keys in (("shape mismatch", wrong_shape), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                details.append(f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise RuntimeError(f"checkpoint {source} does not match the model architecture; " + "; ".join(details))
    module.load_state_dict(state_dict, strict=False)
