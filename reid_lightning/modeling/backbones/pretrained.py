"""Initial backbone weights: none, an ImageNet download, a file or a URL.

``load_pretrained(backbone, "imagenet")`` fetches torchvision's ResNet weights, or IBN-Net's
release for IBN-a ResNets, through torch.hub's download cache (``$TORCH_HOME/hub/checkpoints``);
a path or an ``http(s)://`` URL names a state dict (a URL goes through the same cache).
"""

import logging
import pickle
import warnings
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
import torchvision
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Leading key prefixes written by DataParallel/DDP, fast-reid and our own
# Lightning checkpoints; stripped repeatedly so that the keys match torchvision's.
_PREFIXES = ("module.", "model.", "backbone.")

_IMAGENET_WEIGHTS = {
    18: "ResNet18_Weights.IMAGENET1K_V1",
    34: "ResNet34_Weights.IMAGENET1K_V1",
    50: "ResNet50_Weights.IMAGENET1K_V1",
    101: "ResNet101_Weights.IMAGENET1K_V1",
}

# IBN-Net's ImageNet weights of the IBN-a ResNets (the files fast-reid downloads)
IBN_A_URLS = {
    18: "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet18_ibn_a-2f571257.pth",
    34: "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet34_ibn_a-94bc1577.pth",
    50: "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet50_ibn_a-d9d0bb7b.pth",
    101: "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet101_ibn_a-59ea0ac6.pth",
}

_SHOWN_NAMES = 10


class RandomInitWarning(UserWarning):
    """A deep backbone (ResNet-50 or deeper) starts from random weights."""


def load_pretrained(model: nn.Module, pretrained: str) -> None:
    """Load initial weights into a backbone in place.

    Args:
        model: the backbone (a :class:`~reid_lightning.modeling.backbones.resnet.ResNet`
            for ``"imagenet"``; any module with matching keys for a path).
        pretrained: one of
            ``"none"``: keep the random initialisation (a :class:`RandomInitWarning` for
            depth >= 50, which trains poorly from scratch);
            ``"imagenet"``: ImageNet weights for ``model.depth`` through torch.hub's
            download cache: torchvision's, or IBN-Net's release for IBN-a models;
            a path or an ``http(s)://`` URL: a ``torch.load``-able file holding a state
            dict, or a dict with the state dict under ``"state_dict"`` or ``"model"``.
            Prefixes ``module.``/``model.``/``backbone.`` are stripped, ``fc.*`` dropped,
            floating tensors cast to the model's dtype (float16 files work).

    Raises:
        FileNotFoundError: the path does not exist.
        RuntimeError: the download failed (the message names the URL and how to pass a
            local file instead), or the file lacks some of the model's tensors, has tensors
            of another shape, or holds NaN or infinite weights (their names are listed).
            Infinite BatchNorm running statistics (a float16 overflow) are clamped with a
            warning instead.
        ValueError: ``"imagenet"`` asked for a v1-stride model or a depth without weights.
    """
    if pretrained == "none":
        warn_random_init(model)
        return
    if pretrained == "imagenet":
        state, source = _download_imagenet(model)
    else:
        obj, source = read_weights(pretrained)
        state = state_dict_of(obj, source)
    load_backbone_state(model, state, source)


def warn_random_init(model: nn.Module) -> None:
    """Warn (:class:`RandomInitWarning`) when ``model`` is a ResNet of depth >= 50: it keeps its random init."""
    depth = getattr(model, "depth", 0)
    if depth >= 50:
        message = (
            f"ResNet-{depth} backbone starts from RANDOM weights (model.pretrained=none): a BoT model this deep "
            "trains poorly from scratch. Use model.pretrained=imagenet or the path/URL of a checkpoint."
        )
        warnings.warn(message, RandomInitWarning, stacklevel=3)


def _download_imagenet(model: nn.Module) -> tuple[dict[str, Tensor], str]:
    """Fetch the ImageNet state dict for ``model``; returns (state dict, url)."""
    depth = getattr(model, "depth", None)
    if depth not in _IMAGENET_WEIGHTS:
        raise ValueError(
            f"pretrained='imagenet' needs a ResNet of depth {sorted(_IMAGENET_WEIGHTS)}, "
            f"got {type(model).__name__} with depth={depth}"
        )
    if getattr(model, "stride_in_1x1", False):
        raise ValueError(
            "the ImageNet weights of torchvision and IBN-Net were trained with the stride in the 3x3 conv; "
            "use stride_in_1x1=False with pretrained='imagenet', or pass a v1 (Caffe) checkpoint "
            f"path: model.pretrained=/path/to/resnet{depth}.pth"
        )
    if getattr(model, "with_ibn", False):
        url, what = IBN_A_URLS[depth], f"IBN-Net's ImageNet ResNet-{depth}-IBN-a weights"
    else:
        url = torchvision.models.get_weight(_IMAGENET_WEIGHTS[depth]).url
        what = f"torchvision's ImageNet ResNet-{depth} weights"
    return state_dict_of(download(url, what), url), url


def is_url(location: str) -> bool:
    """Whether a weights or checkpoint location is an ``http(s)://`` address (read with :func:`download`)."""
    return location.startswith(("http://", "https://"))


def download(url: str, what: str, option: str = "model.pretrained") -> Any:
    """Load the file at ``url`` through torch.hub's download cache (``weights_only``).

    Args:
        url: an ``http(s)://`` address.
        what: what the file holds, for the error message.
        option: the config key that takes a local path instead, for the error message.

    Raises:
        RuntimeError: the download failed; the message names the URL and the manual alternative.
    """
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, map_location="cpu", weights_only=True)
    except (URLError, OSError, RuntimeError) as err:
        name = url.rsplit("/", 1)[-1]
        raise RuntimeError(
            f"Downloading {what} from {url} failed ({err}). Without internet access, fetch that file "
            f"elsewhere (or copy it into {torch.hub.get_dir()}/checkpoints/) and pass its local path: "
            f"{option}=/path/to/{name}"
        ) from err


