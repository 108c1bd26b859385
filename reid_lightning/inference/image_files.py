"""Which image files an inference command reads: a folder (recursive), a list file, one image,
or several of those; and the identity/camera that Market-style file names carry.

Called as::

    files = collect_image_files("photos/")          # every .jpg/.jpeg/.png/.bmp below photos/
    files.paths, files.names                        # absolute paths, names relative to the input
    pids, camids = market_labels(files.names)       # -1 where a name does not follow <pid>_c<cam>
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reid_lightning.data.datasets.layout import IMAGE_EXTENSIONS, is_image
from reid_lightning.data.datasets.market_layout import MARKET_PATTERN


@dataclass(frozen=True)
class ImageFiles:
    """Image files to read.

    Attributes:
        paths: the files, absolute.
        names: how each file is reported: relative to the input folder, as written in the list
            file, or the file name of a single image.
    """

    paths: list[Path]
    names: list[str]


def _walk(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, through symlinked sub-folders too (``Path.rglob`` skips
    those before Python 3.13), each real folder once (a link back up ends there)."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield from (Path(root) / name for name in files)


def _from_folder(folder: Path) -> ImageFiles:
    paths = sorted(path for path in _walk(folder) if is_image(path))
    if not paths:
        raise ValueError(f"input folder {folder} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
    return ImageFiles([p.resolve() for p in paths], [p.relative_to(folder).as_posix() for p in paths])


def _from_list_file(list_file: Path) -> ImageFiles:
    try:
        text = list_file.read_text()
    except UnicodeDecodeError as err:  # a binary file: an image of another format, an archive...
        raise ValueError(
            f"input {list_file} is neither an image file ({', '.join(IMAGE_EXTENSIONS)}) nor a text file listing "
            "images (one path per line): convert it to one of those formats"
        ) from err
    names = [line.strip() for line in text.splitlines()]
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise ValueError(f"image list {list_file} names no images (one path per line, relative to the list's folder)")
    return ImageFiles([(list_file.parent / name).resolve() for name in names], names)


def collect_image_files(source: str | Path | Sequence[str | Path]) -> ImageFiles:
    """Resolve an input of ``scripts/extract.py`` or ``scripts/search.py`` into image files.

    Args:
        source: a folder (searched recursively, symlinked sub-folders included, for
            .jpg/.jpeg/.png/.bmp files, sorted), a
            text file listing one image path per line (relative paths are taken from the
            list's folder; blank lines and lines starting with ``#`` are ignored), one image
            file, or a sequence of any of these (concatenated in order).

    Returns:
        The files. Files named in a list are not checked here: reading them reports the
        missing or unreadable ones.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: an empty folder, an empty list file, an empty sequence, or a file that is
            neither an image of those extensions nor text (e.g. a .webp image).
    """
    if not isinstance(source, (str, Path)):
        parts = [collect_image_files(item) for item in source]
        if not parts:
            raise ValueError("no input given: pass a folder, an image list file or image files")
        return ImageFiles([p for part in parts for p in part.paths], [n for part in parts for n in part.names])
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist (expected a folder, an image list file or an image)")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageFiles([path.resolve()], [path.name])
    return _from_list_file(path)


def market_labels(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Identity and 0-based camera of Market-named files (``<pid>_c<camera>...``), else -1.

    Args:
        names: file names or relative paths; only the last component is parsed.

    Returns:
        ``(pids, camids)``, two int64 arrays of ``len(names)``.
    """
    pids = np.full(len(names), -1, dtype=np.int64)
    camids = np.full(len(names), -1, dtype=np.int64)
    for i, name in enumerate(names):
        match = MARKET_PATTERN.search(Path(name).name)
        if match is not None:
            pids[i], camids[i] = int(match.group(1)), int(match.group(2)) - 1
    return pids, camids
