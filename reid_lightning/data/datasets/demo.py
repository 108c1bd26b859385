"""The embedded synthetic demo set (see :mod:`reid_lightning.data.demo_generator`), generated
under the data root on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reid_lightning.data.datasets.market_layout import load_market_layout
from reid_lightning.data.demo_generator import DEFAULT_NUM_CAMS, generate_demo_dataset
from reid_lightning.data.samples import ReIDSplits


def demo_dir(root: str | Path, seed: int = 0) -> Path:
    """Returns the folder of the demo set of a seed: ``root/reid_demo_v1_seed<seed>``."""
    return Path(root).expanduser() / f"reid_demo_v1_seed{seed}"


def prepare_demo(root: str | Path, seed: int = 0, **generator_kwargs: Any) -> Path:
    """Generates the demo set under ``root`` unless a complete one made from the same
    arguments is there already.

    Args:
        root: the data root (``paths.data_dir``); created when missing.
        seed: generator seed.
        **generator_kwargs: further arguments of :func:`generate_demo_dataset`
            (``num_ids``, ``images_per_id``, ``num_cams``, ``size``, ...).

    Returns:
        The demo set folder.
    """
    return generate_demo_dataset(demo_dir(root, seed), seed=seed, **generator_kwargs)


def demo(root: str | Path, seed: int = 0, **generator_kwargs: Any) -> ReIDSplits:
    """Reads the demo set, generating it first when needed (see :func:`prepare_demo`).

    Args:
        root: the data root (``paths.data_dir``).
        seed: generator seed.
        **generator_kwargs: further arguments of :func:`generate_demo_dataset`.

    Returns:
        The splits, parsed as Market-1501 layout.
    """
    num_cams = generator_kwargs.get("num_cams", DEFAULT_NUM_CAMS)
    return load_market_layout("demo", prepare_demo(root, seed, **generator_kwargs), num_cams)
