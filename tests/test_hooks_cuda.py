"""Hooks on a CUDA device with fp16 mixed precision (skipped without a GPU)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hooks_support import TinyModule, make_trainer

from reid_lightning.engine.hooks import (
    CallbackHook,
    IterationTimer,
    LayerFreeze,
    PeriodicWriter,
    PreciseBN,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_hooks_under_fp16_on_cuda(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="reid_lightning")
    seen: dict = {}

    def grab(view) -> None:
        seen.update(scaler=view.grad_scaler, device=view.pl_module.device)

    def bn_device(view) -> None:  # Lightning moves the module back to the CPU after fit
        seen.update(bn_device=view.model[1].running_mean.device, bn_batches=int(view.model[1].num_batches_tracked))

    module = TinyModule(batches=3)
    hooks = [
        IterationTimer(warmup_iter=1), CallbackHook(before_train=grab),
        LayerFreeze(open_layer_iter=2, freeze_layers=["0"]), PreciseBN(num_iter=4), PeriodicWriter(period=2),
        CallbackHook(after_train=bn_device),
    ]
    make_trainer(tmp_path, hooks, accelerator="gpu", precision="16-mixed").fit(module)

    assert seen["device"].type == "cuda"
    assert isinstance(seen["scaler"], torch.amp.GradScaler), seen["scaler"]
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("writers")]
    assert len(lines) == 3, lines
    assert all(line.endswith("M") and "  max_mem: " in line for line in lines), lines
    storage = hooks[0].trainer.storage
    assert [itr for _, itr in storage.history("total_loss").values()] == list(range(6))
    losses = [v for v, _ in storage.history("loss_cls").values()]
    assert torch.isfinite(torch.tensor(losses)).all(), losses
    assert (seen["bn_device"].type, seen["bn_batches"]) == ("cuda", 4)
    assert all(p.requires_grad for p in module.parameters())
