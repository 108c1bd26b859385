"""The LightningModule that trains and evaluates a ReID model (fast-reid's BoT by default).

Built by ``reid_lightning.engine.runner`` from the Hydra config::

    model = build_bot(num_classes=datamodule.num_classes, depth=50, pretrained="imagenet")
    module = ReIDModule(model, solver=dict(cfg.solver), evaluation=dict(cfg.evaluation), cfg=cfg)
    trainer.fit(module, datamodule=datamodule)

Batches are the dicts of :class:`reid_lightning.data.ReIDDataModule`: training batches hold
``images``, ``targets`` and ``camids``; validation/test batches hold ``images``, ``targets``,
``camids``, ``is_query`` and ``index``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from reid_lightning.engine.finite_check import NonFiniteLossWatch
from reid_lightning.engine.optim import build_optimizer, build_warmup_multistep
from reid_lightning.evaluation import ReIDMetric, extract_features

_OPTIMIZER_KEYS = (
    "name", "base_lr", "weight_decay", "weight_decay_norm", "weight_decay_bias",
    "bias_lr_factor", "momentum", "nesterov",
)
_SCHEDULE_KEYS = ("warmup_iters", "warmup_factor", "milestones", "gamma", "milestones_after_warmup")
_METRIC_KEYS = ("metric", "max_rank", "rerank", "rerank_k1", "rerank_k2", "rerank_lambda", "aqe", "aqe_alpha", "aqe_k", "tpr_fprs")


class ReIDModule(pl.LightningModule):
    """Trains ``model`` with its own losses and evaluates Rank-k / mAP / mINP.

    Args:
        model: an nn.Module whose train-mode ``forward(images)`` returns the outputs that its
            ``losses(outputs, targets) -> dict[str, Tensor]`` consumes, and whose eval-mode
            ``forward(images)`` returns one feature vector per image (``Baseline`` does).
        solver: optimizer and schedule settings (keys of ``conf/solver/bot.yaml``).
        evaluation: test-time settings (keys of ``evaluation`` in ``conf/train.yaml``):
            ``flip`` plus the arguments of :class:`ReIDMetric`.
        cfg: the resolved run config; stored in checkpoints as plain containers so that
            ``scripts/eval.py`` can rebuild the model, and exposed to hooks as ``trainer.cfg``.
        keep_eval_outputs: keep the ranked test data of the last test run in
            ``last_eval_outputs`` (see ``ReIDMetric(keep_outputs=True)``).
    """

    def __init__(
        self,
        model: nn.Module,
        solver: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        cfg: DictConfig | Mapping | None = None,
        keep_eval_outputs: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.solver = dict(solver or {})
        self.evaluation = dict(evaluation or {})
        self.cfg = cfg
        metric_kwargs = {k: v for k, v in self.evaluation.items() if k in _METRIC_KEYS}
        if "tpr_fprs" in metric_kwargs:
            metric_kwargs["tpr_fprs"] = tuple(metric_kwargs["tpr_fprs"] or ())
        self.val_metric = ReIDMetric(**metric_kwargs)
        self.test_metric = ReIDMetric(keep_outputs=keep_eval_outputs, **metric_kwargs)
        self.last_test_metrics: dict[str, float] = {}
        self.loss_watch = NonFiniteLossWatch()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of ``images`` (eval mode) with the optional flip test."""
        return extract_features(self.model, images, flip=bool(self.evaluation.get("flip", False)))

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        outputs = self.model(batch["images"])
        loss_dict = self.model.losses(outputs, batch["targets"])
        total = sum(loss_dict.values())
        # checked on the device; read (and failed) every log_every_n_steps and before validation,
        # checkpoints and the end of training (every step when no trainer drives the module)
        self.loss_watch.update(self.global_step, self.current_epoch, total, loss_dict)
        every = max(1, self._trainer.log_every_n_steps) if self._trainer is not None else 1
        if (self.global_step + 1) % every == 0:
            self.loss_watch.check()
        batch_size = batch["images"].shape[0]
        for name, value in loss_dict.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/total_loss", total, prog_bar=True, batch_size=batch_size)
        return {"loss": total, "loss_dict": {k: v.detach() for k, v in loss_dict.items()}}

    def on_train_epoch_end(self) -> None:
        self.loss_watch.check()  # runs before ModelCheckpoint's on_train_epoch_end

    def on_train_end(self) -> None:
        self.loss_watch.check()

    def configure_optimizers(self) -> dict[str, Any]:
        opt_kwargs = {k: self.solver[k] for k in _OPTIMIZER_KEYS if k in self.solver}
        if "optimizer" in self.solver:
            opt_kwargs["name"] = self.solver["optimizer"]
        optimizer = build_optimizer(self.model, **opt_kwargs)
        sched_kwargs = {k: self.solver[k] for k in _SCHEDULE_KEYS if k in self.solver}
        scheduler = build_warmup_multistep(optimizer, iters_per_epoch=self._iters_per_epoch(), **sched_kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _iters_per_epoch(self) -> int:
        """Optimizer steps per epoch (training batches divided by gradient accumulation)."""
        trainer = self.trainer
        trainer.estimated_stepping_batches  # makes Lightning load the train loader and count its batches
        return max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, metric: ReIDMetric, batch: Mapping[str, torch.Tensor]) -> None:
        features = self(batch["images"])
        metric.update(features, batch["targets"], batch["camids"], batch["is_query"], batch["index"])

    def _eval_epoch_end(self, metric: ReIDMetric, prefix: str) -> dict[str, float]:
        results = {k: float(v) for k, v in metric.compute().items()}
        metric.reset()
        # every rank computed the same numbers from the gathered features: no further sync
        for name, value in results.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name in ("mAP", "rank1"), sync_dist=False, rank_zero_only=False)
        return results

    def on_validation_start(self) -> None:
        self.loss_watch.check()

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(self.val_metric, batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metric, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(self.test_metric, batch)

    def on_test_epoch_end(self) -> None:
        self.last_test_metrics = self._eval_epoch_end(self.test_metric, "test")

    @property
    def last_eval_outputs(self) -> dict[str, Any]:
        """Ranked data of the last test run (needs ``keep_eval_outputs=True``)."""
        if not self.test_metric.last_outputs:
            raise RuntimeError("no test outputs kept: build ReIDModule(keep_eval_outputs=True) and run trainer.test")
        return self.test_metric.last_outputs

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the run config as plain containers (loadable with ``weights_only=True``)."""
        if self.cfg is not None:
            cfg = self.cfg
            checkpoint["reid_config"] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
