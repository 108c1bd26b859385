"""Reading reid_lightning and fast-reid checkpoints safely (``torch.load(weights_only=True)``).

Called by ``scripts/eval.py`` through :func:`reid_lightning.cli.evaluate.evaluate`, and by
``scripts/train.py`` for ``init_from`` (fine-tuning) and resuming::

    ckpt = load_checkpoint("outputs/.../checkpoints/last.ckpt")        # ours only (resume)
    ckpt = load_model_checkpoint("model_final.pth")                    # ours, or fast-reid's (path or URL)
    model_cfg = ckpt["reid_config"]["model"] if ckpt["reid_config"] else cfg.model
    load_model_weights(module, ckpt["state_dict"], source="model_final.pth", strict=False)
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from reid_lightning.modeling import fastreid_to_baseline, is_fastreid_checkpoint
from reid_lightning.modeling.backbones.pretrained import download, is_url

log = logging.getLogger(__name__)

CLASSIFIER_KEY = "model.head.classifier.weight"


def _read(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".ckpt", ".pth", ".pt"))
        raise IsADirectoryError(
            f"checkpoint {path} is a directory: pass a checkpoint file"
            + (f" in it ({', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''})" if inside else "")
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[-1] if lines else "")
        raise ValueError(
            f"refusing to load {path}: it holds pickled objects that weights_only loading does not allow "
            f"(a checkpoint from another program, or a tampered file). Details: {reason}"
        ) from err
    except (RuntimeError, EOFError, KeyError) as err:
        raise ValueError(
            f"cannot read checkpoint {path}: not a torch checkpoint, or truncated (an interrupted save or "
            f"copy). Details: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'end of file'}"
        ) from err


def _is_ours(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and "state_dict" in ckpt and "reid_config" in ckpt


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint written by ``scripts/train.py`` without running pickled code.

    Raises:
        FileNotFoundError: ``path`` does not exist (IsADirectoryError: it is a folder; the message
            names the checkpoint files in it).
        ValueError: the file holds arbitrary pickled objects (refused, not executed), is not
            a torch checkpoint or is truncated, or it is not a reid_lightning checkpoint (no
            ``state_dict`` / ``reid_config``; a fast-reid one is named as such, with ``init_from``).
    """
    path = Path(path)
    ckpt = _read(path)
    if not _is_ours(ckpt) and is_fastreid_checkpoint(ckpt):
        raise ValueError(
            f"{path} is a fast-reid checkpoint: it holds model weights only, no trainer state to resume "
            f"from; to train from its weights pass init_from={path} (ckpt_path= resumes a run of scripts/train.py)"
        )
    if not _is_ours(ckpt):
        raise ValueError(
            f"{path} is not a reid_lightning checkpoint: it lacks 'state_dict' or 'reid_config' "
            "(write checkpoints with scripts/train.py)"
        )
    return ckpt


def load_model_checkpoint(location: str | Path, option: str = "ckpt_path") -> dict[str, Any]:
    """Load the model weights of a reid_lightning or a fast-reid checkpoint (path or ``http(s)://`` URL).

    Called by ``scripts/eval.py`` (``ckpt_path``) and ``scripts/train.py`` (``init_from``). A URL
    goes through torch.hub's download cache. A fast-reid checkpoint (``model_final.pth``, model
    zoo files) is renamed to our keys (see :func:`~reid_lightning.modeling.fastreid_to_baseline`).

    Args:
        location: a path or URL.
        option: the config key it came from, for the message of a failed download.

    Returns:
        ``{"state_dict": ReIDModule keys (model.backbone.*, model.head.*) -> tensors,
        "reid_config": the saved run config, or None for a fast-reid checkpoint}``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_checkpoint`; ValueError also when the file
            is neither a reid_lightning nor a fast-reid checkpoint.
        RuntimeError: a URL could not be downloaded.
    """
    location = str(location)
    if is_url(location):
        ckpt = download(location, "the checkpoint", option)
    else:
        ckpt = _read(Path(location))
    if _is_ours(ckpt):
        return ckpt
    if is_fastreid_checkpoint(ckpt):
        state = fastreid_to_baseline(ckpt.get("model", ckpt), location)
        return {"state_dict": {f"model.{k}": v for k, v in state.items()}, "reid_config": None}
    raise ValueError(
        f"{location} is neither a reid_lightning checkpoint ('state_dict' and 'reid_config', written by "
        "scripts/train.py) nor a fast-reid one (a 'model' state dict with heads.bottleneck.0.* keys)"
    )


def num_classes_of(ckpt: dict[str, Any]) -> int:
    """Number of training identities, read from the classifier weight of the checkpoint."""
    try:
        return int(ckpt["state_dict"][CLASSIFIER_KEY].shape[0])
    except KeyError as err:
        raise ValueError(f"checkpoint has no {CLASSIFIER_KEY!r}: not a BoT model checkpoint") from err


def load_model_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load ``state_dict`` into ``module`` key by key.

    Called as ``load_model_weights(module, ckpt["state_dict"], source=str(path), strict=...)``
    by ``scripts/eval.py`` (``strict_load``) and ``scripts/train.py`` (``init_from``, ``init_strict``).

    Args:
        module: the module to fill (a ``ReIDModule``: keys start with ``model.``).
        state_dict: the weights, e.g. a checkpoint's ``state_dict``.
        source: where the weights come from, for messages.
        strict: True: every key must be present on both sides with the same shape. False
            (fine-tuning, e.g. on a data set with another number of identities): keys of
            another shape, missing or unexpected keys are skipped with a logged warning
            naming them; the module keeps its own values for those.

    Raises:
        RuntimeError: with ``strict``, any mismatch (the message names the differing keys);
            without it, when no key of ``state_dict`` fits the module at all.
    """
    own = module.state_dict()
    wrong_shape = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    details = "; ".join(
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("shape mismatch", wrong_shape), ("missing", missing), ("unexpected", unexpected))
        if keys
    )
    if strict and details:
        raise RuntimeError(
            f"checkpoint {source} does not match the model architecture; {details} (to load the weights "
            "that fit and keep the model's own values for the rest: init_strict=false in scripts/train.py, "
            "strict_load=false in scripts/eval.py)"
        )
    skipped = set(wrong_shape)
    fitting = {k: v for k, v in state_dict.items() if k in own and k not in skipped}
    if not fitting:
        raise RuntimeError(f"no weight of checkpoint {source} fits the model: {details}")
    module.load_state_dict(fitting, strict=False)
    if details and rank_zero_only.rank == 0:
        log.warning("non-strict loading of %s: the model keeps its own values where the checkpoint does not fit: %s",
                    source, details)
