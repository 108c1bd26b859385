"""Train and evaluate from a composed Hydra config: the body of ``scripts/train.py``.

Called as::

    @hydra.main(version_base="1.3", config_path="../conf", config_name="train")
    def main(cfg):
        return objective(train(cfg))
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from reid_lightning.checkpointing.async_io import AsyncAtomicCheckpointIO
from reid_lightning.checkpointing.atomic_io import AtomicCheckpointIO
from reid_lightning.checkpointing.load import (
    load_checkpoint,
    load_model_checkpoint,
    load_model_weights,
)
from reid_lightning.checkpointing.resume import ResumePlan, RNGStates
from reid_lightning.cli.config_tree import print_config_tree
from reid_lightning.engine.hooks import build_hooks
from reid_lightning.engine.hparams import log_hyperparameters
from reid_lightning.engine.model_speed import (
    compile_with_fallback,
    resolve_channels_last,
    resolve_compile,
    to_channels_last,
    trains_on_gpu,
)
from reid_lightning.engine.module import ReIDModule
from reid_lightning.engine.settings import EvaluationSettings, SolverSettings
from reid_lightning.launch.hydra_ddp import hydra_job_ddp

log = logging.getLogger(__name__)

# metric names of ReIDMetric -> the keys of metrics.json (percent)
METRIC_NAMES = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "mAP": "mAP", "mINP": "mINP"}


def seed_run(cfg: DictConfig) -> int:
    """Seed python, numpy and torch (and the loader workers) with ``cfg.seed``; returns it.

    Raises:
        TypeError: ``seed`` is not an integer (``seed=abc``), naming it.
    """
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return pl.seed_everything(seed, workers=True)


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """Turn ``precision: auto`` into bf16-mixed on a GPU with native bfloat16 (Ampere and later),
    16-mixed on an older GPU, and 32 elsewhere."""
    if precision != "auto":
        return precision
    if not trains_on_gpu(accelerator):
        return 32
    return "bf16-mixed" if native_bf16() else "16-mixed"


def native_bf16() -> bool:
    """Whether the current CUDA GPU computes bfloat16 natively (compute capability 8.0 and later).

    ``torch.cuda.is_bf16_supported()`` also counts bfloat16 emulated on a V100 or T4 (no bf16
    tensor cores: far slower than fp16 there) unless asked not to; a torch too old for that
    argument is answered by the compute capability.
    """
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # no including_emulation in this torch
        return torch.version.hip is not None or torch.cuda.get_device_capability() >= (8, 0)


def instantiate_group(group: DictConfig | None, name: str = "callbacks") -> list[Any]:
    """Instantiate every entry of a name -> ``{_target_: ...}`` mapping (None entries skipped).

    Args:
        group: the mapping (``cfg.callbacks``, ``cfg.logger``), or None.
        name: its config key, for the error message.

    Raises:
        TypeError: an entry that is neither null nor a mapping with ``_target_`` (a misspelt
            ``_target_``, or ``+callbacks.x.key=value`` without one), naming it.
    """
    if not group:
        return []
    objects = []
    for key, node in group.items():
        if node is None:
            continue
        if not isinstance(node, (Mapping, DictConfig)) or "_target_" not in node:
            shown = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
            raise TypeError(f"{name}.{key}: expected a mapping with '_target_' (or null to drop it), got {shown!r}")
        objects.append(instantiate(node))
    return objects


def build_datamodule(data_cfg: DictConfig, stage: str = "fit") -> pl.LightningDataModule:
    """Instantiate a ``data`` config, generate the demo set if needed and parse the splits
    (``stage="test"``: the test sets only)."""
    # plain containers: the datamodule's hyper-parameters go into checkpoints (weights_only loading)
    datamodule = instantiate(data_cfg, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """Instantiate ``cfg.model`` for ``num_classes`` identities; put the backbone channels-last
    (``channels_last``) and compile it (``compile``: true, or auto on one GPU; ``compile_kwargs``)."""
    model = instantiate(cfg.model, num_classes=num_classes, _convert_="all")
    if resolve_channels_last(cfg.get("channels_last", False), cfg.trainer.get("accelerator", "auto")):
        to_channels_last(model.backbone)
    if resolve_compile(cfg.get("compile", False), cfg.trainer):
        compile_kwargs = cfg.get("compile_kwargs")  # an empty DictConfig is falsy: the default {}
        compile_with_fallback(model.backbone, "backbone", **(OmegaConf.to_container(compile_kwargs) if compile_kwargs else {}))
    return model


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> pl.Trainer:
    """Instantiate ``cfg.trainer`` with resolved precision, the callbacks, loggers and atomic
    checkpoint writes (in a background thread with ``async_checkpoints``).

    Raises:
        RuntimeError: for a GPU accelerator on a machine where torch finds no CUDA GPU.
        ValueError: for ``solver.eval_period`` (``check_val_every_n_epoch``) below 1.
    """
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.accelerator={trainer_cfg['accelerator']} (trainer=gpu, trainer=ddp) but torch finds no CUDA GPU "
            "on this machine: train on the CPU with trainer=cpu or trainer=ddp_cpu, or keep trainer.accelerator=auto"
        )
    every = trainer_cfg.get("check_val_every_n_epoch")
    if isinstance(every, int) and every < 1:
        raise ValueError(
            f"solver.eval_period (trainer.check_val_every_n_epoch) must be >= 1 epochs between validations, got "
            f"{every}; to validate after the last epoch only (fast-reid's TEST.EVAL_PERIOD: 0), set it to "
            "solver.max_epochs"
        )
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision", "auto"), trainer_cfg.get("accelerator", "auto"))
    checkpoint_io = AsyncAtomicCheckpointIO() if cfg.get("async_checkpoints", False) else AtomicCheckpointIO()
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=[checkpoint_io])


def to_report(metrics: dict[str, float]) -> dict[str, float]:
    """Rename ReIDMetric results to the metrics.json keys (Rank-1, ..., mAP, mINP, TPR@FPR=...)."""
    return {METRIC_NAMES.get(k, k): round(float(v), 4) for k, v in metrics.items()}


def report_test_metrics(module: ReIDModule) -> dict[str, Any]:
    """metrics.json figures of the module's last test run: the first test set's at the top
    level and, when there are several test sets, a ``test_sets`` block holding each set's."""
    report: dict[str, Any] = to_report(module.last_test_metrics)
    if len(module.last_test_metrics_by_set) > 1:
        report["test_sets"] = {name: to_report(m) for name, m in module.last_test_metrics_by_set.items()}
    return report


