"""Print and save the composed run config as a rich tree (as lightning-hydra-template does).

Called by the runner at start-up::

    print_config_tree(cfg, save_to=output_dir / "config_tree.log")
"""
from __future__ import annotations

from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

_FIRST = ("data", "model", "solver", "trainer", "evaluation", "callbacks", "hooks", "logger", "paths")


def print_config_tree(cfg: DictConfig, save_to: Path | None = None, resolve: bool = True) -> None:
    """Render ``cfg`` group by group (the main groups first), print it, and write it to ``save_to``."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in _FIRST if k in cfg] + [k for k in cfg if k not in _FIRST]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=resolve) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key), style="dim", guide_style="dim").add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with open(save_to, "w") as handle:
            rich.print(tree, file=handle)
