"""Query x gallery distance matrices for re-identification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("cosine", "euclidean")


def compute_distance(query: Tensor, gallery: Tensor, metric: str = "cosine") -> Tensor:
    """Distance between every query and every gallery feature, in float32.

    Called as ``compute_distance(q_feat, g_feat, "cosine")`` on tensors of shape
    ``(num_query, dim)`` and ``(num_gallery, dim)`` on the same device. The inputs are
    cast to float32 and autocast is disabled, so bf16/fp16 features from a
    mixed-precision model are compared in float32 (a float32 matmul still follows
    ``torch.get_float32_matmul_precision()``, as every float32 matmul does).

    Rows are independent: ``compute_distance(query[i:j], gallery)`` equals rows
    ``i:j`` of the full matrix, so callers can build a large matrix chunk by chunk.

    Args:
        query: ``(num_query, dim)`` features.
        gallery: ``(num_gallery, dim)`` features.
        metric: ``"cosine"``: ``1 - <q, g> / (|q| |g|)``, in ``[0, 2]``;
            ``"euclidean"``: the true Euclidean distance ``|q - g|``, computed in the
            expanded form ``|q|^2 + |g|^2 - 2 <q, g>``, clamped at 0, then square-rooted.
            (fast-reid's euclidean evaluation returns the squared distance; the
            ranking is identical either way.)

    Returns:
        A float32 ``(num_query, num_gallery)`` tensor on the inputs' device.
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown distance metric {metric!r}; expected one of {METRICS}.")
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            "compute_distance expects 2-D features with the same dimension, got query "
            f"{tuple(query.shape)} and gallery {tuple(gallery.shape)}."
        )
    with torch.autocast(device_type=query.device.type, enabled=False):
        query = query.float()
        gallery = gallery.float()
        if metric == "cosine":
            one = torch.ones((), dtype=torch.float32, device=query.device)
            return torch.addmm(one, F.normalize(query, dim=1), F.normalize(gallery, dim=1).T, alpha=-1)
        squares = query.square().sum(1, keepdim=True) + gallery.square().sum(1)
        return squares.addmm_(query, gallery.T, alpha=-2).clamp_(min=0).sqrt_()
