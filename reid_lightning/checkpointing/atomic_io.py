"""``AtomicCheckpointIO``: checkpoint writes that a crash cannot leave half done.

Installed by :func:`reid_lightning.cli.train.build_trainer`::

    trainer = pl.Trainer(..., plugins=[AtomicCheckpointIO()])

Lightning's ``TorchCheckpointIO`` serialises into memory and writes local files through an fsspec
transaction, whose temporary file lies in the system temp dir: its commit is a ``shutil.move``
across file systems (a copy over the old checkpoint) and nothing is synced to disk, so a kill or a
power loss during that copy leaves a truncated ``last.ckpt`` and no previous one. Here a local
checkpoint is written to a temporary file beside the target, synced, and renamed over the target
with ``os.replace`` (atomic within one file system), then the directory entry is synced: readers
see the previous complete file or the new complete file, never a mix. A process killed during the
write leaves only a stray ``.<name>.*.tmp`` file beside the checkpoint (an exception removes it).
Remote paths (``s3://`` ...) go through Lightning's own writer: object stores publish whole
objects only.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from pytorch_lightning.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a synced temporary file renamed over ``path``.

    Args:
        obj: anything ``torch.save`` accepts.
        path: a local file path; its directory is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a plain exclusive open: the file gets the usual permissions (umask), unlike mkstemp's 0600
    tmp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    handle = open(tmp_path, "xb")
    try:
        with handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX; Windows cannot open directories)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through :func:`atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (local paths) or with Lightning's writer (remote).

        Raises:
            TypeError: ``storage_options`` given (not supported, as in ``TorchCheckpointIO``).
        """
        fs, local_path = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, local_path)
