"""A custom data set in a folder: ``root/{bounding_box_train,query,bounding_box_test}``
holding either Market-named images or one sub-folder per identity."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import NamedTuple

from reid_lightning.data.datasets.layout import (
    MARKET_SPLIT_DIRS,
    find_dataset_dir,
    is_hidden,
    is_image,
    list_images,
    relabel,
    warn_query_without_gallery,
)
from reid_lightning.data.datasets.market_layout import parse_market_name
from reid_lightning.data.samples import ReIDSplits, Sample

CAMERA_PATTERN = r"(?<![A-Za-z])c(\d+)"
# Market-1501's pattern with a camera number of any length: ``0001_c12s1_...`` is camera 12, not 1
FLAT_PATTERN = re.compile(r"([-\d]+)_c(\d+)")


class _RawImage(NamedTuple):
    """An image before identities and cameras are numbered: its path, identity name
    and camera number (None when the file name holds none)."""

    path: Path
    identity: str
    camera: int | None


def _split_form(folder: Path) -> str:
    """Returns ``"flat"`` when a split folder holds images, ``"identity"`` when it holds
    sub-folders; raises ValueError when it holds both or neither."""
    entries = [p for p in folder.iterdir() if not is_hidden(p)]
    has_images = any(is_image(p) for p in entries)
    has_dirs = any(p.is_dir() for p in entries)
    if has_images and has_dirs:
        raise ValueError(f"split folder {folder} mixes images and identity sub-folders; use one form")
    if not has_images and not has_dirs:
        raise ValueError(f"split folder {folder} holds no images and no identity sub-folders")
    return "identity" if has_dirs else "flat"


def _read_flat(folder: Path, pattern: re.Pattern[str]) -> list[_RawImage]:
    """Reads a split of Market-named images: identity from group 1, camera from group 2."""
    images = []
    for path in list_images(folder):
        pid, camera = parse_market_name(path, pattern)
        images.append(_RawImage(path, str(pid), camera))
    return images


def _read_identity_folders(folder: Path, camera_pattern: re.Pattern[str]) -> list[_RawImage]:
    """Reads a split holding one sub-folder per identity; the camera comes from the file name when present."""
    images = []
    for identity_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)):
        for path in sorted(p for p in identity_dir.iterdir() if is_image(p)):
            match = camera_pattern.search(path.stem)
            images.append(_RawImage(path, identity_dir.name, int(match.group(1)) if match else None))
    if not images:
        raise ValueError(f"split folder {folder} holds no images in its identity sub-folders")
    return images


def _compile(option: str, pattern: str, groups: int, meaning: str) -> re.Pattern[str]:
    """Compiles a pattern option of :func:`folder`, refusing one that is invalid or has fewer than ``groups`` groups."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"folder {option} {pattern!r} is not a valid regular expression: {error}") from error
    if compiled.groups < groups:
        raise ValueError(f"folder {option} {pattern!r} needs {groups} group(s) in parentheses: {meaning}")
    return compiled


def _identity_numbers(names: set[str]) -> dict[str, int]:
    """Keeps integer identity names as they are; otherwise numbers the names in sorted order."""
    try:
        return {name: int(name) for name in names}
    except ValueError:
        return {name: number for number, name in enumerate(sorted(names))}


def folder(root: str | Path, pattern: str | None = None, camera_pattern: str = CAMERA_PATTERN) -> ReIDSplits:
    """Reads a custom data set from ``root/{bounding_box_train,query,bounding_box_test}``.

    Each split folder holds either

    * images named like Market-1501 (``pattern``, default ``([-\\d]+)_c(\\d+)``:
      group 1 the pid, group 2 the camera number, of any number of digits: ``c12s1``
      is camera 12), or
    * one sub-folder per identity (the folder name is the identity; integer names
      are kept as pids, other names are numbered in sorted order) whose file
      names may carry a camera number matched by ``camera_pattern`` (default: a
      ``c`` not preceded by a letter, then digits, e.g. ``img_c3_001.jpg``).

    All three splits must use the same form. Pid -1 marks junk and is dropped.
    Camera numbers are renumbered ``0..C-1`` in sorted order (``c1..c6`` become
    ``0..5``). When some file name of the identity form holds no camera number,
    every image gets one camera; since the evaluation ignores gallery matches from
    the query's own camera, query images then get camera 0 and gallery images
    camera 1, and a warning says so.

    Args:
        root: folder holding the three split folders.
        pattern: regular expression for Market-named files (pid group, camera group).
        camera_pattern: regular expression whose group 1 is the camera number,
            searched in the file names of the identity form.

    Returns:
        The splits, train pids relabelled to ``0..N-1``.

    Raises:
        FileNotFoundError: ``root`` or a split folder is missing.
        ValueError: an empty split, mixed forms, an unparsable Market-style name, or a
            ``pattern``/``camera_pattern`` that is no regular expression or lacks its groups.
    """
    data_dir = find_dataset_dir(root, (".",), MARKET_SPLIT_DIRS, "folder")
    folders = [data_dir / split for split in MARKET_SPLIT_DIRS]
    forms = {split_dir: _split_form(split_dir) for split_dir in folders}
    if len(set(forms.values())) > 1:
        described = ", ".join(f"{split_dir} ({form})" for split_dir, form in forms.items())
        raise ValueError(f"split folders of {data_dir} use different forms: {described}; use one form for all")
    if forms[folders[0]] == "flat":
        flat_pattern = FLAT_PATTERN if pattern is None else _compile(
            "pattern", pattern, 2, r"group 1 the pid, group 2 the camera number, e.g. '([-\d]+)_c(\d+)'"
        )
        raw = [_read_flat(split_dir, flat_pattern) for split_dir in folders]
    else:
        cameras_in_names = _compile("camera_pattern", camera_pattern, 1, r"group 1 the camera number, e.g. 'c(\d+)'")
        raw = [_read_identity_folders(split_dir, cameras_in_names) for split_dir in folders]

    pids = _identity_numbers({image.identity for split in raw for image in split})
    kept = [[image for image in split if pids[image.identity] != -1] for split in raw]
    for split_dir, images in zip(folders, kept):
        if not images:
            raise ValueError(f"split folder {split_dir} holds only junk images (pid -1)")
    single_camera = any(image.camera is None for split in kept for image in split)
    if single_camera:
        warnings.warn(
            f"data set at {data_dir}: not every file name holds a camera number (pattern {camera_pattern!r}), "
            "so all images are taken as one camera; query images get camera 0 and gallery images camera 1 "
            "so that the evaluation, which ignores same-camera matches, keeps every gallery match",
            stacklevel=2,
        )
    numbers = set() if single_camera else {image.camera for split in kept for image in split}
    cameras = {number: index for index, number in enumerate(sorted(numbers))}
    train, query, gallery = (
        [
            Sample(str(image.path), pids[image.identity], int(index == 2) if single_camera else cameras[image.camera])
            for image in images
        ]
        for index, images in enumerate(kept)
    )
    warn_query_without_gallery(query, gallery, "folder")
    return ReIDSplits("folder", relabel(train), query, gallery)
