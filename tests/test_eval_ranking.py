"""evaluate_rank / per_query_metrics / compute_distance: hand cases and a loop reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from reid_lightning.evaluation import compute_distance, evaluate_rank, per_query_metrics


def reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Straightforward per-query loop: stable argsort, Market rule, AP/INP/CMC by definition.

    Returns ``(cmc, mAP, mINP, num_valid)``, or None when no query is valid.
    """
    distmat = np.asarray(distmat, dtype=np.float32)
    q_pids, g_pids, q_camids, g_camids = map(np.asarray, (q_pids, g_pids, q_camids, g_camids))
    max_rank = min(max_rank, distmat.shape[1])
    cmcs, aps, inps = [], [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        junk = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        hits = g_pids[order][~junk] == q_pids[q]
        if not hits.any():
            continue
        positions = np.flatnonzero(hits)  # 0-based ranks of the matches among kept items
        aps.append(np.mean([(m + 1) / (p + 1) for m, p in enumerate(positions)]))
        inps.append(len(positions) / (positions[-1] + 1))
        cmc = np.zeros(max_rank)
        cmc[positions[0] :] = 1.0
        cmcs.append(cmc)
    if not aps:
        return None
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


def hand_case():
    """Four queries, five gallery items; expected values worked out in the comments."""
    g_pids = np.array([1, 2, 1, 0, 1])
    g_cams = np.array([0, 1, 1, 1, 2])
    q_pids = np.array([1, 3, 2, 2])
    q_cams = np.array([0, 0, 1, 0])
    distmat = np.array(
        [
            # q0 (pid 1, cam 0): g0 is junk (pid 1, cam 0) and removed although nearest;
            # kept order g1 (pid 2), g2 (match), g3 (distractor pid 0), g4 (match):
            # matches at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4, Rank-1 miss.
            [0.1, 0.2, 0.3, 0.4, 0.5],
            # q1 (pid 3): no gallery item of pid 3 -> skipped.
            [0.1, 0.2, 0.3, 0.4, 0.5],
            # q2 (pid 2, cam 1): its only pid-2 item g1 shares its camera -> skipped.
            [0.1, 0.2, 0.3, 0.4, 0.5],
            # q3 (pid 2, cam 0): g1 (pid 2, cam 1) is nearest -> AP 1, INP 1, Rank-1 hit.
            [0.5, 0.1, 0.2, 0.3, 0.4],
        ],
        dtype=np.float32,
    )
    return distmat, q_pids, g_pids, q_cams, g_cams


def test_hand_case_exact_values():
    out = evaluate_rank(*hand_case(), max_rank=5)
    assert out["num_valid_queries"] == 2
    assert out["mAP"] == pytest.approx(0.75, abs=1e-12)
    assert out["mINP"] == pytest.approx(0.75, abs=1e-12)
    np.testing.assert_allclose(out["cmc"], [0.5, 1.0, 1.0, 1.0, 1.0])


def test_per_query_values_and_skipped_queries():
    per_query = per_query_metrics(*hand_case())
    np.testing.assert_array_equal(per_query["num_matches"], [2, 0, 0, 1])
    np.testing.assert_array_equal(per_query["first_match_rank"], [1, -1, -1, 0])
    np.testing.assert_allclose(per_query["ap"], [0.5, np.nan, np.nan, 1.0])
    np.testing.assert_allclose(per_query["inp"], [0.5, np.nan, np.nan, 1.0])


def test_distractors_and_pid_minus_one_count_as_non_matches():
    g_pids = np.array([0, -1, 5, 0])
    g_cams = np.array([1, 1, 1, 1])
    distmat = np.array([[0.1, 0.2, 0.3, 0.05]], dtype=np.float32)
    out = evaluate_rank(distmat, np.array([5]), g_pids, np.array([0]), g_cams, max_rank=4)
    # order g3 (pid 0), g0 (pid 0), g1 (pid -1), g2 (match): match at rank 4
    assert out["mAP"] == pytest.approx(0.25)
    assert out["mINP"] == pytest.approx(0.25)
    np.testing.assert_allclose(out["cmc"], [0, 0, 0, 1])


def test_ties_follow_gallery_index_order():
    q_pids, q_cams = np.array([1, 1]), np.array([0, 0])
    g_pids = np.array([2, 1, 3, 1])
    g_cams = np.array([1, 1, 1, 2])
    distmat = np.full((2, 4), 0.5, dtype=np.float32)
    distmat[1, 0] = 0.7  # second query: g0 moves last -> order g1 (match), g2, g3 (match), g0
    per_query = per_query_metrics(distmat, q_pids, g_pids, q_cams, g_cams)
    # first query: all tied -> index order g0, g1 (match), g2, g3 (match)
    np.testing.assert_allclose(per_query["ap"], [(1 / 2 + 2 / 4) / 2, (1 + 2 / 3) / 2])
    np.testing.assert_allclose(per_query["inp"], [2 / 4, 2 / 3])
    np.testing.assert_array_equal(per_query["first_match_rank"], [1, 0])


def test_tie_between_match_and_later_index_item_favours_the_match():
    # g2 ties with the match g1 but has a larger index: it comes after the match
    distmat = np.array([[0.9, 0.3, 0.3]], dtype=np.float32)
    out = evaluate_rank(distmat, [7], [1, 7, 2], [0], [1, 1, 1], max_rank=3)
    assert out["mAP"] == pytest.approx(1.0)


def test_negative_zero_ties_with_zero():
    # -0.0 == 0.0: the match (index 0) precedes the non-match at -0.0 (index 1)
    distmat = np.array([[0.0, -0.0, 0.5]], dtype=np.float32)
    out = evaluate_rank(distmat, [7], [7, 1, 2], [0], [1, 1, 1], max_rank=3)
    assert out["mAP"] == pytest.approx(1.0)


def test_no_valid_query_raises():
    distmat = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="no query has a gallery item"):
        evaluate_rank(distmat, [1, 2], [1, 3, 4], [0, 0], [0, 1, 1])


