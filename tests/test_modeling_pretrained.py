"""Backbone initial weights: files, URLs, the ImageNet downloads (torchvision, IBN-Net), random
init warnings, and the shared ImageNet ResNet-50."""

import logging
import re
import warnings
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from reid_lightning.modeling import (
    RandomInitWarning,
    build_bot,
    build_resnet,
    load_pretrained,
)
from reid_lightning.modeling.backbones.pretrained import IBN_A_URLS

SHARED = Path(__file__).resolve().parents[2] / "shared"
V1_WEIGHTS = SHARED / "weights" / "resnet50_imagenet_v1.pth"
MARKET = SHARED / "data" / "mini_market1501"
needs_weights = pytest.mark.skipif(not V1_WEIGHTS.is_file(), reason=f"{V1_WEIGHTS} is absent")


@pytest.fixture(scope="module")
def source18() -> nn.Module:
    torch.manual_seed(0)
    model = build_resnet(18)
    with torch.no_grad():  # non-trivial BN statistics, so that they are checked too
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model


def test_none_keeps_the_random_init(source18):
    model = build_resnet(18, pretrained="none")
    assert not torch.equal(model.conv1.weight, source18.conv1.weight)


def test_fp16_file_wrapped_and_prefixed_loads_as_float32(tmp_path, source18):
    half = {f"module.backbone.{k}": v.half() if v.is_floating_point() else v for k, v in source18.state_dict().items()}
    half["module.backbone.fc.weight"] = torch.zeros(1000, 512, dtype=torch.float16)
    path = tmp_path / "r18_fp16.pth"
    torch.save({"state_dict": half, "epoch": 3}, path)

    model = build_resnet(18, pretrained=str(path))
    for key, value in model.state_dict().items():
        original = source18.state_dict()[key]
        expected = original.half().float() if original.is_floating_point() else original
        assert value.dtype == original.dtype, key
        assert torch.equal(value, expected), key


def test_plain_and_model_wrapped_files_load(tmp_path, source18):
    for name, payload in (("plain", source18.state_dict()), ("wrapped", {"model": source18.state_dict()})):
        path = tmp_path / f"{name}.pth"
        torch.save(payload, path)
        model = build_resnet(18)
        load_pretrained(model, str(path))
        assert torch.equal(model.layer4[1].bn2.running_var, source18.layer4[1].bn2.running_var), name


def test_unexpected_keys_are_logged_and_bn_counters_may_be_absent(tmp_path, source18, caplog):
    state = {k: v for k, v in source18.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["head.bnneck.weight"] = torch.ones(512)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="reid_lightning.modeling.backbones.pretrained"):
        model = build_resnet(18, pretrained=str(path))
    assert "head.bnneck.weight" in caplog.text
    assert torch.equal(model.conv1.weight, source18.conv1.weight)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/resnet50.pth"):
        build_resnet(18, pretrained=str(missing))


