"""CUHK03 in the new protocol (CUHK03-NP, Zhong et al. 2017): 767 train and 700 test
identities, 2 cameras, ``detected`` or ``labeled`` crops in the Market layout."""

from __future__ import annotations

from pathlib import Path

from reid_lightning.data.datasets.layout import MARKET_SPLIT_DIRS, find_dataset_dir
from reid_lightning.data.datasets.market_layout import load_market_layout
from reid_lightning.data.samples import ReIDSplits

SUBSETS = ("detected", "labeled")


def cuhk03_np(root: str | Path, subset: str = "detected") -> ReIDSplits:
    """Reads CUHK03-NP.

    The split folders are looked up, in this order, in ``root/cuhk03-np/<subset>``,
    ``root/<subset>`` and ``root`` itself. File names ``PPPP_cCs1_NNNNNN_00.jpg``.

    Args:
        root: the data root (``paths.data_dir``).
        subset: ``"detected"`` or ``"labeled"``.

    Returns:
        The splits, cameras 0..1, train pids relabelled.

    Raises:
        ValueError: unknown ``subset``.
    """
    if subset not in SUBSETS:
        raise ValueError(f"cuhk03_np subset must be one of {SUBSETS}, got {subset!r}")
    candidates = (f"cuhk03-np/{subset}", subset, ".")
    name = f"cuhk03_np_{subset}"
    return load_market_layout(name, find_dataset_dir(root, candidates, MARKET_SPLIT_DIRS, name), 2)