def test_small_gallery_shrinks_max_rank_with_warning():
    distmat, q_pids, g_pids, q_cams, g_cams = hand_case()
    with pytest.warns(UserWarning, match="max_rank shrinks from 50 to 5"):
        out = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams)
    assert out["cmc"].shape == (5,)


def test_shape_errors_name_the_argument():
    distmat = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="g_pids has 2 entries"):
        evaluate_rank(distmat, [1, 2], [1, 2], [0, 0], [0, 1, 1])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(distmat, [1, 2], [1, 2, 3], [0, 0], [0, 1, 1], max_rank=0)


def test_nan_at_a_match_raises_and_elsewhere_sorts_last():
    q_pids, q_cams, g_pids, g_cams = [1], [0], [1, 2, 1], [1, 1, 2]
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(np.array([[np.nan, 0.1, 0.2]], dtype=np.float32), q_pids, g_pids, q_cams, g_cams)
    distmat = np.array([[0.3, np.nan, 0.2]], dtype=np.float32)
    out = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    assert out["mAP"] == pytest.approx(1.0)  # the NaN non-match ranks after both matches


def random_case(rng, num_q, num_g, num_ids, ties):
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.integers(0, 3, num_q)
    g_cams = rng.integers(0, 3, num_g)
    if ties:
        distmat = rng.integers(0, 4, (num_q, num_g)).astype(np.float32)
    else:
        distmat = rng.standard_normal((num_q, num_g)).astype(np.float32)
    return distmat, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("as_torch", [False, True])
