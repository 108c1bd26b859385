"""fast-reid's hook API on PyTorch Lightning.

Write a hook by subclassing :class:`HookBase` and pass it to ``pl.Trainer(callbacks=[...])``, or
list it in the ``hooks:`` config that :func:`build_hooks` instantiates. ``adapter.py`` explains
how Lightning's callback calls become fast-reid's before/after train/epoch/step calls.
"""
from reid_lightning.engine.hooks.base import HookBase
from reid_lightning.engine.hooks.build import build_hooks
from reid_lightning.engine.hooks.callback import CallbackHook
from reid_lightning.engine.hooks.events import (
    EventStorage,
    HistoryBuffer,
    get_event_storage,
)
from reid_lightning.engine.hooks.layer_freeze import LayerFreeze
from reid_lightning.engine.hooks.precise_bn import PreciseBN, update_bn_stats
from reid_lightning.engine.hooks.profiler import TorchProfiler
from reid_lightning.engine.hooks.timer import IterationTimer
from reid_lightning.engine.hooks.view import TrainerView
from reid_lightning.engine.hooks.writers import PeriodicWriter

__all__ = [
    "CallbackHook",
    "EventStorage",
    "HistoryBuffer",
    "HookBase",
    "IterationTimer",
    "LayerFreeze",
    "PeriodicWriter",
    "PreciseBN",
    "TorchProfiler",
    "TrainerView",
    "build_hooks",
    "get_event_storage",
    "update_bn_stats",
]
