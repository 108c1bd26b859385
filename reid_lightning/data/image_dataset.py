"""The torch Dataset over :class:`~reid_lightning.data.samples.Sample` lists, and an
opt-in scan for corrupt image files.

Corrupt images: :class:`ImageDataset` raises ``RuntimeError`` naming the file when
it fails to decode one (a training run stops at the first bad file it meets);
:func:`verify_images` checks every file up front and lists all bad ones
(``ReIDDataModule(verify_images=True)`` runs it at set-up).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from reid_lightning.data.image_cache import SharedImageCache
from reid_lightning.data.samples import Sample
from reid_lightning.data.seeded_sampler import torch_seeded
from reid_lightning.data.transforms import split_deterministic


def read_image(path: str) -> Image.Image:
    """Opens an image file as RGB.

    Args:
        path: image file path.

    Returns:
        The decoded RGB image.

    Raises:
        RuntimeError: the file cannot be read or decoded (message names the path).
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise RuntimeError(f"cannot read image {path}: {error}") from error


def verify_images(samples: Sequence[Sample]) -> None:
    """Checks every image file by decoding it in full with PIL, as training will.

    ``Image.verify`` alone checks a file's structure only: a JPEG cut short by an interrupted
    copy passes it and then fails the run when a loader first decodes it.

    Args:
        samples: the samples whose files to check.

    Raises:
        RuntimeError: listing every file that is missing or fails the check.
    """
    bad = []
    for sample in samples:
        try:
            with Image.open(sample.path) as image:
                image.load()
        except (OSError, ValueError, SyntaxError) as error:
            bad.append(f"{sample.path} ({error})")
    if bad:
        raise RuntimeError(f"{len(bad)} unreadable image(s):\n" + "\n".join(bad))


class ImageDataset(Dataset):
    """Images of a sample list, transformed, with their labels.

    ``dataset[i]`` is a dict ``{"images": tensor, "targets": pid, "camids": camid}``,
    plus ``"index": i`` when ``with_index`` and ``"is_query": i < query_count`` when
    ``query_count`` is given; a transform that returns a dict (a ``normalize=False`` training
    pipeline: ``{"images": ..., "erase_box": ...}``) gives its keys instead of ``"images"``.
    ``dataset[(i, seed)]`` (keys of :class:`SeededSampler`) runs the transform on torch's CPU
    generator seeded with ``seed``. Build the evaluation set with :meth:`for_test`.

    With a ``cache`` the result of the transform's deterministic stages (decode, resize, uint8
    tensor: :func:`~reid_lightning.data.transforms.split_deterministic`) is stored there at its
    first use, by whichever loader worker meets the image first, so that later epochs only run the
    random augmentation. Items are the same with or without it.

    Args:
        samples: the samples, kept as ``dataset.samples``.
        transform: maps a PIL RGB image to a tensor, or to a dict holding ``"images"`` (a
            ``v2.Compose`` of :mod:`reid_lightning.data.transforms` when ``cache`` is given).
        with_index: add each item's position as ``"index"``.
        query_count: the first ``query_count`` samples are queries; adds ``"is_query"``.
        cache: a :class:`~reid_lightning.data.image_cache.SharedImageCache` of one slot per
            sample, shaped as the deterministic stages' output, kept as ``dataset.cache``.

    Raises:
        ValueError: ``query_count`` outside ``0..len(samples)``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor | dict[str, torch.Tensor]],
        with_index: bool = False,
        query_count: int | None = None,
        cache: SharedImageCache | None = None,
    ) -> None:
        if query_count is not None and not 0 <= query_count <= len(samples):
            raise ValueError(f"query_count {query_count} lies outside 0..{len(samples)}")
        if cache is not None and cache.count != len(samples):
            raise ValueError(f"the image cache has {cache.count} slots for {len(samples)} samples")
        self.samples = list(samples)
        self.transform = transform
        self.with_index = with_index
        self.query_count = query_count
        self.cache = cache
        self._prepare, self._augment = split_deterministic(transform) if cache is not None else (None, transform)

    @classmethod
    def for_test(
        cls, query: Sequence[Sample], gallery: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]
    ) -> ImageDataset:
        """Builds the evaluation set: queries first, then the gallery, with ``"index"``
        (position in that concatenation) and ``"is_query"`` in every item.

        Args:
            query: query samples.
            gallery: gallery samples.
            transform: the test transform.

        Returns:
            The dataset.
        """
        return cls([*query, *gallery], transform, with_index=True, query_count=len(query))

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Image.Image | torch.Tensor:
        """The decoded image, or with a ``cache`` its cached deterministic stages."""
        if self.cache is None:
            return read_image(self.samples[index].path)
        image = self.cache.get(index)
        if image is None:
            image = self._prepare(read_image(self.samples[index].path))
            self.cache.put(index, image)
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        image = self._image(index)
        if seed is None:
            images = self._augment(image)
        else:
            with torch_seeded(seed):
                images = self._augment(image)
        item: dict[str, Any] = dict(images) if isinstance(images, dict) else {"images": images}
        item["targets"] = sample.pid
        item["camids"] = sample.camid
        if self.with_index:
            item["index"] = index
        if self.query_count is not None:
            item["is_query"] = index < self.query_count
        return item
