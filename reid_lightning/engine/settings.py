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

from reid_lightning.engine.optim import MILESTONES_FROM, OPTIMIZERS
from reid_lightning.evaluation.distance import METRICS as DISTANCE_METRICS

_Settings = TypeVar("_Settings", "SolverSettings", "EvaluationSettings")

# the type each solver or evaluation setting must have (an int is a float too), by the dataclass annotation
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"float": (int, float), "int": int, "bool": bool, "str": str}
_TYPE_NAMES = {(int, float): "a number", int: "an integer", bool: "true or false", str: "a string"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def _check_types(settings: Any, group: str, nullable: tuple[str, ...] = ()) -> None:
    """Fail on a setting whose value is not of its annotated type (``true`` for a number, ``'yes'``
    for a bool...), naming ``<group>.<key>``; the keys in ``nullable`` may also be None."""
    for field in dataclasses.fields(settings):
        value, kind = getattr(settings, field.name), _FIELD_TYPES.get(field.type)
        if field.name in nullable and value is None:
            continue
        if kind is not None and not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
            raise ValueError(f"{group}.{field.name} must be {_TYPE_NAMES[kind]}, got {value!r}")


def _check_rules(settings: Any, group: str, rules: list[tuple[str, bool, str]]) -> None:
    """Fail on the first ``(key, holds, rule)`` that does not hold: ``<group>.<key> must <rule>, got <value>``."""
    for key, ok, rule in rules:
        if not ok:
            raise ValueError(f"{group}.{key} must {rule}, got {getattr(settings, key)!r}")


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
            ValueError: naming any key that is not a solver setting, or a bad value (see :meth:`check`).
        """
        settings = _from_mapping(cls, values, "solver")
        milestones = settings.milestones
        if milestones is None or isinstance(milestones, (int, float, str)) or not all(_is_int(m) for m in milestones):
            raise ValueError(f"solver.milestones must be a list of epochs, e.g. [40, 90], got {milestones!r}")
        settings = dataclasses.replace(settings, milestones=tuple(int(m) for m in milestones))
        settings.check()
        return settings

    def check(self) -> None:
        """Fail on a value that cannot train (or would silently not train as meant), naming its key.

        Raises:
            ValueError: ``solver.<key> must ..., got <value>`` for the first bad setting.
        """
        if self.optimizer not in OPTIMIZERS:
            hint = next((f" (did you mean {name!r}?)" for name in OPTIMIZERS if name.lower() == str(self.optimizer).lower()), "")
            raise ValueError(f"solver.optimizer must be one of {', '.join(OPTIMIZERS)}{hint}, got {self.optimizer!r}")
        _check_types(self, "solver", nullable=("eval_period",))  # eval_period null: by val_check_interval
        rules = [
            ("base_lr", self.base_lr > 0, "be > 0"),
            ("weight_decay", self.weight_decay >= 0, "be >= 0"),
            ("weight_decay_norm", self.weight_decay_norm >= 0, "be >= 0"),
            ("weight_decay_bias", self.weight_decay_bias >= 0, "be >= 0"),
            ("bias_lr_factor", self.bias_lr_factor > 0, "be > 0"),
            ("momentum", self.momentum >= 0, "be >= 0"),
            ("max_epochs", self.max_epochs >= 1 or self.max_epochs == -1, "be >= 1 (or -1: no epoch limit, as in Lightning)"),
            ("warmup_iters", self.warmup_iters >= 0, "be >= 0 (0: no warmup)"),
            ("warmup_factor", self.warmup_factor >= 0, "be >= 0 (the LR multiplier at the first step)"),
            ("gamma", self.gamma > 0, "be > 0 (the LR multiplier at each milestone; 0 would stop training there)"),
            ("milestones", all(m >= 1 for m in self.milestones), "be epochs >= 1"),
            ("milestones", all(a < b for a, b in zip(self.milestones, self.milestones[1:])),
             "be strictly increasing epochs"),
            ("milestones_from", self.milestones_from in MILESTONES_FROM, f"be one of {', '.join(MILESTONES_FROM)}"),
        ]
        _check_rules(self, "solver", rules)
        if self.optimizer == "SGD" and self.nesterov and self.momentum <= 0:
            raise ValueError(f"solver.nesterov=true needs solver.momentum > 0 (SGD), got {self.momentum!r}")

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
        settings = dataclasses.replace(settings, precision=precision, tpr_fprs=tuple(settings.tpr_fprs or ()))
        settings.check()
        return settings

    def check(self) -> None:
        """Fail on a value the evaluation cannot use, naming its key (at set-up, not at the first
        validation after an epoch of training).

        Raises:
            ValueError: ``evaluation.<key> must ..., got <value>`` for the first bad setting.
        """
        _check_types(self, "evaluation")
        fprs = self.tpr_fprs
        _check_rules(self, "evaluation", [
            ("metric", self.metric in DISTANCE_METRICS, f"be one of {', '.join(DISTANCE_METRICS)}"),
            ("rerank_k1", self.rerank_k1 >= 1, "be >= 1"),
            ("rerank_k2", self.rerank_k2 >= 1, "be >= 1"),
            ("rerank_lambda", 0 <= self.rerank_lambda <= 1, "lie in [0, 1]"),
            ("aqe_alpha", self.aqe_alpha >= 0, "be >= 0"),
            ("aqe_k", self.aqe_k >= 1, "be >= 1"),
            ("max_rank", self.max_rank >= 1, "be >= 1"),
            ("tpr_fprs", all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fprs),
             "be false-positive rates in (0, 1]"),
            ("max_chunk_mb", self.max_chunk_mb > 0, "be > 0"),
        ])

    def metric_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`reid_lightning.evaluation.ReIDMetric` (without ``keep_outputs``)."""
        return {
            "metric": self.metric, "max_rank": self.max_rank, "rerank": self.rerank, "rerank_k1": self.rerank_k1,
            "rerank_k2": self.rerank_k2, "rerank_lambda": self.rerank_lambda, "aqe": self.aqe,
            "aqe_alpha": self.aqe_alpha, "aqe_k": self.aqe_k, "tpr_fprs": self.tpr_fprs,
            "max_chunk_mb": self.max_chunk_mb,
        }
