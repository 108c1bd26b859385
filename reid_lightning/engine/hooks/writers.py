"""``PeriodicWriter``: fast-reid's console metric line and a JSON-lines metrics file."""
from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import torch

from reid_lightning.engine.hooks.base import HookBase
from reid_lightning.engine.hooks.events import EventStorage
from reid_lightning.utils import comm
from reid_lightning.utils.files import write_atomically

logger = logging.getLogger(__name__)


class PeriodicWriter(HookBase):
    """Every ``period`` steps and at the last step, log a line and append to a JSON-lines file.

    The line (logger ``reid_lightning.engine.hooks.writers``, INFO) follows fast-reid's
    CommonMetricPrinter, with medians over the last ``window_size`` steps (wrapped here)::

        eta: 0:01:23  epoch/iter: 1/45  total_loss: 1.234  loss_cls: 1.1  time: 0.1234
            data_time: 0.0012  lr: 3.50e-04  max_mem: 1234M

    It shows every scalar whose name contains ``loss``; ``max_mem`` (peak CUDA memory of the
    module's device) appears when training on CUDA. Each JSON line holds ``iteration``, ``epoch``
    and the latest scalars (median-smoothed when put with ``smoothing_hint=True``) put since the
    previous line. Only global rank 0 writes. The line of a step is written once every hook is
    done with it (when the next step starts, or after ``after_epoch`` at an epoch's last step),
    so it holds the scalars of the hooks listed after this one (fast-reid registers its writers
    last) and those put in ``after_epoch``.

    Args:
        period: steps between two writes.
        json_file: None (no file), ``"auto"`` (``<trainer.log_dir>/metrics.jsonl``, i.e. the first
            logger's directory or ``default_root_dir``) or a path. A resumed fit (``start_iter``
            > 0) first drops the file's lines from ``start_iter`` on: the steps it replays.
        window_size: steps the medians cover.
    """

    def __init__(self, period: int = 20, json_file: str | Path | None = None, window_size: int = 20) -> None:
        if period < 1 or window_size < 1:
            raise ValueError(f"PeriodicWriter period and window_size must be >= 1, got {period}, {window_size}")
        self.period = period
        self.json_file = json_file
        self.window_size = window_size
        self._json_path: Path | None = None
        self._last_written = -1

    def before_train(self) -> None:
        self._last_written = -1
        self._json_path = None
        if self.json_file is None:
            return
        if str(self.json_file) == "auto":
            # Trainer.log_dir broadcasts from rank 0: every rank must ask
            log_dir = self.trainer.pl_trainer.log_dir or self.trainer.pl_trainer.default_root_dir
            path = Path(log_dir) / "metrics.jsonl"
        else:
            path = Path(self.json_file)
        if comm.is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._json_path = path
            if self.trainer.start_iter > 0:
                drop_lines_from(path, self.trainer.start_iter)

    def after_step(self) -> None:
        iteration = self.trainer.iter
        max_iter = self.trainer.max_iter
        if (iteration + 1) % self.period == 0 or (max_iter is not None and iteration == max_iter - 1):
            # once every hook is done with this step: the hooks listed after this one, and
            # after_epoch at an epoch's last step, have put their scalars
            self._hook_adapter.after_all_hooks(lambda: self.write(iteration))

    def after_train(self) -> None:
        # training that stopped early (exception, early stopping) still gets its last line, at
        # the last step that put scalars (not at a step that raised before putting any)
        latest = max(self.trainer.storage.latest_iterations().values(), default=None)
        if latest is not None and latest > self._last_written:
            self.write(latest)

    def write(self, iteration: int | None = None) -> None:
        """Write the console line and the JSON line for ``iteration`` (default: the storage's
        current one) on rank 0."""
        storage = self.trainer.storage
        iteration = storage.iter if iteration is None else iteration
        if comm.is_main_process():
            logger.info(self.format_line(storage, iteration))
            if self._json_path is not None:
                self._write_json(storage, iteration)
        self._last_written = iteration

    def format_line(self, storage: EventStorage, iteration: int) -> str:
        """The console line for ``iteration`` from ``storage``."""
        histories = storage.histories()
        window = self.window_size

        def median(name: str) -> float | None:
            return histories[name].median(window) if name in histories else None

        step_time, data_time = median("time"), median("data_time")
        parts = [f"eta: {self._eta(iteration, step_time)}", f"epoch/iter: {self.trainer.epoch}/{iteration}"]
        parts += [f"{name}: {buf.median(window):.4g}" for name, buf in histories.items() if "loss" in name]
        if step_time is not None:
            parts.append(f"time: {step_time:.4f}")
        if data_time is not None:
            parts.append(f"data_time: {data_time:.4f}")
        if "lr" in histories:
            parts.append(f"lr: {histories['lr'].latest():.2e}")
        device = self.trainer.pl_module.device
        if device.type == "cuda":
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated(device) / 1024**2:.0f}M")
        return "  ".join(parts)

    def _eta(self, iteration: int, step_time: float | None) -> str:
        max_iter = self.trainer.max_iter
        if max_iter is None or step_time is None:
            return "N/A"
        seconds = step_time * max(0, max_iter - iteration - 1)  # step_time includes data_time
        return str(datetime.timedelta(seconds=int(seconds)))

    def _write_json(self, storage: EventStorage, iteration: int) -> None:
        scalars = {
            name: value
            for name, (value, itr) in storage.latest_with_smoothing_hint(self.window_size).items()
            if itr > self._last_written
        }
        record = {"iteration": iteration, "epoch": self.trainer.epoch, **scalars}
        with self._json_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def drop_lines_from(path: Path, iteration: int) -> None:
    """Remove the JSON lines of ``path`` recorded at ``iteration`` or later (and unreadable ones: a
    line cut short by a killed process): a run resumed at ``iteration`` writes those steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int) and record["iteration"] < iteration:
            kept.append(line + "\n")
    write_atomically(path, "".join(kept))
