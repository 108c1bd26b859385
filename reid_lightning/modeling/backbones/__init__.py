"""Backbones: ResNet-18/34/50/101 (optional IBN-a, v1 strides) and their initial weights."""

from .ibn import IBN
from .pretrained import RandomInitWarning, load_pretrained
from .resnet import STEM_POOLS, ResNet, build_resnet, build_stem_pool

__all__ = ["IBN", "STEM_POOLS", "RandomInitWarning", "ResNet", "build_resnet", "build_stem_pool", "load_pretrained"]
