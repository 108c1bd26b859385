"""k-reciprocal re-ranking against a loop reference; average query expansion by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_lightning.evaluation import (
    average_query_expansion,
    k_reciprocal_rerank,
    rerank,
)


def reference_rerank(q_feat, g_feat, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al.'s algorithm with plain loops, dense matrices and float64."""
    feats = np.concatenate([q_feat, g_feat]).astype(np.float64)
    num_q, n = len(q_feat), len(feats)
    dist = ((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1)
    original = np.transpose(dist / np.max(dist, axis=0))
    rank = np.argsort(original, axis=1, kind="stable")

    def reciprocal(i, k):
        return np.array([c for c in rank[i, : k + 1] if i in rank[c, : k + 1]])

    v = np.zeros((n, n))
    for i in range(n):
        members = reciprocal(i, k1)
        expansion = list(members)
        for c in members:
            candidate = reciprocal(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(candidate, members)) > 2 / 3 * len(candidate):
                expansion.extend(candidate)
        expansion = np.unique(expansion)
        weights = np.exp(-original[i, expansion])
        v[i, expansion] = weights / weights.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.zeros((num_q, n - num_q))
    for i in range(num_q):
        for j in range(n - num_q):
            shared = np.minimum(v[i], v[num_q + j]).sum()
            jaccard[i, j] = 1 - shared / (2 - shared)
    return jaccard * (1 - lambda_value) + original[:num_q, num_q:] * lambda_value


def clustered(seed, num_q, num_g, num_ids=8, dim=16):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g)
    q = centres[torch.randint(0, num_ids, (num_q,), generator=g)] + 0.5 * torch.randn(num_q, dim, generator=g)
    gal = centres[torch.randint(0, num_ids, (num_g,), generator=g)] + 0.5 * torch.randn(num_g, dim, generator=g)
    return q, gal


@pytest.mark.parametrize(
    ("k1", "k2", "lambda_value", "chunk_size"),
    [(20, 6, 0.3, 1024), (20, 6, 0.3, 7), (5, 3, 0.0, 16), (6, 1, 0.5, 1024), (9, 4, 0.3, 3)],
)
def test_rerank_matches_reference(k1, k2, lambda_value, chunk_size):
    q, g = clustered(k1 + k2, 10, 40)
    expected = reference_rerank(q.numpy(), g.numpy(), k1, k2, lambda_value)
    result = k_reciprocal_rerank(q, g, k1, k2, lambda_value, chunk_size=chunk_size)
    assert result.shape == (10, 40) and result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, atol=2e-6, rtol=0)


def test_rerank_chunking_is_invisible(monkeypatch):
    q, g = clustered(11, 10, 40)
    expected = reference_rerank(q.numpy(), g.numpy(), 7, 3, 0.3)
    monkeypatch.setattr(rerank, "_BUDGET", 64)  # many small chunks in every step
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, 7, 3, 0.3, chunk_size=4).numpy(), expected, atol=2e-6)


def test_rerank_on_normalised_features_and_lambda_one_is_the_normalised_distance():
    q, g = clustered(3, 6, 30)
    q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    np.testing.assert_allclose(
        k_reciprocal_rerank(q, g, 8, 3, 0.3).numpy(), reference_rerank(q.numpy(), g.numpy(), 8, 3, 0.3), atol=2e-6
    )
    feats = torch.cat([q, g])
    squared = torch.cdist(q, feats) ** 2
    torch.testing.assert_close(
        k_reciprocal_rerank(q, g, 8, 3, 1.0), (squared / squared.amax(1, keepdim=True))[:, 6:], atol=1e-5, rtol=0
    )


def test_rerank_rejects_impossible_neighbourhoods():
    q, g = clustered(0, 3, 5)
    with pytest.raises(ValueError, match="k1 < 8"):
        k_reciprocal_rerank(q, g, k1=8)
    with pytest.raises(ValueError, match="k2 <= k1 \\+ 1"):
        k_reciprocal_rerank(q, g, k1=3, k2=5)


def test_rerank_is_float32_under_autocast():
    # the evaluation of a mixed-precision run (and any caller's autocast, bf16/fp16 on a GPU):
    # the distance matmuls ran in bf16 and reordered the neighbours
    q, g = clustered(7, 10, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = k_reciprocal_rerank(q.bfloat16(), g.bfloat16(), 8, 3, 0.3)
    expected = reference_rerank(q.bfloat16().float().numpy(), g.bfloat16().float().numpy(), 8, 3, 0.3)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, atol=2e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rerank_runs_on_cuda():
    q, g = clustered(1, 10, 40)
    result = k_reciprocal_rerank(q.cuda(), g.cuda())
    assert result.is_cuda
    np.testing.assert_allclose(result.cpu().numpy(), reference_rerank(q.numpy(), g.numpy()), atol=1e-5)


def test_average_query_expansion_by_hand():
    # a=(1,0), b=(3,4), c=(0,2); cosine: a.b = 0.6, a.c = 0, b.c = 0.8; k=2 keeps each
    # feature and its most similar other one: a<-b, b<-c, c<-b; weights sim**3.
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    new_q, new_g = average_query_expansion(q, g, alpha=3.0, k=2)
    torch.testing.assert_close(new_q, torch.tensor([[(1 + 0.216 * 3) / 2, 0.216 * 4 / 2]]))
    torch.testing.assert_close(
        new_g, torch.tensor([[3 / 2, (4 + 0.512 * 2) / 2], [0.512 * 3 / 2, (2 + 0.512 * 4) / 2]])
    )


def test_average_query_expansion_k1_is_identity_and_chunking_is_invisible():
    q, g = clustered(5, 7, 20)
    same_q, same_g = average_query_expansion(q, g, k=1)
    torch.testing.assert_close(same_q, q)
    torch.testing.assert_close(same_g, g)
    whole = average_query_expansion(q, g, k=5)
    chunked = average_query_expansion(q, g, k=5, chunk_size=3)
    torch.testing.assert_close(whole, chunked)
    with pytest.raises(ValueError, match="aqe k must be in \\[1, 27\\]"):
        average_query_expansion(q, g, k=28)
