"""BoT losses (fast-reid's formulas), always computed in float32.

Every loss casts its inputs to float32 and disables autocast: the hard
negative mining adds 1e9 to masked distances, which overflows float16, and
the softmax/log terms lose precision in bfloat16.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Added to the distances of positive pairs so that they never win the hardest-negative min.
_NOT_A_NEGATIVE = 1e9
# Margin of fast-reid's fallback when the soft-margin triplet loss overflows to inf.
_SOFT_MARGIN_FALLBACK = 0.3


def _no_autocast(tensor: Tensor) -> torch.autocast:
    """Context that turns autocast off on ``tensor``'s device type."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def cross_entropy_label_smooth(logits: Tensor, targets: Tensor, eps: float = 0.1) -> Tensor:
    """Cross-entropy with label smoothing, fast-reid's form.

    The target distribution is ``1 - eps`` on the true class and
    ``eps / (K - 1)`` on each of the other ``K - 1`` classes (not
    ``eps / K`` everywhere, as torch's ``label_smoothing`` does).

    Args:
        logits: (N, K) class scores.
        targets: (N,) class indices in [0, K).
        eps: smoothing mass moved off the true class; 0 gives plain CE.

    Returns:
        Scalar float32 tensor: the mean over the batch of ``-sum(q * log_softmax(logits))``.
    """
    num_classes = logits.size(1)
    if num_classes < 2:
        raise ValueError(f"label-smoothed cross-entropy needs >= 2 classes, got logits of shape {tuple(logits.shape)}")
    with _no_autocast(logits):
        log_probs = F.log_softmax(logits.float(), dim=1)
        smooth = torch.full_like(log_probs, eps / (num_classes - 1))
        smooth.scatter_(1, targets.long().unsqueeze(1), 1.0 - eps)
        return -(smooth * log_probs).sum(dim=1).mean()


def _pairwise_distances(embedding: Tensor, norm_feat: bool) -> Tensor:
    """(N, N) distances: euclidean, or fast-reid's cosine distance ``2 - 2 cos``."""
    if norm_feat:
        unit = F.normalize(embedding, dim=1)
        return 2 - 2 * unit @ unit.t()
    squared = embedding.pow(2).sum(dim=1, keepdim=True)
    dist = squared + squared.t() - 2 * embedding @ embedding.t()
    return dist.clamp(min=1e-12).sqrt()


def _softmax_weights(dist: Tensor, mask: Tensor) -> Tensor:
    """Row-wise softmax of ``dist`` restricted to ``mask`` (fast-reid's softmax_weights)."""
    shifted = dist - (dist * mask).amax(dim=1, keepdim=True)
    exp = shifted.exp() * mask
    return exp / (exp.sum(dim=1, keepdim=True) + 1e-6)


def triplet_loss(
    embedding: Tensor,
    targets: Tensor,
    margin: float = 0.3,
    norm_feat: bool = False,
    hard_mining: bool = True,
) -> Tensor:
    """Triplet loss over a batch (Hermans et al. 2017), fast-reid's version.

    Args:
        embedding: (N, D) features (BoT: the pre-BNNeck feature).
        targets: (N,) identity labels.
        margin: > 0: ``mean(relu(d_ap - d_an + margin))``; 0: soft margin
            ``mean(softplus(d_ap - d_an))``, falling back to margin 0.3 if that
            overflows to inf (as fast-reid does).
        norm_feat: use the cosine distance ``2 - 2 cos`` of L2-normalised
            features instead of the euclidean distance.
        hard_mining: batch-hard mining (hardest positive, hardest negative per
            anchor); False: weighted mining, a softmax over the positives'
            distances and a softmin over the negatives'.

    Returns:
        Scalar float32 tensor.
    """
    with _no_autocast(embedding):
        dist = _pairwise_distances(embedding.float(), norm_feat)
        is_pos = targets.view(-1, 1).eq(targets.view(1, -1)).float()
        is_neg = 1.0 - is_pos
        if hard_mining:
            dist_ap = (dist * is_pos).amax(dim=1)
            dist_an = (dist * is_neg + is_pos * _NOT_A_NEGATIVE).amin(dim=1)
        else:
            dist_ap = (dist * _softmax_weights(dist * is_pos, is_pos)).sum(dim=1)
            dist_an = (dist * _softmax_weights(-dist * is_neg, is_neg)).sum(dim=1)
        ones = torch.ones_like(dist_an)
        if margin > 0:
            return F.margin_ranking_loss(dist_an, dist_ap, ones, margin=margin)
        loss = F.soft_margin_loss(dist_an - dist_ap, ones)
        fallback = F.margin_ranking_loss(dist_an, dist_ap, ones, margin=_SOFT_MARGIN_FALLBACK)
        return torch.where(torch.isinf(loss), fallback, loss)


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): squared distance of each feature to its class centre.

    Args:
        num_classes: number of classes (one learnable centre each, N(0, 1) init).
        feat_dim: feature dimension.

    Called as ``center_loss(features, targets)`` with (N, feat_dim) features and
    (N,) labels; returns the float32 scalar ``mean_i ||f_i - c_{y_i}||^2``.
    The centres are parameters: they train with whatever optimizer holds them.
    """

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: Tensor, targets: Tensor) -> Tensor:
        with _no_autocast(features):
            diff = features.float() - self.centers.float()[targets.long()]
            return diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12).mean()
