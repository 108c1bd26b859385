"""Nearest gallery items of each query, with the distance of evaluation, in bounded memory.

Called as::

    distances, indices = search_gallery(query_feat, gallery_feat, top_k=10, metric="cosine")
    distances, indices = search_gallery(query_feat, gallery_feat, top_k=10, backend="faiss")

The torch backend never holds more than ``query_chunk x gallery_chunk`` distances: it walks
the gallery in chunks, computes each block with
:func:`reid_lightning.evaluation.compute_distance`, and merges a running top-k.
"""
from __future__ import annotations

import torch
from torch import Tensor

from reid_lightning.evaluation.distance import METRICS, compute_distance

BACKENDS = ("torch", "faiss")


def _topk_torch(query: Tensor, gallery: Tensor, k: int, metric: str, gallery_chunk: int) -> tuple[Tensor, Tensor]:
    best_d = torch.empty(len(query), 0, device=query.device)
    best_i = torch.empty(len(query), 0, dtype=torch.long, device=query.device)
    for start in range(0, len(gallery), gallery_chunk):
        dist = compute_distance(query, gallery[start:start + gallery_chunk].to(query.device), metric)
        # stable sorts: ties keep gallery order (running items have lower indices than the chunk)
        chunk_d, chunk_i = torch.sort(dist, dim=1, stable=True)
        merged_d = torch.cat([best_d, chunk_d[:, :k]], dim=1)
        merged_i = torch.cat([best_i, chunk_i[:, :k] + start], dim=1)
        merged_d, order = torch.sort(merged_d, dim=1, stable=True)
        best_d, best_i = merged_d[:, :k], merged_i.gather(1, order[:, :k])
    return best_d, best_i


def _topk_faiss(query: Tensor, gallery: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError as err:
        raise ImportError('backend="faiss" needs faiss: pip install -e ".[faiss]" (or use backend="torch")') from err
    q = query.float().cpu().contiguous()
    g = gallery.float().cpu().contiguous()
    if metric == "cosine":  # 1 - inner product of unit vectors, as compute_distance
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
        index = faiss.IndexFlatIP(g.shape[1])
    else:
        index = faiss.IndexFlatL2(g.shape[1])
    index.add(g.numpy())
    scores, indices = index.search(q.numpy(), k)
    scores = torch.from_numpy(scores)
    distances = 1 - scores if metric == "cosine" else scores.clamp(min=0).sqrt()
    return distances, torch.from_numpy(indices).long()


def search_gallery(
    query: Tensor,
    gallery: Tensor,
    top_k: int = 10,
    metric: str = "cosine",
    backend: str = "torch",
    device: str | torch.device = "cpu",
    query_chunk: int = 1024,
    gallery_chunk: int = 16384,
) -> tuple[Tensor, Tensor]:
    """The ``top_k`` nearest gallery items of every query, nearest first.

    Args:
        query: ``(Q, D)`` features.
        gallery: ``(G, D)`` features (float16 features are compared in float32).
        top_k: items per query (at most ``G``).
        metric: ``"cosine"`` or ``"euclidean"``, as in evaluation (``compute_distance``).
        backend: ``"torch"`` (exact; ties keep gallery order, as a stable argsort of the full
            row would) or ``"faiss"`` (exact flat index on the CPU; needs the ``faiss`` extra).
        device: where the torch backend computes (``"cuda"`` for a GPU).
        query_chunk: queries per block (torch backend).
        gallery_chunk: gallery items per block (torch backend); memory is about
            ``query_chunk * gallery_chunk * 4`` bytes per sort buffer.

    Returns:
        ``(distances, indices)``: float32 and int64 tensors of shape ``(Q, min(top_k, G))`` on the CPU.

    Raises:
        ValueError: an unknown metric or backend, an empty gallery, ``top_k < 1``, or
            features of different dimensions.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if len(gallery) == 0 or top_k < 1:
        raise ValueError(f"need a non-empty gallery and top_k >= 1, got {len(gallery)} gallery items and top_k={top_k}")
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and gallery {tuple(gallery.shape)} features must be 2-D of the same dimension")
    k = min(top_k, len(gallery))
    if backend == "faiss":
        return _topk_faiss(query, gallery, k, metric)
    device = torch.device(device)
    results = [
        _topk_torch(query[start:start + query_chunk].to(device), gallery, k, metric, gallery_chunk)
        for start in range(0, len(query), query_chunk)
    ]
    return torch.cat([d for d, _ in results]).cpu(), torch.cat([i for _, i in results]).cpu()
