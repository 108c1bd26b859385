"""BNNeck head and the BoT Baseline: outputs per mode, frozen BN bias, classifier init, losses."""

import pytest
import torch
from torch import nn

from reid_lightning.modeling import (
    Baseline,
    BNNeckHead,
    GeneralizedMeanPooling,
    build_bot,
    cross_entropy_label_smooth,
    triplet_loss,
)


def test_train_forward_returns_logits_and_pre_bn_features():
    head = BNNeckHead(16, num_classes=5).train()
    feature_map = torch.randn(4, 16, 4, 2)
    out = head(feature_map)
    assert set(out) == {"cls_logits", "features"}
    assert out["cls_logits"].shape == (4, 5)
    torch.testing.assert_close(out["features"], feature_map.mean(dim=(2, 3)))
    # Logits come from the post-BN feature through the bias-free classifier.
    bn = nn.functional.batch_norm(out["features"], None, None, training=True)
    torch.testing.assert_close(out["cls_logits"], bn @ head.classifier.weight.t(), atol=1e-5, rtol=1e-5)


def test_eval_forward_returns_post_bn_feature_or_pre_bn_with_neck_feat_before():
    feature_map = torch.randn(4, 16, 4, 2)
    head = BNNeckHead(16, num_classes=5)
    with torch.no_grad():
        head.bnneck.running_mean.fill_(0.5)
        head.bnneck.running_var.fill_(4.0)
    head.eval()
    pooled = feature_map.mean(dim=(2, 3))
    torch.testing.assert_close(head(feature_map), (pooled - 0.5) / (4.0 + head.bnneck.eps) ** 0.5)
    head.neck_feat = "before"
    torch.testing.assert_close(head(feature_map), pooled)
    with pytest.raises(ValueError, match="neck_feat"):
        BNNeckHead(16, 5, neck_feat="middle")


def test_bnneck_bias_frozen_and_unchanged_by_adam_weight_decay():
    head = BNNeckHead(8, num_classes=3)
    assert not head.bnneck.bias.requires_grad
    assert head.bnneck.weight.requires_grad
    assert torch.equal(head.bnneck.weight.detach(), torch.ones(8))
    assert torch.equal(head.bnneck.bias.detach(), torch.zeros(8))
    # Like BoT's solver: weight decay on every parameter the model lists, bias included.
    optimizer = torch.optim.Adam(head.parameters(), lr=0.1, weight_decay=5e-4)
    weight_before = head.bnneck.weight.detach().clone()
    for _ in range(2):
        out = head.train()(torch.randn(6, 8, 2, 2))
        loss = cross_entropy_label_smooth(out["cls_logits"], torch.tensor([0, 1, 2, 0, 1, 2]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert head.bnneck.bias.grad is None
    assert torch.equal(head.bnneck.bias.detach(), torch.zeros(8))
    assert not torch.equal(head.bnneck.weight.detach(), weight_before)


def test_classifier_is_bias_free_with_std_0_01():
    torch.manual_seed(0)
    head = BNNeckHead(2048, num_classes=751)
    assert head.classifier.bias is None
    assert head.classifier.weight.shape == (751, 2048)
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert head.classifier.weight.mean().abs().item() < 1e-3


def test_reset_classifier_changes_the_class_count():
    head = BNNeckHead(32, num_classes=4, cls_init_std=0.05)
    head.reset_classifier(7)
    assert head.num_classes == 7 and head.classifier.weight.shape == (7, 32)
    assert head.classifier.weight.std().item() == pytest.approx(0.05, rel=0.25)
    assert head.train()(torch.randn(2, 32, 2, 2))["cls_logits"].shape == (2, 7)


def test_head_pooling_is_configurable():
    head = BNNeckHead(16, num_classes=3, pooling="gem")
    assert isinstance(head.pool, GeneralizedMeanPooling)


@pytest.fixture
def bot18() -> Baseline:
    torch.manual_seed(0)
    return build_bot(num_classes=4, depth=18)


def test_bot_forward_per_mode(bot18):
    images = torch.randn(4, 3, 64, 32)
    out = bot18.train()(images)
    assert out["cls_logits"].shape == (4, 4) and out["features"].shape == (4, 512)
    assert bot18.forward_features(images).shape == (4, 512, 4, 2)
    with torch.no_grad():
        features = bot18.eval()(images)
    assert isinstance(features, torch.Tensor) and features.shape == (4, 512)


def test_bot_losses_are_the_scaled_loss_functions(bot18):
    targets = torch.tensor([0, 0, 1, 1])
    out = bot18.train()(torch.randn(4, 3, 64, 32))
    losses = bot18.losses(out, targets)
    assert set(losses) == {"loss_cls", "loss_triplet"}
    torch.testing.assert_close(losses["loss_cls"], cross_entropy_label_smooth(out["cls_logits"], targets, 0.1))
    torch.testing.assert_close(losses["loss_triplet"], triplet_loss(out["features"], targets, 0.3))

    scaled = Baseline(bot18.backbone, bot18.head, ce_scale=0.5, triplet_scale=2.0, triplet_margin=0.0)
    scaled_losses = scaled.losses(out, targets)
    torch.testing.assert_close(scaled_losses["loss_cls"], 0.5 * losses["loss_cls"])
    torch.testing.assert_close(scaled_losses["loss_triplet"], 2.0 * triplet_loss(out["features"], targets, 0.0))

    sum(losses.values()).backward()
    assert bot18.backbone.conv1.weight.grad.abs().sum() > 0
    assert bot18.head.classifier.weight.grad.abs().sum() > 0


def test_bot_center_loss_when_enabled():
    model = build_bot(num_classes=3, depth=18, center_loss_scale=0.0005)
    assert model.center_loss.centers.shape == (3, 512)
    out = model.train()(torch.randn(4, 3, 64, 32))
    losses = model.losses(out, torch.tensor([0, 0, 2, 2]))
    assert set(losses) == {"loss_cls", "loss_triplet", "loss_center"}
    expected = 0.0005 * model.center_loss(out["features"], torch.tensor([0, 0, 2, 2]))
    torch.testing.assert_close(losses["loss_center"], expected)
    assert build_bot(num_classes=3, depth=18).center_loss is None


def test_bot_losses_float32_under_bf16_autocast(bot18):
    targets = torch.tensor([0, 0, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bot18.train()(torch.randn(4, 3, 64, 32))
        losses = bot18.losses(out, targets)
    assert out["cls_logits"].dtype == torch.bfloat16
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