def test_random_cases_match_the_loop_reference(ties, as_torch):
    rng = np.random.default_rng(1 + ties + 2 * as_torch)
    checked = 0
    for num_q, num_g in [(1, 1), (2, 2), (5, 31), (9, 32), (13, 33), (40, 100), (25, 257)]:
        case = random_case(rng, num_q, num_g, num_ids=max(2, num_g // 6), ties=ties)
        reference = reference_rank(*case, max_rank=20)
        inputs = [torch.from_numpy(a) for a in case] if as_torch else list(case)
        if reference is None:
            with pytest.raises(ValueError, match="no query"):
                evaluate_rank(*inputs)
            continue
        ref_cmc, ref_map, ref_minp, ref_valid = reference
        checked += 1
        for chunk_size in (1, 7, None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = evaluate_rank(*inputs, max_rank=20, chunk_size=chunk_size)
            assert out["num_valid_queries"] == ref_valid
            assert out["mAP"] == pytest.approx(ref_map, abs=1e-12)
            assert out["mINP"] == pytest.approx(ref_minp, abs=1e-12)
            np.testing.assert_allclose(out["cmc"], ref_cmc, atol=1e-12)
    assert checked >= 5


def test_float64_and_identity_structured_input_match_the_reference():
    rng = np.random.default_rng(7)
    num_ids = 30
    centres = rng.standard_normal((num_ids, 16))
    q_pids, g_pids = rng.integers(0, num_ids, 60), rng.integers(0, num_ids, 300)
    q_cams, g_cams = rng.integers(0, 6, 60), rng.integers(0, 6, 300)
    q_feat = torch.from_numpy(centres[q_pids] + 0.8 * rng.standard_normal((60, 16)))
    g_feat = torch.from_numpy(centres[g_pids] + 0.8 * rng.standard_normal((300, 16)))
    distmat = torch.cdist(q_feat, g_feat)  # float64
    ref_cmc, ref_map, ref_minp, ref_valid = reference_rank(distmat.numpy(), q_pids, g_pids, q_cams, g_cams)
    out = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, chunk_size=16)
    assert 0.3 < out["mAP"] < 1.0  # a realistic mix of easy and hard queries
    assert out["mAP"] == pytest.approx(ref_map, abs=1e-12)
    assert out["mINP"] == pytest.approx(ref_minp, abs=1e-12)
    np.testing.assert_allclose(out["cmc"], ref_cmc, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    case = random_case(np.random.default_rng(3), 50, 400, num_ids=40, ties=True)
    cpu = evaluate_rank(*case)
    cuda = evaluate_rank(*(torch.from_numpy(a).cuda() for a in case))
    assert cuda["mAP"] == pytest.approx(cpu["mAP"], abs=1e-12)
    np.testing.assert_allclose(cuda["cmc"], cpu["cmc"])


def test_compute_distance_cosine_and_euclidean():
    torch.manual_seed(0)
    q, g = torch.randn(5, 8), torch.randn(7, 8)
    cosine = compute_distance(q, g, "cosine")
    expected = 1 - torch.nn.functional.cosine_similarity(q[:, None], g[None], dim=2)
    torch.testing.assert_close(cosine, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(compute_distance(q, g, "euclidean"), torch.cdist(q, g), atol=1e-5, rtol=1e-5)
    # rows are independent: chunking gives the same rows
    torch.testing.assert_close(compute_distance(q[2:4], g), cosine[2:4])


def test_compute_distance_is_float32_under_autocast_and_for_half_inputs():
    q, g = torch.randn(3, 4).bfloat16(), torch.randn(6, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = compute_distance(q, g)
    assert dist.dtype == torch.float32
    torch.testing.assert_close(dist, compute_distance(q.float(), g.float()))
    same = compute_distance(q.float(), q.float(), "euclidean")
    assert (same.diagonal() >= 0).all() and same.diagonal().max() < 1e-3


def test_compute_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="Unknown distance metric 'manhattan'"):
        compute_distance(torch.zeros(1, 2), torch.zeros(1, 2), "manhattan")
    with pytest.raises(ValueError, match="same dimension"):
        compute_distance(torch.zeros(1, 2), torch.zeros(1, 3))
