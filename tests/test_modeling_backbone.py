"""ResNet backbones, IBN, stem max-pool and pooling: shapes, stride placement, torchvision key compatibility."""

import pytest
import torch
import torchvision
from torch import nn

from reid_lightning.modeling import (
    GeneralizedMeanPooling,
    GlobalAvgPool,
    GlobalMaxPool,
    build_pooling,
    build_resnet,
)
from reid_lightning.modeling.backbones import IBN, build_stem_pool


@pytest.fixture(scope="module")
def resnet50_v15() -> nn.Module:
    return build_resnet(50, last_stride=2).eval()


@pytest.fixture(scope="module")
def resnet50_v1() -> nn.Module:
    return build_resnet(50, last_stride=2, stride_in_1x1=True).eval()


@pytest.mark.parametrize(("depth", "channels"), [(18, 512), (34, 512), (50, 2048), (101, 2048)])
def test_output_shape_per_depth(depth, channels):
    model = build_resnet(depth, last_stride=1).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 32)).shape == (2, channels, 4, 2)


@pytest.mark.parametrize(("depth", "channels"), [(18, 512), (50, 2048)])
def test_last_stride_2_halves_the_map(depth, channels):
    model = build_resnet(depth, last_stride=2).eval()
    assert model.layer4[0].downsample[0].stride == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 32)).shape == (2, channels, 2, 1)


def test_last_stride_1_keeps_layer4_at_stride_1():
    model = build_resnet(18, last_stride=1)
    assert model.layer4[0].conv1.stride == (1, 1)
    assert model.layer4[0].downsample[0].stride == (1, 1)


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4"])
def test_stride_in_1x1_moves_the_stride_to_conv1(layer, resnet50_v15, resnet50_v1):
    v15 = getattr(resnet50_v15, layer)[0]
    v1 = getattr(resnet50_v1, layer)[0]
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))
    assert (v1.conv1.stride, v1.conv2.stride) == ((2, 2), (1, 1))
    assert v1.downsample[0].stride == (2, 2)
    # Only the first (downsampling) block has a stride.
    assert getattr(resnet50_v1, layer)[1].conv1.stride == (1, 1)
    assert getattr(resnet50_v1, layer)[1].conv2.stride == (1, 1)


def test_stride_in_1x1_keeps_output_shape(resnet50_v1):
    with torch.no_grad():
        assert resnet50_v1(torch.randn(1, 3, 64, 32)).shape == (1, 2048, 2, 1)


@pytest.mark.parametrize("depth", [18, 50])
def test_ibn_in_layer1_to_3_only(depth):
    model = build_resnet(depth, with_ibn=True)
    for name in ("layer1", "layer2", "layer3"):
        for block in getattr(model, name):
            assert isinstance(block.bn1, IBN), name
            assert isinstance(block.bn2, nn.BatchNorm2d)
    for block in model.layer4:
        assert isinstance(block.bn1, nn.BatchNorm2d) and not isinstance(block.bn1, IBN)
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert not any(isinstance(m, IBN) for m in build_resnet(depth).modules())


def test_ibn_model_runs_and_has_ibn_net_key_names():
    model = build_resnet(50, with_ibn=True).eval()
    assert "layer1.0.bn1.IN.weight" in model.state_dict()
    assert "layer1.0.bn1.BN.running_mean" in model.state_dict()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 32)).shape == (2, 2048, 4, 2)


def test_ibn_normalises_half_the_channels_per_instance():
    ibn = IBN(8).train()
    x = torch.randn(4, 8, 6, 5) * 3 + 2
    out = ibn(x)
    assert out.shape == x.shape
    inst = out[:, :4]
    torch.testing.assert_close(inst.mean(dim=(2, 3)), torch.zeros(4, 4), atol=1e-5, rtol=0)
    batch = out[:, 4:]
    torch.testing.assert_close(batch.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    # Batch-normalised channels are not normalised per instance.
    assert batch.mean(dim=(2, 3)).abs().max() > 1e-3


@pytest.mark.parametrize(("depth", "factory"), [(18, torchvision.models.resnet18), (50, torchvision.models.resnet50)])
def test_torchvision_state_dict_loads_strictly(depth, factory):
    reference = factory()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    ours = build_resnet(depth, last_stride=2)  # torchvision's layer4 has stride 2
    ours.load_state_dict(state, strict=True)
    trunk = nn.Sequential(*list(reference.children())[:-2]).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), trunk(x))


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="depth"):
        build_resnet(42)
    with pytest.raises(ValueError, match="last_stride"):
        build_resnet(50, last_stride=3)
    with pytest.raises(ValueError, match="stride_in_1x1"):
        build_resnet(18, stride_in_1x1=True)


