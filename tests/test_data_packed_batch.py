"""collate_packed / unpack_integer_fields: the training batch's integer fields cross from the
loader workers in one tensor and come back equal to default_collate's, as views of it."""
from __future__ import annotations

import pytest
import torch
from conftest import fit_tiny_bot
from torch.utils.data import DataLoader, default_collate

from reid_lightning.data.batch_normalize import BatchNormalizer
from reid_lightning.data.packed_batch import (
    LAYOUT,
    PACKED,
    collate_packed,
    unpack_integer_fields,
)


def _sample(index: int) -> dict:
    generator = torch.Generator().manual_seed(index)
    return {
        "images": torch.randint(0, 256, (3, 8, 4), dtype=torch.uint8, generator=generator),
        "erase_box": torch.tensor([index % 3, 1, 2 + index, 1]),
        "targets": 10 + index,
        "camids": index % 2,
    }


SAMPLES = [_sample(i) for i in range(5)]


def test_the_fields_unpack_to_what_default_collate_gives() -> None:
    packed = collate_packed(SAMPLES)
    assert set(packed) == {"images", PACKED, LAYOUT}
    assert packed[PACKED].shape == (6, 5) and packed[PACKED].is_contiguous()
    assert packed[LAYOUT] == (("erase_box", 4), ("targets", 0), ("camids", 0))
    expected, unpacked = default_collate(SAMPLES), unpack_integer_fields(packed)
    assert list(unpacked) == list(expected)
    for key, value in expected.items():
        assert unpacked[key].dtype == value.dtype and torch.equal(unpacked[key], value), key
    storage = packed[PACKED].untyped_storage().data_ptr()
    assert all(unpacked[key].untyped_storage().data_ptr() == storage for key in ("erase_box", "targets", "camids"))
    assert unpacked["targets"].is_contiguous() and unpacked["camids"].is_contiguous()


def test_a_batch_with_fewer_than_two_integer_fields_is_default_collate() -> None:
    samples = [{"images": s["images"], "targets": s["targets"], "weight": 0.5} for s in SAMPLES]
    batch = collate_packed(samples)
    assert set(batch) == {"images", "targets", "weight"} and torch.equal(batch["targets"], torch.arange(10, 15))


@pytest.mark.parametrize("batch", [{"images": torch.zeros(2, 3, 4, 4)}, [torch.zeros(2)], "text"])
def test_other_batches_pass_through(batch) -> None:
    assert unpack_integer_fields(batch) is batch


def test_two_tensors_cross_from_a_worker_and_normalise_like_the_default_batch() -> None:
    torch.set_num_threads(1)
    loader = DataLoader(SAMPLES, batch_size=5, num_workers=1, collate_fn=collate_packed)
    (batch,) = list(loader)
    assert [key for key, value in batch.items() if torch.is_tensor(value)] == ["images", PACKED]
    normalize = BatchNormalizer()
    normalised, expected = normalize(batch), normalize(default_collate(SAMPLES))
    assert list(normalised) == list(expected) == ["images", "targets", "camids"]
    for key in expected:
        assert torch.equal(normalised[key], expected[key]), key


def _trained_weights(demo_root, on_device: bool) -> dict[str, torch.Tensor]:
    """BoT R18 weights after 3 training steps of the Lightning fit, from one loader worker."""
    _, module = fit_tiny_bot(demo_root, 3, workers=1, overrides=[f"data.normalize_on_device={str(on_device).lower()}"])
    return module.model.state_dict()


def test_training_on_packed_uint8_batches_gives_the_same_weights(demo_root) -> None:
    torch.set_num_threads(1)
    packed, per_image = _trained_weights(demo_root, True), _trained_weights(demo_root, False)
    for key, value in per_image.items():
        assert torch.equal(packed[key], value), key
