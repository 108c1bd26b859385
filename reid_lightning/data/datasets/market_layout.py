"""Parser of the Market-1501 layout: ``bounding_box_train/``, ``query/`` and
``bounding_box_test/`` folders of images named ``<pid>_c<camera>...``, shared by
Market-1501, DukeMTMC-reID, CUHK03-NP, the demo set and custom folders."""

from __future__ import annotations

import re
from pathlib import Path

from reid_lightning.data.datasets.layout import (
    list_images,
    relabel,
    warn_query_without_gallery,
)
from reid_lightning.data.samples import ReIDSplits, Sample

MARKET_PATTERN = re.compile(r"([-\d]+)_c(\d)")


def parse_market_name(path: Path, pattern: re.Pattern[str] = MARKET_PATTERN) -> tuple[int, int]:
    """Identity and one-based camera of a Market-named image (``0002_c1s1_000451_03.jpg`` -> (2, 1)).

    Args:
        path: the image file.
        pattern: regular expression searched in the file name, group 1 the pid, group 2 the camera.

    Raises:
        ValueError: the file name does not match ``pattern`` (the path and pattern are named).
    """
    match = pattern.search(path.name)
    if match is None:
        raise ValueError(f"cannot parse identity and camera from image name {path} (pattern {pattern.pattern!r})")
    return int(match.group(1)), int(match.group(2))


def parse_market_split(folder: Path, num_cams: int, pattern: re.Pattern[str] = MARKET_PATTERN) -> list[Sample]:
    """Parses one split folder of Market-named images.

    Junk images (pid ``-1``) are dropped; distractors (pid ``0``) are kept.
    Cameras ``1..num_cams`` become ``0..num_cams-1``.

    Args:
        folder: the split folder.
        num_cams: number of cameras of the data set.
        pattern: regular expression searched in each file name, group 1 the pid,
            group 2 the one-based camera number.

    Returns:
        The samples with original pids, sorted by file name.

    Raises:
        ValueError: the folder holds no image or no usable image, a file name does
            not match ``pattern``, or its camera lies outside ``1..num_cams``.
    """
    samples = []
    for path in list_images(folder):
        pid, camera = parse_market_name(path, pattern)
        if not 1 <= camera <= num_cams:
            raise ValueError(f"camera {camera} of image {path} lies outside 1..{num_cams}")
        if pid == -1:
            continue
        samples.append(Sample(str(path), pid, camera - 1))
    if not samples:
        raise ValueError(f"split folder {folder} holds only junk images (pid -1)")
    return samples


def load_market_layout(
    name: str, data_dir: Path, num_cams: int, pattern: re.Pattern[str] = MARKET_PATTERN
) -> ReIDSplits:
    """Reads a data set stored in the Market-1501 layout.

    Args:
        name: data set name for the summary and messages.
        data_dir: folder holding ``bounding_box_train/``, ``query/``, ``bounding_box_test/``.
        num_cams: number of cameras.
        pattern: file-name pattern, see :func:`parse_market_split`.

    Returns:
        The splits, train pids relabelled to ``0..N-1``.
    """
    train = relabel(parse_market_split(data_dir / "bounding_box_train", num_cams, pattern))
    query = parse_market_split(data_dir / "query", num_cams, pattern)
    gallery = parse_market_split(data_dir / "bounding_box_test", num_cams, pattern)
    warn_query_without_gallery(query, gallery, name)
    return ReIDSplits(name, train, query, gallery)
