"""``PreciseBN``: recompute BatchNorm running statistics over many training batches."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from reid_lightning.engine.hooks.base import HookBase
from reid_lightning.utils import comm

logger = logging.getLogger(__name__)


def bn_modules(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that are in training mode and track running stats."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], num_iter: int) -> int:
    """Set the running mean/var of ``model``'s training-mode BatchNorm layers to the average of
    their batch statistics over ``num_iter`` inputs (fvcore's ``update_bn_stats``).

    The layers run with ``momentum=None`` (cumulative average) from reset statistics; their
    momentum is restored afterwards. Under DDP the result is averaged over ranks.

    Args:
        model: the model; called as ``model(images)`` for each item of ``batches``.
        batches: an iterable of model inputs (already on the model's device).
        num_iter: number of inputs to use.

    Returns:
        the number of inputs used (fewer than ``num_iter`` when ``batches`` ran out).
    """
    layers = bn_modules(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    used = 0
    try:
        for images in itertools.islice(batches, num_iter):
            model(images)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    stats = [t for layer in layers for t in (layer.running_mean, layer.running_var) if t is not None]
    comm.all_reduce_mean_(stats)
    return used


class PreciseBN(HookBase):
    """Recompute BatchNorm statistics with ``num_iter`` training batches after the last step
    (and after the last step of every ``period``-th epoch when set), like fast-reid's PreciseBN.

    It runs in ``after_step`` so that the validation and checkpoints that follow the step see the
    new statistics; ``after_train`` runs it when training stopped before ``max_iter`` (early
    stopping, time limit), but not after an exception. The training model (``trainer.model``)
    runs under ``torch.no_grad`` on the LightningModule's device; only its BatchNorm layers in
    training mode are updated.

    As fast-reid, it reads its own training loader, built afresh for each update, not the
    batches the current epoch trained on: ``build_train_loader(rank, world_size, epoch=epoch,
    stream=1)`` of the datamodule (or LightningModule) when it has one (``ReIDDataModule``: the
    same data and sampler with their own batches and augmentation), else a new
    ``train_dataloader()`` of it; only when neither exists, the trainer's training loader. A
    loader that runs out starts its next epoch (``sampler.set_epoch``) until ``num_iter``
    batches are used.

    Args:
        num_iter: batches to average over.
        period: also run every ``period`` epochs (None: only at the end of training).
        get_images: key of the images in a batch dict, or a callable ``batch -> model input``;
            it gets each batch as ``training_step`` does: on the device, after the
            ``on_after_batch_transfer`` hook.
    """

    def __init__(
        self,
        num_iter: int = 200,
        period: int | None = None,
        get_images: str | Callable[[Any], torch.Tensor] = "images",
    ) -> None:
        if num_iter < 1:
            raise ValueError(f"PreciseBN num_iter must be >= 1, got {num_iter}")
        if period is not None and period < 1:
            raise ValueError(f"PreciseBN period must be >= 1 or None, got {period}")
        self.num_iter = num_iter
        self.period = period
        self.get_images = get_images
        self._updated_at: int | None = None

    def before_train(self) -> None:
        self._updated_at = None

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        max_iter, per_epoch = self.trainer.max_iter, self.trainer.iters_per_epoch
        last = max_iter is not None and next_iter == max_iter
        periodic = self.period is not None and per_epoch is not None and next_iter % (self.period * per_epoch) == 0
        if last or periodic:
            self.update_stats()
            self._updated_at = next_iter

    def after_train(self) -> None:
        trainer = self.trainer
        stopped_early = self._updated_at != trainer.iter and trainer.iter > trainer.start_iter
        if stopped_early and not trainer.pl_trainer.interrupted:
            self.update_stats()

    def _images(self, batch: Any) -> torch.Tensor:
        if callable(self.get_images):
            return self.get_images(batch)
        try:
            return batch[self.get_images]
        except (KeyError, TypeError, IndexError) as err:
            raise KeyError(
                f"PreciseBN: cannot take {self.get_images!r} from a batch of type {type(batch).__name__}; "
                "pass get_images (a key or a callable)"
            ) from err

    def _fresh_loader(self) -> Iterable[Any]:
        view = self.trainer
        pl_trainer = view.pl_trainer
        source = pl_trainer.datamodule if pl_trainer.datamodule is not None else view.pl_module
        build = getattr(source, "build_train_loader", None)
        if callable(build):
            return build(pl_trainer.global_rank, pl_trainer.world_size, epoch=view.epoch, stream=1)
        if is_overridden("train_dataloader", source):
            return source.train_dataloader()
        loader = view.data_loader
        if loader is None:
            raise RuntimeError("PreciseBN needs a training dataloader, and the trainer has none")
        return loader

    def _inputs(self) -> Iterator[torch.Tensor]:
        loader = self._fresh_loader()
        module = self.trainer.pl_module
        precision = self.trainer.pl_trainer.precision_plugin
        epoch = self.trainer.epoch
        while True:
            empty = True
            for batch in loader:
                empty = False
                # Lightning's own preparation of a training batch: the precision plugin's input
                # cast (a "-true" precision's dtype), the transfer to the device, then the
                # on_after_batch_transfer hook (ReIDDataModule's normalises uint8 images)
                yield self._images(module._apply_batch_transfer_handler(precision.convert_input(batch)))
            if empty:
                return
            epoch += 1
            set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def update_stats(self) -> None:
        """Recompute the statistics now."""
        model = self.trainer.model
        used = update_bn_stats(model, self._inputs(), self.num_iter)
        if used:
            logger.info("PreciseBN: BatchNorm statistics recomputed over %d batches", used)
        else:
            logger.warning("PreciseBN: nothing done (no BatchNorm layer in training mode, or no data)")
