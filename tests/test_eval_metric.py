"""ReIDMetric (single process and DDP on CPU), tpr_at_fpr and the flip test."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reid_lightning.evaluation import (
    ReIDMetric,
    average_query_expansion,
    compute_distance,
    evaluate_rank,
    extract_features,
    k_reciprocal_rerank,
    tpr_at_fpr,
    verification,
)


def make_split(seed: int = 0, num_ids: int = 6, per_id: int = 5, dim: int = 16) -> dict[str, torch.Tensor]:
    """One query and per_id - 1 gallery images per identity, three cameras."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g)
    pids = torch.arange(num_ids).repeat_interleave(per_id)
    order = torch.arange(pids.numel())
    return {
        "features": centres[pids] + 0.9 * torch.randn(pids.numel(), dim, generator=g),
        "pids": pids,
        "camids": order % 3,
        "is_query": order % per_id == 0,
        "index": order,
    }


def expected_results(data: dict[str, torch.Tensor], metric: str = "cosine") -> dict[str, float]:
    q = data["is_query"]
    dist_mat = compute_distance(data["features"][q], data["features"][~q], metric)
    ranks = evaluate_rank(dist_mat, data["pids"][q], data["pids"][~q], data["camids"][q], data["camids"][~q], 24)
    cmc = ranks["cmc"]
    return {"rank1": 100 * cmc[0], "rank5": 100 * cmc[4], "rank10": 100 * cmc[9],
            "mAP": 100 * ranks["mAP"], "mINP": 100 * ranks["mINP"]}


def feed(metric: ReIDMetric, data: dict[str, torch.Tensor], order: torch.Tensor, batch: int) -> None:
    for lo in range(0, order.numel(), batch):
        sel = order[lo : lo + batch]
        metric.update(data["features"][sel], data["pids"][sel], data["camids"][sel],
                      data["is_query"][sel], data["index"][sel])


def test_metric_matches_evaluate_rank_whatever_the_batch_order():
    data = make_split()
    metric = ReIDMetric()
    feed(metric, data, torch.randperm(30, generator=torch.Generator().manual_seed(1)), batch=7)
    results = metric.compute()
    assert set(results) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    expected = expected_results(data)
    assert 20 < expected["mAP"] < 100  # neither trivial nor hopeless
    for key, value in expected.items():
        assert results[key].dtype == torch.float32
        assert results[key].item() == pytest.approx(value, abs=1e-4), key


def test_metric_drops_repeated_indices_keeping_the_first():
    data = make_split()
    metric = ReIDMetric(metric="euclidean")
    feed(metric, data, torch.arange(30), batch=30)
    # a padded repeat of sample 3 with other features must not change anything
    metric.update(torch.zeros(1, 16), data["pids"][3:4], data["camids"][3:4], data["is_query"][3:4], torch.tensor([3]))
    results = metric.compute()
    for key, value in expected_results(data, "euclidean").items():
        assert results[key].item() == pytest.approx(value, abs=1e-4), key


def test_metric_options_follow_the_documented_pipeline():
    data = make_split(seed=2)
    q = data["is_query"]
    metric = ReIDMetric(aqe=True, aqe_k=3, rerank=True, rerank_k1=6, rerank_k2=2, tpr_fprs=(0.01, 0.1))
    feed(metric, data, torch.arange(30), batch=11)
    results = metric.compute()
    q_feat, g_feat = average_query_expansion(data["features"][q], data["features"][~q], 3.0, 3)
    q_feat, g_feat = torch.nn.functional.normalize(q_feat, dim=1), torch.nn.functional.normalize(g_feat, dim=1)
    dist_mat = k_reciprocal_rerank(q_feat, g_feat, 6, 2, 0.3)
    ids = (data["pids"][q], data["pids"][~q])
    cams = (data["camids"][q], data["camids"][~q])
    ranks = evaluate_rank(dist_mat, *ids, *cams, 24)
    assert results["mAP"].item() == pytest.approx(100 * ranks["mAP"], abs=1e-4)
    tprs = tpr_at_fpr(dist_mat, *ids, (0.01, 0.1), *cams)
    assert set(tprs) == {"TPR@FPR=1e-02", "TPR@FPR=1e-01"}
    for key, value in tprs.items():
        assert results[key].item() == pytest.approx(100 * value, abs=1e-4)


