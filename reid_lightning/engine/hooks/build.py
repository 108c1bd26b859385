"""``build_hooks``: the ``hooks:`` config mapping to a list of hook objects."""
from __future__ import annotations

from collections.abc import Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reid_lightning.engine.hooks.base import HookBase


def build_hooks(hooks_cfg: Mapping | DictConfig | None) -> list[HookBase]:
    """Instantiate the hooks of a ``hooks:`` config, in mapping order.

    Each entry is ``name: {_target_: dotted.path.Class, <kwargs>}``; ``null`` entries are skipped,
    so ``+hooks.my_hook._target_=pkg.MyHook`` adds a hook and ``~hooks.x`` / ``hooks.x=null``
    removes one. The entry name becomes ``hook.hook_name`` (the hook's checkpoint key).

    Args:
        hooks_cfg: the mapping (DictConfig or dict), or None for no hooks.

    Returns:
        the hooks, ready for ``pl.Trainer(callbacks=...)``.

    Raises:
        TypeError: an entry is not a mapping with ``_target_``, or builds something that is not a
            ``HookBase``.
    """
    if hooks_cfg is None:
        return []
    if not isinstance(hooks_cfg, (Mapping, DictConfig)):
        raise TypeError(f"hooks config must be a mapping of name -> {{_target_: ...}}, got {type(hooks_cfg).__name__}")
    hooks: list[HookBase] = []
    for name, entry in hooks_cfg.items():
        if entry is None:
            continue
        if isinstance(entry, HookBase):
            hook = entry
        else:
            if not isinstance(entry, (Mapping, DictConfig)) or "_target_" not in entry:
                shown = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry
                raise TypeError(f"hooks.{name}: expected a mapping with '_target_' (or null), got {shown!r}")
            hook = instantiate(entry, _convert_="all")
            if not isinstance(hook, HookBase):
                raise TypeError(
                    f"hooks.{name}: _target_ {entry['_target_']!r} built a {type(hook).__qualname__}, "
                    "not a reid_lightning.engine.hooks.HookBase"
                )
        hook.hook_name = str(name)
        hooks.append(hook)
    return hooks
