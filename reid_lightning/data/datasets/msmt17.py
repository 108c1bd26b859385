"""MSMT17 (Wei et al. 2018): 4,101 identities, 15 cameras, image lists instead of
Market-named folders."""

from __future__ import annotations

from pathlib import Path

from reid_lightning.data.datasets.layout import (
    DATA_ROOT_HINT,
    relabel,
    warn_query_without_gallery,
)
from reid_lightning.data.samples import ReIDSplits, Sample

# version folder -> (train image folder, test image folder); V2 is tried first.
VERSIONS = {"MSMT17_V2": ("mask_train_v2", "mask_test_v2"), "MSMT17_V1": ("train", "test")}
NUM_CAMS = 15


def _msmt_camera(path: str, list_file: Path, line_no: int) -> int:
    """Reads the zero-based camera from an MSMT17 file name ``<pid>_<index>_<camera>_<time>_<frame>_<n>.jpg``."""
    fields = Path(path).name.split("_")
    if len(fields) < 3 or not fields[2].isdigit():
        raise ValueError(f"cannot parse the camera of image {path} ({list_file}:{line_no})")
    camera = int(fields[2])
    if not 1 <= camera <= NUM_CAMS:
        raise ValueError(f"camera {camera} of image {path} ({list_file}:{line_no}) lies outside 1..{NUM_CAMS}")
    return camera - 1


def read_msmt_list(image_dir: Path, list_file: Path) -> list[Sample]:
    """Reads one MSMT17 list file, lines ``relative/path.jpg pid``.

    Args:
        image_dir: folder the relative paths start from.
        list_file: the list file.

    Returns:
        The samples with original pids.

    Raises:
        FileNotFoundError: the list file is missing.
        ValueError: a malformed line, or the list names no image.
    """
    if not list_file.is_file():
        raise FileNotFoundError(f"MSMT17 list file {list_file} is missing; {DATA_ROOT_HINT}")
    samples = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ValueError(f"malformed line {line_no} of {list_file}: {line!r} (expected 'relative/path.jpg pid')")
        samples.append(Sample(str(image_dir / fields[0]), int(fields[1]), _msmt_camera(fields[0], list_file, line_no)))
    if not samples:
        raise ValueError(f"MSMT17 list file {list_file} names no image")
    return samples


def msmt17(root: str | Path) -> ReIDSplits:
    """Reads MSMT17, version 2 (``root/MSMT17_V2`` with ``mask_train_v2/``,
    ``mask_test_v2/``) or, when absent, version 1 (``root/MSMT17_V1`` with
    ``train/``, ``test/``).

    As in fast-reid the training split is ``list_train.txt`` plus ``list_val.txt``;
    query and gallery come from ``list_query.txt`` and ``list_gallery.txt``.

    Args:
        root: the data root (``paths.data_dir``).

    Returns:
        The splits, cameras 0..14, train pids relabelled, query/gallery pids as listed.

    Raises:
        FileNotFoundError: neither version folder exists, or one of its image
            folders or list files is missing.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} of data set 'msmt17' does not exist; {DATA_ROOT_HINT}")
    for version, (train_name, test_name) in VERSIONS.items():
        if (root / version).is_dir():
            break
    else:
        looked = " or ".join(f"{root / v}/{{{a},{b},list_*.txt}}" for v, (a, b) in VERSIONS.items())
        raise FileNotFoundError(f"data set 'msmt17' not found: looked for {looked}; {DATA_ROOT_HINT}")
    base = root / version
    train_dir, test_dir = base / train_name, base / test_name
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"MSMT17 image folder {folder} is missing; {DATA_ROOT_HINT}")
    train = read_msmt_list(train_dir, base / "list_train.txt") + read_msmt_list(train_dir, base / "list_val.txt")
    query = read_msmt_list(test_dir, base / "list_query.txt")
    gallery = read_msmt_list(test_dir, base / "list_gallery.txt")
    warn_query_without_gallery(query, gallery, "msmt17")
    return ReIDSplits("msmt17", relabel(train), query, gallery)
