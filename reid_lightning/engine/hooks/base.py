"""``HookBase``: fast-reid's hook API as a Lightning callback.

A hook overrides some of ``before_train``, ``after_train``, ``before_epoch``, ``after_epoch``,
``before_step`` and ``after_step`` and reads the run through ``self.trainer`` (a weak proxy to a
:class:`~reid_lightning.engine.hooks.view.TrainerView`)::

    class PrintLoss(HookBase):
        def after_step(self):
            if self.trainer.iter % 20 == 0:
                print(self.trainer.iter, self.trainer.storage.history("loss_cls").latest())

    trainer = pl.Trainer(callbacks=[PrintLoss()])

Every hook of one ``pl.Trainer`` shares a :class:`~reid_lightning.engine.hooks.adapter.HookAdapter`
(found through the trainer), which decides when steps start and end, keeps the EventStorage and
calls the hooks in the order of ``trainer.callbacks``. Lightning calls are mapped as

=====================  =================================================================
fast-reid              Lightning
=====================  =================================================================
``before_train``       ``on_train_start``
``after_train``        ``on_train_end``, or ``on_exception`` (once, like fast-reid's finally)
``before_epoch``       ``on_train_epoch_start``
``after_epoch``        ``on_train_epoch_end``
``before_step``        ``on_train_batch_start`` of the first micro-batch of an optimizer step
``after_step``         ``on_train_batch_end`` of the batch whose optimizer step ran
=====================  =================================================================

A subclass that also overrides one of these Lightning methods (or ``setup``) must call
``super()`` in it.
"""
from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from reid_lightning.engine.hooks.adapter import HookAdapter

if TYPE_CHECKING:
    from reid_lightning.engine.hooks.view import TrainerView


class HookBase(Callback):
    """Base class of fast-reid style hooks; each method below is a no-op to override.

    Attributes:
        trainer: weak proxy to the :class:`TrainerView` of the running fit (set at ``setup``):
            ``iter``, ``start_iter``, ``max_iter``, ``epoch``, ``storage``, ``model``, ``optimizer``, ...
        hook_name: name of the hook in the ``hooks:`` config (set by ``build_hooks``); it makes the
            checkpoint key ``state_key`` = ``"ClassName[hook_name]"``. Unnamed hooks get
            ``"ClassName#k"``, k counting the unnamed hooks of that class in ``trainer.callbacks``.
        provides_scalars: storage scalars this hook writes itself; the adapter then does not write
            them (``IterationTimer`` provides ``"time"``).

    ``state_dict()`` / ``load_state_dict(state)`` (Lightning's ``Callback`` API, empty by default)
    go into the checkpoint under ``state_key``; keep the state to plain types and tensors so that
    checkpoints load with ``torch.load(weights_only=True)``: saving a checkpoint raises a
    ``TypeError`` naming the value otherwise (a NumPy scalar, a ``deque``, a dataclass...).
    """

    trainer: TrainerView
    hook_name: str | None = None
    provides_scalars: ClassVar[frozenset[str]] = frozenset()
    _state_index: int | None = None

    # ------------------------------------------------------------------ fast-reid API
    def before_train(self) -> None:
        """Called once before the first step (also when resuming)."""

    def after_train(self) -> None:
        """Called once after the last step, also when training stops with an exception."""

    def before_epoch(self) -> None:
        """Called at the start of every training epoch."""

    def after_epoch(self) -> None:
        """Called at the end of every training epoch (``trainer.iter`` is then the next step)."""

    def before_step(self) -> None:
        """Called before each optimizer step's first micro-batch; keep it cheap."""

    def after_step(self) -> None:
        """Called after each optimizer step; the step's scalars are in ``trainer.storage``."""

    # ------------------------------------------------------------------ checkpoint key
    @property
    def state_key(self) -> str:
        """Key of this hook's state in ``checkpoint["callbacks"]``, unique per hook of a trainer."""
        name = type(self).__qualname__
        if self.hook_name is not None:
            return f"{name}[{self.hook_name}]"
        if self._state_index is None:
            # before setup (Lightning's duplicate-key check at Trainer init): unique per object
            return f"{name}@{id(self):x}"
        return f"{name}#{self._state_index}"

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not set: self.trainer before the hook's first fit
        if name == "trainer":
            raise AttributeError(
                f"{type(self).__qualname__}.trainer is set when a pl.Trainer with this hook in its callbacks "
                "starts a fit (setup('fit')): it does not exist in __init__, nor in a validate/test/predict run "
                "of a trainer that has not fitted"
            )
        raise AttributeError(f"{type(self).__qualname__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: drop the weak proxy and the adapter; setup sets them again
        state = self.__dict__.copy()
        state.pop("trainer", None)
        state.pop("_hook_adapter", None)
        return state

    def _adapter(self, trainer: pl.Trainer) -> HookAdapter:
        adapter = self.__dict__.get("_hook_adapter")
        if adapter is None or adapter.closed or adapter.trainer_ref() is not trainer:
            adapter = HookAdapter.attach(trainer, self)
        return adapter

    # ------------------------------------------------------------------ Lightning callback
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        unnamed_peers = [
            cb for cb in trainer.callbacks if type(cb) is type(self) and cb.hook_name is None
        ]
        self._state_index = next((i for i, cb in enumerate(unnamed_peers) if cb is self), None)
        if stage == "fit":
            HookAdapter.attach(trainer, self, new_fit=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter(trainer).train_start(self)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter(trainer).train_end(self)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        adapter = HookAdapter.find(trainer)
        if adapter is not None:
            adapter.train_end(self)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter(trainer).epoch_start(self)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapter(trainer).epoch_end(self)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._adapter(trainer).batch_start(self)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._adapter(trainer).batch_end(self, outputs)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state:
            check_weights_only_loadable(state, self.state_key)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        adapter = HookAdapter.find(trainer)
        if adapter is not None:
            adapter.restart_data_timer(self)


_PLAIN_LEAVES = (str, int, float, bool, bytes, type(None), torch.Tensor, torch.nn.Parameter)


def check_weights_only_loadable(state: Any, owner: str, path: str = "") -> None:
    """Raise when ``torch.load(weights_only=True)`` could not read ``state`` back.

    Args:
        state: a hook's ``state_dict()``.
        owner: its ``state_key``, for the message.
        path: where ``state`` sits in the hook's state (``['scores'][1]``), for the message.

    Raises:
        TypeError: naming the first value of another type and where it sits.
    """
    kind = type(state)
    if kind in (dict, OrderedDict):
        for key, value in state.items():
            check_weights_only_loadable(key, owner, f"{path} (a key)")
            check_weights_only_loadable(value, owner, f"{path}[{key!r}]")
        return
    if kind in (list, tuple):
        for i, value in enumerate(state):
            check_weights_only_loadable(value, owner, f"{path}[{i}]")
        return
    if kind in _PLAIN_LEAVES:
        return
    buffer = io.BytesIO()
    try:  # another type torch's weights_only unpickler may allow (torch.Size, dtype, set...)
        torch.save(state, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, TypeError, AttributeError) as err:
        raise TypeError(
            f"the state_dict() of hook {owner} holds a {kind.__module__}.{kind.__qualname__} at "
            f"state{path or ''}: torch.load(weights_only=True) cannot read it, so the checkpoint could not be "
            "resumed. Keep hook state to numbers, strings, lists, tuples, dicts and tensors (e.g. float(x) for a "
            "NumPy scalar, list(d) for a deque)"
        ) from err
