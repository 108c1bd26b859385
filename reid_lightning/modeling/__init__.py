"""The BoT re-id model as plain nn.Modules: backbones, pooling, BNNeck head, losses."""

from .backbones import RandomInitWarning, build_resnet, load_pretrained
from .baseline import Baseline, build_bot
from .fastreid_checkpoint import (
    fastreid_to_baseline,
    is_fastreid_checkpoint,
    load_fastreid_weights,
)
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
    "RandomInitWarning",
    "build_bot",
    "build_pooling",
    "build_resnet",
    "cross_entropy_label_smooth",
    "fastreid_to_baseline",
    "is_fastreid_checkpoint",
    "load_fastreid_weights",
    "load_pretrained",
    "triplet_loss",
]
