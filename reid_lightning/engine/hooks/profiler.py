"""``TorchProfiler``: ``torch.profiler`` traces of chosen steps (detectron2's profiler hooks)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from reid_lightning.engine.hooks.base import HookBase
from reid_lightning.utils import comm

logger = logging.getLogger(__name__)


class TorchProfiler(HookBase):
    """Profile whole steps (all their micro-batches, hooks included) on global rank 0.

    For each profiled step ``i`` it writes ``trace_iter{i}.json`` (open in chrome://tracing or
    https://ui.perfetto.dev) and ``table_iter{i}.txt`` (operators sorted by self time) in
    ``output_dir``.

    Args:
        enable_predicate: ``f(trainer_view) -> bool`` choosing the steps; overrides ``iters``.
        iters: the steps to profile when no predicate is given.
        output_dir: where to write; None: ``<trainer.log_dir>/profiler``.
        use_cuda: also record CUDA activity; None: when CUDA is available.
        record_shapes / profile_memory: passed to ``torch.profiler.profile``.
        row_limit: rows of the table.
    """

    def __init__(
        self,
        enable_predicate: Callable[[Any], bool] | None = None,
        iters: Sequence[int] = (10, 11, 12),
        output_dir: str | Path | None = None,
        use_cuda: bool | None = None,
        record_shapes: bool = False,
        profile_memory: bool = False,
        row_limit: int = 30,
    ) -> None:
        self.enable_predicate = enable_predicate
        self.iters = frozenset(int(i) for i in iters)
        self.output_dir = output_dir
        self.use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self.row_limit = row_limit
        self._dir: Path | None = None
        self._profiler: profile | None = None

    def _enabled(self) -> bool:
        if self.enable_predicate is not None:
            return bool(self.enable_predicate(self.trainer))
        return self.trainer.iter in self.iters

    def before_train(self) -> None:
        if self.output_dir is None:
            # Trainer.log_dir broadcasts from rank 0: every rank must ask
            pl_trainer = self.trainer.pl_trainer
            directory = Path(pl_trainer.log_dir or pl_trainer.default_root_dir) / "profiler"
        else:
            directory = Path(self.output_dir)
        self._dir = directory if comm.is_main_process() else None

    def before_step(self) -> None:
        if self._dir is None or not self._enabled():
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.use_cuda else [])
        self._profiler = profile(
            activities=activities, record_shapes=self.record_shapes, profile_memory=self.profile_memory
        )
        self._profiler.__enter__()

    def after_step(self) -> None:
        if self._profiler is None:
            return
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        iteration = self.trainer.iter
        self._dir.mkdir(parents=True, exist_ok=True)
        trace = self._dir / f"trace_iter{iteration}.json"
        prof.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if self.use_cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=self.row_limit)
        (self._dir / f"table_iter{iteration}.txt").write_text(table + "\n")
        logger.info("TorchProfiler: iteration %d written to %s", iteration, trace)

    def after_train(self) -> None:
        # a step that raised leaves its profiler open
        if self._profiler is not None:
            prof, self._profiler = self._profiler, None
            prof.__exit__(None, None, None)