def test_metric_errors():
    with pytest.raises(ValueError, match="max_rank must be >= 10"):
        ReIDMetric(max_rank=5)
    with pytest.raises(ValueError, match="Unknown distance metric"):
        ReIDMetric(metric="hamming")
    metric = ReIDMetric()
    with pytest.raises(ValueError, match="pids has 2 entries for 3 features"):
        metric.update(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3), torch.zeros(3), torch.arange(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics may warn about compute before update
        with pytest.raises(RuntimeError, match="before any update"):
            ReIDMetric().compute()
    data = make_split()
    metric.update(data["features"], data["pids"], data["camids"], torch.ones(30, dtype=torch.bool), data["index"])
    with pytest.raises(ValueError, match="both query and gallery"):
        metric.compute()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, shards: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = ReIDMetric(tpr_fprs=(0.1,))
        for batch in shards[rank]:
            metric.update(*batch)
        torch.save(metric.compute(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gathers_uneven_shards_with_padding_repeats(tmp_path):
    data = make_split()
    fields = ("features", "pids", "camids", "is_query", "index")

    def batch(sel: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(data[f][sel] for f in fields)

    # rank 0: 17 samples in two batches; rank 1: the other 13 plus two repeats (one of
    # rank 0's samples, one of its own), as a padding sampler would add
    shards = [
        [batch(torch.arange(0, 10)), batch(torch.arange(10, 17))],
        [batch(torch.arange(17, 30)), batch(torch.tensor([4, 20]))],
    ]
    # fork: the workers inherit the imported modules (spawn re-imports torchmetrics: ~10 s);
    # they use one thread each and no CUDA, so forking is safe
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), shards, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = ReIDMetric(tpr_fprs=(0.1,))
    feed(single, data, torch.arange(30), batch=30)
    expected = single.compute()
    assert set(per_rank[0]) == set(expected) == {"rank1", "rank5", "rank10", "mAP", "mINP", "TPR@FPR=1e-01"}
    for key in expected:
        assert per_rank[0][key].item() == per_rank[1][key].item(), key
        assert per_rank[0][key].item() == pytest.approx(expected[key].item(), abs=1e-5), key
    # the test can tell: one rank's shard alone, or the repeats kept, give another mAP
    alone = ReIDMetric()
    for b in shards[0]:
        alone.update(*b)
    with_repeats = torch.cat([torch.arange(30), torch.tensor([4, 20])])
    q = data["is_query"][with_repeats]
    feats, pids, cams = data["features"][with_repeats], data["pids"][with_repeats], data["camids"][with_repeats]
    naive = evaluate_rank(compute_distance(feats[q], feats[~q]), pids[q], pids[~q], cams[q], cams[~q], 24)
    for other in (alone.compute()["mAP"].item(), 100 * naive["mAP"]):
        assert abs(other - expected["mAP"].item()) > 0.1


def test_tpr_at_fpr_hand_case():
    # positives (same pid): d 0.1, 0.5; negatives: d 0.3, 0.6, 0.2, 0.4
    distmat = torch.tensor([[0.1, 0.3, 0.6], [0.2, 0.5, 0.4]])
    q_pids, g_pids = torch.tensor([1, 2]), torch.tensor([1, 2, 3])
    fprs = (0.0, 0.25, 0.5, 0.75, 1.0)
    # FPR 1/4 lets the negative at 0.2 through: accept d < 0.3 -> one positive of two
    assert tpr_at_fpr(distmat, q_pids, g_pids, fprs) == {
        "TPR@FPR=0e+00": 0.5, "TPR@FPR=2e-01": 0.5, "TPR@FPR=5e-01": 0.5, "TPR@FPR=8e-01": 1.0, "TPR@FPR=1e+00": 1.0,
    }
    assert tpr_at_fpr(-distmat, q_pids, g_pids, (0.25,), is_similarity=True) == {"TPR@FPR=2e-01": 0.5}
    # Market rule: (q0, g0) shares pid and camera -> dropped; the positive left is d 0.5
    cams = (torch.tensor([0, 0]), torch.tensor([0, 1, 1]))
    assert tpr_at_fpr(distmat, q_pids, g_pids, (0.25, 0.75), *cams) == {"TPR@FPR=2e-01": 0.0, "TPR@FPR=8e-01": 1.0}
    with pytest.raises(ValueError, match="lie in \\[0, 1\\]"):
        tpr_at_fpr(distmat, q_pids, g_pids, (1.5,))
    with pytest.raises(ValueError, match="needs positive and negative pairs"):
        tpr_at_fpr(distmat, q_pids, torch.tensor([5, 6, 7]))


@pytest.mark.parametrize("sample", [1 << 20, 3])
def test_tpr_at_fpr_matches_brute_force(monkeypatch, sample):
    # a 3-value sample gives too tight a bound for the closest negatives: it must widen
    monkeypatch.setattr(verification, "_SAMPLE", sample)
    monkeypatch.setattr(verification, "_CHUNK_ELEMENTS", 150)
    g = torch.Generator().manual_seed(4)
    q_pids, g_pids = torch.randint(0, 12, (30,), generator=g), torch.randint(0, 12, (200,), generator=g)
    q_cams, g_cams = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (200,), generator=g)
    distmat = torch.rand(30, 200, generator=g) - 0.3 * (q_pids[:, None] == g_pids[None, :]).float()
    fprs = (0.001, 0.01, 0.3, 1.0)
    same = q_pids[:, None] == g_pids[None, :]
    positive = same & (q_cams[:, None] != g_cams[None, :])
    negatives = distmat[~same].sort().values
    expected = {}
    for fpr in fprs:
        allowed = int(fpr * negatives.numel())
        accepted = distmat[positive] < negatives[allowed] if allowed < negatives.numel() else distmat[positive] < 9
        expected[f"TPR@FPR={fpr:.0e}"] = accepted.double().mean().item()
    assert tpr_at_fpr(distmat, q_pids, g_pids, fprs, q_cams, g_cams) == pytest.approx(expected, abs=1e-12)


def test_extract_features_averages_the_mirrored_batch():
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    original = images.clone()

    def first_row(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :]  # not mirror-invariant

    torch.testing.assert_close(extract_features(first_row, images), images[:, 0, 0, :])
    torch.testing.assert_close(
        extract_features(first_row, images, flip=True), (images[:, 0, 0, :] + images[:, 0, 0, :].flip(1)) / 2
    )
    assert torch.equal(images, original)
    with pytest.raises(ValueError, match="NCHW"):
        extract_features(first_row, images[0])
