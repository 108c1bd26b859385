"""``AsyncAtomicCheckpointIO``: atomic checkpoint writes in a background thread, so that training
goes on while ``last.ckpt`` is serialised, written and synced.

Installed by :func:`reid_lightning.cli.train.build_trainer` when ``async_checkpoints`` is true
(the default)::

    trainer = pl.Trainer(..., plugins=[AsyncAtomicCheckpointIO()])

A save copies every tensor of the checkpoint to host memory on the calling thread (a snapshot:
training then changes the weights in place; a GPU tensor's copy waits for the GPU once), then one
background thread writes it with :func:`~reid_lightning.checkpointing.atomic_io.atomic_torch_save`.
Saves and removals run in the order they were asked for, so a best checkpoint is removed only
after its successor is on disk. Loads, ``wait()`` and the end of ``trainer.fit`` (``teardown``)
wait for the writes in flight. A write that fails is raised by the next save, removal, load or
``teardown``: the run stops there, as it would have at the write itself, one call later.

What it costs: one copy of the checkpoint in host memory while a write is in flight, and a process
killed before a write ends keeps the previous complete file (the write is atomic), one checkpoint
older than a synchronous writer would have left.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

from reid_lightning.checkpointing.atomic_io import AtomicCheckpointIO


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory that later in-place updates of ``tensor`` do not reach."""
    return tensor.detach().to("cpu", copy=True)


class AsyncAtomicCheckpointIO(AtomicCheckpointIO):
    """:class:`AtomicCheckpointIO` whose saves and removals run, in order, in one background thread."""

    def __init__(self) -> None:
        super().__init__()
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future | None = None
        self._error: BaseException | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` to host memory and queue its write to ``path``.

        Raises:
            BaseException: the error of an earlier write or removal that failed.
        """
        snapshot = apply_to_collection(checkpoint, torch.Tensor, _host_copy)
        self._submit(f"writing checkpoint {path}", AtomicCheckpointIO.save_checkpoint, self, snapshot, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        """Queue the removal of ``path`` after the writes asked for before it."""
        self._submit(f"removing checkpoint {path}", AtomicCheckpointIO.remove_checkpoint, self, path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Wait for the writes in flight, then load ``path``."""
        self.wait()
        return super().load_checkpoint(path, *args, **kwargs)

    def wait(self) -> None:
        """Block until every queued write and removal is done.

        Raises:
            BaseException: the error of a write or removal that failed (raised once).
        """
        if self._last is not None:
            self._last.result()  # the wrapper below never raises: errors land in self._error
            self._last = None
        self._raise_error()

    def teardown(self) -> None:
        """Wait for the writes in flight and stop the thread (Lightning calls it at the end of a fit)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _submit(self, what: str, call: Callable[..., None], *args: Any) -> None:
        self._raise_error()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint_io")
        self._last = self._executor.submit(self._run, what, call, *args)

    def _run(self, what: str, call: Callable[..., None], *args: Any) -> None:
        if self._error is not None:  # an earlier write failed: later ones would build on it
            return
        try:
            call(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the training thread at its next call
            # raised later, by another call: say which write it was (Python >= 3.11)
            if hasattr(error, "add_note"):
                error.add_note(f"(raised in the background thread of AsyncAtomicCheckpointIO, {what}; "
                               "async_checkpoints=false writes in the training step instead)")
            self._error = error

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
