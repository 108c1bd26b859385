"""fast-reid checkpoints (``model_final.pth``, the model zoo) onto our :class:`Baseline`.

fast-reid's ``Checkpointer`` writes ``{"model": state_dict, "optimizer"?, "lr_sched",
"warmup_sched", "epoch", "metric"}``; the state dict of its BoT ``Baseline`` names the
backbone ``backbone.*`` (torchvision names), the BNNeck ``heads.bottleneck.0.*`` and the
bias-free classifier ``heads.weight``. Called as::

    obj, source = read_weights("model_final.pth")       # or an http(s) URL
    if is_fastreid_checkpoint(obj):
        load_fastreid_weights(model, obj, source)        # model: a Baseline with a BNNeckHead
    state = fastreid_to_baseline(obj["model"], source)   # Baseline key names, e.g. for load_state_dict
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .backbones.pretrained import load_backbone_state

log = logging.getLogger(__name__)

_BNNECK = "heads.bottleneck.0."
_POOL = "heads.pool_layer."
# fast-reid >= 1.0 ("any_softmax" classifiers) and the older "classifier" Linear
_CLASSIFIERS = ("heads.weight", "heads.classifier.weight")
# fast-reid < 1.3 saved its input normalisation as persistent buffers; ours is in the transforms
_PIXEL_STATS = ("pixel_mean", "pixel_std")
# fast-reid's pixel mean/std in 0..255 units: torchvision's ImageNet mean/std (our transforms) x 255
_IMAGENET_PIXEL_STATS = {
    "pixel_mean": torch.tensor([0.485, 0.456, 0.406]) * 255,
    "pixel_std": torch.tensor([0.229, 0.224, 0.225]) * 255,
}


def _model_state(obj: Any) -> Mapping[str, Any] | None:
    """The state dict of a fast-reid checkpoint (under ``model``, or the object itself)."""
    state = obj.get("model") if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) else obj
    return state if isinstance(state, Mapping) else None


def is_fastreid_checkpoint(obj: Any) -> bool:
    """True when ``obj`` (a loaded file) holds a fast-reid Baseline: a BNNeck under ``heads.bottleneck.0.``."""
    state = _model_state(obj)
    return state is not None and any(_strip_module(k).startswith(_BNNECK) for k in state)


def _strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def fastreid_to_baseline(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename a fast-reid BoT state dict to :class:`~reid_lightning.modeling.Baseline` keys.

    ``backbone.X`` -> ``backbone.X``, ``heads.bottleneck.0.X`` -> ``head.bnneck.X``,
    ``heads.pool_layer.X`` (GeM-P's ``p``, shape ``[1]`` there, a scalar here) -> ``head.pool.X``, ``heads.weight`` (or the older
    ``heads.classifier.weight``) -> ``head.classifier.weight``; ``pixel_mean``/``pixel_std``
    are dropped (with a warning when they differ from the ImageNet statistics our transforms use).

    Args:
        state: fast-reid's ``model`` state dict (a ``module.`` prefix is allowed).
        source: where it comes from, for messages.

    Raises:
        RuntimeError: keys of parts our BoT model does not have (another head, neck or
            meta-architecture), named.
    """
    renamed: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        key = _strip_module(key)
        if key.startswith("backbone."):
            renamed[key] = value
        elif key.startswith(_BNNECK):
            renamed["head.bnneck." + key[len(_BNNECK) :]] = value
        elif key.startswith(_POOL):
            name = key[len(_POOL) :]
            if name == "p" and value.numel() == 1:
                value = value.reshape(())  # fast-reid's GeneralizedMeanPoolingP: ones(1) * 3; ours is a scalar
            renamed["head.pool." + name] = value
        elif key in _CLASSIFIERS:
            renamed["head.classifier.weight"] = value
        elif key in _PIXEL_STATS:
            expected = _IMAGENET_PIXEL_STATS[key]
            if value.numel() != expected.numel() or not torch.allclose(value.flatten().float(), expected, atol=1e-3):
                log.warning(
                    "%s: %s is %s, but our transforms normalise with ImageNet's %s: the features "
                    "will differ from fast-reid's", source, key, value.flatten().tolist(), expected.tolist(),
                )
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise RuntimeError(
            f"{source} is a fast-reid checkpoint with parts that the BoT model (ResNet backbone + BNNeck head + "
            f"linear classifier) does not have: {shown}"
        )
    return renamed


