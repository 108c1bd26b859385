"""search_gallery: chunked top-k equals a brute-force stable argsort of the evaluation distance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_lightning.evaluation import compute_distance
from reid_lightning.inference import search_gallery


def features(num: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("query_chunk", "gallery_chunk"), [(1024, 16384), (3, 7)])
def test_chunked_search_equals_brute_force_argsort(metric, query_chunk, gallery_chunk):
    query, gallery = features(10, seed=1), features(50, seed=2)
    gallery[31] = gallery[4]  # exact ties must keep gallery order
    gallery[17] = query[3]
    dist = compute_distance(query, gallery, metric)
    expected = np.argsort(dist.numpy(), axis=1, kind="stable")[:, :12]
    distances, indices = search_gallery(
        query, gallery, top_k=12, metric=metric, query_chunk=query_chunk, gallery_chunk=gallery_chunk
    )
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    np.testing.assert_array_equal(indices.numpy(), expected)
    torch.testing.assert_close(distances, dist.gather(1, torch.from_numpy(expected)))
    assert indices[3, 0] == 17


def test_float16_gallery_and_top_k_beyond_the_gallery():
    query, gallery = features(4), features(6, seed=5).half()
    distances, indices = search_gallery(query, gallery, top_k=10, gallery_chunk=4)
    assert indices.shape == (4, 6)
    expected = np.argsort(compute_distance(query, gallery).numpy(), axis=1, kind="stable")
    np.testing.assert_array_equal(indices.numpy(), expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_faiss_backend_agrees_with_torch(metric):
    pytest.importorskip("faiss", reason="faiss is an optional extra (pip install -e '.[faiss]')")
    query, gallery = features(8, seed=3), features(40, seed=4)
    d_torch, i_torch = search_gallery(query, gallery, top_k=5, metric=metric)
    d_faiss, i_faiss = search_gallery(query, gallery, top_k=5, metric=metric, backend="faiss")
    np.testing.assert_array_equal(i_faiss.numpy(), i_torch.numpy())
    torch.testing.assert_close(d_faiss, d_torch, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "manhattan"}, "metric must be one of"),
        ({"backend": "annoy"}, "backend must be one of"),
        ({"top_k": 0}, "top_k >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        search_gallery(features(2), features(3), **kwargs)
    with pytest.raises(ValueError, match=r"\(2, 16\).*\(3, 8\)"):
        search_gallery(features(2), features(3, dim=8))
