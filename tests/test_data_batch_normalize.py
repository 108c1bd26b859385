"""uint8 batches normalised on the device (data.normalize_on_device): the same images as the
per-image float pipeline, bit for bit, through the transforms, the datamodule and the module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from reid_lightning.data.batch_normalize import BatchNormalizer, erase_boxes
from reid_lightning.data.packed_batch import pack_integer_fields
from reid_lightning.data.transforms import (
    RandomErasingBox,
    build_test_transforms,
    build_train_transforms,
)

SIZE = (48, 24)


def _images(count: int = 24) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (60 + i, 30, 3), dtype=np.uint8)) for i in range(count)]


def _per_image(transform, images: list[Image.Image], seed: int = 0) -> list:
    outputs = []
    for index, image in enumerate(images):
        torch.manual_seed(seed + index)
        outputs.append(transform(image))
    return outputs


@pytest.mark.parametrize("erasing_prob", [0.0, 0.5, 1.0])
def test_train_batch_equals_the_float_pipeline(erasing_prob: float) -> None:
    images = _images()
    kwargs = {"size": SIZE, "flip_prob": 0.5, "padding": 4, "erasing_prob": erasing_prob}
    expected = torch.stack(_per_image(build_train_transforms(**kwargs), images))
    items = _per_image(build_train_transforms(**kwargs, normalize=False), images)
    batch = default_collate([item if isinstance(item, dict) else {"images": item} for item in items])
    assert batch["images"].dtype == torch.uint8
    out = BatchNormalizer()(batch)
    assert out["images"].dtype == torch.float32 and "erase_box" not in out
    assert torch.equal(out["images"], expected)
    if erasing_prob > 0:  # rectangles were drawn and erased, not a vacuous match
        erased = (batch["erase_box"][:, 2] > 0).sum().item()
        assert erased >= (len(images) if erasing_prob == 1.0 else 4)
        assert (expected == 0).flatten(1).all(0).sum() == 0  # no pixel is 0 in every image
        assert all((expected[i] == 0).all(0).sum() >= b[2] * b[3] for i, b in enumerate(batch["erase_box"].tolist()))


def test_test_batch_equals_the_float_pipeline() -> None:
    images = _images(6)
    expected = torch.stack([build_test_transforms(SIZE)(image) for image in images])
    uint8 = torch.stack([build_test_transforms(SIZE, normalize=False)(image) for image in images])
    assert uint8.dtype == torch.uint8
    assert torch.equal(BatchNormalizer()({"images": uint8})["images"], expected)


def test_erasing_box_draws_the_random_numbers_of_random_erasing() -> None:
    image = torch.zeros(3, *SIZE, dtype=torch.uint8)
    for seed in range(20):
        torch.manual_seed(seed)
        erased = v2.RandomErasing(p=0.5, value=0)(image + 1)
        after_erasing = torch.rand(1)
        torch.manual_seed(seed)
        top, left, height, width = RandomErasingBox(p=0.5)(image)["erase_box"].tolist()
        assert torch.equal(torch.rand(1), after_erasing)
        zeros = (erased == 0).all(0)
        assert zeros.sum() == height * width and zeros[top:top + height, left:left + width].all()


def test_no_fitting_rectangle_erases_nothing() -> None:
    image = torch.full((3, *SIZE), 7, dtype=torch.uint8)
    torch.manual_seed(0)
    assert torch.equal(v2.RandomErasing(p=1.0, scale=(0.99, 1.0), ratio=(10.0, 20.0))(image), image)
    torch.manual_seed(0)
    assert RandomErasingBox(p=1.0, scale=(0.99, 1.0), ratio=(10.0, 20.0))(image)["erase_box"].tolist() == [0, 0, 0, 0]


def test_erase_boxes_fills_exactly_the_rectangles() -> None:
    images = torch.ones(3, 2, 6, 5)
    boxes = torch.tensor([[1, 2, 3, 2], [0, 0, 0, 0], [5, 4, 1, 1]])
    out = erase_boxes(images, boxes)
    expected = images.clone()
    expected[0, :, 1:4, 2:4] = 0
    expected[2, :, 5:6, 4:5] = 0
    assert torch.equal(out, expected) and torch.equal(images, torch.ones(3, 2, 6, 5))


def test_float_and_foreign_batches_pass_unchanged() -> None:
    normalize = BatchNormalizer()
    floats = {"images": torch.rand(2, 3, 4, 4), "erase_box": torch.zeros(2, 4, dtype=torch.int64)}
    assert normalize(floats) is floats
    for other in ([torch.zeros(2, dtype=torch.uint8)], {"targets": torch.zeros(2)}, None):
        assert normalize(other) is other


def test_a_zero_std_is_refused() -> None:
    with pytest.raises(ValueError, match="divide by zero"):
        BatchNormalizer(std=(0.2, 0.0, 0.2))


def _erasing_batch(device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, *SIZE), dtype=torch.uint8, generator=generator)
    boxes = torch.tensor([[0, 0, 5, 6], [0, 0, 0, 0], [10, 3, 20, 9], [47, 23, 1, 1]])
    return {"images": images.to(device), "erase_box": boxes.to(device), "targets": torch.arange(4, device=device)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("packed", [False, True])
def test_normalising_on_cuda_never_waits_for_the_gpu(packed: bool) -> None:
    normalize = BatchNormalizer()
    batch = pack_integer_fields(_erasing_batch("cuda")) if packed else _erasing_batch("cuda")
    normalize(batch)  # the first batch brings the mean and std to the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = normalize(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(out["images"].cpu(), normalize(_erasing_batch("cpu"))["images"], atol=1e-6)
