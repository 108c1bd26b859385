"""The run's hyper-parameters for Lightning's loggers: the resolved config, flattened.

Called by :func:`reid_lightning.cli.train.train` once the trainer is built::

    log_hyperparameters(trainer.loggers, cfg)

Every logger (CSV ``hparams.yaml``, TensorBoard's HPARAMS tab, MLflow params, W&B config) gets
the same flat mapping, keyed like Hydra overrides (``solver.base_lr``, ``model.depth``,
``data.batch_size``), so that a logged value can be passed back on the command line.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping with dotted keys; lists and scalars are leaves.

    Args:
        tree: a plain (resolved) config, e.g. ``OmegaConf.to_container(cfg, resolve=True)``.
        prefix: key of ``tree`` itself ("" at the top).

    Returns:
        ``{"a.b": 1, "a.c": [2, 3]}`` for ``{"a": {"b": 1, "c": [2, 3]}}``; empty mappings leave
        no key.
    """
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def log_hyperparameters(loggers: Iterable[Logger], cfg: DictConfig) -> dict[str, Any]:
    """Log the resolved, flattened ``cfg`` to every logger (each logs on rank 0 only).

    An MLflow run continued by ``resume=true`` gets only the keys it does not hold yet: MLflow
    refuses to change a logged param (``resume`` itself goes from false to true).

    Args:
        loggers: the trainer's loggers (``trainer.loggers``).
        cfg: the run config (without the ``hydra`` node, as ``@hydra.main`` passes it).

    Returns:
        The logged mapping.
    """
    params = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    for logger in loggers:
        logger.log_hyperparams(_not_logged_yet(logger, params))
    return params


def _not_logged_yet(logger: Logger, params: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(logger, MLFlowLogger) or rank_zero_only.rank != 0:
        return params
    held = logger.experiment.get_run(logger.run_id).data.params
    return {key: value for key, value in params.items() if key not in held}
