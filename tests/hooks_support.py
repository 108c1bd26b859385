"""Tiny LightningModule and recording hooks for the hook tests (CPU, a few milliseconds a step).

``TinyModule`` follows ReIDModule's contract: ``self.model`` is the trained nn.Module,
``self.cfg`` the run config, and ``training_step`` returns ``{"loss", "loss_dict"}``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reid_lightning.engine.hooks import HookBase
from reid_lightning.utils import comm

FEATURES = 8
CLASSES = 4


class RandomDicts(Dataset):
    """``n`` batches-worth of ``{"images": (8,) float, "targets": int}`` items, fixed by ``seed``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, FEATURES, generator=generator) * 2 + 1
        self.targets = torch.randint(0, CLASSES, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i], "targets": self.targets[i]}


class TinyModule(pl.LightningModule):
    """A 2-layer MLP (with BatchNorm) trained with two loss terms.

    Args:
        batches: training batches per epoch.
        batch_size: items per batch.
        fail_at: raise RuntimeError in ``training_step`` at this ``global_step``.
        lr: SGD learning rate.
    """

    def __init__(self, batches: int = 3, batch_size: int = 4, fail_at: int | None = None, lr: float = 0.1) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.cfg = {"name": "tiny"}
        self.batches, self.batch_size, self.fail_at, self.lr = batches, batch_size, fail_at, lr
        self.batch_losses: list[float] = []  # un-normalised total loss of every training batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError(f"failing on purpose at step {self.global_step}")
        logits = self.model(batch["images"])
        loss_cls = nn.functional.cross_entropy(logits, batch["targets"])
        loss_reg = 0.01 * logits.pow(2).mean()
        total = loss_cls + loss_reg
        self.batch_losses.append(float(total.detach()))
        return {"loss": total, "loss_dict": {"loss_cls": loss_cls.detach(), "loss_reg": loss_reg.detach()}}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDicts(self.batches * self.batch_size), batch_size=self.batch_size)


def make_trainer(tmp_path: Path, callbacks: list, **overrides: Any) -> pl.Trainer:
    """A quiet CPU trainer for 2 epochs writing under ``tmp_path``; ``overrides`` go to pl.Trainer."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return pl.Trainer(callbacks=callbacks, **kwargs)


class Recorder(HookBase):
    """Appends ``(tag, event, iter, epoch, storage.iter)`` for every hook call to ``self.events``.

    Args:
        tag: label of this hook in the events (to check interleaving).
        events: list to append to (shared by several recorders); a new one when None.
        out_dir: when set, ``after_train`` writes the events and every rank's rank, gathered, to
            ``<out_dir>/<tag>_rank<r>.json`` (to collect results from ddp_spawn processes).
    """

    def __init__(self, tag: str = "rec", events: list | None = None, out_dir: str | None = None) -> None:
        self.tag = tag
        self.events = [] if events is None else events
        self.out_dir = out_dir

    def _record(self, event: str) -> None:
        storage_iter = self.trainer.storage.iter
        self.events.append((self.tag, event, self.trainer.iter, self.trainer.epoch, storage_iter))

    def before_train(self) -> None:
        self._record("before_train")

    def before_epoch(self) -> None:
        self._record("before_epoch")

    def before_step(self) -> None:
        self._record("before_step")

    def after_step(self) -> None:
        self._record("after_step")

    def after_epoch(self) -> None:
        self._record("after_epoch")

    def after_train(self) -> None:
        self._record("after_train")
        if self.out_dir is not None:
            rank = comm.get_rank()
            gathered = [None] * comm.get_world_size()
            dist.all_gather_object(gathered, rank)  # a collective in after_train: every rank gets there
            result = {
                "events": self.events, "gathered": gathered, "world_size": comm.get_world_size(),
                "rank": self.trainer.pl_trainer.global_rank, "start_iter": self.trainer.start_iter,
                "max_iter": self.trainer.max_iter,
            }
            (Path(self.out_dir) / f"{self.tag}_rank{rank}.json").write_text(json.dumps(result))


def events_of(events: list, event: str, tag: str | None = None) -> list[tuple]:
    """The recorded tuples of one event name (and tag)."""
    return [e for e in events if e[1] == event and (tag is None or e[0] == tag)]
