"""Global pooling layers: (N, C, H, W) feature map -> (N, C) feature."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GlobalAvgPool(nn.Module):
    """Global average pooling; ``pool(x)`` maps (N, C, H, W) to (N, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """Global max pooling; ``pool(x)`` maps (N, C, H, W) to (N, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=(2, 3))


class GeneralizedMeanPooling(nn.Module):
    """Generalized-mean (GeM) pooling, Radenovic et al. 2018.

    ``(mean over H, W of clamp(x, eps) ** p) ** (1 / p)``: p=1 is average
    pooling, p -> inf approaches max pooling.

    Args:
        p: the exponent (3 in fast-reid).
        eps: lower clamp of the activations, keeping the power defined.
        learnable: make ``p`` a trained parameter (fast-reid's GeM-P, saved in the state dict);
            otherwise ``p`` is a non-persistent buffer (fast-reid's GeM saves nothing either).

    Called as ``pool(x)`` with x (N, C, H, W); returns (N, C).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}")
        self.eps = eps
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            # a constant of the config, not state: like fast-reid's GeM, nothing in the checkpoint
            self.register_buffer("p", torch.tensor(float(p)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p).flatten(1)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4g}, eps={self.eps}, learnable={isinstance(self.p, nn.Parameter)}"


_POOLINGS = {
    "avg": GlobalAvgPool,
    "max": GlobalMaxPool,
    "gem": GeneralizedMeanPooling,
    "gem_learnable": lambda: GeneralizedMeanPooling(learnable=True),
}


def build_pooling(name: str) -> nn.Module:
    """Build a global pooling layer by name.

    Args:
        name: ``"avg"`` (BoT), ``"max"``, ``"gem"`` (p=3) or ``"gem_learnable"``
            (p starts at 3 and is trained).

    Returns:
        A module mapping (N, C, H, W) to (N, C).
    """
    if name not in _POOLINGS:
        raise ValueError(f"Unknown pooling {name!r}; choose one of {sorted(_POOLINGS)}")
    return _POOLINGS[name]()
