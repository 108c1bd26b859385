"""SharedImageCache: one copy of the decoded training images, filled and read by every loader worker."""
from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reid_lightning.data.image_cache import SharedImageCache
from reid_lightning.data.image_dataset import ImageDataset
from reid_lightning.data.samples import Sample
from reid_lightning.data.transforms import build_train_transforms, split_deterministic

SHAPE = (3, 8, 4)


def image(value: int) -> torch.Tensor:
    return torch.full(SHAPE, value, dtype=torch.uint8)


def test_get_returns_what_put_stored_and_none_before() -> None:
    cache = SharedImageCache(3, SHAPE)
    assert cache.get(1) is None and len(cache) == 0
    cache.put(1, image(7))
    assert torch.equal(cache.get(1), image(7)) and cache.get(0) is None and len(cache) == 1


def test_bad_shapes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="positive count and shape"):
        SharedImageCache(0, SHAPE)
    with pytest.raises(ValueError, match="positive count and shape"):
        SharedImageCache(2, (3, 0, 4))
    cache = SharedImageCache(2, SHAPE)
    with pytest.raises(ValueError, match=r"shape \(3, 8, 4\); got torch.uint8 \(3, 4, 8\) for image 0"):
        cache.put(0, torch.zeros(3, 4, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="got torch.float32"):
        cache.put(0, torch.zeros(SHAPE))


def _store(cache: SharedImageCache, index: int, value: int) -> None:
    torch.set_num_threads(1)  # as a loader worker: a forked child must not enter the parent's OpenMP pool
    cache.put(index, image(value))


def test_a_forked_process_fills_the_parents_cache() -> None:
    cache = SharedImageCache(4, SHAPE)
    child = multiprocessing.get_context("fork").Process(target=_store, args=(cache, 2, 9))
    child.start()
    child.join(60)
    child.kill()
    assert child.exitcode == 0
    assert torch.equal(cache.get(2), image(9)) and len(cache) == 1


def test_a_pickled_cache_is_an_empty_one_of_the_same_shape() -> None:
    cache = SharedImageCache(4, SHAPE)
    cache.put(0, image(1))
    copy = pickle.loads(pickle.dumps(cache))
    assert (copy.count, copy.shape, len(copy)) == (4, SHAPE, 0)
    copy.put(1, image(2))
    assert cache.get(1) is None


@pytest.fixture
def samples(tmp_path) -> list[Sample]:
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(paths[-1])
    return [Sample(path, pid=i, camid=0) for i, path in enumerate(paths)]


def test_loader_workers_fill_one_cache_that_later_passes_read(samples) -> None:
    transform = build_train_transforms((32, 16), padding=3, normalize=False)
    prepare = split_deterministic(transform)[0]
    cache = SharedImageCache(len(samples), (3, 32, 16))
    dataset = ImageDataset(samples, transform, cache=cache)
    plain = ImageDataset(samples, transform)
    keys = [(i, 10 + i) for i in range(len(samples))]
    loader = DataLoader(dataset, batch_size=2, sampler=keys, num_workers=2, multiprocessing_context="fork")
    first = list(loader)
    assert len(cache) == len(samples)  # stored by the workers, seen here
    for i, sample in enumerate(samples):
        assert torch.equal(cache.get(i), prepare(Image.open(sample.path).convert("RGB")))
    second = list(loader)  # from the cache: the same items as without one
    reference = list(DataLoader(plain, batch_size=2, sampler=keys))
    for a, b, c in zip(first, second, reference):
        assert torch.equal(a["images"], c["images"]) and torch.equal(b["images"], c["images"])
        assert torch.equal(a["erase_box"], c["erase_box"])


def test_a_cache_that_does_not_fit_the_dataset_is_refused(samples) -> None:
    transform = build_train_transforms((32, 16))
    with pytest.raises(ValueError, match="the image cache has 2 slots for 6 samples"):
        ImageDataset(samples, transform, cache=SharedImageCache(2, (3, 32, 16)))
    dataset = ImageDataset(samples, transform, cache=SharedImageCache(6, (3, 16, 16)))
    with pytest.raises(ValueError, match=r"shape \(3, 16, 16\); got torch.uint8 \(3, 32, 16\) for image 0"):
        dataset[0]


def test_memory_limit_is_the_lower_of_the_machine_and_its_control_group(tmp_path, monkeypatch) -> None:
    import os

    from reid_lightning.data import image_cache

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    unlimited, limited = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    unlimited.write_text("max\n")
    limited.write_text(f"{2**30}\n")
    monkeypatch.setattr(image_cache, "_CGROUP_LIMITS", (str(unlimited), str(tmp_path / "absent")))
    assert image_cache.memory_limit_bytes() == physical
    monkeypatch.setattr(image_cache, "_CGROUP_LIMITS", (str(unlimited), str(limited)))
    assert image_cache.memory_limit_bytes() == min(physical, 2**30)
