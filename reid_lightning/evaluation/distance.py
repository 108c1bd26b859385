"""Query x gallery distance matrices for re-identification, whole or row chunk by row chunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("cosine", "euclidean")


class GalleryDistance:
    """Distances from query rows to a fixed gallery, for computing a matrix chunk by chunk.

    Called as ``rows = GalleryDistance(g_feat, "cosine"); rows(q_feat[i:j])``: the gallery
    is prepared once (cast to float32; L2-normalised for cosine, squared norms for
    euclidean), then each call returns the float32 ``(j - i, num_gallery)`` block that
    :func:`compute_distance` returns for those rows (the same arithmetic). Autocast is
    disabled inside, so bf16/fp16 features are compared in float32.

    Memory held: for cosine, a normalised float32 copy of the gallery (``4 * G * D``
    bytes); for euclidean, the gallery itself when it is float32 already (else a float32
    copy) plus ``4 * G`` bytes of squared norms.

    Args:
        gallery: ``(num_gallery, dim)`` features.
        metric: ``"cosine"``: ``1 - <q, g> / (|q| |g|)``, in ``[0, 2]``;
            ``"euclidean"``: the true Euclidean distance ``|q - g|``, computed in the
            expanded form ``|q|^2 + |g|^2 - 2 <q, g>``, clamped at 0, then square-rooted.
            (fast-reid's euclidean evaluation returns the squared distance; the
            ranking is identical either way.)
    """

    def __init__(self, gallery: Tensor, metric: str = "cosine") -> None:
        if metric not in METRICS:
            raise ValueError(f"Unknown distance metric {metric!r}; expected one of {METRICS}.")
        if gallery.dim() != 2:
            raise ValueError(f"GalleryDistance expects 2-D gallery features, got {tuple(gallery.shape)}.")
        self.metric = metric
        with torch.autocast(device_type=gallery.device.type, enabled=False):
            gallery = gallery.float()
            if metric == "cosine":
                self.gallery = F.normalize(gallery, dim=1)
            else:
                self.gallery = gallery
                self.squares = gallery.square().sum(1)

    @property
    def num_gallery(self) -> int:
        return self.gallery.shape[0]

    def __call__(self, query: Tensor) -> Tensor:
        """Distances of ``query`` ``(rows, dim)`` to every gallery item: float32 ``(rows, num_gallery)``."""
        if query.dim() != 2 or query.shape[1] != self.gallery.shape[1]:
            raise ValueError(
                "compute_distance expects 2-D features with the same dimension, got query "
                f"{tuple(query.shape)} and gallery {tuple(self.gallery.shape)}."
            )
        with torch.autocast(device_type=query.device.type, enabled=False):
            query = query.float()
            if self.metric == "cosine":
                one = torch.ones((), dtype=torch.float32, device=query.device)
                return torch.addmm(one, F.normalize(query, dim=1), self.gallery.T, alpha=-1)
            squares = query.square().sum(1, keepdim=True) + self.squares
            return squares.addmm_(query, self.gallery.T, alpha=-2).clamp_(min=0).sqrt_()


def compute_distance(query: Tensor, gallery: Tensor, metric: str = "cosine") -> Tensor:
    """Distance between every query and every gallery feature, in float32.

    Called as ``compute_distance(q_feat, g_feat, "cosine")`` on tensors of shape
    ``(num_query, dim)`` and ``(num_gallery, dim)`` on the same device. The inputs are
    cast to float32 and autocast is disabled, so bf16/fp16 features from a
    mixed-precision model are compared in float32 (a float32 matmul still follows
    ``torch.get_float32_matmul_precision()``, as every float32 matmul does).

    Rows are independent: ``compute_distance(query[i:j], gallery)`` equals rows
    ``i:j`` of the full matrix; :class:`GalleryDistance` computes such row blocks
    without preparing the gallery again for each.

    Args:
        query: ``(num_query, dim)`` features.
        gallery: ``(num_gallery, dim)`` features.
        metric: ``"cosine"`` or ``"euclidean"`` (see :class:`GalleryDistance`).

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
    return GalleryDistance(gallery, metric)(query)
