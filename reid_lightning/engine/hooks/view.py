"""``TrainerView``: what a hook sees as ``self.trainer`` (fast-reid's trainer attribute names)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from reid_lightning.engine.hooks.adapter import HookAdapter
    from reid_lightning.engine.hooks.events import EventStorage


class TrainerView:
    """Read-only view of a running ``pl.Trainer`` with fast-reid's names.

    Hooks receive it as ``self.trainer`` (a ``weakref.proxy``). Iterations count optimizer steps.

    Attributes (properties):
        iter: index of the current step inside ``before_step``..``after_step`` (0-based, Lightning's
            ``global_step`` when the step began); between steps, the index of the next step.
        start_iter: ``iter`` of the first step of this fit (``global_step`` restored on resume).
        max_iter: total optimizer steps of the run (``estimated_stepping_batches``), None if unknown.
        epoch / start_epoch / max_epoch: Lightning's ``current_epoch``, its value at train start,
            and ``max_epochs`` (None when unbounded).
        iters_per_epoch: optimizer steps per epoch, None for loaders without a length.
        storage: the run's :class:`EventStorage`.
        model: ``pl_module.model`` when the module holds one, else the LightningModule.
        optimizer / scheduler: the first optimizer and LR scheduler (None when absent).
        grad_scaler: the fp16 precision plugin's ``GradScaler``, else None.
        cfg: ``pl_module.cfg`` (the run config) or None.
        data_loader: the training dataloader.
        pl_trainer / pl_module: the Lightning objects themselves.
    """

    def __init__(self, adapter: HookAdapter) -> None:
        self._adapter = adapter

    @property
    def iter(self) -> int:
        return self._adapter.iter

    @property
    def start_iter(self) -> int:
        return self._adapter.start_iter

    @property
    def max_iter(self) -> int | None:
        return self._adapter.max_iter

    @property
    def epoch(self) -> int:
        return self.pl_trainer.current_epoch

    @property
    def start_epoch(self) -> int:
        return self._adapter.start_epoch

    @property
    def max_epoch(self) -> int | None:
        epochs = self.pl_trainer.max_epochs
        return None if epochs is None or epochs < 0 else epochs

    @property
    def iters_per_epoch(self) -> int | None:
        return self._adapter.iters_per_epoch

    @property
    def storage(self) -> EventStorage:
        storage = self._adapter.storage
        if storage is None:
            raise RuntimeError("trainer.storage exists from before_train to after_train only")
        return storage

    @property
    def pl_trainer(self) -> pl.Trainer:
        return self._adapter.pl_trainer

    @property
    def pl_module(self) -> pl.LightningModule:
        return self.pl_trainer.lightning_module

    @property
    def model(self) -> nn.Module:
        module = self.pl_module
        inner = getattr(module, "model", None)
        return inner if isinstance(inner, nn.Module) else module

    @property
    def optimizer(self) -> Optimizer | None:
        optimizers = self.pl_trainer.optimizers
        return optimizers[0] if optimizers else None

    @property
    def scheduler(self) -> Any:
        configs = self.pl_trainer.lr_scheduler_configs
        return configs[0].scheduler if configs else None

    @property
    def grad_scaler(self) -> Any:
        return getattr(self.pl_trainer.precision_plugin, "scaler", None)

    @property
    def cfg(self) -> Any:
        return getattr(self.pl_module, "cfg", None)

    @property
    def data_loader(self) -> Any:
        return self.pl_trainer.train_dataloader

    def __repr__(self) -> str:
        return f"TrainerView(iter={self.iter}, epoch={self.epoch}, max_iter={self.max_iter})"
