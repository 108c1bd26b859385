"""DukeMTMC-reID (Zheng et al. 2017): 1,404 identities plus distractors, 8 cameras."""

from __future__ import annotations

from pathlib import Path

from reid_lightning.data.datasets.layout import MARKET_SPLIT_DIRS, find_dataset_dir
from reid_lightning.data.datasets.market_layout import load_market_layout
from reid_lightning.data.samples import ReIDSplits

FOLDER_CANDIDATES = ("DukeMTMC-reID", "dukemtmc", ".")


def dukemtmc(root: str | Path) -> ReIDSplits:
    """Reads DukeMTMC-reID.

    The split folders are looked up, in this order, in ``root/DukeMTMC-reID``,
    ``root/dukemtmc`` and ``root`` itself.

    Args:
        root: the data root (``paths.data_dir``).

    Returns:
        The splits, cameras 0..7, train pids relabelled.
    """
    return load_market_layout("dukemtmc", find_dataset_dir(root, FOLDER_CANDIDATES, MARKET_SPLIT_DIRS, "dukemtmc"), 8)
