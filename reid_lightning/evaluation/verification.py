"""Verification metric: true-positive rate at fixed false-positive rates over all pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .ranking import ArrayLike, _as_tensor

#: Distances per chunk when scanning the pairs, and size of the sample that bounds the
#: closest negatives.
_CHUNK_ELEMENTS = 1 << 22
_SAMPLE = 1 << 20


def _allowed_false_positives(fpr: float, num_negatives: int) -> int:
    """Largest count n with ``n / num_negatives <= fpr``."""
    allowed = int(fpr * num_negatives)
    while allowed + 1 <= num_negatives and (allowed + 1) / num_negatives <= fpr:
        allowed += 1
    while allowed > 0 and allowed / num_negatives > fpr:
        allowed -= 1
    return allowed


def _pair_keys(
    keys: Tensor, q_pids: Tensor, g_pids: Tensor, cams: tuple[Tensor, Tensor] | None, bound: float, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Keys of all positive pairs, and of the negative pairs with ``key <= bound``.

    Args:
        keys: ``(num_query, num_gallery)``; smaller is closer.
        q_pids, g_pids: identities; same-pid pairs are positives, the others negatives.
        cams: optional ``(q_camids, g_camids)``: same-pid same-camera pairs are dropped.
        bound: largest negative key to keep.
        chunk_size: query rows per chunk.
    """
    pos, neg = [], []
    for lo in range(0, keys.shape[0], chunk_size):
        rows = slice(lo, lo + chunk_size)
        chunk = keys[rows]
        same = q_pids[rows, None] == g_pids[None, :]
        positive = same if cams is None else same & (cams[0][rows, None] != cams[1][None, :])
        pos.append(chunk[positive])
        neg.append(chunk[~same & (chunk <= bound)])
    return torch.cat(pos), torch.cat(neg)


def _num_same_pid_pairs(q_pids: Tensor, g_pids: Tensor) -> int:
    sorted_pids = g_pids.sort().values
    counts = torch.searchsorted(sorted_pids, q_pids, right=True) - torch.searchsorted(sorted_pids, q_pids)
    return int(counts.sum())


def tpr_at_fpr(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    fprs: Sequence[float] = (1e-4, 1e-3, 1e-2),
    q_camids: ArrayLike | None = None,
    g_camids: ArrayLike | None = None,
    is_similarity: bool = False,
) -> dict[str, float]:
    """TPR at each target FPR, treating every query x gallery pair as a verification trial.

    Called as ``tpr_at_fpr(distmat, q_pids, g_pids)`` (or with similarity scores and
    ``is_similarity=True``). Positives are same-pid pairs and negatives different-pid
    pairs, the standard ROC convention (fast-reid's ``evaluate_roc`` labels positives 0
    and feeds distances as scores, inverting both; the result is the same curve). With
    camera ids, same-pid same-camera pairs are removed first (Market rule, as fast-reid).

    For each target, pairs are accepted when their score (``-distance``) is strictly
    above the threshold that lets at most ``floor(fpr * num_negatives)`` negatives
    through, so the achieved FPR never exceeds the target (fast-reid instead takes the
    ROC point nearest to the target, which may exceed it).

    Cost: the pairs are scanned in row chunks; only the positives and the negatives
    closer than a bound (set from a fixed random sample of the matrix, about twice the
    largest allowed count of false positives) are kept and sorted. At Market-1501 scale
    (3,368 x 15,913) with targets up to 1e-2 that is about 1M values.

    Args:
        distmat: ``(num_query, num_gallery)`` distances (or similarities).
        q_pids: ``(num_query,)`` query identities.
        g_pids: ``(num_gallery,)`` gallery identities.
        fprs: target false-positive rates in ``[0, 1]``.
        q_camids: optional ``(num_query,)`` query cameras (with ``g_camids``).
        g_camids: optional ``(num_gallery,)`` gallery cameras.
        is_similarity: ``distmat`` holds similarities (larger is closer).

    Returns:
        ``{"TPR@FPR=1e-04": tpr, ...}``, one key per target (formatted ``{:.0e}``), TPRs
        as fractions.
    """
    keys = _as_tensor(distmat).float()
    if is_similarity:
        keys = -keys  # smaller is closer from here on
    device = keys.device
    q_pids, g_pids = _as_tensor(q_pids, device).reshape(-1), _as_tensor(g_pids, device).reshape(-1)
    if keys.shape != (q_pids.numel(), g_pids.numel()):
        raise ValueError(
            f"distmat has shape {tuple(keys.shape)} but there are {q_pids.numel()} query "
            f"and {g_pids.numel()} gallery pids."
        )
    if (q_camids is None) != (g_camids is None):
        raise ValueError("tpr_at_fpr needs both q_camids and g_camids, or neither.")
    cams = None
    if q_camids is not None:
        cams = (_as_tensor(q_camids, device).reshape(-1), _as_tensor(g_camids, device).reshape(-1))
    for fpr in fprs:
        if not 0.0 <= fpr <= 1.0:
            raise ValueError(f"FPR targets must lie in [0, 1], got {fpr}.")
    chunk_size = max(1, _CHUNK_ELEMENTS // max(1, keys.shape[1]))
    num_neg = keys.numel() - _num_same_pid_pairs(q_pids, g_pids)
    allowed = [_allowed_false_positives(fpr, num_neg) for fpr in fprs]
    needed = max([a + 1 for a in allowed if a < num_neg], default=0)  # closest negatives to find

    # Only the `needed` closest negatives matter: bound them with a quantile of a fixed
    # random sample of the keys, widening the bound until enough negatives fall below it.
    flat = keys.reshape(-1)
    sample = flat[torch.randint(flat.numel(), (min(flat.numel(), _SAMPLE),),
                                generator=torch.Generator().manual_seed(0)).to(device)]
    fraction = 2.0 * needed / max(1, num_neg) + 1e-3
    while True:
        if needed == 0:
            bound = float("-inf")  # every target lets all negatives through
        elif fraction >= 1.0:
            bound = float("inf")
        else:
            bound = float(torch.kthvalue(sample, max(1, int(fraction * sample.numel()))).values)
        pos_keys, neg_keys = _pair_keys(keys, q_pids, g_pids, cams, bound, chunk_size)
        if neg_keys.numel() >= needed or bound == float("inf"):
            break
        fraction *= 4
    if pos_keys.numel() == 0 or num_neg == 0:
        raise ValueError(
            f"tpr_at_fpr needs positive and negative pairs, got {pos_keys.numel()} and {num_neg}."
        )
    closest = neg_keys.sort().values
    results = {}
    for fpr, n_allowed in zip(fprs, allowed):
        if n_allowed >= closest.numel():  # every negative may pass (NaN keys never do)
            tpr = (pos_keys <= float("inf")).double().mean().item()
        else:
            # accept keys below the (n_allowed + 1)-th closest negative: at most n_allowed pass
            tpr = (pos_keys < closest[n_allowed]).double().mean().item()
        results[f"TPR@FPR={fpr:.0e}"] = tpr
    return results
