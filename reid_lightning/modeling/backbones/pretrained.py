"""Initial backbone weights: none, torchvision's ImageNet download, or a file."""

import logging
from pathlib import Path
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

_SHOWN_NAMES = 10


def load_pretrained(model: nn.Module, pretrained: str) -> None:
    """Load initial weights into a backbone in place.

    Args:
        model: the backbone (a :class:`~reid_lightning.modeling.backbones.resnet.ResNet`
            for ``"imagenet"``; any module with matching keys for a path).
        pretrained: one of
            ``"none"``: keep the random initialisation;
            ``"imagenet"``: torchvision's ImageNet weights for ``model.depth``,
            through torchvision's normal download and cache;
            a path: a ``torch.load``-able file holding a state dict, or a dict
            with the state dict under ``"state_dict"`` or ``"model"``. Prefixes
            ``module.``/``model.``/``backbone.`` are stripped, ``fc.*`` dropped,
            floating tensors cast to the model's dtype (float16 files work).

    Raises:
        FileNotFoundError: the path does not exist.
        RuntimeError: the download failed, or the file lacks some of the model's
            tensors, has tensors of another shape, or holds NaN or infinite weights
            (their names are listed). Infinite BatchNorm running statistics (a float16
            overflow) are clamped with a warning instead.
        ValueError: ``"imagenet"`` asked for an IBN-a or v1-stride model, for
            which torchvision has no weights.
    """
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        state, source = _download_imagenet(model)
    else:
        path = Path(pretrained).expanduser()
        state, source = _read_file(path), str(path)
    _load_checked(model, state, source)


def _download_imagenet(model: nn.Module) -> tuple[dict[str, Tensor], str]:
    """Fetch torchvision's ImageNet state dict for ``model``; returns (state dict, url)."""
    depth = getattr(model, "depth", None)
    if depth not in _IMAGENET_WEIGHTS:
        raise ValueError(
            f"pretrained='imagenet' needs a ResNet of depth {sorted(_IMAGENET_WEIGHTS)}, "
            f"got {type(model).__name__} with depth={depth}"
        )
    if getattr(model, "with_ibn", False):
        raise ValueError(
            "torchvision has no ImageNet weights for IBN-a ResNets: pass the path of an IBN-a "
            f"checkpoint instead, e.g. model.pretrained=/path/to/resnet{depth}_ibn_a.pth"
        )
    if getattr(model, "stride_in_1x1", False):
        raise ValueError(
            "torchvision's ImageNet weights were trained with the stride in the 3x3 conv; "
            "use stride_in_1x1=False with pretrained='imagenet', or pass a v1 (Caffe) checkpoint "
            f"path: model.pretrained=/path/to/resnet{depth}.pth"
        )
    url = torchvision.models.get_weight(_IMAGENET_WEIGHTS[depth]).url
    try:
        state = torch.hub.load_state_dict_from_url(url, progress=True, map_location="cpu", weights_only=True)
    except (URLError, OSError, RuntimeError) as err:
        raise RuntimeError(
            f"Downloading torchvision's ImageNet ResNet-{depth} weights from {url} failed ({err}). "
            f"Without internet access, fetch that file elsewhere and pass its local path: "
            f"model.pretrained=/path/to/resnet{depth}.pth"
        ) from err
    return state, url


def _read_file(path: Path) -> dict[str, Tensor]:
    """Read a state dict from ``path`` (plain, or under ``state_dict``/``model``)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained weights file not found: {path} "
            "(pretrained must be 'none', 'imagenet' or the path of a state dict)"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise RuntimeError(f"{path} holds no state dict (a dict of tensor names to tensors)")
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


def _load_checked(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``, raising on missing, mis-shaped or non-finite tensors
    (infinite running statistics are clamped, see :func:`_repair_overflowed_statistics`)."""
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
        raise RuntimeError(f"Cannot load backbone weights from {source}: " + "; ".join(problems))
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        log.warning("Ignored %d tensors of %s not in the backbone: %s", len(unexpected), source, _names(unexpected))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    log.info("Loaded backbone weights from %s", source)