def read_weights(location: str) -> tuple[Any, str]:
    """Read a weights file from a path or an ``http(s)://`` URL with ``torch.load(weights_only=True)``.

    Returns:
        (the loaded object, its source for messages).

    Raises:
        FileNotFoundError: the path does not exist.
        RuntimeError: the download failed, or the file holds pickled objects that weights-only
            loading refuses.
    """
    if is_url(location):
        return download(location, "weights"), location
    path = Path(location).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained weights file not found: {path} "
            "(pretrained must be 'none', 'imagenet', a URL or the path of a state dict)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except pickle.UnpicklingError as err:
        raise RuntimeError(f"refusing to load {path}: it holds pickled objects beyond tensors ({err})") from err


def state_dict_of(obj: Any, source: str) -> dict[str, Tensor]:
    """The state dict in a loaded file: the object itself, or under ``state_dict``/``model``."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise RuntimeError(f"{source} holds no state dict (a dict of tensor names to tensors)")
    return obj


def _strip_prefixes(key: str) -> str:
    """``module.backbone.conv1.weight`` -> ``conv1.weight``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _names(keys: list[str]) -> str:
    """Comma-separated names, the first few of a long list and a count."""
    shown = ", ".join(keys[:_SHOWN_NAMES])
    return shown if len(keys) <= _SHOWN_NAMES else f"{shown}, ... ({len(keys)} in all)"


def _repair_overflowed_statistics(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Clamp infinite BatchNorm running statistics to the largest value of their stored dtype.

    A float16 file cannot hold a running variance above 65504: it becomes ``inf``. (ImageNet
    ResNet-50 weights saved in float16 can hold one in ``bn1.running_var``: a conv1 scaled for
    torchvision-normalised input gives stem variances in the ten thousands.) Loaded as
    is, that channel is a constant in eval mode, and fine-tuning never repairs it, because
    BatchNorm's momentum update keeps ``inf`` infinite while training normalises the channel by
    its batch statistics: train and eval then disagree. The stored maximum is the closest
    value the file allows; training replaces it with real statistics within a few dozen steps.

    Raises:
        RuntimeError: a NaN anywhere, or an infinite weight (nothing to repair from); the
            tensors are named.
    """
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    statistics = [k for k in broken if k.endswith(("running_var", "running_mean")) and not state[k].isnan().any()]
    unrepairable = [k for k in broken if k not in statistics]
    if unrepairable:
        raise RuntimeError(f"Cannot load backbone weights from {source}: non-finite values in {_names(unrepairable)}")
    state = dict(state)
    for key in statistics:
        bound = torch.finfo(state[key].dtype).max
        count = int((~torch.isfinite(state[key])).sum())
        state[key] = state[key].clamp(-bound, bound)
        log.warning(
            "%s: %d infinite value(s) in %s (%s overflow), clamped to %g; training re-estimates them",
            source, count, key, state[key].dtype, bound,
        )
    return state


def resnet_depth(state: dict[str, Any]) -> int | None:
    """Depth of the ResNet whose (prefix-free) state dict is ``state``, from its block type and
    block counts; None when they are not those of a depth :func:`~reid_lightning.modeling.build_resnet` builds."""
    from .resnet import _ARCHS, Bottleneck  # resnet.py imports this module

    blocks = tuple(
        1 + max((int(key.split(".")[1]) for key in state if key.startswith(f"layer{i}.")), default=-1)
        for i in range(1, 5)
    )
    bottleneck = "layer1.0.conv3.weight" in state
    return next((depth for depth, (block, layers) in _ARCHS.items()
                 if (block is Bottleneck) == bottleneck and layers == blocks), None)


def load_backbone_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``, raising on missing, mis-shaped or non-finite tensors.

    Called by :func:`load_pretrained` and the fast-reid checkpoint loader. Prefixes
    ``module.``/``model.``/``backbone.`` are stripped and ``fc.*`` dropped; infinite running
    statistics are clamped (see :func:`_repair_overflowed_statistics`).

    Args:
        model: the backbone to fill.
        state: tensor name -> tensor.
        source: where the weights come from, for messages.
    """
    dtype = next(model.parameters()).dtype
    state = {_strip_prefixes(k): v for k, v in state.items()}
    state = _repair_overflowed_statistics({k: v for k, v in state.items() if not k.startswith("fc.")}, source)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    expected = model.state_dict()
    # Checkpoints saved before torch 0.4.1 (and Caffe conversions) have no BN counters.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing: {_names(missing)}")
    if mismatched:
        problems.append(f"shape mismatch: {_names(mismatched)}")
    if problems:
        held, built = resnet_depth(state), resnet_depth(expected)
        if held is not None and held != built:
            problems.append(f"the file holds a ResNet-{held}, the model is a ResNet-{built}: set model.depth={held}")
        ibn_held, ibn_built = (any(".IN." in key for key in keys) for keys in (state, expected))
        if ibn_held != ibn_built:
            kind = "an IBN-a ResNet" if ibn_held else "a ResNet without IBN"
            problems.append(f"the file holds {kind}: set model.with_ibn={str(ibn_held).lower()}")
        raise RuntimeError(f"Cannot load backbone weights from {source}: " + "; ".join(problems))
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        log.warning("Ignored %d tensors of %s not in the backbone: %s", len(unexpected), source, _names(unexpected))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    log.info("Loaded backbone weights from %s", source)
