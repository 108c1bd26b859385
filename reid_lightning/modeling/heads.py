"""BNNeck head of the BoT baseline (Luo et al. 2019; fast-reid's EmbeddingHead)."""

from torch import Tensor, nn

from .pooling import build_pooling


class BNNeckHead(nn.Module):
    """Pooling -> BatchNorm neck with frozen bias -> bias-free linear classifier.

    Args:
        in_channels: channels of the backbone map (2048 for ResNet-50).
        num_classes: training identities.
        pooling: name for :func:`~reid_lightning.modeling.pooling.build_pooling`.
        neck_feat: feature returned in eval mode: ``"after"`` the BNNeck (BoT)
            or ``"before"`` it. Training always gives the pre-BN feature to the
            triplet loss and the post-BN feature to the classifier. (In
            fast-reid, NECK_FEAT instead picks the triplet feature and eval
            always uses the post-BN one; BoT's behaviour is the same.)
        cls_init_std: std of the normal init of the classifier weight.

    Called as ``head(feature_map)`` with (N, in_channels, H, W). Train mode
    returns ``{"cls_logits": (N, num_classes), "features": (N, in_channels)
    pre-BN}``; eval mode returns the (N, in_channels) feature chosen by
    ``neck_feat``. The classifier is fast-reid's "Linear" type (scale 1,
    margin 0): ``logits = bn_feature @ weight.T``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pooling: str = "avg",
        neck_feat: str = "after",
        cls_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if neck_feat not in ("after", "before"):
            raise ValueError(f"neck_feat must be 'after' or 'before', got {neck_feat!r}")
        self.in_channels = in_channels
        self.neck_feat = neck_feat
        self.cls_init_std = cls_init_std
        self.pool = build_pooling(pooling)
        self.bnneck = nn.BatchNorm1d(in_channels)
        nn.init.ones_(self.bnneck.weight)
        nn.init.zeros_(self.bnneck.bias)
        self.bnneck.bias.requires_grad_(False)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (N(0, cls_init_std) init)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        weight = self.bnneck.weight
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.in_channels, num_classes, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.classifier.weight, std=self.cls_init_std)

    def forward(self, feature_map: Tensor) -> dict[str, Tensor] | Tensor:
        features = self.pool(feature_map)
        bn_features = self.bnneck(features)
        if not self.training:
            return bn_features if self.neck_feat == "after" else features
        return {"cls_logits": self.classifier(bn_features), "features": features}

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, neck_feat={self.neck_feat}"
