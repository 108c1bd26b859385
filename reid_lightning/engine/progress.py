"""``IntervalRichProgressBar``: Lightning's RichProgressBar reading the training losses at an interval.

Reading a loss for display copies it to the host, which waits for the GPU. Lightning's bar shows
the metrics logged with ``prog_bar=True``, and Lightning converts those to numbers after every
training batch, even on the batches that log nothing (it shows the last logged value again): a
wait for the GPU at every step. ``ReIDModule`` therefore logs its training losses without
``prog_bar``; this bar shows the ``show`` metrics itself, read from ``trainer.callback_metrics``
every ``metrics_every_n_steps`` batches. Listed in ``conf/callbacks/default.yaml``::

    progress_bar:
      _target_: reid_lightning.engine.progress.IntervalRichProgressBar
      metrics_every_n_steps: null     # null: the trainer's log_every_n_steps
      show: [train/total_loss]
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

TRAINING_LOSS = "train/total_loss"


class IntervalRichProgressBar(RichProgressBar):
    """A RichProgressBar whose metrics refresh every ``metrics_every_n_steps`` training batches and
    which shows the ``show`` metrics (logged without ``prog_bar``) besides Lightning's progress-bar
    metrics; the bar itself advances every batch.

    Args:
        metrics_every_n_steps: batches between two metric reads; None: ``trainer.log_every_n_steps``.
        show: names in ``trainer.callback_metrics`` to show (those not logged yet are left out).
        **kwargs: arguments of ``RichProgressBar``.
    """

    def __init__(self, metrics_every_n_steps: int | None = None, show: Sequence[str] = (TRAINING_LOSS,), **kwargs: Any) -> None:
        if metrics_every_n_steps is not None and metrics_every_n_steps < 1:
            raise ValueError(f"metrics_every_n_steps must be >= 1 or None, got {metrics_every_n_steps}")
        super().__init__(**kwargs)
        self.metrics_every_n_steps = metrics_every_n_steps
        self.show = list(show)
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

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        """Lightning's metrics for the bar, with the ``show`` metrics read to numbers."""
        metrics = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics
        for name in self.show:
            if name in logged:
                metrics[name] = float(logged[name])
        return metrics
