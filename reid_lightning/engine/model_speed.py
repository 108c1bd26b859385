"""Speed switches applied to a built model by ``reid_lightning.cli.train.build_model``:
channels-last memory format and ``torch.compile`` of a submodule with a fallback to eager mode.

    if resolve_channels_last(cfg.channels_last, cfg.trainer.accelerator):
        to_channels_last(model.backbone)
    if resolve_compile(cfg.compile, cfg.trainer):
        compile_with_fallback(model.backbone, "backbone", **cfg.compile_kwargs)
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from torch import nn

log = logging.getLogger(__name__)


def trains_on_gpu(accelerator: str) -> bool:
    """Whether a trainer with this ``accelerator`` (``auto``, ``gpu``, ``cuda``, ``cpu``...) trains
    on a CUDA GPU: what the configs' ``auto`` switches (precision, channels-last, compile) follow."""
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def resolve_channels_last(value: bool | str, accelerator: str) -> bool:
    """``channels_last`` of the config as a bool: ``auto`` is on when training runs on a GPU.

    Args:
        value: true, false or ``"auto"``.
        accelerator: the trainer's accelerator (``auto``, ``gpu``, ``cuda``, ``cpu``...).

    Raises:
        ValueError: ``value`` is none of these.
    """
    if isinstance(value, bool):
        return value
    if value == "auto":
        return trains_on_gpu(accelerator)
    raise ValueError(f"channels_last must be true, false or auto, got {value!r}")


def resolve_compile(value: bool | str, trainer: Mapping[str, Any]) -> bool:
    """``compile`` of the config as a bool: ``auto`` is on when training runs on one CUDA GPU in
    one process (a compiled DDP run is not measured yet, so ``auto`` leaves it eager).

    Args:
        value: true, false or ``"auto"``.
        trainer: the trainer config (``accelerator``, ``devices``, ``num_nodes``).

    Raises:
        ValueError: ``value`` is none of these.
    """
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ValueError(f"compile must be true, false or auto, got {value!r}")
    if not trains_on_gpu(str(trainer.get("accelerator", "auto"))):
        return False
    return int(trainer.get("num_nodes", 1)) == 1 and _device_count(trainer.get("devices", "auto")) == 1


def _device_count(devices: Any) -> int:
    """How many GPUs Lightning's ``devices`` selects (``auto``: all; else Lightning's own parsing
    of a count, -1, a list of indices or a string of them such as ``"0,"``)."""
    if devices == "auto":
        return torch.cuda.device_count()
    return len(CUDAAccelerator.parse_devices(devices) or [])


def _inputs_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    first = args[0]
    if torch.is_tensor(first) and first.dim() == 4:
        return (first.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def to_channels_last(module: nn.Module) -> nn.Module:
    """Store ``module``'s 4-d weights channels-last and convert its 4-d input the same way
    (a forward pre-hook), so its convolutions run in NHWC. Returns ``module``."""
    module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(_inputs_channels_last)
    return module


def _compile_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    inductor_error = getattr(torch._inductor.exc, "InductorError", None)
    if inductor_error is not None:
        errors.append(inductor_error)
    return tuple(errors)


def _describe(error: BaseException) -> str:
    """``Type: first line`` of ``error`` and of the error it wraps (a compiler's own failure)."""
    parts = []
    while error is not None and len(parts) < 3:
        lines = str(error).strip().splitlines()
        parts.append(f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": "))
        error = getattr(error, "inner_exception", None) or error.__cause__
    return " <- ".join(parts)


def compile_with_fallback(module: nn.Module, name: str, **compile_kwargs: Any) -> bool:
    """Compile ``module`` in place (``module.compile``: its state-dict keys keep their names);
    when compiling fails, now or at a later call, log why and run it eagerly from then on.

    Args:
        module: the module to compile.
        name: its name in the messages (e.g. ``backbone``).
        **compile_kwargs: arguments of ``torch.compile`` (``backend``, ``mode``, ``dynamic``...).

    Returns:
        False when ``torch.compile`` refused the arguments at once (the module stays eager), else True.
    """
    errors = _compile_errors()

    def fall_back(error: BaseException) -> None:
        module._compiled_call_impl = None  # nn.Module.__call__ then runs the eager forward
        log.warning(
            "torch.compile of the %s failed, so it runs without compile (set compile=false to skip "
            "the attempt): %s", name, _describe(error),
        )

    try:
        module.compile(**compile_kwargs)
    except errors as error:
        fall_back(error)
        return False
    compiled = module._compiled_call_impl

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except errors as error:
            fall_back(error)
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call
    return True
