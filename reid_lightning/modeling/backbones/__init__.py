"""Backbones: ResNet-18/34/50/101 (optional IBN-a, v1 strides) and their initial weights."""

from .ibn import IBN
from .pretrained import load_pretrained
from .resnet import ResNet, build_resnet

__all__ = ["IBN", "ResNet", "build_resnet", "load_pretrained"]
