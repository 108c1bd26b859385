"""Train and evaluate from a composed Hydra config: the body of ``scripts/train.py``.

Called as::

    @hydra.main(version_base="1.3", config_path="../conf", config_name="train")
    def main(cfg):
        return train(cfg)["mAP"]
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reid_lightning.engine.checkpoint import load_checkpoint, load_model_weights
from reid_lightning.engine.checkpoint_io import AtomicCheckpointIO
from reid_lightning.engine.config_tree import print_config_tree
from reid_lightning.engine.ddp_launch import hydra_job_ddp
from reid_lightning.engine.hooks import build_hooks
from reid_lightning.engine.model_speed import compile_with_fallback, resolve_channels_last, to_channels_last
from reid_lightning.engine.module import ReIDModule
from reid_lightning.engine.resume import ResumePlan, RNGStates

log = logging.getLogger(__name__)

# metric names of ReIDMetric -> the keys of metrics.json (percent)
METRIC_NAMES = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "mAP": "mAP", "mINP": "mINP"}


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """Turn ``precision: auto`` into bf16-mixed (or 16-mixed) on a GPU and 32 elsewhere."""
    if precision != "auto":
        return precision
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if not on_gpu:
        return 32
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a name -> config mapping (None entries skipped)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def build_datamodule(data_cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate a ``data`` config, generate the demo set if needed and parse the splits."""
    # plain containers: the datamodule's hyper-parameters go into checkpoints (weights_only loading)
    datamodule = instantiate(data_cfg, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """Instantiate ``cfg.model`` for ``num_classes`` identities; put the backbone channels-last
    (``channels_last``) and compile it (``compile``, ``compile_kwargs``) if asked."""
    model = instantiate(cfg.model, num_classes=num_classes, _convert_="all")
    if resolve_channels_last(cfg.get("channels_last", False), cfg.trainer.get("accelerator", "auto")):
        to_channels_last(model.backbone)
    if cfg.get("compile"):
        compile_with_fallback(model.backbone, "backbone", **OmegaConf.to_container(cfg.get("compile_kwargs") or {}))
    return model


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> pl.Trainer:
    """Instantiate ``cfg.trainer`` with resolved precision, the callbacks, loggers and atomic checkpoint writes."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision", "auto"), trainer_cfg.get("accelerator", "auto"))
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])


def to_report(metrics: dict[str, float]) -> dict[str, float]:
    """Rename ReIDMetric results to the metrics.json keys (Rank-1, ..., mAP, mINP, TPR@FPR=...)."""
    return {METRIC_NAMES.get(k, k): round(float(v), 4) for k, v in metrics.items()}


def write_metrics(metrics: dict[str, float], output_dir: Path) -> Path:
    """Write ``metrics.json`` into ``output_dir`` and print it as a table."""
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ReID metrics ({path})")
    for name in metrics:
        table.add_column(name, justify="right")
    table.add_row(*(f"{v:.2f}" for v in metrics.values()))
    Console().print(table)
    return path


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model described by ``cfg``, test it and write ``metrics.json``.

    Returns:
        The test metrics in percent (keys of :data:`METRIC_NAMES`), empty when
        ``cfg.run_test`` is false.
    """
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    resume = ResumePlan.from_config(cfg)  # fails early when the checkpoint to resume from is missing
    if pl.utilities.rank_zero_only.rank == 0:
        print_config_tree(cfg, save_to=output_dir / "config_tree.log")

    datamodule = build_datamodule(cfg.data)
    model = build_model(cfg, datamodule.num_classes)
    plain_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    module = ReIDModule(model, solver=cfg.solver, evaluation=OmegaConf.to_container(cfg.evaluation), cfg=plain_cfg)
    if cfg.get("init_from") and not resume.ckpt_path:  # a resumed run restores its own weights
        init = load_checkpoint(cfg.init_from)
        load_model_weights(module, init["state_dict"], source=str(cfg.init_from), strict=cfg.get("init_strict", True))

    callbacks = instantiate_group(cfg.get("callbacks")) + build_hooks(cfg.get("hooks")) + [RNGStates()]
    loggers = instantiate_group(resume.logger_config(cfg.get("logger")))
    resume.keep_logged_history(loggers)
    trainer = build_trainer(cfg, callbacks, loggers)

    with hydra_job_ddp(trainer):  # DDP children of this job only (multirun sweeps)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.ckpt_path)
        if not cfg.get("run_test", True):
            return {}
        trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = to_report(module.last_test_metrics)
    if trainer.is_global_zero:
        write_metrics(metrics, output_dir)
    return metrics
