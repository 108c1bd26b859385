"""User-style hooks written from fast-reid's description of its hook mechanism.

The article's two examples: time every step (start in ``before_step``, stop in ``after_step``)
and decay the learning rate after the steps that reach a milestone (``after_step``). List them
in the config like any hook::

    hooks:
      step_timer: {_target_: example_hooks.StepTimer}
      lr_decay: {_target_: example_hooks.StepLRDecay, milestones: [1000, 2000], gamma: 0.1}

(``example_hooks`` is importable when ``tests/`` is on ``sys.path``, as under pytest.)
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from reid_lightning.engine.hooks import HookBase

logger = logging.getLogger(__name__)


class StepTimer(HookBase):
    """Put each step's duration into the storage as ``step_seconds`` and print it every ``period``."""

    def __init__(self, period: int = 20) -> None:
        self.period = period
        self._start = 0.0

    def before_step(self) -> None:
        self._start = time.perf_counter()

    def after_step(self) -> None:
        seconds = time.perf_counter() - self._start
        self.trainer.storage.put_scalar("step_seconds", seconds)
        if (self.trainer.iter + 1) % self.period == 0:
            logger.info("iter %d took %.4f s", self.trainer.iter, seconds)


class StepLRDecay(HookBase):
    """Multiply every learning rate by ``gamma`` once ``milestones[k]`` steps are done."""

    def __init__(self, milestones: Sequence[int], gamma: float = 0.1) -> None:
        self.milestones = frozenset(milestones)
        self.gamma = gamma

    def after_step(self) -> None:
        if self.trainer.iter + 1 in self.milestones:
            for group in self.trainer.optimizer.param_groups:
                group["lr"] *= self.gamma
