"""Folder lookup and checks shared by the data set parsers: where a data set lives
under the data root, which files are images, train relabelling and the
query-versus-gallery identity check."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

from reid_lightning.data.samples import Sample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MARKET_SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")
DATA_ROOT_HINT = "set paths.data_dir (Hydra) or the environment variable REID_DATA to the folder holding your data sets"


def find_dataset_dir(root: str | Path, candidates: Iterable[str], required: Sequence[str], name: str) -> Path:
    """Finds the folder of a data set under the data root.

    The candidates are tried in order; the first one that holds any of the
    ``required`` sub-folders is taken and must then hold all of them.

    Args:
        root: the data root (``paths.data_dir``).
        candidates: folder names relative to ``root`` to try, ``"."`` for ``root`` itself.
        required: sub-folders (or files) the data set folder must contain.
        name: data set name used in error messages.

    Returns:
        The data set folder.

    Raises:
        FileNotFoundError: ``root`` does not exist, no candidate holds the layout,
            or the chosen folder lacks one of the ``required`` entries.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} of data set {name!r} does not exist; {DATA_ROOT_HINT}")
    tried = [root / candidate for candidate in candidates]
    layout = "{" + ",".join(required) + "}"
    for folder in tried:
        if folder.is_dir() and any((folder / entry).exists() for entry in required):
            missing = [str(folder / entry) for entry in required if not (folder / entry).exists()]
            if missing:
                raise FileNotFoundError(
                    f"data set {name!r} at {folder} is incomplete: missing {', '.join(missing)} "
                    f"(expected layout {folder}/{layout}); {DATA_ROOT_HINT}"
                )
            return folder
    looked = ", ".join(f"{folder}/{layout}" for folder in tried)
    raise FileNotFoundError(f"data set {name!r} not found under {root}: looked for {looked}; {DATA_ROOT_HINT}")


def is_hidden(path: Path) -> bool:
    """Tells whether a file or folder name starts with a dot: macOS's ``._<name>`` resource files
    (written beside every image copied to a FAT, exFAT or network drive), ``.ipynb_checkpoints``.
    The parsers skip them, as fast-reid's ``glob('*.jpg')`` does."""
    return path.name.startswith(".")


def is_image(path: Path) -> bool:
    """Tells whether a path names an image file by its extension (.jpg .jpeg .png .bmp, any case),
    hidden files (:func:`is_hidden`) excepted."""
    return not is_hidden(path) and path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Lists the image files directly inside a folder, sorted by name.

    Args:
        folder: a split folder.

    Returns:
        The image paths.

    Raises:
        ValueError: the folder holds no image.
    """
    images = sorted(path for path in folder.iterdir() if is_image(path))
    if not images:
        raise ValueError(f"split folder {folder} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return images


def relabel(samples: Sequence[Sample]) -> list[Sample]:
    """Maps training identities to ``0..N-1`` in sorted order of the original pids.

    Args:
        samples: training samples with their original pids.

    Returns:
        The same samples with relabelled pids.
    """
    mapping = {pid: label for label, pid in enumerate(sorted({s.pid for s in samples}))}
    return [s._replace(pid=mapping[s.pid]) for s in samples]


def warn_query_without_gallery(query: Sequence[Sample], gallery: Sequence[Sample], name: str) -> None:
    """Warns when query identities have no image in the gallery (such queries cannot be ranked).

    Args:
        query: query samples.
        gallery: gallery samples.
        name: data set name used in the message.
    """
    absent = sorted({s.pid for s in query} - {s.pid for s in gallery})
    if absent:
        shown = ", ".join(map(str, absent[:5])) + (", ..." if len(absent) > 5 else "")
        warnings.warn(
            f"data set {name!r}: {len(absent)} query identities have no gallery image ({shown}); "
            "their queries are skipped by the evaluation",
            stacklevel=3,
        )
