"""Hold training identities out as a validation query/gallery split, for model selection
that never looks at the test split::

    train, val = hold_out_identities(splits.train, 0.1, seed=0)
    # train: the other identities, relabelled 0..M-1; val: ReIDSplits("validation", [], query, gallery)
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

from reid_lightning.data.datasets.layout import relabel
from reid_lightning.data.samples import ReIDSplits, Sample


def resolve_identity_count(value: int | float, num_ids: int) -> int:
    """Turns ``data.val_identities`` into a number of identities.

    Args:
        value: an integer ``N >= 0`` (that many identities), or a fraction in ``(0, 1)`` of
            ``num_ids`` (rounded, at least 1).
        num_ids: number of training identities.

    Returns:
        The number of identities to hold out.

    Raises:
        ValueError: a negative number, a non-integral number >= 1, or not a number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"data.val_identities must be an integer >= 0 or a fraction in (0, 1), got {value!r}")
    if 0 < value < 1:
        return max(1, round(value * num_ids))
    if value < 0 or value != int(value):
        raise ValueError(f"data.val_identities must be an integer >= 0 or a fraction in (0, 1), got {value!r}")
    return int(value)


def hold_out_identities(
    train: Sequence[Sample], count: int | float, seed: int = 0
) -> tuple[list[Sample], ReIDSplits]:
    """Splits training samples into the identities trained on and a validation split.

    Only identities that can be evaluated under the Market rule (the gallery item of the
    query's own identity and camera is ignored) are held out: their images span at least
    two cameras and outnumber their cameras, so that after one query per camera the gallery
    keeps an image that some query from another camera can match. They are drawn with
    ``random.Random(seed)`` from those identities; the query of each (identity, camera)
    pair is drawn from that pair's images with the same generator, the rest form the
    gallery. The result depends only on ``train``, ``count`` and ``seed``.

    Args:
        train: training samples (pids are labels, cameras distinct per data set).
        count: identities to hold out, see :func:`resolve_identity_count`; 0 holds none out.
        seed: seed of the draws.

    Returns:
        ``(train, validation)``: the samples of the other identities, relabelled to
        ``0..M-1`` in the order of their labels, and ``ReIDSplits("validation", [], query,
        gallery)`` whose pids are the held-out identities' labels in ``train``. With
        ``count == 0``: the samples unchanged and an empty validation split.

    Raises:
        ValueError: ``count`` is invalid, exceeds the identities that can be evaluated
            (the message gives that number), or would leave no identity to train on.
    """
    by_identity: dict[int, list[Sample]] = defaultdict(list)
    for sample in train:
        by_identity[sample.pid].append(sample)
    num = resolve_identity_count(count, len(by_identity))
    if num == 0:
        return list(train), ReIDSplits("validation", [], [], [])
    usable = sorted(
        pid for pid, samples in by_identity.items()
        if len({s.camid for s in samples}) >= 2 and len(samples) > len({s.camid for s in samples})
    )
    if num > len(usable):
        raise ValueError(
            f"data.val_identities={count!r} asks for {num} validation identities, but only {len(usable)} of the "
            f"{len(by_identity)} training identities have images in >= 2 cameras and more images than cameras "
            f"(needed to evaluate them under the Market rule); use at most {len(usable)}"
        )
    if num >= len(by_identity):
        raise ValueError(
            f"data.val_identities={count!r} holds out all {len(by_identity)} training identities; "
            "leave some to train on"
        )
    rng = random.Random(seed)
    held_out = set(rng.sample(usable, num))
    query: list[Sample] = []
    gallery: list[Sample] = []
    for pid in sorted(held_out):
        by_camera: dict[int, list[Sample]] = defaultdict(list)
        for sample in sorted(by_identity[pid]):
            by_camera[sample.camid].append(sample)
        for camid in sorted(by_camera):
            images = by_camera[camid]
            pick = rng.randrange(len(images))
            query.append(images[pick])
            gallery.extend(images[:pick] + images[pick + 1:])
    kept = relabel([s for s in train if s.pid not in held_out])
    return kept, ReIDSplits("validation", [], query, gallery)
