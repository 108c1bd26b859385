"""``IterationTimer``: per-step time into the storage and a training-speed summary at the end."""
from __future__ import annotations

import datetime
import logging
import time
from typing import ClassVar

from reid_lightning.engine.hooks.base import HookBase
from reid_lightning.utils import comm

logger = logging.getLogger(__name__)


class IterationTimer(HookBase):
    """Time each step from this hook's ``before_step`` to its ``after_step``, plus the step's
    loading time (fast-reid's hook, whose ``before_step`` comes before ``next(data_loader)``;
    Lightning fetches the batch before ``on_train_batch_start``, so the adapter's ``data_time``
    of the step is added).

    Puts ``time`` (seconds) into the storage after the first ``warmup_iter`` steps of the fit
    (the adapter then leaves ``time`` to this hook), and logs on rank 0 at ``after_train``::

        Overall training speed: 120 iterations in 0:00:30 (0.2500 s / it)
        Total training time: 0:00:35 (0:00:05 on hooks)

    Register it first so that its step time includes the other hooks.

    Args:
        warmup_iter: steps excluded from timing (slow first steps: allocation, cudnn benchmark).
    """

    provides_scalars: ClassVar[frozenset[str]] = frozenset({"time"})

    def __init__(self, warmup_iter: int = 3) -> None:
        if warmup_iter < 0:
            raise ValueError(f"IterationTimer warmup_iter must be >= 0, got {warmup_iter}")
        self.warmup_iter = warmup_iter
        self._step_start = 0.0
        self._train_start = 0.0
        self._timed_seconds = 0.0
        self._timed_steps = 0

    def before_train(self) -> None:
        self._train_start = time.perf_counter()
        self._timed_seconds = 0.0
        self._timed_steps = 0

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        seconds = time.perf_counter() - self._step_start + self._hook_adapter.step_data_time
        steps_done = self.trainer.iter - self.trainer.start_iter + 1
        if steps_done > self.warmup_iter:
            self.trainer.storage.put_scalar("time", seconds)
            self._timed_seconds += seconds
            self._timed_steps += 1
        else:
            # warmup: the summary's wall time starts after it
            self._train_start = time.perf_counter()

    @property
    def timed_steps(self) -> int:
        """Steps measured after warmup in the current fit."""
        return self._timed_steps

    @property
    def timed_seconds(self) -> float:
        """Sum of the step times measured after warmup."""
        return self._timed_seconds

    def after_train(self) -> None:
        if not comm.is_main_process() or self._timed_steps == 0:
            return
        total = time.perf_counter() - self._train_start
        per_step = self._timed_seconds / self._timed_steps
        logger.info(
            "Overall training speed: %d iterations in %s (%.4f s / it)",
            self._timed_steps, datetime.timedelta(seconds=int(self._timed_seconds)), per_step,
        )
        logger.info(
            "Total training time: %s (%s on hooks)",
            datetime.timedelta(seconds=int(total)),
            datetime.timedelta(seconds=int(max(0.0, total - self._timed_seconds))),
        )
