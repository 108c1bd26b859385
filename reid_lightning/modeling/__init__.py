"""The BoT re-id model as plain nn.Modules: backbones, pooling, BNNeck head, losses."""

from .backbones import build_resnet, load_pretrained
from .baseline import Baseline, build_bot
from .heads import BNNeckHead
from .losses import CenterLoss, cross_entropy_label_smooth, triplet_loss
from .pooling import GeneralizedMeanPooling, GlobalAvgPool, GlobalMaxPool, build_pooling

__all__ = [
    "BNNeckHead",
    "Baseline",
    "CenterLoss",
    "GeneralizedMeanPooling",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "build_bot",
    "build_pooling",
    "build_resnet",
    "cross_entropy_label_smooth",
    "load_pretrained",
    "triplet_loss",
]
