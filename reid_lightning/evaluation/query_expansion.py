"""Average query expansion (alpha-QE), as fast-reid's ``aqe`` with one expansion round."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def average_query_expansion(
    q_feat: Tensor, g_feat: Tensor, alpha: float = 3.0, k: int = 5, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Replace every feature by a similarity-weighted mean of its k nearest neighbours.

    Called as ``q_feat, g_feat = average_query_expansion(q_feat, g_feat)`` before the
    distance is computed. As fast-reid's ``aqe`` (``fastreid/evaluation/query_expansion.py``,
    ``qe_times=1``): query and gallery features are pooled; the neighbours of each
    feature are its k most cosine-similar pooled features (itself included, at
    similarity 1); the new feature is ``mean_j(sim_j ** alpha * feat_j)`` over those k,
    with the features as given (not normalised) in the sum. Both query and gallery
    are expanded. Work is chunked over rows: ``chunk_size x (num_q + num_g)``
    similarities at a time.

    Args:
        q_feat: ``(num_query, dim)`` features.
        g_feat: ``(num_gallery, dim)`` features.
        alpha: exponent on the cosine similarities (odd/integer values keep the sign of
            negative similarities; a fractional alpha gives NaN for them, as in fast-reid).
        k: neighbours pooled, the feature itself included.
        chunk_size: rows per chunk.

    Returns:
        ``(expanded_query, expanded_gallery)`` float32 tensors of the input shapes.
    """
    num_q = q_feat.shape[0]
    with torch.autocast(device_type=q_feat.device.type, enabled=False):
        feats = torch.cat([q_feat, g_feat]).float()
        if not 1 <= k <= feats.shape[0]:
            raise ValueError(f"aqe k must be in [1, {feats.shape[0]}] (number of features), got {k}.")
        normed = F.normalize(feats, dim=1)
        expanded = torch.empty_like(feats)
        for lo in range(0, feats.shape[0], chunk_size):
            sims, idx = (normed[lo : lo + chunk_size] @ normed.T).topk(k, dim=1)
            weights = sims.pow(alpha).unsqueeze(1)  # (c, 1, k)
            expanded[lo : lo + chunk_size] = torch.bmm(weights, feats[idx]).squeeze(1) / k
    return expanded[:num_q], expanded[num_q:]