def load_fastreid_weights(model: nn.Module, obj: Any, source: str) -> None:
    """Load a fast-reid checkpoint into a :class:`~reid_lightning.modeling.Baseline` in place.

    The backbone and the BNNeck must match exactly (missing, mis-shaped or extra tensors, such
    as those of fast-reid's non-local or SE blocks, fail with their names; the backbone is also
    checked for non-finite values, as any backbone weights are); a learnable GeM pooling takes ``heads.pool_layer.p`` (fast-reid's GeM-P), a fixed GeM
    (p = 3) takes a checkpoint without pooling keys (fast-reid's GeM saves none); the classifier is loaded where its shape
    fits, otherwise the model keeps its fresh classifier and a warning says so (fine-tuning on
    another number of identities). Floating tensors are cast to the model's dtype.

    Args:
        model: a ``Baseline`` whose head is a :class:`~reid_lightning.modeling.BNNeckHead`.
        obj: the loaded file (see :func:`is_fastreid_checkpoint`).
        source: where it comes from, for messages.

    Raises:
        RuntimeError: a part of the checkpoint does not fit the model (names the keys).
    """
    state = fastreid_to_baseline(_model_state(obj), source)
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    own_backbone = model.backbone.state_dict()
    extra = [k for k in backbone if k[len("backbone.") :] not in own_backbone]
    complete = all(f"backbone.{k}" in backbone for k in own_backbone if not k.endswith("num_batches_tracked"))
    if extra and complete:  # e.g. fast-reid's non-local (NL_*) or SE blocks: dropping them changes the features
        shown = ", ".join(extra[:10]) + (f", ... ({len(extra)} in all)" if len(extra) > 10 else "")
        raise RuntimeError(
            f"{source} is a fast-reid checkpoint whose backbone has parts the model's backbone does not have "
            f"(non-local or SE blocks?): {shown}"
        )
    load_backbone_state(model.backbone, backbone, source)
    stem_pool = getattr(model.backbone, "stem_pool", "fastreid")
    if stem_pool != "fastreid":
        log.warning(
            "%s is a fast-reid checkpoint but the model uses the %r stem max-pool: its features will differ "
            "from fast-reid's (model.stem_pool=fastreid reproduces them)", source, stem_pool,
        )
    head = model.head
    neck = {k[len("head.bnneck.") :]: v for k, v in state.items() if k.startswith("head.bnneck.")}
    own_neck = head.bnneck.state_dict()
    missing = [k for k in own_neck if k not in neck and k != "num_batches_tracked"]
    wrong = [
        f"{k} (file {tuple(neck[k].shape)}, model {tuple(v.shape)})"
        for k, v in own_neck.items()
        if k in neck and neck[k].shape != v.shape
    ]
    problems = [f"missing: {', '.join(missing)}"] if missing else []
    problems += [f"shape mismatch: {', '.join(wrong)}"] if wrong else []
    if problems:
        raise RuntimeError(f"Cannot load the BNNeck of {source} ({_BNNECK}*): " + "; ".join(problems))
    dtype = head.bnneck.weight.dtype
    head.bnneck.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in neck.items()}, strict=False)
    pool = {k[len("head.pool.") :]: v.to(dtype) for k, v in state.items() if k.startswith("head.pool.")}
    own_pool = head.pool.state_dict()  # a fixed GeM's p is not state, as in fast-reid
    if pool.keys() != own_pool.keys():
        raise RuntimeError(
            f"The pooling of {source} ({_POOL}*: {sorted(pool) or 'none'}) does not match the model's "
            f"{type(head.pool).__name__} ({sorted(head.pool.state_dict()) or 'no tensors'}): pick model.pooling to match"
        )
    head.pool.load_state_dict(pool)
    classifier = state.get("head.classifier.weight")
    own = head.classifier.weight
    fits = classifier is not None and classifier.shape == own.shape
    if fits:
        with torch.no_grad():
            own.copy_(classifier)
    else:
        found = (
            "no classifier" if classifier is None
            else f"a classifier of {classifier.shape[0]} identities {tuple(classifier.shape)}"
        )
        log.warning(
            "%s has %s; the model has %d identities (%s): keeping the model's freshly initialised classifier",
            source, found, own.shape[0], tuple(own.shape),
        )
    log.info("Loaded fast-reid checkpoint %s (backbone, BNNeck%s)", source, ", classifier" if fits else "")
