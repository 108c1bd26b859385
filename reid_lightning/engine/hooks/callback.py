"""``CallbackHook``: a hook made of plain functions."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reid_lightning.engine.hooks.base import HookBase

TrainerCallable = Callable[[Any], None]


class CallbackHook(HookBase):
    """Call the given functions with the trainer view at the matching points::

        CallbackHook(after_step=lambda trainer: print(trainer.iter))

    Args:
        before_train, after_train, before_epoch, after_epoch, before_step, after_step: functions
            taking the :class:`TrainerView` (``self.trainer``); None skips that point.
    """

    def __init__(
        self,
        *,
        before_train: TrainerCallable | None = None,
        after_train: TrainerCallable | None = None,
        before_epoch: TrainerCallable | None = None,
        after_epoch: TrainerCallable | None = None,
        before_step: TrainerCallable | None = None,
        after_step: TrainerCallable | None = None,
    ) -> None:
        self._before_train = before_train
        self._after_train = after_train
        self._before_epoch = before_epoch
        self._after_epoch = after_epoch
        self._before_step = before_step
        self._after_step = after_step

    def before_train(self) -> None:
        if self._before_train is not None:
            self._before_train(self.trainer)

    def after_train(self) -> None:
        if self._after_train is not None:
            self._after_train(self.trainer)

    def before_epoch(self) -> None:
        if self._before_epoch is not None:
            self._before_epoch(self.trainer)

    def after_epoch(self) -> None:
        if self._after_epoch is not None:
            self._after_epoch(self.trainer)

    def before_step(self) -> None:
        if self._before_step is not None:
            self._before_step(self.trainer)

    def after_step(self) -> None:
        if self._after_step is not None:
            self._after_step(self.trainer)
