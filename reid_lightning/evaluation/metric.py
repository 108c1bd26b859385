"""ReIDMetric: a torchmetrics Metric that ranks a gallery for every query (Market-1501 rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from .distance import METRICS, compute_distance
from .memory import ensure_fits
from .query_expansion import average_query_expansion
from .ranking import (
    chunk_plan,
    metrics_from_sums,
    per_query_metrics,
    rank_queries,
    rank_sums,
)
from .rerank import k_reciprocal_rerank
from .verification import tpr_at_fpr

_STATES = ("features", "pids", "camids", "is_query", "index")


def _first_occurrences(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct index, in ascending index order."""
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((unique.numel(),), index.numel(), dtype=torch.long, device=index.device)
    return first.scatter_reduce_(0, inverse, positions, reduce="amin")


class ReIDMetric(Metric):
    """Rank-1/5/10, mAP and mINP (percent) of query x gallery retrieval.

    Fed batch by batch during validation, as any torchmetrics Metric::

        metric = ReIDMetric()
        metric.update(features, pids, camids, is_query, index)   # per batch
        results = metric.compute()   # {"rank1": tensor(94.4), "rank5": ..., "mAP": ..., "mINP": ...}

    Each sample carries its dataset ``index`` and an ``is_query`` flag, so the order in
    which batches arrive does not matter. Under DDP, torchmetrics gathers the states of
    all ranks (uneven sizes allowed); samples that a distributed sampler repeated to pad
    the last batch appear twice and are dropped (first occurrence kept).

    ``compute()`` sorts the samples by index, splits query and gallery by the flag, casts
    the features to float32, applies optional average query expansion (fast-reid's AQE,
    chunked over rows), then ranks:

    * by default without the whole distance matrix (:func:`rank_queries`): the queries'
      distances to the gallery are computed and ranked chunk by chunk, each chunk within
      ``max_chunk_mb``. When the states were gathered over DDP ranks, rank ``r`` of ``W``
      ranks its contiguous share ``[r Q / W, (r + 1) Q / W)`` of the (index-sorted) queries
      against the whole gallery; the per-rank sums of AP, INP, valid queries and the
      first-match histogram are gathered and added in rank order, so every rank reports
      the same numbers (a ModelCheckpoint monitoring ``mAP`` sees one value) and the
      ranking time falls with the number of ranks. Peak memory beyond the gathered
      features: ``max_chunk_mb`` MiB + the normalised gallery for cosine
      (``4 * G * D`` bytes) + the query/gallery split of the features
      (``4 * (Q + G) * D`` bytes) + O(Q + G); see :func:`rank_queries`.
    * with the whole ``Q x G`` float32 matrix (every rank computes all of it) when an
      option needs it: k-reciprocal re-ranking (Zhong et al.; features are
      L2-normalised first when ``metric == "cosine"``, as fast-reid does; the result
      mixes the Jaccard distance with the re-ranking's own normalised squared Euclidean
      distance, as the authors' code does) or ``tpr_fprs``. A matrix larger than the
      available memory is refused with a ``MemoryError`` stating the size.

    torchmetrics' Retrieval* metrics are not used: since torchmetrics 1.8 they drop
    scores <= 0 (cosine scores can be negative).

    Args:
        metric: ``"cosine"`` or ``"euclidean"``.
        max_rank: length of the CMC curve (>= 10).
        rerank: apply k-reciprocal re-ranking with ``rerank_k1``, ``rerank_k2``,
            ``rerank_lambda``.
        aqe: apply average query expansion with ``aqe_alpha`` and ``aqe_k``.
        tpr_fprs: FPR targets for extra ``"TPR@FPR=1e-04"`` style keys (percent),
            computed over all query x gallery pairs (Market rule applied).
        keep_outputs: after each ``compute()``, keep the ranked data in ``last_outputs``
            (query/gallery features, pids, camids, dataset indices and the CMC curve, plus
            the distance matrix ``"dist"`` when the dense path computed one) for feature
            export and rank-list pictures; with ``aqe`` the features are the expanded ones
            the ranking used, and the model's own are kept as ``"q_feat_model"`` /
            ``"g_feat_model"``.
        max_chunk_mb: memory budget in MiB of one query chunk of the chunked ranking
            (``evaluation.max_chunk_mb``).
        **kwargs: passed to ``torchmetrics.Metric`` (``sync_on_compute``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        metric: str = "cosine",
        max_rank: int = 50,
        rerank: bool = False,
        rerank_k1: int = 20,
        rerank_k2: int = 6,
        rerank_lambda: float = 0.3,
        aqe: bool = False,
        aqe_alpha: float = 3.0,
        aqe_k: int = 5,
        tpr_fprs: Sequence[float] = (),
        keep_outputs: bool = False,
        max_chunk_mb: float = 256,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if metric not in METRICS:
            raise ValueError(f"Unknown distance metric {metric!r}; expected one of {METRICS}.")
        if max_rank < 10:
            raise ValueError(f"max_rank must be >= 10 to report rank10, got {max_rank}.")
        chunk_plan(1, max_chunk_mb)  # validates the budget
        self.metric = metric
        self.max_rank = max_rank
        self.rerank = rerank
        self.rerank_k1, self.rerank_k2, self.rerank_lambda = rerank_k1, rerank_k2, rerank_lambda
        self.aqe = aqe
        self.aqe_alpha, self.aqe_k = aqe_alpha, aqe_k
        self.tpr_fprs = tuple(tpr_fprs)
        self.keep_outputs = keep_outputs
        self.max_chunk_mb = max_chunk_mb
        self.last_outputs: dict[str, Tensor | np.ndarray] = {}
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, pids: Tensor, camids: Tensor, is_query: Tensor, index: Tensor) -> None:
        """Store one batch.

        Args:
            features: ``(batch, dim)`` embeddings (any float dtype; detached).
            pids: ``(batch,)`` identities.
            camids: ``(batch,)`` camera ids.
            is_query: ``(batch,)`` True for query samples, False for gallery samples.
            index: ``(batch,)`` dataset index of each sample, unique per sample.
        """
        if features.dim() != 2:
            raise ValueError(f"ReIDMetric.update expects (batch, dim) features, got {tuple(features.shape)}.")
        batch = features.shape[0]
        for name, value in (("pids", pids), ("camids", camids), ("is_query", is_query), ("index", index)):
            if value.numel() != batch:
                raise ValueError(f"ReIDMetric.update: {name} has {value.numel()} entries for {batch} features.")
        self.features.append(features.detach().float())
        self.pids.append(pids.detach().long().reshape(-1))
        self.camids.append(camids.detach().long().reshape(-1))
        self.is_query.append(is_query.detach().long().reshape(-1))  # gloo cannot gather bool
        self.index.append(index.detach().long().reshape(-1))

    def compute(self) -> dict[str, Tensor]:
        """Rank the gallery for every query; returns float32 tensors in percent.

        Returns:
            ``{"rank1", "rank5", "rank10", "mAP", "mINP"}`` plus one ``"TPR@FPR=..."``
            key per entry of ``tpr_fprs``.
        """
        if isinstance(self.index, list) and not self.index:
            raise RuntimeError("ReIDMetric.compute() was called before any update().")
        index = dim_zero_cat(self.index)
        keep = _first_occurrences(index)
        is_query = dim_zero_cat(self.is_query)[keep].bool()
        if is_query.all() or not is_query.any():
            raise ValueError(
                f"ReIDMetric needs both query and gallery samples, got {int(is_query.sum())} queries "
                f"among {is_query.numel()} samples."
            )
        q_keep, g_keep = keep[is_query], keep[~is_query]
        features = dim_zero_cat(self.features)
        q_feat, g_feat = features[q_keep].float(), features[g_keep].float()
        del features
        pids, camids = dim_zero_cat(self.pids), dim_zero_cat(self.camids)
        q_pids, g_pids, q_camids, g_camids = pids[q_keep], pids[g_keep], camids[q_keep], camids[g_keep]
        model_feats = {}
        if self.aqe:
            if self.keep_outputs:  # feature export writes the model's features, not the expanded ones
                model_feats = {"q_feat_model": q_feat, "g_feat_model": g_feat}
            q_feat, g_feat = average_query_expansion(q_feat, g_feat, self.aqe_alpha, self.aqe_k)
        # a gallery smaller than max_rank shortens the CMC (it then ends at 1.0)
        max_rank = min(self.max_rank, g_feat.shape[0])
        distmat = None
        if self.rerank or self.tpr_fprs:
            distmat = self._dense_distance(q_feat, g_feat)
            per_query = per_query_metrics(distmat, q_pids, g_pids, q_camids, g_camids)
            sums = rank_sums(per_query, max_rank, q_feat.device)
        else:
            lo, hi = self._query_share(q_feat.shape[0])
            per_query = rank_queries(q_feat[lo:hi], g_feat, q_pids[lo:hi], g_pids, q_camids[lo:hi], g_camids,
                                     self.metric, self.max_chunk_mb)
            sums = self._sum_over_ranks(rank_sums(per_query, max_rank, q_feat.device))
        ranks = metrics_from_sums(sums, max_rank)
        cmc = ranks["cmc"]
        results = {f"rank{k}": cmc[min(k, len(cmc)) - 1] for k in (1, 5, 10)}
        results.update(mAP=ranks["mAP"], mINP=ranks["mINP"])
        if self.tpr_fprs:
            results.update(tpr_at_fpr(distmat, q_pids, g_pids, self.tpr_fprs, q_camids, g_camids))
        if self.keep_outputs:
            self.last_outputs = {
                "q_feat": q_feat, "g_feat": g_feat, "q_pids": q_pids, "g_pids": g_pids,
                "q_camids": q_camids, "g_camids": g_camids,
                "q_index": index[q_keep], "g_index": index[g_keep], "cmc": cmc, **model_feats,
            }
            if distmat is not None:
                self.last_outputs["dist"] = distmat
        return {
            key: torch.tensor(100.0 * value, dtype=torch.float32, device=self.device) for key, value in results.items()
        }

    def _dense_distance(self, q_feat: Tensor, g_feat: Tensor) -> Tensor:
        """The whole ``Q x G`` distance matrix (re-ranked when ``rerank``), refused when it cannot fit."""
        num_q, num_g = q_feat.shape[0], g_feat.shape[0]
        options = ", ".join(name for name, on in (("rerank", self.rerank), ("tpr_fprs", bool(self.tpr_fprs))) if on)
        ensure_fits(
            4 * num_q * num_g, q_feat.device, f"The {num_q:,} x {num_g:,} distance matrix of evaluation.{options}",
            hint="Turn the option off to rank in bounded memory (evaluation.max_chunk_mb).",
        )
        if not self.rerank:
            return compute_distance(q_feat, g_feat, self.metric)
        if self.metric == "cosine":
            q_feat, g_feat = F.normalize(q_feat, dim=1), F.normalize(g_feat, dim=1)
        return k_reciprocal_rerank(q_feat, g_feat, self.rerank_k1, self.rerank_k2, self.rerank_lambda)

    def _ranks(self) -> tuple[int, int]:
        """``(rank, world_size)`` over which the states were gathered; ``(0, 1)`` when they were not."""
        # torchmetrics sets _is_synced inside compute() when it gathered the states of all ranks
        if not (self._is_synced and dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _query_share(self, num_query: int) -> tuple[int, int]:
        """This rank's contiguous slice ``[lo, hi)`` of the queries."""
        rank, world = self._ranks()
        return num_query * rank // world, num_query * (rank + 1) // world

    def _sum_over_ranks(self, sums: Tensor) -> Tensor:
        """Add the ranks' sums, in rank order, so that every rank holds the same result."""
        if self._ranks()[1] == 1:
            return sums
        return torch.stack(gather_all_tensors(sums, group=self.process_group)).sum(0)
