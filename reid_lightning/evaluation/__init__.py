"""Evaluation: distances, Market-1501 ranking metrics, re-ranking, query expansion, pictures."""

from .distance import compute_distance
from .features import extract_features
from .metric import ReIDMetric
from .query_expansion import average_query_expansion
from .ranking import evaluate_rank, per_query_metrics
from .rerank import k_reciprocal_rerank
from .verification import tpr_at_fpr
from .visualize import draw_rank_strip, save_cmc_curve, save_rank_lists

__all__ = [
    "ReIDMetric",
    "average_query_expansion",
    "compute_distance",
    "draw_rank_strip",
    "evaluate_rank",
    "extract_features",
    "k_reciprocal_rerank",
    "per_query_metrics",
    "save_cmc_curve",
    "save_rank_lists",
    "tpr_at_fpr",
]
