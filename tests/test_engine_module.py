"""ReIDModule in a real (tiny) Lightning fit: losses logged, LR schedule per step, eval metrics."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from reid_lightning.data import ReIDDataModule
from reid_lightning.engine.hooks import CallbackHook
from reid_lightning.engine.module import ReIDModule
from reid_lightning.modeling import build_bot


class _LRRecorder(pl.Callback):
    def __init__(self):
        self.lrs: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append((trainer.current_epoch, trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


@pytest.fixture
def tiny_data(demo_root):
    dm = ReIDDataModule(
        "demo", root=str(demo_root), height=64, width=32, batch_size=8, num_instances=4,
        test_batch_size=64, num_workers=0, batches_per_epoch=3,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _fit(dm, tmp_path, solver, epochs=2, hooks=(), **trainer_kwargs):
    model = build_bot(num_classes=dm.num_classes, depth=18, pretrained="none")
    module = ReIDModule(model, solver=solver, evaluation={"metric": "cosine"}, cfg={"note": "plain config"})
    recorder = _LRRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, callbacks=[recorder, *hooks], **trainer_kwargs,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module, recorder


def test_schedule_warms_up_per_step_and_decays_at_the_milestone_epoch(tiny_data, tmp_path):
    solver = {"base_lr": 1e-3, "warmup_iters": 2, "warmup_factor": 0.1, "milestones": [1], "gamma": 0.1}
    _, _, recorder = _fit(tiny_data, tmp_path, solver, limit_val_batches=0)
    lrs = [lr for _, _, lr in recorder.lrs]
    assert [step for _, step, _ in recorder.lrs] == list(range(6))
    assert lrs[0] == pytest.approx(1e-4)                 # warmup starts at 0.1x
    assert lrs[1] == pytest.approx(1e-3 * (0.1 * 0.5 + 0.5))
    assert lrs[2] == pytest.approx(1e-3)                 # warmup over, epoch 0
    assert lrs[3:] == pytest.approx([1e-4] * 3)          # epoch 1 = milestone


def test_validation_logs_identical_metric_names_and_checkpoint_holds_plain_config(tiny_data, tmp_path):
    trainer, module, _ = _fit(tiny_data, tmp_path, {"warmup_iters": 1}, epochs=1)
    logged = trainer.callback_metrics
    for name in ("val/rank1", "val/rank5", "val/rank10", "val/mAP", "val/mINP"):
        assert 0.0 <= float(logged[name]) <= 100.0
    assert "train/loss_cls" in logged and "train/loss_triplet" in logged
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["reid_config"] == {"note": "plain config"}


def test_training_step_returns_the_hook_contract(tiny_data):
    model = build_bot(num_classes=tiny_data.num_classes, depth=18, pretrained="none")
    module = ReIDModule(model)
    batch = next(iter(tiny_data.build_train_loader(0, 1)))
    out = module.training_step(batch, 0)
    assert out["loss"].requires_grad
    assert set(out["loss_dict"]) == {"loss_cls", "loss_triplet"}
    assert torch.allclose(out["loss"].detach(), sum(out["loss_dict"].values()))
    with torch.no_grad():  # train-mode BatchNorm uses batch statistics: the same logits again
        logits = model(batch["images"])["cls_logits"]
    top1 = (logits.argmax(1) == batch["targets"]).float().mean()
    assert set(out["metrics"]) == {"cls_accuracy"} and out["metrics"]["cls_accuracy"] == top1


def test_training_logs_the_classification_accuracy(tiny_data, tmp_path):
    put: list[tuple[int, float]] = []

    def record(view) -> None:
        value, iteration = view.storage.latest()["cls_accuracy"]
        put.append((iteration, value))

    hooks = [CallbackHook(after_step=record)]
    trainer, _, _ = _fit(tiny_data, tmp_path, {"warmup_iters": 1}, epochs=1, hooks=hooks, limit_val_batches=0)
    assert [iteration for iteration, _ in put] == [0, 1, 2]
    assert all(0.0 <= value <= 1.0 for _, value in put)
    assert float(trainer.callback_metrics["train/cls_accuracy"]) == pytest.approx(put[-1][1])


def test_non_finite_loss_names_iteration_and_terms(tiny_data):
    model = build_bot(num_classes=tiny_data.num_classes, depth=18, pretrained="none")
    module = ReIDModule(model)
    batch = next(iter(tiny_data.build_train_loader(0, 1)))
    batch["images"] = batch["images"] * float("nan")
    with pytest.raises(FloatingPointError, match=r"iteration 0 .*loss_cls=nan"):
        module.training_step(batch, 0)