def metric_rows(metrics: dict[str, Any], label: str = "test") -> list[tuple[str, dict[str, float]]]:
    """The numeric figures of a metrics.json dict as ``(label, figures)`` rows: the top level
    as ``label``, then each nested block (``val``, ``best``, each test set) as its own row."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    rows = [(label, flat)] if flat else []
    for key, value in metrics.items():
        if isinstance(value, dict):
            child = label if key == "test_sets" else (key if label == "test" else f"{label} {key}")
            rows += metric_rows(value, child)
    return rows


def write_metrics(metrics: dict[str, Any], output_dir: Path) -> Path:
    """Write ``metrics.json`` into ``output_dir`` and print it as a table (one row per block;
    no table for an empty dict)."""
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    if not metrics:
        return path
    from rich.console import Console
    from rich.table import Table

    rows = metric_rows(metrics)
    table = Table(title=f"ReID metrics ({path})")
    columns = list(dict.fromkeys(name for _, row in rows for name in row))
    for name in ["", *columns]:
        table.add_column(name, justify="right")
    for label, row in rows:
        cells = [row.get(name, "") for name in columns]
        table.add_row(label, *(f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells))
    Console().print(table)
    return path


class ValidateFinalEpoch(pl.Callback):
    """Validates the last epoch (``trainer.max_epochs``) also when ``solver.eval_period`` does not
    divide it, as fast-reid's EvalHook evaluates the final iteration: inside the fit, so that
    the ModelCheckpoint monitoring ``val/mAP`` weighs the final model too (a ``trainer.validate``
    after the fit saves no checkpoint). The trainer's ``check_val_every_n_epoch`` is 1 for that
    epoch only."""

    def __init__(self) -> None:
        self._every: int | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every, last = trainer.check_val_every_n_epoch, trainer.max_epochs
        if isinstance(every, int) and every > 1 and last is not None and last > 0 and trainer.current_epoch == last - 1:
            self._every, trainer.check_val_every_n_epoch = every, 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._every is not None:
            trainer.check_val_every_n_epoch, self._every = self._every, None


def selection_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The first ModelCheckpoint that monitors ``val/mAP`` and has saved a best checkpoint."""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor == "val/mAP" and callback.best_model_path:
            return callback
    return None


