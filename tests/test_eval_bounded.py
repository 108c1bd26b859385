"""Evaluation in bounded memory: chunked ranking from features equals the dense path, ReIDMetric
never builds the Q x G matrix, DDP ranks split the queries, re-ranking refuses what cannot fit."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reid_lightning.evaluation import (
    GalleryDistance,
    ReIDMetric,
    compute_distance,
    evaluate_rank,
    k_reciprocal_rerank,
    memory,
    per_query_metrics,
    rank_queries,
    rerank_memory_bytes,
)
from reid_lightning.evaluation import (
    metric as metric_module,
)
from reid_lightning.evaluation.ranking import BYTES_PER_DISTANCE, chunk_plan


def structured_split(seed: int, num_q: int, num_g: int, num_ids: int, dim: int = 8, ties: bool = False):
    """Identity-structured features (centre + noise), random pids and cameras."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g)
    q_pids, g_pids = torch.randint(0, num_ids, (num_q,), generator=g), torch.randint(0, num_ids, (num_g,), generator=g)
    q_cams, g_cams = torch.randint(0, 3, (num_q,), generator=g), torch.randint(0, 3, (num_g,), generator=g)
    q_feat = centres[q_pids] + 0.8 * torch.randn(num_q, dim, generator=g)
    g_feat = centres[g_pids] + 0.8 * torch.randn(num_g, dim, generator=g)
    if ties:  # repeated gallery features give tied distances
        g_feat[1::3] = g_feat[0::3][: g_feat[1::3].shape[0]]
    return q_feat, g_feat, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("max_chunk_mb", [1e-3, 0.05, 256])
def test_rank_queries_equals_the_dense_path(metric, ties, max_chunk_mb):
    q_feat, g_feat, *ids = structured_split(3, 70, 230, 25, ties=ties)
    ids[0][::9] = 999  # queries without a match are skipped
    dense = per_query_metrics(compute_distance(q_feat, g_feat, metric), *ids)
    chunked = rank_queries(q_feat, g_feat, *ids, metric=metric, max_chunk_mb=max_chunk_mb)
    assert 10 < (dense["num_matches"] > 0).sum() < 70
    # ranks are identical (the same distances); AP/INP sums may differ in the last bit
    for key in ("first_match_rank", "num_matches"):
        np.testing.assert_array_equal(chunked[key], dense[key], err_msg=key)
    for key in ("ap", "inp"):
        np.testing.assert_allclose(chunked[key], dense[key], rtol=1e-13, atol=0, err_msg=key)
    # a subset of the queries gives those rows (a DDP rank's share)
    share = rank_queries(q_feat[20:45], GalleryDistance(g_feat, metric), ids[0][20:45], ids[1], ids[2][20:45],
                         ids[3], max_chunk_mb=max_chunk_mb)
    np.testing.assert_array_equal(share["first_match_rank"], dense["first_match_rank"][20:45])
    np.testing.assert_allclose(share["ap"], dense["ap"][20:45], rtol=1e-13, atol=0)


def test_chunk_plan_follows_the_budget_and_rejects_a_bad_one():
    rows, piece = chunk_plan(82161, 256)
    assert rows == 256 * 2**19 // (BYTES_PER_DISTANCE * 82161) == 326
    assert piece == 256 * 2**19 // 96
    assert chunk_plan(10**9, 1) == (1, 2**19 // 96)  # one row at least
    with pytest.raises(ValueError, match="evaluation.max_chunk_mb must be > 0, got 0"):
        chunk_plan(100, 0)
    with pytest.raises(ValueError, match="max_chunk_mb must be > 0, got -1"):
        ReIDMetric(max_chunk_mb=-1)


def feed_split(metric: ReIDMetric, split, batch: int = 64) -> None:
    q_feat, g_feat, q_pids, g_pids, q_cams, g_cams = split
    feats, pids, cams = torch.cat([q_feat, g_feat]), torch.cat([q_pids, g_pids]), torch.cat([q_cams, g_cams])
    is_query = torch.arange(feats.shape[0]) < q_feat.shape[0]
    order = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(5))
    for lo in range(0, order.numel(), batch):
        sel = order[lo : lo + batch]
        metric.update(feats[sel], pids[sel], cams[sel], is_query[sel], sel)


