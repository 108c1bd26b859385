"""fast-reid's BoT meta-architecture ("Baseline"): backbone + BNNeck head + losses."""

from typing import Any

from torch import Tensor, nn

from .backbones import ResNet, load_pretrained
from .backbones.pretrained import load_backbone_state, read_weights, state_dict_of
from .fastreid_checkpoint import is_fastreid_checkpoint, load_fastreid_weights
from .heads import BNNeckHead
from .losses import CenterLoss, cross_entropy_label_smooth, triplet_loss


class Baseline(nn.Module):
    """Backbone -> head, with the BoT losses.

    Unlike fast-reid's Baseline, the model does not subtract a pixel mean and
    divide by a pixel std: images arrive already normalised by the data
    transforms.

    Args:
        backbone: maps images (N, 3, H, W) to a feature map.
        head: train mode returns ``{"cls_logits", "features"}``, eval mode a
            (N, D) tensor (a :class:`BNNeckHead`). With a center loss it must
            expose ``num_classes`` and ``in_channels``.
        ce_eps: label smoothing of the cross-entropy.
        ce_scale: weight of ``loss_cls``.
        triplet_margin: triplet margin (0: soft margin).
        triplet_scale: weight of ``loss_triplet``.
        triplet_norm_feat: triplet on cosine instead of euclidean distances.
        triplet_hard_mining: batch-hard (True) or weighted (False) mining.
        center_loss_scale: weight of ``loss_center``; 0 disables the center
            loss (and creates no centres).

    ``model(images)`` returns the head's output: a dict in train mode, the
    (N, D) retrieval feature in eval mode. ``model.losses(outputs, targets)``
    turns a train-mode output into the named, weighted float32 losses.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        ce_eps: float = 0.1,
        ce_scale: float = 1.0,
        triplet_margin: float = 0.3,
        triplet_scale: float = 1.0,
        triplet_norm_feat: bool = False,
        triplet_hard_mining: bool = True,
        center_loss_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.ce_eps = ce_eps
        self.ce_scale = ce_scale
        self.triplet_margin = triplet_margin
        self.triplet_scale = triplet_scale
        self.triplet_norm_feat = triplet_norm_feat
        self.triplet_hard_mining = triplet_hard_mining
        self.center_loss_scale = center_loss_scale
        self.center_loss = CenterLoss(head.num_classes, head.in_channels) if center_loss_scale > 0 else None

    def forward_features(self, images: Tensor) -> Tensor:
        """Backbone feature map (N, C, H', W') of normalised images (N, 3, H, W)."""
        return self.backbone(images)

    def forward(self, images: Tensor) -> dict[str, Tensor] | Tensor:
        return self.head(self.forward_features(images))

    def losses(self, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """Weighted losses of a train-mode forward.

        Args:
            outputs: ``model(images)`` in train mode (``cls_logits``, ``features``).
            targets: (N,) identity labels in [0, num_classes).

        Returns:
            ``{"loss_cls", "loss_triplet"}`` (plus ``"loss_center"`` when
            enabled), each a float32 scalar already multiplied by its scale.
        """
        losses = {
            "loss_cls": cross_entropy_label_smooth(outputs["cls_logits"], targets, self.ce_eps) * self.ce_scale,
            "loss_triplet": triplet_loss(
                outputs["features"],
                targets,
                self.triplet_margin,
                self.triplet_norm_feat,
                self.triplet_hard_mining,
            )
            * self.triplet_scale,
        }
        if self.center_loss is not None:
            losses["loss_center"] = self.center_loss(outputs["features"], targets) * self.center_loss_scale
        return losses


def build_bot(
    num_classes: int,
    depth: int = 50,
    last_stride: int = 1,
    with_ibn: bool = False,
    stride_in_1x1: bool = False,
    pretrained: str = "none",
    pooling: str = "avg",
    neck_feat: str = "after",
    stem_pool: str = "torchvision",
    **loss_kwargs: Any,
) -> Baseline:
    """Build the BoT model: ResNet backbone + BNNeck head + losses.

    Args:
        num_classes: training identities.
        depth, last_stride, with_ibn, stride_in_1x1, stem_pool: see
            :func:`~reid_lightning.modeling.backbones.build_resnet` (the BoT configs
            pick ``stem_pool="fastreid"``, fast-reid's own).
        pretrained: ``"none"``, ``"imagenet"``, or the path or URL of backbone weights or of
            a fast-reid checkpoint (``model_final.pth``, model zoo files). A fast-reid
            checkpoint fills the backbone, the BNNeck and, where its shape fits, the
            classifier (see :func:`~reid_lightning.modeling.fastreid_checkpoint.load_fastreid_weights`);
            other files fill the backbone (see :func:`~reid_lightning.modeling.load_pretrained`).
        pooling, neck_feat: see :class:`~reid_lightning.modeling.heads.BNNeckHead`.
        **loss_kwargs: loss options of :class:`Baseline` (``ce_eps``,
            ``triplet_margin``, ``center_loss_scale``, ...).

    Returns:
        The :class:`Baseline`.
    """
    backbone = ResNet(depth, last_stride, with_ibn, stride_in_1x1, stem_pool)
    head = BNNeckHead(backbone.out_channels, num_classes, pooling=pooling, neck_feat=neck_feat)
    model = Baseline(backbone, head, **loss_kwargs)
    if pretrained in ("none", "imagenet"):
        load_pretrained(backbone, pretrained)
        return model
    obj, source = read_weights(pretrained)
    if is_fastreid_checkpoint(obj):
        load_fastreid_weights(model, obj, source)
    else:
        load_backbone_state(backbone, state_dict_of(obj, source), source)
    return model