def test_missing_tensor_is_named(tmp_path, source18):
    state = dict(source18.state_dict())
    del state["layer3.1.bn2.running_var"], state["layer4.0.conv1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="missing: layer3.1.bn2.running_var, layer4.0.conv1.weight"):
        build_resnet(18, pretrained=str(path))


def test_shape_mismatch_is_named(tmp_path, source18):
    state = dict(source18.state_dict())
    state["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"shape mismatch: layer2\.0\.conv2\.weight \(file \(128, 128, 1, 1\)"):
        build_resnet(18, pretrained=str(path))


@pytest.mark.parametrize(("held", "built"), [(50, 18), (18, 34), (34, 50)])
def test_weights_of_another_depth_name_the_depth_to_set(tmp_path, held, built):
    path = tmp_path / f"resnet{held}.pth"
    torch.save(build_resnet(held).state_dict(), path)
    with pytest.raises(RuntimeError, match=rf"the file holds a ResNet-{held}, the model is a ResNet-{built}: set model.depth={held}"):
        build_resnet(built, pretrained=str(path))


@pytest.mark.parametrize("ibn_held", [True, False])
def test_weights_with_or_without_ibn_name_the_setting(tmp_path, ibn_held):
    path = tmp_path / "backbone.pth"
    torch.save(build_resnet(18, with_ibn=ibn_held).state_dict(), path)
    with pytest.raises(RuntimeError, match=f"set model.with_ibn={str(ibn_held).lower()}"):
        build_resnet(18, with_ibn=not ibn_held, pretrained=str(path))


def test_fp16_overflowed_running_statistics_are_clamped_with_a_warning(tmp_path, source18, caplog):
    half = {k: v.half() if v.is_floating_point() else v for k, v in source18.state_dict().items()}
    half["bn1.running_var"][5] = float("inf")
    half["layer2.0.bn1.running_mean"][0] = float("-inf")
    path = tmp_path / "overflow.pth"
    torch.save(half, path)
    with caplog.at_level(logging.WARNING, logger="reid_lightning.modeling.backbones.pretrained"):
        model = build_resnet(18, pretrained=str(path))
    assert "bn1.running_var" in caplog.text and "layer2.0.bn1.running_mean" in caplog.text
    assert model.bn1.running_var[5].item() == 65504.0
    assert model.layer2[0].bn1.running_mean[0].item() == -65504.0
    assert torch.equal(model.bn1.running_var[:5], half["bn1.running_var"][:5].float())


@pytest.mark.parametrize(
    ("key", "value"),
    [("layer3.0.conv1.weight", float("nan")), ("layer1.1.bn2.bias", float("inf")), ("bn1.running_var", float("nan"))],
)
def test_non_finite_weights_are_refused_by_name(tmp_path, source18, key, value):
    state = {k: v.clone() for k, v in source18.state_dict().items()}
    state[key].view(-1)[0] = value
    state["fc.weight"] = torch.full((1000, 512), float("nan"))  # dropped, so never a reason to refuse
    path = tmp_path / "non_finite.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=rf"non-finite values in {re.escape(key)}$"):
        build_resnet(18, pretrained=str(path))


def test_imagenet_downloads_torchvision_weights(monkeypatch, source18):
    requested = []
    reference = torchvision.models.resnet18()
    reference.load_state_dict(source18.state_dict(), strict=False)

    def fake_download(url, **kwargs):
        requested.append(url)
        return reference.state_dict()  # includes fc.*, which must be dropped

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = build_resnet(18, pretrained="imagenet")
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(model.layer1[0].conv1.weight, source18.layer1[0].conv1.weight)


def test_imagenet_offline_error_says_how_to_pass_a_file(monkeypatch):
    def offline(url, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="failed") as info:
        build_resnet(50, pretrained="imagenet")
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    assert url in str(info.value) and f"model.pretrained=/path/to/{url.rsplit('/', 1)[-1]}" in str(info.value)
    assert isinstance(info.value.__cause__, URLError)


def test_imagenet_refuses_v1_strides():
    with pytest.raises(ValueError, match="stride_in_1x1"):
        build_resnet(50, stride_in_1x1=True, pretrained="imagenet")


def test_imagenet_ibn_downloads_ibn_nets_release(monkeypatch):
    source = build_resnet(18, with_ibn=True)
    requested = []

    def fake_download(url, **kwargs):
        requested.append(url)
        return {"module." + k: v for k, v in source.state_dict().items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = build_resnet(18, with_ibn=True, pretrained="imagenet")
    assert requested == ["https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet18_ibn_a-2f571257.pth"]
    assert torch.equal(model.layer1[0].bn1.IN.weight, source.layer1[0].bn1.IN.weight)


def test_imagenet_ibn_offline_error_names_the_url_and_the_local_file_option(monkeypatch):
    def offline(url, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as info:
        build_resnet(50, with_ibn=True, pretrained="imagenet")
    message = str(info.value)
    assert IBN_A_URLS[50] in message and "Temporary failure in name resolution" in message
    assert "model.pretrained=/path/to/resnet50_ibn_a-d9d0bb7b.pth" in message


def test_ibn_weights_load_from_a_local_file(tmp_path):
    source = build_resnet(18, with_ibn=True)
    with torch.no_grad():
        source.layer2[1].bn1.IN.weight.uniform_(-1, 1)
    path = tmp_path / "resnet18_ibn_a.pth"
    torch.save(source.state_dict(), path)
    model = build_resnet(18, with_ibn=True, pretrained=str(path))
    assert torch.equal(model.layer2[1].bn1.IN.weight, source.layer2[1].bn1.IN.weight)


def test_url_weights_go_through_the_hub_cache(monkeypatch, source18):
    requested = []

    def fake_download(url, **kwargs):
        requested.append((url, kwargs.get("weights_only")))
        return {"state_dict": source18.state_dict()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = build_resnet(18, pretrained="https://example.org/w/r18.pth")
    assert requested == [("https://example.org/w/r18.pth", True)]
    assert torch.equal(model.layer3[0].bn1.running_var, source18.layer3[0].bn1.running_var)


@pytest.mark.parametrize("depth", [50, 101])
def test_deep_backbone_from_random_weights_warns(depth):
    with pytest.warns(RandomInitWarning, match=f"ResNet-{depth} backbone starts from RANDOM weights"):
        build_resnet(depth, pretrained="none")
    with pytest.warns(RandomInitWarning, match="RANDOM"):
        build_bot(num_classes=3, depth=depth, with_ibn=True, pretrained="none")


def test_shallow_or_initialised_backbones_do_not_warn(tmp_path):
    path = tmp_path / "r50.pth"
    with pytest.warns(RandomInitWarning):
        torch.save(build_resnet(50).state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        build_resnet(18, pretrained="none")
        build_resnet(50, pretrained=str(path))
        build_bot(num_classes=3, depth=50, pretrained=str(path))


@needs_weights
def test_shared_weights_equal_the_file_cast_to_float32():
    state = torch.load(V1_WEIGHTS, map_location="cpu", weights_only=True)
    assert state["conv1.weight"].dtype == torch.float16
    model = build_resnet(50, last_stride=2, stride_in_1x1=True, pretrained=str(V1_WEIGHTS))
    assert model.conv1.weight.dtype == torch.float32
    assert torch.equal(model.conv1.weight.detach(), state["conv1.weight"].float())
    assert torch.equal(model.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"].float())


@needs_weights
def test_shared_weights_stem_variance_is_finite_float32_beyond_float16s_range():
    # the file's BatchNorm tensors are float32: the stem's variance exceeds float16's 65504,
    # which the earlier float16 file stored as inf (the clamp above repairs such files)
    state = torch.load(V1_WEIGHTS, map_location="cpu", weights_only=True)
    assert state["bn1.running_var"].dtype == torch.float32
    assert torch.isfinite(state["bn1.running_var"]).all() and state["bn1.running_var"].max() > 65504
    model = build_resnet(50, stride_in_1x1=True, pretrained=str(V1_WEIGHTS))
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])


def _bn_input_mismatch(model: nn.Module, images: torch.Tensor) -> float:
    """Mean over the BN layers of layer2..4 of the median |log(batch var / running var)| per channel.

    A network fed natural images in the layout its weights were trained with sees
    activations whose per-channel variance matches the BN running variance it
    learnt; wiring the weights differently (e.g. another stride placement) shifts it.
    """
    mismatches = []

    def record(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        variance = inputs[0].double().var(dim=(0, 2, 3))
        ratio = variance / (module.running_var.double() + module.eps)
        mismatches.append(ratio.log().abs().median().item())

    hooks = [
        module.register_forward_hook(record)
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d) and name.split(".")[0] in ("layer2", "layer3", "layer4")
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return sum(mismatches) / len(mismatches)


@needs_weights
@pytest.mark.skipif(not MARKET.is_dir(), reason=f"{MARKET} is absent")
def test_shared_weights_fit_real_photos_only_with_v1_strides():
    paths = sorted(MARKET.glob("*/*.jpg"))[::3]
    assert len(paths) >= 24
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images = torch.stack(
        [(TF.to_tensor(Image.open(p).convert("RGB").resize((128, 256), Image.BICUBIC)) - mean) / std for p in paths]
    )
    v1 = build_resnet(50, last_stride=2, stride_in_1x1=True, pretrained=str(V1_WEIGHTS)).eval()
    v15 = build_resnet(50, last_stride=2, stride_in_1x1=False, pretrained=str(V1_WEIGHTS)).eval()

    v1_mismatch = _bn_input_mismatch(v1, images)
    v15_mismatch = _bn_input_mismatch(v15, images)
    assert v1_mismatch < 0.32, v1_mismatch
    assert v15_mismatch > 1.4 * v1_mismatch, (v1_mismatch, v15_mismatch)

    with torch.no_grad():
        features = v1(images).mean(dim=(2, 3))
    assert features.shape == (len(paths), 2048)
    assert torch.isfinite(features).all() and (features >= 0).all()
    assert 0.2 < features.mean().item() < 2.0
