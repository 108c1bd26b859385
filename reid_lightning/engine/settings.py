"""Typed solver and evaluation settings of :class:`reid_lightning.engine.module.ReIDModule`.

Built from the ``solver`` and ``evaluation`` configs (``conf/solver/bot.yaml``,
``conf/evaluation/default.yaml``)::

    solver = SolverSettings.from_mapping(cfg.solver)            # a misspelt key fails, naming it
    evaluation = EvaluationSettings.from_mapping(cfg.evaluation)
    optimizer = build_optimizer(model, **solver.optimizer_kwargs())
    metric = ReIDMetric(**evaluation.metric_kwargs())

Defaults are those of fast-reid's BoT recipe (the YAML files above hold the same values).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

_Settings = TypeVar("_Settings", "SolverSettings", "EvaluationSettings")


def _from_mapping(cls: type[_Settings], values: Mapping[str, Any], group: str) -> _Settings:
    values = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {group} setting(s) {unknown}: the {group} keys are {known}")
    return cls(**values)


@dataclass(frozen=True)
class SolverSettings:
    """Optimizer and LR schedule (``solver.*``); see :mod:`reid_lightning.engine.optim`.

    ``max_epochs`` and ``eval_period`` drive the trainer (``trainer.max_epochs``,
    ``trainer.check_val_every_n_epoch``); they are listed here so that the whole ``solver``
    group is checked.
    """

    optimizer: str = "Adam"
    base_lr: float = 3.5e-4
    weight_decay: float = 5e-4
    weight_decay_norm: float = 5e-4
    weight_decay_bias: float = 5e-4
    bias_lr_factor: float = 1.0
    momentum: float = 0.9
    nesterov: bool = False
    fused: bool = True
    max_epochs: int = 120
    warmup_iters: int = 2000
    warmup_factor: float = 0.1
    milestones: tuple[int, ...] = (40, 90)
    gamma: float = 0.1
    milestones_from: str = "after_warmup"
    eval_period: int = 30

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SolverSettings:
        """Settings from a ``solver`` mapping; missing keys keep the defaults.

        Raises:
            ValueError: naming any key that is not a solver setting.
        """
        settings = _from_mapping(cls, values, "solver")
        return dataclasses.replace(settings, milestones=tuple(int(m) for m in settings.milestones))

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`reid_lightning.engine.optim.build_optimizer`."""
        return {
            "name": self.optimizer, "base_lr": self.base_lr, "weight_decay": self.weight_decay,
            "weight_decay_norm": self.weight_decay_norm, "weight_decay_bias": self.weight_decay_bias,
            "bias_lr_factor": self.bias_lr_factor, "momentum": self.momentum, "nesterov": self.nesterov,
            "fused": self.fused,
        }

    def schedule_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`reid_lightning.engine.optim.build_warmup_multistep`."""
        return {
            "warmup_iters": self.warmup_iters, "warmup_factor": self.warmup_factor,
            "milestones": self.milestones, "gamma": self.gamma, "milestones_from": self.milestones_from,
        }


# evaluation.precision: "32" extracts features with autocast off; "autocast" keeps the trainer's
EVAL_PRECISIONS = ("32", "autocast")


@dataclass(frozen=True)
class EvaluationSettings:
    """Test-time settings (``evaluation.*``): the flip test, the feature precision and the
    arguments of :class:`reid_lightning.evaluation.ReIDMetric`."""

    metric: str = "cosine"
    flip: bool = False
    precision: str = "32"
    rerank: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    aqe: bool = False
    aqe_alpha: float = 3.0
    aqe_k: int = 5
    max_rank: int = 50
    tpr_fprs: tuple[float, ...] = ()
    max_chunk_mb: float = 256

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EvaluationSettings:
        """Settings from an ``evaluation`` mapping; missing keys keep the defaults.

        Raises:
            ValueError: naming any key that is not an evaluation setting, or an unknown ``precision``.
        """
        settings = _from_mapping(cls, values, "evaluation")
        precision = str(settings.precision)
        if precision not in EVAL_PRECISIONS:
            raise ValueError(
                f"evaluation.precision must be one of {list(EVAL_PRECISIONS)} (32: float32 features with autocast "
                f"off; autocast: the trainer's mixed precision), got {precision!r}"
            )
        return dataclasses.replace(settings, precision=precision, tpr_fprs=tuple(settings.tpr_fprs or ()))

    def metric_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`reid_lightning.evaluation.ReIDMetric` (without ``keep_outputs``)."""
        return {
            "metric": self.metric, "max_rank": self.max_rank, "rerank": self.rerank, "rerank_k1": self.rerank_k1,
            "rerank_k2": self.rerank_k2, "rerank_lambda": self.rerank_lambda, "aqe": self.aqe,
            "aqe_alpha": self.aqe_alpha, "aqe_k": self.aqe_k, "tpr_fprs": self.tpr_fprs,
            "max_chunk_mb": self.max_chunk_mb,
        }
