"""The LightningModule that trains and evaluates a ReID model (fast-reid's BoT by default).

Built by ``reid_lightning.cli.train`` from the Hydra config::

    model = build_bot(num_classes=datamodule.num_classes, depth=50, pretrained="imagenet")
    module = ReIDModule(model, solver=dict(cfg.solver), evaluation=dict(cfg.evaluation), cfg=cfg)
    trainer.fit(module, datamodule=datamodule)

Batches are the dicts of :class:`reid_lightning.data.ReIDDataModule`: training batches hold
``images``, ``targets`` and ``camids``; validation/test batches hold ``images``, ``targets``,
``camids``, ``is_query`` and ``index``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import Subset

from reid_lightning.engine.finite_check import NonFiniteLossWatch
from reid_lightning.engine.optim import build_optimizer, build_warmup_multistep
from reid_lightning.engine.settings import EvaluationSettings, SolverSettings
from reid_lightning.evaluation import ReIDMetric, extract_features


class ReIDModule(pl.LightningModule):
    """Trains ``model`` with its own losses and evaluates Rank-k / mAP / mINP.

    Args:
        model: an nn.Module whose train-mode ``forward(images)`` returns the outputs that its
            ``losses(outputs, targets) -> dict[str, Tensor]`` consumes, and whose eval-mode
            ``forward(images)`` returns one feature vector per image (``Baseline`` does).
        solver: optimizer and schedule settings (keys of ``conf/solver/bot.yaml``, read into
            :class:`~reid_lightning.engine.settings.SolverSettings`: an unknown key is an error).
        evaluation: test-time settings (keys of ``conf/evaluation/default.yaml``, read into
            :class:`~reid_lightning.engine.settings.EvaluationSettings`): ``flip``, ``precision``
            (``32``: evaluation features in float32 with autocast off, as fast-reid; ``autocast``:
            in the trainer's mixed precision) plus the arguments of :class:`ReIDMetric`.
        cfg: the resolved run config; stored in checkpoints as plain containers so that
            ``scripts/eval.py`` can rebuild the model, and exposed to hooks as ``trainer.cfg``.
        keep_eval_outputs: keep the ranked test data of the last test run in
            ``last_eval_outputs`` (see ``ReIDMetric(keep_outputs=True)``).
        val_sets: names of the validation loaders (``ReIDDataModule.val_set_names``), one
            ReIDMetric each. The first set logs ``val/<metric>``; with several, each also
            logs ``val/<name>/<metric>``.
        test_sets: names of the test loaders (``ReIDDataModule.test_set_names``), logged the
            same way under :attr:`test_log_prefix` (``test``).

    Attributes:
        test_log_prefix: the prefix the next test runs log under: ``test`` (the final model),
            ``best/test`` for the best checkpoint's test (``reid_lightning.cli.train``), so that
            the loggers' ``test/*`` stay the final model's figures.
    """

    def __init__(
        self,
        model: nn.Module,
        solver: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        cfg: DictConfig | Mapping | None = None,
        keep_eval_outputs: bool = False,
        val_sets: Sequence[str] = ("validation",),
        test_sets: Sequence[str] = ("test",),
    ) -> None:
        super().__init__()
        self.model = model
        self.solver = SolverSettings.from_mapping(solver or {})
        self.evaluation = EvaluationSettings.from_mapping(evaluation or {})
        self.cfg = cfg
        self.eval_autocast = self.evaluation.precision == "autocast"
        self._eval_samples = 0
        metric_kwargs = self.evaluation.metric_kwargs()
        self.val_sets, self.test_sets = list(val_sets), list(test_sets)
        self.val_metrics = nn.ModuleList(ReIDMetric(**metric_kwargs) for _ in self.val_sets)
        self.test_metrics = nn.ModuleList(ReIDMetric(keep_outputs=keep_eval_outputs, **metric_kwargs) for _ in self.test_sets)
        self.last_test_metrics: dict[str, float] = {}
        self.last_test_metrics_by_set: dict[str, dict[str, float]] = {}
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_metrics_by_set: dict[str, dict[str, float]] = {}
        self.last_val_step: int | None = None
        self.test_log_prefix = "test"
        self.loss_watch = NonFiniteLossWatch()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of ``images`` (eval mode) with the optional flip test, in float32 unless
        ``evaluation.precision=autocast``."""
        return extract_features(
            self.model, images, flip=self.evaluation.flip, autocast=self.eval_autocast
        )

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        outputs = self.model(_model_input(batch))
        loss_dict = self.model.losses(outputs, batch["targets"])
        total = sum(loss_dict.values())
        # kept unread; read (and failed) every log_every_n_steps and before validation, every
        # checkpoint (on_save_checkpoint) and the end of training (every step when no trainer drives the module)
        self.loss_watch.update(self.global_step, self.current_epoch, total, loss_dict)
        metrics = {}
        if isinstance(outputs, Mapping) and "cls_logits" in outputs:  # fast-reid's log_accuracy, top-1, on device
            metrics["cls_accuracy"] = (outputs["cls_logits"].detach().argmax(dim=1) == batch["targets"]).float().mean()
        if self._writes_step_logs(batch_idx):
            self.loss_watch.check()
            batch_size = batch["images"].shape[0]
            for name, value in loss_dict.items():
                self.log(f"train/{name}", value, batch_size=batch_size)
            # not prog_bar: Lightning would read it to the host after every batch (the progress bar shows it)
            self.log("train/total_loss", total, batch_size=batch_size)
            for name, value in metrics.items():
                self.log(f"train/{name}", value, batch_size=batch_size)
        return {"loss": total, "loss_dict": {k: v.detach() for k, v in loss_dict.items()}, "metrics": metrics}

    def _writes_step_logs(self, batch_idx: int) -> bool:
        """Whether this training step calls ``self.log``: on the steps the trainer writes to its
        loggers (Lightning's rule: every ``log_every_n_steps`` optimizer steps, and when a callback
        stops training), and on the last step of each epoch and of the fit, so that
        ``trainer.callback_metrics`` ends them with that step's values, as when every step logs.
        Every step when no trainer drives the module or ``log_every_n_steps`` is 0. Skipping the
        others saves host time: on an H200, 3.4 ms of a 41.5 ms BoT R50 step."""
        trainer = self._trainer
        if trainer is None or trainer.log_every_n_steps < 1:
            return True
        step = self.global_step + 1
        return (step % trainer.log_every_n_steps == 0 or trainer.should_stop or step == trainer.max_steps
                or batch_idx + 1 >= trainer.num_training_batches)

    def on_train_epoch_end(self) -> None:
        self.loss_watch.check()  # runs before ModelCheckpoint's on_train_epoch_end

    def on_train_end(self) -> None:
        self.loss_watch.check()

    def configure_optimizers(self) -> dict[str, Any]:
        kwargs = self.solver.optimizer_kwargs()
        if kwargs["fused"] and self._clips_under_mixed_precision():
            # Lightning refuses to clip the gradients of a fused optimizer under mixed precision
            # (its step unscales them itself): a RuntimeError at the first step
            kwargs["fused"] = False
            rank_zero_info(
                f"trainer.gradient_clip_val={self.trainer.gradient_clip_val} with precision "
                f"{self.trainer.precision}: the optimizer runs torch's per-tensor / foreach loop instead of "
                "the fused kernel (solver.fused), which Lightning cannot clip under mixed precision"
            )
        optimizer = build_optimizer(self.model, **kwargs)
        scheduler = build_warmup_multistep(optimizer, iters_per_epoch=self._iters_per_epoch(), **self.solver.schedule_kwargs())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _clips_under_mixed_precision(self) -> bool:
        """Whether the trainer clips gradients (``gradient_clip_val`` > 0) with a mixed-precision
        plugin (``16-mixed`` or ``bf16-mixed``)."""
        trainer = self._trainer
        return (trainer is not None and bool(trainer.gradient_clip_val)
                and isinstance(trainer.precision_plugin, MixedPrecision))

    def _iters_per_epoch(self) -> int:
        """Optimizer steps per epoch (training batches divided by gradient accumulation)."""
        trainer = self.trainer
        trainer.estimated_stepping_batches  # makes Lightning load the train loader and count its batches
        return max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))

    # ------------------------------------------------------------------ evaluation
    def _sanity_checking(self) -> bool:
        return self._trainer is not None and self.trainer.sanity_checking

    def _eval_step(self, metric: ReIDMetric, batch: Mapping[str, torch.Tensor]) -> None:
        features = self(_model_input(batch))
        self._eval_samples += features.shape[0]
        # the sanity check runs a few batches: often queries only, nothing to rank yet
        if not self._sanity_checking():
            metric.update(features, batch["targets"], batch["camids"], batch["is_query"], batch["index"])

    def _warn_partial_split(self, prefix: str) -> None:
        """Warn when fewer samples were evaluated (all ranks together) than the split holds."""
        loaders = self.trainer.val_dataloaders if prefix == "val" else self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        # under DDP each rank's loader holds a Subset, its share of the split
        # (ReIDDataModule.build_test_loader): the shares add up over the ranks, as the counts do
        datasets = [loader.dataset for loader in loaders]
        shares = sum(len(dataset) for dataset in datasets if isinstance(dataset, Subset))
        counts = torch.tensor([self._eval_samples, shares], device=self.device, dtype=torch.long)
        evaluated, shares = self.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        total = shares + sum(len(dataset) for dataset in datasets if not isinstance(dataset, Subset))
        if evaluated < total:
            rank_zero_warn(
                f"{prefix}: evaluated {evaluated} of the {total} samples (query + gallery) of the split "
                f"(trainer.limit_{prefix}_batches?): the {prefix}/* metrics rank a partial gallery and are not "
                "comparable with a full evaluation"
            )

    def _eval_epoch_end(
        self, metrics: nn.ModuleList, names: list[str], prefix: str, log_prefix: str | None = None
    ) -> dict[str, dict[str, float]]:
        """Computes and logs every set's metrics: ``<log_prefix>/<metric>`` for the first set and,
        with several sets, ``<log_prefix>/<set>/<metric>`` for each (``log_prefix``: default
        ``prefix``, ``val`` or ``test``); returns them by set name (nothing during Lightning's
        sanity check, which ranks nothing)."""
        log_prefix = log_prefix or prefix
        if self._sanity_checking():
            for metric in metrics:
                metric.reset()
            return {}
        self._warn_partial_split(prefix)
        by_set = {}
        for metric, set_name in zip(metrics, names):
            by_set[set_name] = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
        # every rank computed the same numbers from the gathered features: no further sync
        for key, value in _logged_keys(by_set, log_prefix).items():
            self.log(key, value, prog_bar=key in (f"{log_prefix}/mAP", f"{log_prefix}/rank1"), sync_dist=False,
                     rank_zero_only=False)
        return by_set

    def on_validation_start(self) -> None:
        self.loss_watch.check()

    def on_validation_epoch_start(self) -> None:
        self._eval_samples = 0

    def on_test_epoch_start(self) -> None:
        self._eval_samples = 0

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_metrics[dataloader_idx], batch)

    def on_validation_epoch_end(self) -> None:
        by_set = self._eval_epoch_end(self.val_metrics, self.val_sets, "val")
        if not by_set:  # sanity check
            return
        self.last_val_metrics_by_set = by_set
        self.last_val_metrics = by_set[self.val_sets[0]]
        self.last_val_step = self.global_step

    def adopt_validation_as_test(self) -> None:
        """Take the last validation's figures as the test figures (``last_test_metrics*``) and
        log them under ``test/`` to the trainer's loggers, in place of a test pass that would
        compute them again: for a run that validates on its test sets (no held-out identities)
        and validated its final weights on all of them (see ``reid_lightning.cli.train``). The
        test loop's callbacks (``on_test_*``) do not run.

        Raises:
            RuntimeError: the validation sets are not the test sets, or nothing was validated.
        """
        if self.val_sets != self.test_sets or not self.last_val_metrics_by_set:
            raise RuntimeError(
                f"the last validation ({self.val_sets}) is not a test of {self.test_sets}: run trainer.test instead"
            )
        self.last_test_metrics_by_set = {name: dict(m) for name, m in self.last_val_metrics_by_set.items()}
        self.last_test_metrics = self.last_test_metrics_by_set[self.test_sets[0]]
        logged = _logged_keys(self.last_test_metrics_by_set, "test")
        for logger in self.trainer.loggers:
            logger.log_metrics(logged, step=self.global_step)
            logger.save()

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_metrics[dataloader_idx], batch)

    def on_test_epoch_end(self) -> None:
        self.last_test_metrics_by_set = self._eval_epoch_end(self.test_metrics, self.test_sets, "test", self.test_log_prefix)
        self.last_test_metrics = self.last_test_metrics_by_set[self.test_sets[0]]

    def eval_outputs(self, test_set: int = 0) -> dict[str, Any]:
        """Ranked data of test set number ``test_set`` in the last test run (needs ``keep_eval_outputs=True``)."""
        outputs = self.test_metrics[test_set].last_outputs
        if not outputs:
            raise RuntimeError("no test outputs kept: build ReIDModule(keep_eval_outputs=True) and run trainer.test")
        return outputs

    @property
    def last_eval_outputs(self) -> dict[str, Any]:
        """Ranked data of the first test set in the last test run (needs ``keep_eval_outputs=True``)."""
        return self.eval_outputs(0)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the run config as plain containers (loadable with ``weights_only=True``).

        Raises:
            FloatingPointError: a training loss since the last read was not finite: the weights
                may hold NaNs, and Lightning writes the checkpoint only after this hook (a
                ModelCheckpoint saving every N steps would otherwise overwrite ``last.ckpt`` with them).
        """
        self.loss_watch.check()
        if self.cfg is not None:
            cfg = self.cfg
            checkpoint["reid_config"] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _logged_keys(by_set: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """Logged names of evaluation figures: ``<prefix>/<metric>`` for the first set and, with
    several sets, ``<prefix>/<set>/<metric>`` for each."""
    keys: dict[str, float] = {}
    for position, (set_name, results) in enumerate(by_set.items()):
        prefixes = ([prefix] if position == 0 else []) + ([f"{prefix}/{set_name}"] if len(by_set) > 1 else [])
        for name, value in results.items():
            for key in prefixes:
                keys[f"{key}/{name}"] = value
    return keys


def _model_input(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The batch's images; uint8 images (a ``normalize_on_device`` loader) that skipped the
    datamodule's ``on_after_batch_transfer`` fail here with what to do."""
    images = batch["images"]
    if images.dtype == torch.uint8:
        raise TypeError(
            "the batch holds uint8 images: a loader of ReIDDataModule(normalize_on_device=True) leaves "
            "their normalisation to the datamodule's on_after_batch_transfer hook; pass the datamodule "
            "(trainer.fit(module, datamodule=dm)), apply reid_lightning.data.batch_normalize.BatchNormalizer "
            "to the batch, or set data.normalize_on_device=false"
        )
    return images
