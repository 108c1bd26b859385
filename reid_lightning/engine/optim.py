"""Optimizer and learning-rate schedule of fast-reid's BoT recipe.

Called by :class:`reid_lightning.engine.module.ReIDModule.configure_optimizers`::

    optimizer = build_optimizer(model, name="Adam", base_lr=3.5e-4, weight_decay=5e-4)
    scheduler = build_warmup_multistep(optimizer, iters_per_epoch=len(loader),
                                       warmup_iters=2000, milestones=(40, 90))
    # scheduler.step() once per optimizer step (Lightning: interval="step")
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_bias: float,
    bias_lr_factor: float = 1.0,
) -> list[dict]:
    """Split trainable parameters into groups as fast-reid's ``get_default_optimizer_params``.

    Norm-layer parameters get ``weight_decay_norm``; biases get ``weight_decay_bias`` and
    ``base_lr * bias_lr_factor``; everything else ``weight_decay``. Frozen parameters
    (``requires_grad=False``, e.g. the BNNeck bias) are left out. Empty groups are dropped.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, wd = base_lr, weight_decay
            if isinstance(module, _NORM_TYPES):
                wd = weight_decay_norm
            elif name == "bias":
                lr, wd = base_lr * bias_lr_factor, weight_decay_bias
            groups.setdefault((lr, wd), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def build_optimizer(
    model: nn.Module,
    name: str = "Adam",
    base_lr: float = 3.5e-4,
    weight_decay: float = 5e-4,
    weight_decay_norm: float = 5e-4,
    weight_decay_bias: float = 5e-4,
    bias_lr_factor: float = 1.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """Build ``Adam``, ``AdamW`` or ``SGD`` over :func:`build_param_groups` of ``model``.

    Raises:
        ValueError: for an unknown optimizer name (the message lists the known ones).
    """
    groups = build_param_groups(model, base_lr, weight_decay, weight_decay_norm, weight_decay_bias, bias_lr_factor)
    if name == "Adam":
        return torch.optim.Adam(groups, lr=base_lr)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=base_lr)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, nesterov=nesterov)
    raise ValueError(f"unknown optimizer {name!r}: choose one of Adam, AdamW, SGD")


def warmup_multistep_factor(
    iteration: int,
    iters_per_epoch: int,
    warmup_iters: int,
    warmup_factor: float,
    milestones: Sequence[int],
    gamma: float,
    milestones_after_warmup: bool = False,
) -> float:
    """LR multiplier at optimizer step ``iteration`` (0-based).

    Linear warmup as fast-reid: ``warmup_factor * (1 - a) + a`` with ``a = iteration / warmup_iters``
    for ``iteration < warmup_iters``, then 1. Multistep: times ``gamma`` for every milestone
    epoch reached, where the epoch is ``iteration // iters_per_epoch``. With
    ``milestones_after_warmup=True`` the epoch is counted from the end of the warmup epochs
    (``ceil(warmup_iters / iters_per_epoch)``), which is what fast-reid's LRScheduler hook does
    because it only steps the multistep scheduler once warmup is over.
    """
    factor = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor = warmup_factor * (1.0 - alpha) + alpha
    epoch = iteration // iters_per_epoch
    if milestones_after_warmup:
        epoch -= math.ceil(warmup_iters / iters_per_epoch)
    passed = sum(1 for m in milestones if epoch >= m)
    return factor * gamma**passed


def build_warmup_multistep(
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    warmup_iters: int = 2000,
    warmup_factor: float = 0.1,
    milestones: Sequence[int] = (40, 90),
    gamma: float = 0.1,
    milestones_after_warmup: bool = False,
) -> LambdaLR:
    """A per-iteration :class:`LambdaLR` following :func:`warmup_multistep_factor`.

    Its state (``last_epoch`` = optimizer steps taken) goes into checkpoints, so a resumed
    run continues the warmup and the milestones where it stopped.
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    milestones = sorted(int(m) for m in milestones)

    def factor(iteration: int) -> float:
        return warmup_multistep_factor(
            iteration, iters_per_epoch, warmup_iters, warmup_factor, milestones, gamma, milestones_after_warmup
        )

    return LambdaLR(optimizer, factor)