def evaluate_best_checkpoint(
    trainer: pl.Trainer, module: ReIDModule, datamodule: pl.LightningDataModule, callback: ModelCheckpoint
) -> dict[str, Any]:
    """Load the best checkpoint of ``callback`` into ``module`` and test it, logging its figures
    under ``best/test/`` (the final model's are ``test/``).

    Returns:
        The ``best`` block of metrics.json: its ``epoch`` (0-based, as in its file name),
        ``step``, ``val_mAP``, ``checkpoint`` path and its test figures (see :func:`report_test_metrics`).
    """
    ckpt = load_checkpoint(callback.best_model_path)
    load_model_weights(module, ckpt["state_dict"], source=str(callback.best_model_path))
    module.test_log_prefix = "best/test"  # the loggers' test/* stay the final model's
    try:
        trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        module.test_log_prefix = "test"
    return {**best_checkpoint_block(callback, ckpt), **report_test_metrics(module)}


def best_checkpoint_block(callback: ModelCheckpoint, ckpt: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``best`` block of metrics.json without test figures (what ``run_test=false`` reports):
    the best checkpoint's ``epoch``, ``step``, ``val_mAP`` and ``checkpoint`` path (``ckpt``: its
    loaded contents, read from the file when None)."""
    if ckpt is None:
        ckpt = load_checkpoint(callback.best_model_path)
    return {
        "epoch": int(ckpt["epoch"]), "step": int(ckpt["global_step"]),
        "val_mAP": round(float(callback.best_model_score), 4), "checkpoint": str(callback.best_model_path),
    }


def objective(metrics: dict[str, Any]) -> float | None:
    """The figure a sweeper optimises: the best checkpoint's validation mAP, else the final
    model's validation mAP when a validation split exists, else the test mAP."""
    if "best" in metrics:
        return metrics["best"]["val_mAP"]
    if "val" in metrics:
        return metrics["val"]["mAP"]
    return metrics.get("mAP")