def test_metric_ranks_query_chunks_without_the_whole_matrix(monkeypatch):
    split = structured_split(1, 90, 400, 30)
    blocks = []
    original = GalleryDistance.__call__

    def recording_call(self, query):
        out = original(self, query)
        blocks.append(tuple(out.shape))
        return out

    monkeypatch.setattr(GalleryDistance, "__call__", recording_call)
    monkeypatch.setattr(metric_module, "compute_distance", None)  # the dense path must not run
    budget_mb = 0.02
    metric = ReIDMetric(max_chunk_mb=budget_mb)
    feed_split(metric, split)
    results = metric.compute()
    rows, _ = chunk_plan(400, budget_mb)
    assert rows == 5 and len(blocks) == 18 and max(b[0] for b in blocks) == rows
    assert all(b[1] == 400 and BYTES_PER_DISTANCE * b[0] * b[1] <= budget_mb * 2**19 for b in blocks)
    monkeypatch.undo()
    expected = evaluate_rank(compute_distance(split[0], split[1]), *split[2:], max_rank=50)
    assert results["mAP"].item() == pytest.approx(100 * expected["mAP"], abs=1e-4)
    assert results["mINP"].item() == pytest.approx(100 * expected["mINP"], abs=1e-4)
    assert results["rank5"].item() == pytest.approx(100 * expected["cmc"][4], abs=1e-4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _share_worker(rank: int, world: int, port: int, split, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranked = []
        original = metric_module.rank_queries

        def recording(q_feat, *args, **kwargs):
            ranked.append(q_feat.shape[0])
            return original(q_feat, *args, **kwargs)

        metric_module.rank_queries = recording
        metric = ReIDMetric(max_chunk_mb=0.01)
        q_feat, g_feat, q_pids, g_pids, q_cams, g_cams = split
        # rank r feeds every world-th sample, as a distributed sampler would
        feats, pids, cams = torch.cat([q_feat, g_feat]), torch.cat([q_pids, g_pids]), torch.cat([q_cams, g_cams])
        is_query = torch.arange(feats.shape[0]) < q_feat.shape[0]
        sel = torch.arange(rank, feats.shape[0], world)
        metric.update(feats[sel], pids[sel], cams[sel], is_query[sel], sel)
        torch.save({"results": metric.compute(), "ranked": ranked}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_split_the_queries_and_agree_with_one_process(tmp_path):
    split = structured_split(2, 61, 300, 20)
    mp.start_processes(_share_worker, args=(3, _free_port(), split, str(tmp_path)), nprocs=3, join=True,
                       start_method="fork")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    assert [r["ranked"] for r in per_rank] == [[20], [20], [21]]  # contiguous shares of the 61 queries
    single = ReIDMetric()
    feed_split(single, split)
    expected = single.compute()
    for key, value in expected.items():
        assert {r["results"][key].item() for r in per_rank} == {per_rank[0]["results"][key].item()}, key
        assert per_rank[0]["results"][key].item() == pytest.approx(value.item(), abs=1e-5), key


def test_rerank_refuses_what_does_not_fit(monkeypatch):
    q_feat, g_feat, *ids = structured_split(4, 20, 60, 8)
    needed = rerank_memory_bytes(20, 60, 5, 2)
    assert needed > 4 * 20 * 60
    monkeypatch.setattr(memory, "available_bytes", lambda device: needed - 1)
    with pytest.raises(MemoryError, match=r"re-ranking of 20 queries x 60 gallery images .* needs about "
                                          r"[0-9.]+ GiB on cpu, but only [0-9.]+ GiB is available"):
        k_reciprocal_rerank(q_feat, g_feat, 5, 2)
    metric = ReIDMetric(rerank=True, rerank_k1=5, rerank_k2=2)
    feed_split(metric, (q_feat, g_feat, *ids))
    with pytest.raises(MemoryError, match="needs about"):
        metric.compute()
    monkeypatch.setattr(memory, "available_bytes", lambda device: needed)
    assert k_reciprocal_rerank(q_feat, g_feat, 5, 2).shape == (20, 60)
    # the dense distance matrix of tpr_fprs is checked too
    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * 20 * 60 - 1)
    metric = ReIDMetric(tpr_fprs=(0.1,))
    feed_split(metric, (q_feat, g_feat, *ids))
    with pytest.raises(MemoryError, match=r"The 20 x 60 distance matrix of evaluation.tpr_fprs needs about"):
        metric.compute()


def test_available_bytes_reads_meminfo_and_the_cgroup_limit(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP", cgroup)
    assert memory.available_bytes("cpu") == 8000000 * 1024  # no cgroup files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert memory.available_bytes("cpu") == 8000000 * 1024
    (cgroup / "memory.max").write_text(f"{2**30}\n")
    assert memory.available_bytes("cpu") == 2**30 - 123
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")
    assert memory.available_bytes("cpu") is None
    memory.ensure_fits(10**18, "cpu", "anything")  # unknown: no refusal


def test_kept_outputs_hold_a_distance_matrix_only_from_the_dense_path():
    split = structured_split(6, 30, 120, 10)
    chunked, dense = ReIDMetric(keep_outputs=True), ReIDMetric(keep_outputs=True, tpr_fprs=(0.1,))
    for metric in (chunked, dense):
        feed_split(metric, split)
        metric.compute()
    assert "dist" not in chunked.last_outputs
    torch.testing.assert_close(dense.last_outputs["dist"], compute_distance(split[0], split[1]))
    for key in ("q_feat", "g_feat", "q_index", "g_index", "cmc"):
        assert np.array_equal(np.asarray(chunked.last_outputs[key]), np.asarray(dense.last_outputs[key])), key