def test_pooling_outputs_and_values():
    x = torch.rand(3, 5, 4, 2) + 0.1
    torch.testing.assert_close(GlobalAvgPool()(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(GlobalMaxPool()(x), x.flatten(2).max(dim=2).values)
    gem = GeneralizedMeanPooling(p=3.0)
    torch.testing.assert_close(gem(x), x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    torch.testing.assert_close(GeneralizedMeanPooling(p=1.0)(x), x.mean(dim=(2, 3)))
    assert not any(p.requires_grad for p in gem.parameters())
    # GeM lies between average and max pooling.
    assert (gem(x) >= GlobalAvgPool()(x) - 1e-6).all() and (gem(x) <= GlobalMaxPool()(x) + 1e-6).all()


def test_learnable_gem_trains_p():
    gem = build_pooling("gem_learnable")
    assert [name for name, _ in gem.named_parameters()] == ["p"]
    gem(torch.rand(2, 3, 4, 4) + 0.1).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0


def test_build_pooling_names():
    assert isinstance(build_pooling("avg"), GlobalAvgPool)
    assert isinstance(build_pooling("max"), GlobalMaxPool)
    assert isinstance(build_pooling("gem"), GeneralizedMeanPooling)
    with pytest.raises(ValueError, match="'mean'"):
        build_pooling("mean")


def test_stem_pools_are_fastreids_and_torchvisions():
    fastreid = build_resnet(18, stem_pool="fastreid").maxpool
    assert (fastreid.kernel_size, fastreid.stride, fastreid.padding, fastreid.ceil_mode) == (3, 2, 0, True)
    tv_pool = build_resnet(18).maxpool
    assert (tv_pool.kernel_size, tv_pool.stride, tv_pool.padding, tv_pool.ceil_mode) == (3, 2, 1, False)


def test_stem_pools_shift_the_windows_by_one_pixel():
    x = torch.arange(36.0).view(1, 1, 6, 6)  # increasing along rows and columns: each window's max is its last pixel
    # torchvision: windows at rows/cols -1..1, 1..3, 3..5; fast-reid: 0..2, 2..4, 4..5 (cut short by ceil_mode)
    torch.testing.assert_close(build_stem_pool("torchvision")(x)[0, 0], x[0, 0, 1::2, 1::2])
    torch.testing.assert_close(build_stem_pool("fastreid")(x)[0, 0], x[0, 0, [2, 4, 5]][:, [2, 4, 5]])


def test_stem_pools_give_other_features_and_other_sizes_for_odd_inputs():
    fastreid = build_resnet(18, stem_pool="fastreid").eval()
    torchvision_model = build_resnet(18).eval()
    torchvision_model.load_state_dict(fastreid.state_dict())  # same weights, only the pool differs
    with torch.no_grad():
        even = torch.randn(2, 3, 64, 32)
        a, b = fastreid(even), torchvision_model(even)
        assert a.shape == b.shape == (2, 512, 4, 2)
        assert not torch.allclose(a, b)
        stem = fastreid.relu(fastreid.bn1(fastreid.conv1(torch.randn(1, 3, 102, 38))))  # stem map 51x19
        assert build_stem_pool("fastreid")(stem).shape[-2:] == (25, 9)
        assert build_stem_pool("torchvision")(stem).shape[-2:] == (26, 10)


def test_unknown_stem_pool_is_named():
    with pytest.raises(ValueError, match=r"stem_pool must be one of \['fastreid', 'torchvision'\], got 'caffe'"):
        build_resnet(18, stem_pool="caffe")
