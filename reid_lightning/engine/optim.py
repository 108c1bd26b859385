"""Optimizer and learning-rate schedule of fast-reid's BoT recipe.

Called by :class:`reid_lightning.engine.module.ReIDModule.configure_optimizers`::

    optimizer = build_optimizer(model, name="Adam", base_lr=3.5e-4, weight_decay=5e-4)
    scheduler = build_warmup_multistep(optimizer, iters_per_epoch=len(loader), warmup_iters=2000,
                                       milestones=(40, 90), milestones_from="after_warmup")
    # scheduler.step() once per optimizer step (Lightning: interval="step")
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

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

    Every parameter named ``bias`` gets ``base_lr * bias_lr_factor`` and ``weight_decay_bias``,
    norm-layer biases included (fast-reid applies its bias override after the norm rule);
    the other norm-layer parameters get ``base_lr`` and ``weight_decay_norm``; everything else
    ``base_lr`` and ``weight_decay``. Frozen parameters (``requires_grad=False``, e.g. the
    BNNeck bias) are left out. Empty groups are dropped.

    Args:
        model: the model whose parameters are grouped.
        base_lr: learning rate of the non-bias parameters.
        weight_decay: weight decay of the parameters that are neither biases nor in norm layers.
        weight_decay_norm: weight decay of the norm-layer weights.
        weight_decay_bias: weight decay of every bias.
        bias_lr_factor: learning-rate multiplier of every bias.

    Returns:
        ``[{"params": [...], "lr": ..., "weight_decay": ...}, ...]``, one group per setting.
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
            if name == "bias":
                lr, wd = base_lr * bias_lr_factor, weight_decay_bias
            groups.setdefault((lr, wd), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


# the names build_optimizer knows (torch's class names, case-sensitive: solver.optimizer)
OPTIMIZERS = ("Adam", "AdamW", "SGD")


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
    fused: bool = True,
) -> torch.optim.Optimizer:
    """Build ``Adam``, ``AdamW`` or ``SGD`` over :func:`build_param_groups` of ``model``.

    Call it once the model is on its device. ``fused`` runs torch's fused kernel (one call per
    parameter group; the same update up to float rounding) when every parameter is a
    floating-point tensor on a device that has one (CPU and CUDA among them); elsewhere, or with
    ``fused=False``, torch's default per-tensor or foreach loop (docs/results.md has the timings).
    The kernel stays the one chosen here when a checkpoint's state is loaded (torch would take the
    checkpoint's choice: see :func:`keep_kernel_choice`).

    Raises:
        ValueError: for an unknown optimizer name (the message lists the known ones).
    """
    groups = build_param_groups(model, base_lr, weight_decay, weight_decay_norm, weight_decay_bias, bias_lr_factor)
    kwargs = {"fused": True} if fused and _fused_kernel_available(groups) else {}
    if name == "Adam":
        optimizer = torch.optim.Adam(groups, lr=base_lr, **kwargs)
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(groups, lr=base_lr, **kwargs)
    elif name == "SGD":
        optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=momentum, nesterov=nesterov, **kwargs)
    else:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    return keep_kernel_choice(optimizer)


KERNEL_KEYS = ("fused", "foreach")


def keep_kernel_choice(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.load_state_dict`` keep the optimizer's own kernel choice (``fused``,
    ``foreach``) instead of the saved param groups' (torch copies every saved group setting).

    A run resumed with another ``solver.fused``, or with gradient clipping turned on or off under
    mixed precision (see ``ReIDModule.configure_optimizers``), would otherwise step with the
    checkpoint's kernel; under ``16-mixed`` a fused-built optimizer stepping the foreach loop fails
    (torch's GradScaler hands its scale to optimizers built fused). Returns ``optimizer``.
    """
    choice = {key: optimizer.defaults.get(key) for key in KERNEL_KEYS}

    def with_own_choice(_: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # before torch reads the groups: it also places each saved ``step`` by them (on the
        # parameter's device for the fused kernel, where the checkpoint's loop kept it on the CPU)
        return {**state_dict, "param_groups": [{**group, **choice} for group in state_dict["param_groups"]]}

    optimizer.register_load_state_dict_pre_hook(with_own_choice)
    return optimizer


def _fused_kernel_available(groups: list[dict]) -> bool:
    """Whether torch has a fused optimizer kernel for every parameter of ``groups``."""
    devices = _get_fused_kernels_supported_devices()
    params = [param for group in groups for param in group["params"]]
    return bool(params) and all(param.device.type in devices and param.is_floating_point() for param in params)


MILESTONES_FROM = ("after_warmup", "start")


def milestone_offset(iters_per_epoch: int, warmup_iters: int, milestones_from: str) -> int:
    """Epochs added to every milestone.

    ``"start"``: 0, milestones count epochs from the start of training. ``"after_warmup"``:
    fast-reid's LRScheduler hook, which steps its MultiStepLR at the end of every epoch once the
    next iteration is past the warmup (``(epoch + 1) * iters_per_epoch >= warmup_iters``); its
    first step ends epoch ``ceil(warmup_iters / iters_per_epoch) - 1``, so milestone ``m`` takes
    effect from epoch ``m + ceil(warmup_iters / iters_per_epoch) - 1`` (0 without warmup).

    Raises:
        ValueError: for an unknown ``milestones_from`` (the message lists the choices).
    """
    if milestones_from == "start":
        return 0
    if milestones_from == "after_warmup":
        return max(0, math.ceil(warmup_iters / iters_per_epoch) - 1)
    raise ValueError(f"unknown solver.milestones_from {milestones_from!r}: choose one of {', '.join(MILESTONES_FROM)}")


def warmup_multistep_factor(
    iteration: int,
    iters_per_epoch: int,
    warmup_iters: int,
    warmup_factor: float,
    milestones: Sequence[int],
    gamma: float,
    milestones_from: str = "after_warmup",
) -> float:
    """LR multiplier at optimizer step ``iteration`` (0-based).

    Linear warmup as fast-reid's WarmupLR: ``warmup_factor * (1 - a) + a`` with
    ``a = iteration / warmup_iters`` for ``iteration < warmup_iters``, then 1. Multistep: times
    ``gamma`` for every milestone ``m`` with ``iteration // iters_per_epoch >= m + offset``, the
    offset from :func:`milestone_offset`. With ``"after_warmup"`` this is fast-reid's LR at every
    iteration: its decays only start once the warmup has reached 1.
    """
    factor = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor = warmup_factor * (1.0 - alpha) + alpha
    epoch = iteration // iters_per_epoch - milestone_offset(iters_per_epoch, warmup_iters, milestones_from)
    passed = sum(1 for m in milestones if epoch >= m)
    return factor * gamma**passed


def build_warmup_multistep(
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    warmup_iters: int = 2000,
    warmup_factor: float = 0.1,
    milestones: Sequence[int] = (40, 90),
    gamma: float = 0.1,
    milestones_from: str = "after_warmup",
) -> LambdaLR:
    """A per-iteration :class:`LambdaLR` following :func:`warmup_multistep_factor`.

    Its state (``last_epoch`` = optimizer steps taken) goes into checkpoints, so a resumed
    run continues the warmup and the milestones where it stopped.

    Args:
        optimizer: the optimizer whose groups' ``lr`` is the base LR.
        iters_per_epoch: optimizer steps per epoch.
        warmup_iters: warmup length in optimizer steps (0: none).
        warmup_factor: LR multiplier at step 0.
        milestones: epochs of the decays, counted as ``milestones_from`` says (positive).
        gamma: multiplier per decay.
        milestones_from: ``"after_warmup"`` (fast-reid) or ``"start"`` (see :func:`milestone_offset`).

    Raises:
        ValueError: ``iters_per_epoch < 1``, a milestone below 1, or an unknown ``milestones_from``.
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    milestones = sorted(int(m) for m in milestones)
    if milestones and milestones[0] < 1:
        raise ValueError(f"solver.milestones must be epochs >= 1, got {milestones}")
    milestone_offset(iters_per_epoch, warmup_iters, milestones_from)  # validates milestones_from

    def factor(iteration: int) -> float:
        return warmup_multistep_factor(
            iteration, iters_per_epoch, warmup_iters, warmup_factor, milestones, gamma, milestones_from
        )

    return LambdaLR(optimizer, factor)
