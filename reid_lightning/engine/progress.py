"""``IntervalRichProgressBar``: Lightning's RichProgressBar reading the logged metrics at an interval.

Reading a logged loss for display copies it to the host, which waits for the GPU; Lightning's bar
does it after every batch. Listed in ``conf/callbacks/default.yaml``::

    progress_bar:
      _target_: reid_lightning.engine.progress.IntervalRichProgressBar
      metrics_every_n_steps: null     # null: the trainer's log_every_n_steps
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class IntervalRichProgressBar(RichProgressBar):
    """A RichProgressBar whose metrics (losses) refresh every ``metrics_every_n_steps`` training
    batches; the bar itself advances every batch.

    Args:
        metrics_every_n_steps: batches between two metric reads; None: ``trainer.log_every_n_steps``.
        **kwargs: arguments of ``RichProgressBar``.
    """

    def __init__(self, metrics_every_n_steps: int | None = None, **kwargs: Any) -> None:
        if metrics_every_n_steps is not None and metrics_every_n_steps < 1:
            raise ValueError(f"metrics_every_n_steps must be >= 1 or None, got {metrics_every_n_steps}")
        super().__init__(**kwargs)
        self.metrics_every_n_steps = metrics_every_n_steps
        self._skip_metrics = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # after the optimizer step: global_step counts this batch, as Lightning's logging rule does
        every = self.metrics_every_n_steps or max(1, trainer.log_every_n_steps)
        self._skip_metrics = trainer.global_step % every != 0
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._skip_metrics = False

    def _update_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skip_metrics:
            super()._update_metrics(trainer, pl_module)
