"""``HookAdapter``: the state that all ``HookBase`` callbacks of one ``pl.Trainer`` share.

Lightning calls each callback in ``trainer.callbacks`` order; the adapter turns those calls into
fast-reid's loop. It is created by the first hook's ``setup("fit")`` (found again through a
weak-keyed table, so nothing is added to the Trainer) and:

* opens the :class:`EventStorage` before any ``before_train`` and closes it after the last
  ``after_train``; ``after_train`` runs once per hook, from ``on_train_end`` or ``on_exception``;
* starts a step at the first micro-batch after the previous optimizer step (the first hook's
  ``on_train_batch_start`` does the bookkeeping, every hook then gets ``before_step``) and ends it
  at the ``on_train_batch_end`` of the batch in which Lightning's ``global_step`` advanced;
* before any ``after_step``, puts the step's scalars at ``storage.iter == trainer.iter``:
  ``total_loss`` (``outputs["loss"]``, un-normalised under gradient accumulation), every
  ``outputs["loss_dict"]`` and ``outputs["metrics"]`` entry (e.g. ``cls_accuracy``; tensors left
  on their device: the storage reads them when a writer asks, so a step does not wait for the
  device), ``lr`` (first parameter group of the first optimizer, as used by the step),
  ``data_time`` (time outside Lightning's batch hooks: loader and transfer) and ``time`` (the
  whole step, ``data_time`` included, as fast-reid's ``time`` includes its ``next(data_loader)``),
  each summed over the step's micro-batches;
* runs what hooks deferred with :meth:`HookAdapter.after_all_hooks` (``PeriodicWriter``'s write)
  once every hook is done with the step (at the next step's start, or after the last
  ``after_epoch``);
* after the last hook's ``after_step`` (and after the last ``after_epoch``/``after_train``) sends
  the scalars put at that iteration to the Lightning loggers with ``logger.log_metrics`` on global
  rank 0 (no collective call, so no DDP deadlock) every ``log_every_n_steps`` steps (never with
  ``log_every_n_steps=0``, Lightning's setting for no step logging: those put in ``after_epoch``
  still go at the epoch's end). The values
  taken from the step outputs are not sent: the LightningModule logs its own losses and metrics
  with ``self.log``. Each rank's storage holds that rank's values; rank 0's reach the loggers.

The storage never needs an explicit ``step()``: its ``iter`` is set to ``trainer.iter`` when each
step starts (detectron2's invariant), so values put in ``after_epoch`` land at the last step; its
``epoch`` is set to ``trainer.epoch`` before the hooks' ``before_epoch``. Histograms and images put
with ``storage.put_histogram`` / ``storage.put_image`` go to the TensorBoard loggers (global rank
0) when the scalars are sent, and are then cleared on every rank.
"""
from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from reid_lightning.engine.hooks.events import EventStorage
from reid_lightning.engine.hooks.view import TrainerView

if TYPE_CHECKING:
    from reid_lightning.engine.hooks.base import HookBase

_ADAPTERS: weakref.WeakKeyDictionary[pl.Trainer, HookAdapter] = weakref.WeakKeyDictionary()