def validated_final_weights_on_test_sets(trainer: pl.Trainer, module: ReIDModule, datamodule: Any) -> bool:
    """Whether the last validation ranked the test sets, in full as a test would, with the final
    weights: no held-out validation identities, a validation after the last optimizer step,
    validation batches limited as test batches are, and one process. Under DDP each rank
    validates with its own BatchNorm running statistics from the last step, while the test
    starts from rank 0's whole state (what last.ckpt holds), so the test pass runs there."""
    return (
        trainer.world_size == 1 and datamodule.val_split is None and module.val_sets == module.test_sets
        and module.last_val_step == trainer.global_step and trainer.limit_val_batches == trainer.limit_test_batches
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the model described by ``cfg``, test it and write ``metrics.json``.

    With held-out validation identities (``data.val_identities``) the last epoch is
    validated also when ``solver.eval_period`` does not divide ``solver.max_epochs``
    (:class:`ValidateFinalEpoch`), the final model once more after the fit when the fit
    stopped elsewhere (``trainer.max_steps``), and the best checkpoint by ``val/mAP`` is tested
    after the final model. Without them validation ranks the test sets, so when the last epoch
    was validated its figures are the test figures and no second pass runs.

    Returns:
        The contents of metrics.json, in percent: the final model's test figures (keys of
        :data:`METRIC_NAMES`) of the first test set, ``test_sets`` (each test set's, when
        several), ``val`` (the final model's validation figures) and ``best`` (see
        :func:`evaluate_best_checkpoint`) when there is a validation split. Test figures are
        absent when ``cfg.run_test`` is false (``best`` then holds no test figures either); the
        dict (and metrics.json) is then empty without a validation split.
    """
    output_dir = Path(cfg.paths.output_dir)
    seed_run(cfg)
    resume = ResumePlan.from_config(cfg)  # fails early when the checkpoint to resume from is missing
    resume.keep_held_settings(cfg)  # the learning rate etc. that the restored optimizer state holds
    # a bad solver or evaluation value fails here, named, before any data is read
    SolverSettings.from_mapping(cfg.solver)
    EvaluationSettings.from_mapping(cfg.evaluation)
    if pl.utilities.rank_zero_only.rank == 0:
        print_config_tree(cfg, save_to=output_dir / "config_tree.log")

    datamodule = build_datamodule(cfg.data)
    model = build_model(cfg, datamodule.num_classes)
    plain_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    module = ReIDModule(
        model, solver=cfg.solver, evaluation=OmegaConf.to_container(cfg.evaluation), cfg=plain_cfg,
        val_sets=datamodule.val_set_names, test_sets=datamodule.test_set_names,
    )
    if cfg.get("init_from") and not resume.ckpt_path:  # a resumed run restores its own weights
        init = load_model_checkpoint(cfg.init_from, option="init_from")  # ours or fast-reid's
        load_model_weights(module, init["state_dict"], source=str(cfg.init_from), strict=cfg.get("init_strict", True))

    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks") + build_hooks(cfg.get("hooks")) + [RNGStates()]
    if datamodule.val_split is not None:  # the final model competes for the best checkpoint
        callbacks.append(ValidateFinalEpoch())
    loggers = instantiate_group(resume.logger_config(cfg.get("logger")), "logger")
    if not loggers:  # logger=none: Lightning's LearningRateMonitor refuses a trainer without loggers
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    resume.keep_logged_history(loggers)
    trainer = build_trainer(cfg, callbacks, loggers)
    log_hyperparameters(trainer.loggers, cfg)

    with hydra_job_ddp(trainer):  # DDP children of this job only (multirun sweeps)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.ckpt_path)
        metrics: dict[str, Any] = {}
        if datamodule.val_split is not None:
            if module.last_val_step != trainer.global_step:  # the final weights have not been validated
                trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics["val"] = to_report(module.last_val_metrics)
        run_test = cfg.get("run_test", True)
        if run_test:
            if validated_final_weights_on_test_sets(trainer, module, datamodule):
                module.adopt_validation_as_test()  # a test pass would compute the same figures again
            else:
                trainer.test(module, datamodule=datamodule, verbose=False)
            metrics = {**report_test_metrics(module), **metrics}
        best = selection_checkpoint(trainer) if datamodule.val_split is not None else None
        if best is not None:  # what the objective returns; its test figures only with run_test
            metrics["best"] = (evaluate_best_checkpoint(trainer, module, datamodule, best) if run_test
                               else best_checkpoint_block(best))
    if trainer.is_global_zero:
        # also without figures (run_test=false, no validation split): a sweep's summary lists a
        # job without metrics.json as failed
        write_metrics(metrics, output_dir)
    return metrics
