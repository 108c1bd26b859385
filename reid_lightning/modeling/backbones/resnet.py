"""ResNet-18/34/50/101 backbones that return the last feature map.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ...), so torchvision state dicts load as they are.
Options beyond torchvision: IBN-a blocks in layer1..layer3, ResNet v1 (Caffe)
stride placement in the 1x1 conv of downsampling Bottlenecks, and fast-reid's stem
max-pool (no padding, ``ceil_mode``) instead of torchvision's (padding 1).
"""

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from .ibn import IBN
from .pretrained import load_pretrained


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock whose ``bn1`` becomes IBN when ``with_ibn``.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of ``conv1``.
        downsample: module applied to the shortcut, or None.
        with_ibn: replace ``bn1`` with :class:`IBN`.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        with_ibn: bool = False,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample)
        if with_ibn:
            self.bn1 = IBN(planes)


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with IBN-a and v1 stride options.

    Args:
        inplanes: input channels.
        planes: bottleneck width (output channels are ``4 * planes``).
        stride: stride of the block.
        downsample: module applied to the shortcut, or None.
        with_ibn: replace ``bn1`` with :class:`IBN`.
        stride_in_1x1: put the stride in ``conv1`` (1x1, ResNet v1 / Caffe)
            instead of ``conv2`` (3x3, torchvision's v1.5).
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        with_ibn: bool = False,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample)
        if with_ibn:
            self.bn1 = IBN(planes)
        if stride_in_1x1 and stride != 1:
            self.conv1.stride = (stride, stride)
            self.conv2.stride = (1, 1)


STEM_POOLS = ("fastreid", "torchvision")


def build_stem_pool(name: str) -> nn.MaxPool2d:
    """The 3x3 stride-2 max-pool after the stem conv.

    Args:
        name: ``"torchvision"``: ``MaxPool2d(3, 2, padding=1)``, the pool torchvision's
            ImageNet weights were trained with; ``"fastreid"``: fast-reid's
            ``MaxPool2d(3, 2, padding=0, ceil_mode=True)``, whose windows start one pixel
            later (same output size for even inputs, one less row/column for odd ones).

    Raises:
        ValueError: another name.
    """
    if name == "torchvision":
        return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    if name == "fastreid":
        return nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    raise ValueError(f"stem_pool must be one of {list(STEM_POOLS)}, got {name!r}")


_ARCHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet trunk (stem + layer1..layer4) without pooling or classifier.

    Args:
        depth: 18, 34, 50 or 101.
        last_stride: stride of layer4 (1 keeps a 16x8 map for 256x128 input).
        with_ibn: IBN-a: the first norm of every block in layer1..layer3 is IBN.
        stride_in_1x1: ResNet v1 stride placement (Bottleneck depths only).
        stem_pool: ``"torchvision"`` or ``"fastreid"`` max-pool after the stem, see
            :func:`build_stem_pool`.

    Called as ``resnet(images)`` with images (N, 3, H, W); returns the layer4
    map (N, out_channels, H', W'). ``out_channels`` is 512 (18/34) or 2048.
    """

    def __init__(
        self,
        depth: int = 50,
        last_stride: int = 1,
        with_ibn: bool = False,
        stride_in_1x1: bool = False,
        stem_pool: str = "torchvision",
    ) -> None:
        super().__init__()
        if depth not in _ARCHS:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCHS)}, got {depth}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        block, layers = _ARCHS[depth]
        if stride_in_1x1 and block is BasicBlock:
            raise ValueError(f"stride_in_1x1 applies to Bottleneck ResNets (depth 50/101), not depth {depth}")
        self.depth = depth
        self.last_stride = last_stride
        self.with_ibn = with_ibn
        self.stride_in_1x1 = stride_in_1x1
        self.stem_pool = stem_pool

        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = build_stem_pool(stem_pool)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, with_ibn)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, with_ibn)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, with_ibn)
        self.layer4 = self._make_layer(block, 512, layers[3], last_stride, False)
        self.out_channels = 512 * block.expansion

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int, with_ibn: bool
    ) -> nn.Sequential:
        """Stack ``blocks`` residual blocks; the first one may downsample."""
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        extra = {"stride_in_1x1": self.stride_in_1x1} if block is Bottleneck else {}
        modules = [block(self.inplanes, planes, stride, downsample, with_ibn=with_ibn, **extra)]
        self.inplanes = out_planes
        modules += [block(out_planes, planes, with_ibn=with_ibn, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def build_resnet(
    depth: int = 50,
    last_stride: int = 1,
    with_ibn: bool = False,
    stride_in_1x1: bool = False,
    pretrained: str = "none",
    stem_pool: str = "torchvision",
) -> ResNet:
    """Build a ResNet backbone and load its initial weights.

    Args:
        depth: 18, 34, 50 or 101 (BasicBlock for 18/34, Bottleneck otherwise).
        last_stride: stride of layer4: 1 (BoT) or 2 (ImageNet).
        with_ibn: IBN-a variant (Pan et al. 2018), as fast-reid's resnet-ibn-a.
        stride_in_1x1: ResNet v1 / Caffe stride placement in Bottlenecks.
        pretrained: ``"none"``, ``"imagenet"`` (torchvision's or IBN-Net's download),
            a path or a URL of a state dict; see :func:`load_pretrained`.
        stem_pool: ``"torchvision"`` (default) or ``"fastreid"``; see :func:`build_stem_pool`.

    Returns:
        The backbone; ``backbone(images)`` gives (N, out_channels, H/16, W/16)
        with last_stride 1, or H/32, W/32 with last_stride 2.
    """
    model = ResNet(depth, last_stride, with_ibn, stride_in_1x1, stem_pool)
    load_pretrained(model, pretrained)
    return model