class HookAdapter:
    """Drives the hooks of one fit. Hooks reach it with :meth:`attach` / :meth:`find`.

    Args:
        trainer: the Lightning trainer (held weakly).
        hooks: its ``HookBase`` callbacks in ``trainer.callbacks`` order.
    """

    def __init__(self, trainer: pl.Trainer, hooks: Sequence[HookBase]) -> None:
        if not hooks:
            raise ValueError("HookAdapter needs at least one hook")
        self.trainer_ref = weakref.ref(trainer)
        self.hooks = list(hooks)
        self.first, self.last = self.hooks[0], self.hooks[-1]
        self.view = TrainerView(self)
        proxy = weakref.proxy(self.view)
        for hook in self.hooks:
            hook.trainer = proxy
            hook._hook_adapter = self
        self._provided = frozenset().union(*(hook.provides_scalars for hook in self.hooks))

        self.storage: EventStorage | None = None
        self.started = False
        self.closed = False
        self._ended: set[int] = set()
        self.iter = self.start_iter = trainer.global_step
        self.start_epoch = trainer.current_epoch
        self.max_iter: int | None = None
        self.iters_per_epoch: int | None = None
        self._loss_scale = 1.0

        self._in_step = False
        self._opened = False
        self._closing = False
        self._step_global_step = 0
        self._lr: float | None = None
        self._parts: dict[str, list[Any]] = {}
        self._loss_names: set[str] = set()
        self._data_time = 0.0
        self._step_time = 0.0
        self._batch_start = 0.0
        self._last_end = time.perf_counter()
        self._handled: dict[str, int] = {}
        self._after_hooks: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ lookup
    @classmethod
    def attach(cls, trainer: pl.Trainer, hook: HookBase, new_fit: bool = False) -> HookAdapter:
        """The adapter of ``trainer``'s current fit, created when missing or finished.

        Args:
            trainer: the Lightning trainer calling ``hook``.
            hook: the calling hook.
            new_fit: called from ``setup("fit")``: the first hook of the trainer starts a new adapter.
        """
        adapter = _ADAPTERS.get(trainer)
        if adapter is None or adapter.closed or (new_fit and adapter.first is hook):
            from reid_lightning.engine.hooks.base import HookBase

            hooks = [cb for cb in trainer.callbacks if isinstance(cb, HookBase)]
            adapter = _ADAPTERS[trainer] = cls(trainer, hooks or [hook])
        return adapter

    @staticmethod
    def find(trainer: pl.Trainer) -> HookAdapter | None:
        """The adapter of ``trainer`` if one was created, else None."""
        return _ADAPTERS.get(trainer)

    @property
    def pl_trainer(self) -> pl.Trainer:
        trainer = self.trainer_ref()
        if trainer is None:
            raise ReferenceError("the pl.Trainer of these hooks no longer exists")
        return trainer

    # ------------------------------------------------------------------ train
    def train_start(self, hook: HookBase) -> None:
        """``on_train_start`` of ``hook``: open the storage once, then ``hook.before_train()``."""
        if not self.started:
            self._begin_training()
        hook.before_train()

    def train_end(self, hook: HookBase) -> None:
        """``on_train_end``/``on_exception`` of ``hook``: ``hook.after_train()`` once per fit."""
        if not self.started or self.closed or id(hook) in self._ended:
            return
        self._after_hooks.clear()
        self._ended.add(id(hook))
        try:
            hook.after_train()
        finally:
            if all(id(h) in self._ended for h in self.hooks):
                self._finish_training()

    def _begin_training(self) -> None:
        trainer = self.pl_trainer
        self.started = True
        self.iter = self.start_iter = trainer.global_step
        self.start_epoch = trainer.current_epoch
        try:
            steps = trainer.estimated_stepping_batches
        except MisconfigurationException:  # accumulation that changes between epochs
            steps = trainer.max_steps if trainer.max_steps >= 0 else math.inf
        self.max_iter = int(steps) if math.isfinite(steps) else None
        batches = trainer.num_training_batches
        self.iters_per_epoch = (
            math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
        )
        automatic = trainer.lightning_module.automatic_optimization
        self._loss_scale = float(trainer.accumulate_grad_batches) if automatic else 1.0
        self.storage = EventStorage(self.start_iter)
        self.storage.epoch = self.start_epoch
        self.storage.__enter__()
        self._last_end = time.perf_counter()

    def _finish_training(self) -> None:
        try:
            self._flush(self.storage.iter, due=True)
        finally:
            self.closed = True
            self.storage.__exit__(None, None, None)

    # ------------------------------------------------------------------ epochs
    def epoch_start(self, hook: HookBase) -> None:
        """``on_train_epoch_start``: restart the data timer and set ``storage.epoch``, then
        ``hook.before_epoch()``."""
        if hook is self.first:
            self._last_end = time.perf_counter()
            self.storage.epoch = self.pl_trainer.current_epoch
        hook.before_epoch()

    def epoch_end(self, hook: HookBase) -> None:
        """``on_train_epoch_end``: ``hook.after_epoch()``; after the last hook's, what hooks
        deferred with :meth:`after_all_hooks` runs and new scalars are sent."""
        hook.after_epoch()
        if hook is self.last and self.storage is not None:
            self._run_after_hooks()
            self._flush(self.storage.iter, due=True)

    def restart_data_timer(self, hook: HookBase) -> None:
        """``on_validation_end``: validation time is not data time."""
        if hook is self.first:
            self._last_end = time.perf_counter()

    # ------------------------------------------------------------------ steps
    def batch_start(self, hook: HookBase) -> None:
        """``on_train_batch_start``: the first hook opens a step if none is open; hooks get
        ``before_step`` on the step's first micro-batch."""
        if hook is self.first:
            self._begin_batch()
        if self._opened:
            hook.before_step()

    def batch_end(self, hook: HookBase, outputs: Any) -> None:
        """``on_train_batch_end``: the first hook records the batch and, when the optimizer stepped,
        the step's scalars; hooks then get ``after_step``; the last hook closes the step."""
        if hook is self.first:
            self._end_batch(outputs)
        if self._closing:
            hook.after_step()
        if hook is self.last:
            self._finish_batch()

    def _begin_batch(self) -> None:
        self._run_after_hooks()  # the previous step is over
        now = time.perf_counter()
        self._data_time += now - self._last_end
        self._batch_start = now
        self._opened = not self._in_step
        if self._opened:
            trainer = self.pl_trainer
            self._in_step = True
            self.iter = self._step_global_step = trainer.global_step
            self.storage.iter = self.iter
            optimizers = trainer.optimizers
            self._lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    def _end_batch(self, outputs: Any) -> None:
        self._collect(outputs)
        self._closing = self.pl_trainer.global_step != self._step_global_step
        if not self._closing:
            self._step_time += time.perf_counter() - self._batch_start
            return
        scalars: dict[str, Any] = self._step_losses()
        self._step_time += time.perf_counter() - self._batch_start
        if self._lr is not None:
            scalars["lr"] = self._lr
        scalars["data_time"] = self._data_time
        scalars["time"] = self._data_time + self._step_time
        storage = self.storage
        for name, value in scalars.items():
            if name not in self._provided:
                storage.put_scalar(name, value, smoothing_hint=name != "lr")

    @property
    def step_data_time(self) -> float:
        """Seconds the open step spent outside Lightning's batch hooks (loader, transfer), summed
        over its micro-batches; read in ``after_step`` (``IterationTimer`` adds it to its time)."""
        return self._data_time

    def after_all_hooks(self, function: Callable[[], None]) -> None:
        """Call ``function`` once every hook is done with the current step: when the next step
        starts or, at an epoch's last step, after the last hook's ``after_epoch`` (values put there
        land at that step). A writer uses it to see what every hook put at the step, also those
        listed after it. Called outside a step's ``after_step``, ``function`` runs now; deferred
        calls still pending when training ends (a hook raised) are dropped."""
        if self._closing:
            self._after_hooks.append(function)
        else:
            function()

    def _run_after_hooks(self) -> None:
        functions, self._after_hooks = self._after_hooks, []
        for function in functions:
            function()

    def _finish_batch(self) -> None:
        if self._closing:
            self._closing = False
            self._in_step = False
            step_iter = self.iter
            self.iter = self.pl_trainer.global_step
            self._data_time = self._step_time = 0.0
            every = self.pl_trainer.log_every_n_steps  # 0: Lightning logs no step metrics
            self._flush(step_iter, due=every > 0 and (step_iter + 1) % every == 0)
        self._last_end = time.perf_counter()

    def _collect(self, outputs: Any) -> None:
        if isinstance(outputs, torch.Tensor):
            outputs = {"loss": outputs}
        if not isinstance(outputs, Mapping):
            return
        loss = outputs.get("loss")
        if loss is not None:
            self._parts.setdefault("total_loss", []).append(loss)
        for key in ("loss_dict", "metrics"):
            values = outputs.get(key)
            if isinstance(values, Mapping):
                for name, value in values.items():
                    self._parts.setdefault(str(name), []).append(value)

    def _step_losses(self) -> dict[str, Any]:
        """Mean over the step's micro-batches of every collected loss (a tensor stays a tensor on
        its device, unread). ``total_loss`` is un-normalised from Lightning's division by the
        gradient accumulation."""
        parts, self._parts = self._parts, {}
        self._loss_names.update(parts)
        result = {name: _mean(values) for name, values in parts.items()}
        if "total_loss" in result and self._loss_scale != 1.0:
            result["total_loss"] = result["total_loss"] * self._loss_scale
        return result

    # ------------------------------------------------------------------ loggers
    def _flush(self, iteration: int, due: bool) -> None:
        """Send the scalars put at ``iteration`` and not sent before to the loggers when ``due``
        (and the histograms put so far). The losses are not sent, so their tensors stay unread."""
        if due:
            self._write_histograms()
        fresh = [
            name
            for name, itr in self.storage.latest_iterations().items()
            if itr == iteration and self._handled.get(name) != itr
        ]
        if not fresh:
            return
        for name in fresh:
            self._handled[name] = iteration
        trainer = self.pl_trainer
        if not (due and trainer.loggers and trainer.is_global_zero):
            return
        storage = self.storage
        metrics = {name: storage.history(name).latest() for name in fresh if name not in self._loss_names}
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=iteration)

    def _write_histograms(self) -> None:
        """Write the storage's histograms and images to the TensorBoard loggers (global rank 0),
        then clear them."""
        storage = self.storage
        histograms, images = storage.histograms, storage.images
        if not (histograms or images):
            return
        trainer = self.pl_trainer
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for params in histograms:
                        logger.experiment.add_histogram_raw(**params)
                    for name, image, iteration in images:
                        logger.experiment.add_image(name, image, global_step=iteration)
        storage.clear_histograms()
        storage.clear_images()


def _mean(values: list[Any]) -> Any:
    """Mean of numbers or tensors (a tensor of several elements counts as its mean), computed
    where the tensors live, without reading them."""
    items = [_scalar(v) for v in values]
    return items[0] if len(items) == 1 else sum(items) / len(items)


def _scalar(value: Any) -> Any:
    if not torch.is_tensor(value):
        return float(value)
    return value.detach() if value.numel() == 1 else value.detach().float().mean()
