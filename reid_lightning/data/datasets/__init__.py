"""Data set parsers, each returning :class:`~reid_lightning.data.samples.ReIDSplits`,
and the registry that builds them by name::

    splits = build_dataset("market1501", "/data")
    splits = build_dataset("cuhk03_np", "/data", subset="labeled")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from reid_lightning.data.datasets.cuhk03_np import cuhk03_np
from reid_lightning.data.datasets.demo import demo
from reid_lightning.data.datasets.dukemtmc import dukemtmc
from reid_lightning.data.datasets.folder import folder
from reid_lightning.data.datasets.market1501 import market1501
from reid_lightning.data.datasets.msmt17 import msmt17
from reid_lightning.data.samples import ReIDSplits

DATASETS: dict[str, Callable[..., ReIDSplits]] = {
    "market1501": market1501,
    "dukemtmc": dukemtmc,
    "msmt17": msmt17,
    "cuhk03_np": cuhk03_np,
    "folder": folder,
    "demo": demo,
}


def build_dataset(name: str, root: str | Path, **kwargs: Any) -> ReIDSplits:
    """Parses a data set by its registry name.

    Args:
        name: a key of :data:`DATASETS`.
        root: the data root (``paths.data_dir``); see each parser for the folders
            it looks for.
        **kwargs: parser options (e.g. ``subset`` for ``cuhk03_np``, ``seed`` for ``demo``).

    Returns:
        The train / query / gallery splits.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root, **kwargs)


__all__ = ["DATASETS", "build_dataset"]
