"""BoT losses against hand-computed values, and their float32 guarantee under autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from reid_lightning.modeling import CenterLoss, cross_entropy_label_smooth, triplet_loss

IDS = torch.tensor([0, 0, 1, 1])
# 1-D points 0, 2 (id 0) and 3, 4 (id 1); pairwise distances are |xi - xj|.
LINE = torch.tensor([[0.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])


def test_label_smooth_cross_entropy_hand_computed():
    # log_softmax([2, 1, 0]) = [2, 1, 0] - log(e^2 + e + 1) = [-0.407606, -1.407606, -2.407606];
    # q = [0.9, 0.05, 0.05]  ->  0.9 * 0.407606 + 0.05 * 1.407606 + 0.05 * 2.407606 = 0.557606
    loss = cross_entropy_label_smooth(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]), eps=0.1)
    assert loss.item() == pytest.approx(0.557606, abs=1e-5)


def test_label_smooth_cross_entropy_is_batch_mean_and_differs_from_torch_smoothing():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([0, 1])
    # Second row: log_softmax = [0, 0, 3] - log(2 + e^3) = [-3.09492, -3.09492, -0.09492]
    # q = [0.05, 0.9, 0.05] -> 0.05 * 3.09492 + 0.9 * 3.09492 + 0.05 * 0.09492 = 2.944921
    expected = (0.557606 + 2.944921) / 2
    loss = cross_entropy_label_smooth(logits, targets, eps=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # torch's label_smoothing spreads eps / K over all classes: q = [0.9333, 0.0333, 0.0333]
    # on the first row gives 0.507606, not 0.557606.
    torch_smoothed = F.cross_entropy(logits[:1], targets[:1], label_smoothing=0.1).item()
    assert torch_smoothed == pytest.approx(0.507606, abs=1e-5)
    assert cross_entropy_label_smooth(logits, targets, eps=0.0).item() == pytest.approx(
        F.cross_entropy(logits, targets).item(), abs=1e-6
    )


def test_label_smooth_cross_entropy_needs_two_classes():
    with pytest.raises(ValueError, match="2 classes"):
        cross_entropy_label_smooth(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))


def test_triplet_batch_hard_hand_computed():
    # anchor 0: d_ap = 2, d_an = min(3, 4) = 3 -> relu(2 - 3 + 0.3) = 0
    # anchor 2: d_ap = 2, d_an = min(1, 2) = 1 -> 1.3
    # anchor 3: d_ap = 1, d_an = min(3, 1) = 1 -> 0.3
    # anchor 4: d_ap = 1, d_an = min(4, 2) = 2 -> 0       mean = 1.6 / 4
    assert triplet_loss(LINE, IDS, margin=0.3).item() == pytest.approx(0.4, abs=1e-5)


def test_triplet_soft_margin_hand_computed():
    # softplus(d_ap - d_an) for d_ap - d_an = -1, 1, 0, -1
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log(2)) / 4
    assert expected == pytest.approx(0.658233, abs=1e-6)
    assert triplet_loss(LINE, IDS, margin=0.0).item() == pytest.approx(expected, abs=1e-5)


def test_triplet_soft_margin_overflow_falls_back_to_margin_0_3():
    # Positives 200 apart, negatives 1 apart: softplus(199) overflows float32 to inf.
    points = torch.tensor([[0.0], [200.0], [1.0], [201.0]])
    # every anchor: d_ap = 200, d_an = 1 -> relu(200 - 1 + 0.3)
    assert triplet_loss(points, IDS, margin=0.0).item() == pytest.approx(199.3, abs=1e-3)


def test_triplet_weighted_mining_hand_computed():
    # The positive set includes the anchor itself (distance 0), as in fast-reid.
    # anchor 2: positives d = [2, 0], softmax weights [e^2, 1] / (e^2 + 1) -> d_ap = 1.761594
    #           negatives d = [1, 2], softmin weights [e^-1, e^-2] / sum   -> d_an = 1.268941
    #           relu(1.761594 - 1.268941 + 0.3) = 0.792653; the other three anchors give 0.
    loss = triplet_loss(LINE, IDS, margin=0.3, hard_mining=False)
    assert loss.item() == pytest.approx(0.792653 / 4, abs=1e-5)


def test_triplet_norm_feat_uses_cosine_distance_on_unit_vectors():
    # Directions 0, 60 deg (id 0) and 90, 180 deg (id 1), with different lengths.
    vectors = torch.tensor([[1.0, 0.0], [0.5, 3**0.5 / 2], [0.0, 3.0], [-2.0, 0.0]])
    # distance 2 - 2 cos: d01 = 1, d02 = 2, d03 = 4, d12 = 2 - sqrt(3), d13 = 3, d23 = 2
    # anchor 1: 1 - 0.267949 + 0.3; anchor 2: 2 - 0.267949 + 0.3; anchors 0 and 3 give 0
    expected = (1.032051 + 2.032051) / 4
    assert triplet_loss(vectors, IDS, margin=0.3, norm_feat=True).item() == pytest.approx(expected, abs=1e-5)
    # Scaling a feature changes nothing with norm_feat, but does without.
    scaled = vectors * torch.tensor([[5.0], [1.0], [1.0], [1.0]])
    assert triplet_loss(scaled, IDS, norm_feat=True).item() == pytest.approx(expected, abs=1e-5)
    assert triplet_loss(scaled, IDS).item() != pytest.approx(triplet_loss(vectors, IDS).item(), abs=1e-3)


def test_triplet_gradient_is_finite_for_duplicate_features():
    # Identical features give distance 0: the clamp keeps sqrt's gradient finite.
    features = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 1.0], [3.0, 1.0]], requires_grad=True)
    triplet_loss(features, IDS).backward()
    assert torch.isfinite(features.grad).all()


def test_center_loss_hand_computed_and_learnable():
    center_loss = CenterLoss(num_classes=3, feat_dim=2)
    assert center_loss.centers.shape == (3, 2) and center_loss.centers.requires_grad
    with torch.no_grad():
        center_loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    features = torch.tensor([[3.0, 4.0], [1.0, 2.0]])
    # ||(3, 4) - (0, 0)||^2 = 25, ||(1, 2) - (1, 1)||^2 = 1
    loss = center_loss(features, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(13.0)
    loss.backward()
    assert center_loss.centers.grad[2].abs().sum() == 0 and center_loss.centers.grad[0].abs().sum() > 0


def _every_loss(features: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The label-smoothed CE and each triplet variant of the same batch."""
    return {
        "ce": cross_entropy_label_smooth(logits, ids),
        "hard": triplet_loss(features, ids),
        "soft": triplet_loss(features, ids, margin=0.0),
        "weighted": triplet_loss(features, ids, hard_mining=False),
        "cosine": triplet_loss(features, ids, norm_feat=True),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_stay_float32_and_finite_under_autocast(dtype):
    torch.manual_seed(0)
    features = torch.randn(8, 16)
    logits = torch.randn(8, 5) * 4
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    reference = _every_loss(features, logits, ids)
    with torch.autocast("cpu", dtype=dtype):
        results = _every_loss(features.to(dtype), logits.to(dtype), ids)
    for name, value in results.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        # Only the input rounding differs from the float32 computation.
        assert value.item() == pytest.approx(reference[name].item(), rel=0.05, abs=0.02), name
