"""Instance-Batch Normalization (IBN-a, Pan et al., ECCV 2018)."""

import torch
from torch import Tensor, nn


class IBN(nn.Module):
    """Half the channels InstanceNorm2d (affine), the other half BatchNorm2d.

    Replaces the first norm of a residual block in IBN-a ResNets. Parameter
    names (``IN.*``, ``BN.*``) match the IBN-Net and fast-reid checkpoints.

    Args:
        planes: number of input (and output) channels.
        ratio: fraction of the channels that go through InstanceNorm.

    Called as ``ibn(x)`` with ``x`` of shape (N, planes, H, W); returns the
    same shape.
    """

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        if not 0 < self.half < planes:
            raise ValueError(f"IBN needs 0 < planes * ratio < planes, got planes={planes}, ratio={ratio}")
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: Tensor) -> Tensor:
        first, second = torch.split(x, [self.half, x.size(1) - self.half], dim=1)
        return torch.cat([self.IN(first.contiguous()), self.BN(second.contiguous())], dim=1)
