"""Train/test transforms: shapes, bicubic resize, flip, padding, erasing with the ImageNet mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reid_lightning.data import build_test_transforms, build_train_transforms
from reid_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SIZE = (32, 16)
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def gradient_image(height: int = 50, width: int = 23) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def normalised(image: Image.Image) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (array - MEAN) / STD


def test_output_shape_and_dtype() -> None:
    torch.manual_seed(0)
    for transform in (build_train_transforms(SIZE), build_test_transforms(SIZE)):
        out = transform(gradient_image())
        assert out.shape == (3, *SIZE) and out.dtype == torch.float32


def test_test_transform_is_bicubic_resize_then_imagenet_normalisation() -> None:
    image = gradient_image()
    expected = normalised(image.resize((SIZE[1], SIZE[0]), Image.Resampling.BICUBIC))
    bilinear = normalised(image.resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR))
    out = build_test_transforms(SIZE)(image)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, bilinear, atol=1e-3)


def test_train_without_augmentation_equals_test() -> None:
    image = gradient_image()
    plain = build_train_transforms(SIZE, flip_prob=0, padding=0, erasing_prob=0)
    assert torch.equal(plain(image), build_test_transforms(SIZE)(image))


def test_flip_with_probability_one() -> None:
    image = gradient_image()
    flipped = build_train_transforms(SIZE, flip_prob=1.0, padding=0, erasing_prob=0)(image)
    assert torch.allclose(flipped, build_test_transforms(SIZE)(image).flip(-1))


def test_padding_is_black_before_normalisation() -> None:
    white = Image.new("RGB", (SIZE[1], SIZE[0]), (255, 255, 255))
    transform = build_train_transforms(SIZE, flip_prob=0, padding=10, erasing_prob=0)
    torch.manual_seed(0)
    outputs = torch.stack([transform(white) for _ in range(20)])
    black = (-MEAN / STD).view(1, 3, 1, 1)
    is_black = torch.isclose(outputs, black.expand_as(outputs), atol=1e-5).all(dim=1)
    assert is_black.any() and not is_black.all()


def test_erasing_fills_zero_after_normalisation_which_is_the_imagenet_mean() -> None:
    white = Image.new("RGB", (SIZE[1], SIZE[0]), (255, 255, 255))
    torch.manual_seed(0)
    out = build_train_transforms(SIZE, flip_prob=0, padding=0, erasing_prob=1.0)(white)
    erased = (out == 0).all(dim=0)
    assert 0 < erased.sum() < SIZE[0] * SIZE[1]
    pixel = out[:, erased][:, 0:1].view(3, 1, 1)
    assert torch.allclose(pixel * STD + MEAN, MEAN)  # de-normalised: the ImageNet mean colour
    assert torch.allclose(out[:, ~erased], ((1 - MEAN) / STD).expand(3, *SIZE)[:, ~erased])


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="flip_prob=1.5"):
        build_train_transforms(SIZE, flip_prob=1.5)
    with pytest.raises(ValueError, match="padding=-1"):
        build_train_transforms(SIZE, padding=-1)


def test_cached_dataset_items_equal_uncached_ones(tmp_path) -> None:
    from reid_lightning.data.image_cache import SharedImageCache
    from reid_lightning.data.image_dataset import ImageDataset
    from reid_lightning.data.samples import Sample
    from reid_lightning.data.transforms import split_deterministic

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(paths[-1])
    samples = [Sample(path, pid=i, camid=0) for i, path in enumerate(paths)]
    transform = build_train_transforms((32, 16), padding=3)
    prepare = split_deterministic(transform)[0]
    assert [type(s).__name__ for s in prepare.transforms] == ["Resize", "ToImage"]
    cache = SharedImageCache(3, (3, 32, 16))
    plain, cached = ImageDataset(samples, transform), ImageDataset(samples, transform, cache=cache)
    for epoch in range(3):  # the first epoch fills the cache, the later ones read it
        for i in range(3):
            a, b = plain[(i, 100 * epoch + i)], cached[(i, 100 * epoch + i)]
            assert torch.equal(a["images"], b["images"]) and a["targets"] == b["targets"]
    assert len(cache) == 3 and torch.equal(cache.get(0), prepare(Image.open(paths[0]).convert("RGB")))
    assert plain.cache is None
