"""Market-1501 (Zheng et al. 2015): 1,501 identities, 6 cameras."""

from __future__ import annotations

from pathlib import Path

from reid_lightning.data.datasets.layout import MARKET_SPLIT_DIRS, find_dataset_dir
from reid_lightning.data.datasets.market_layout import load_market_layout
from reid_lightning.data.samples import ReIDSplits

FOLDER_CANDIDATES = ("Market-1501-v15.09.15", "market1501", ".")


def market1501(root: str | Path) -> ReIDSplits:
    """Reads Market-1501.

    The split folders ``bounding_box_train/``, ``query/``, ``bounding_box_test/``
    are looked up, in this order, in ``root/Market-1501-v15.09.15``,
    ``root/market1501`` and ``root`` itself.

    Args:
        root: the data root (``paths.data_dir``).

    Returns:
        The splits: junk (pid -1) dropped, distractors (pid 0) kept in the gallery,
        cameras 0..5, train pids relabelled.
    """
    data_dir = find_dataset_dir(root, FOLDER_CANDIDATES, MARKET_SPLIT_DIRS, "market1501")
    return load_market_layout("market1501", data_dir, 6)
