"""Evaluation: distances, Market-1501 ranking metrics, re-ranking, query expansion, pictures."""

from .distance import GalleryDistance, compute_distance
from .features import extract_features
from .memory import available_bytes, ensure_fits
from .metric import ReIDMetric
from .query_expansion import average_query_expansion
from .ranking import evaluate_rank, per_query_metrics, rank_queries
from .rerank import k_reciprocal_rerank, rerank_memory_bytes
from .verification import tpr_at_fpr
from .visualize import draw_rank_strip, save_cmc_curve, save_rank_lists

__all__ = [
    "GalleryDistance",
    "ReIDMetric",
    "available_bytes",
    "average_query_expansion",
    "compute_distance",
    "draw_rank_strip",
    "ensure_fits",
    "evaluate_rank",
    "extract_features",
    "k_reciprocal_rerank",
    "per_query_metrics",
    "rank_queries",
    "rerank_memory_bytes",
    "save_cmc_curve",
    "save_rank_lists",
    "tpr_at_fpr",
]
