"""Fit variants and a py-spy reading, the body of ``scripts/benchmark_fit_variants.py``: the fit
of :mod:`reid_lightning.cli.train_benchmark` with one thing changed at a time, in one process.

Called as::

    name_to_variant = variants(workers=14)
    overrides, patches = name_to_variant["no_train_log"]
    fit = time_variant(benchmark_config(..., overrides=overrides), iters=150, warmup=30, patches=patches)
    parts = main_thread_parts(open("spy.txt").read())   # py-spy record --threads -f raw
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig

from reid_lightning.cli import train_benchmark as bench
from reid_lightning.data.datamodule import ReIDDataModule
from reid_lightning.engine.module import ReIDModule
from reid_lightning.engine.progress import TRAINING_LOSS

# parts of the fit's main thread, by the frames its stack holds; the first part with a matching
# frame names a sample (Lightning runs training_step and backward inside optimizer.step)
STACK_PARTS = [
    ("self.log", ("log (pytorch_lightning/core/module.py",)),
    ("backward", ("backward (torch/_tensor.py",)),
    ("losses", ("losses (reid_lightning/modeling/baseline.py",)),
    ("forward", ("forward",)),
    ("training_step, other", ("training_step",)),
    ("zero_grad", ("zero_grad",)),
    ("optimizer step", ("torch/optim/adam", "torch/optim/sgd")),
    ("waiting for the next batch", ("fetchers.py",)),
    ("batch to device", ("_apply_batch_transfer_handler",)),
    ("callbacks and hooks", ("_call_callback_hooks",)),
]
FIT_LOOP_FRAME = "_TrainingEpochLoop.advance"


class FromMemory:
    """``batches`` real training batches of ``loader``, replayed for ``length`` batches per epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader, batches: int = 8, length: int = 115) -> None:
        pin = torch.cuda.is_available()
        source = bench.batches_forever(loader)
        self.batches = [{key: value.pin_memory() if pin and torch.is_tensor(value) else value
                         for key, value in next(source).items()} for _ in range(batches)]
        self.length, self.sampler = length, loader.sampler

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(self.length):
            yield self.batches[index % len(self.batches)]


def _no_log(self: ReIDModule, *args: Any, **kwargs: Any) -> None:
    return None


def _loss_on_lightnings_bar(self: ReIDModule, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
    """``self.log`` with the training loss on Lightning's progress bar (``prog_bar=True``), as the
    module logged it before 2026-12-01: Lightning then reads it to the host after every batch."""
    if name == TRAINING_LOSS:
        kwargs["prog_bar"] = True
    return ORIGINAL_LOG(self, name, value, *args, **kwargs)


def _file_system_loader(self: ReIDDataModule) -> torch.utils.data.DataLoader:
    torch.multiprocessing.set_sharing_strategy("file_system")
    return ORIGINAL_LOADER(self)


ORIGINAL_LOG = ReIDModule.log
ORIGINAL_LOADER = ReIDDataModule.train_dataloader


def variants(workers: int) -> dict[str, tuple[list[str], dict[str, Callable]]]:
    """name -> (config overrides, patches of ``ReIDModule.log`` / ``ReIDDataModule.train_dataloader``;
    a ``"last_checkpoint"`` key asks the fit for a ``last.ckpt`` every epoch)."""
    from_memory = {"train_dataloader": lambda self: FromMemory(ORIGINAL_LOADER(self))}
    return {
        "default": ([], {}),
        "no_train_log": ([], {"log": _no_log}),
        "loss_on_lightnings_bar": ([], {"log": _loss_on_lightnings_bar}),
        "from_memory": ([], from_memory),
        "from_memory_no_hooks_no_log": (["hooks=none"], {**from_memory, "log": _no_log}),
        "half_workers": ([f"data.num_workers={max(1, workers // 2)}"], {}),
        "no_pin_memory": (["data.pin_memory=false"], {}),
        "file_system_sharing": ([], {"train_dataloader": _file_system_loader}),
        "float_batches": (["data.normalize_on_device=false"], {}),
        "no_image_cache": (["data.cache_images=false"], {}),
        "last_checkpoint": ([], {"last_checkpoint": bool}),
        "last_checkpoint_sync": (["async_checkpoints=false"], {"last_checkpoint": bool}),
    }


def time_variant(cfg: DictConfig, iters: int, warmup: int, patches: dict[str, Callable], sync_debug: bool = False) -> dict[str, Any]:
    """``bench.time_fit`` with the patches applied, restoring everything afterwards (a
    ``"last_checkpoint"`` entry: the fit writes ``last.ckpt`` every epoch; ``sync_debug``: see
    ``bench.time_fit``)."""
    sharing = torch.multiprocessing.get_sharing_strategy()
    ReIDModule.log = patches.get("log", ORIGINAL_LOG)
    ReIDDataModule.train_dataloader = patches.get("train_dataloader", ORIGINAL_LOADER)
    bench.seed(0)
    try:
        return bench.time_fit(cfg, iters, warmup, last_checkpoint="last_checkpoint" in patches, sync_debug=sync_debug)
    finally:
        ReIDModule.log, ReIDDataModule.train_dataloader = ORIGINAL_LOG, ORIGINAL_LOADER
        torch.multiprocessing.set_sharing_strategy(sharing)


def main_thread_parts(raw_stacks: str) -> dict[str, float]:
    """Share of the main thread's samples inside the fit loop per part (py-spy ``--threads -f raw``)."""
    parts, total = Counter(), 0
    for line in raw_stacks.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if "MainThread" not in stack.split(";", 1)[0] or FIT_LOOP_FRAME not in stack:
            continue
        total += int(count)
        part = next((name for name, frames in STACK_PARTS if any(frame in stack for frame in frames)), "other")
        parts[part] += int(count)
    return {name: round(count / total, 4) for name, count in parts.most_common()} if total else {}
