"""HookBase on a real pl.Trainer: call order, exceptions, accumulation, storage, loggers, resume."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hooks_support import Recorder, TinyModule, events_of, make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    IMAGES,
    EventAccumulator,
)

from reid_lightning.engine.hooks import CallbackHook, HookBase, get_event_storage


def test_calls_follow_fast_reid_loop_in_registration_order(tmp_path: Path) -> None:
    events: list = []
    trainer = make_trainer(tmp_path, [Recorder("a", events), Recorder("b", events)])
    trainer.fit(TinyModule(batches=3))

    # (event, iter, epoch, storage.iter), each for hook a then hook b
    expected = [("before_train", 0, 0, 0)]
    for epoch in range(2):
        expected.append(("before_epoch", 3 * epoch, epoch, max(0, 3 * epoch - 1)))
        for it in range(3 * epoch, 3 * epoch + 3):
            expected += [("before_step", it, epoch, it), ("after_step", it, epoch, it)]
        expected.append(("after_epoch", 3 * epoch + 3, epoch, 3 * epoch + 2))
    expected.append(("after_train", 6, trainer.current_epoch, 5))
    interleaved = [(tag, *e) for e in expected for tag in ("a", "b")]
    assert [tuple(e) for e in events] == interleaved


def test_trainer_view_exposes_fast_reid_names(tmp_path: Path) -> None:
    seen: dict = {}

    def grab(view) -> None:
        seen.update(
            start_iter=view.start_iter, max_iter=view.max_iter, iters_per_epoch=view.iters_per_epoch,
            start_epoch=view.start_epoch, max_epoch=view.max_epoch, model=view.model, optimizer=view.optimizer,
            scheduler=view.scheduler, grad_scaler=view.grad_scaler, cfg=view.cfg, data_loader=view.data_loader,
            pl_trainer=view.pl_trainer, pl_module=view.pl_module, storage=view.storage,
        )

    module = TinyModule(batches=3)
    trainer = make_trainer(tmp_path, [CallbackHook(before_train=grab)])
    trainer.fit(module)
    assert (seen["start_iter"], seen["max_iter"], seen["iters_per_epoch"]) == (0, 6, 3)
    assert (seen["start_epoch"], seen["max_epoch"]) == (0, 2)
    assert seen["model"] is module.model and seen["pl_module"] is module and seen["pl_trainer"] is trainer
    assert seen["optimizer"] is trainer.optimizers[0] and seen["scheduler"] is None and seen["grad_scaler"] is None
    assert seen["cfg"] == {"name": "tiny"} and seen["data_loader"] is trainer.train_dataloader
    assert seen["storage"].iter == 6 - 1  # the same storage object, now at the last step


def test_after_train_runs_once_when_a_step_raises(tmp_path: Path) -> None:
    events: list = []
    trainer = make_trainer(tmp_path, [Recorder("a", events), Recorder("b", events)])
    with pytest.raises(RuntimeError, match="failing on purpose at step 4"):
        trainer.fit(TinyModule(batches=3, fail_at=4))
    assert [e[2] for e in events_of(events, "after_step", "a")] == [0, 1, 2, 3]
    assert [e[2] for e in events_of(events, "before_step", "a")] == [0, 1, 2, 3, 4]
    assert [e[0] for e in events_of(events, "after_train")] == ["a", "b"]
    with pytest.raises(RuntimeError, match="no active EventStorage"):
        get_event_storage()


def test_after_train_runs_once_when_after_train_raises(tmp_path: Path) -> None:
    class Broken(HookBase):
        def after_train(self) -> None:
            raise ValueError("broken after_train")

    events: list = []
    trainer = make_trainer(tmp_path, [Broken(), Recorder("a", events)], max_epochs=1)
    with pytest.raises(ValueError, match="broken after_train"):
        trainer.fit(TinyModule(batches=2))
    assert len(events_of(events, "after_train")) == 1


def test_step_hooks_fire_per_optimizer_step_with_gradient_accumulation(tmp_path: Path) -> None:
    events: list = []
    module = TinyModule(batches=4)
    trainer = make_trainer(tmp_path, [Recorder("a", events)], accumulate_grad_batches=2)
    trainer.fit(module)
    assert [e[2] for e in events_of(events, "before_step")] == [0, 1, 2, 3]
    assert [e[2] for e in events_of(events, "after_step")] == [0, 1, 2, 3]
    assert [e[2] for e in events_of(events, "after_epoch")] == [2, 4]
    recorder = trainer.callbacks[[type(c) for c in trainer.callbacks].index(Recorder)]
    assert (recorder.trainer.max_iter, recorder.trainer.iters_per_epoch) == (4, 2)
    # total_loss is the mean of the step's (un-normalised) micro-batch losses
    expected = torch.tensor(module.batch_losses).view(4, 2).mean(dim=1)
    recorded = torch.tensor([v for v, _ in recorder.trainer.storage.history("total_loss").values()])
    torch.testing.assert_close(recorded, expected)


def test_step_scalars_are_in_the_storage_at_after_step(tmp_path: Path) -> None:
    checked: list[int] = []

    class Check(HookBase):
        def after_step(self) -> None:
            storage = self.trainer.storage
            assert storage is get_event_storage()
            latest = storage.latest()
            for name in ("total_loss", "loss_cls", "loss_reg", "lr", "time", "data_time"):
                assert latest[name][1] == self.trainer.iter, name
            assert latest["lr"][0] == pytest.approx(0.1)
            assert latest["time"][0] > 0 and latest["data_time"][0] >= 0
            assert latest["total_loss"][0] == pytest.approx(latest["loss_cls"][0] + latest["loss_reg"][0], rel=1e-5)
            checked.append(self.trainer.iter)

    make_trainer(tmp_path, [Check()]).fit(TinyModule(batches=3))
    assert checked == list(range(6))


def test_storage_iter_and_epoch_follow_the_loop(tmp_path: Path) -> None:
    seen: list[tuple[str, int, int]] = []

    def record(event: str):
        return lambda view: seen.append((event, view.storage.iter, view.storage.epoch))

    hook = CallbackHook(before_epoch=record("before_epoch"), after_step=record("after_step"))
    make_trainer(tmp_path, [hook]).fit(TinyModule(batches=3))
    assert [(i, e) for event, i, e in seen if event == "after_step"] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    assert [e for event, _, e in seen if event == "before_epoch"] == [0, 1]


def test_histograms_and_images_reach_tensorboard_and_are_then_cleared(tmp_path: Path) -> None:
    pending: list[int] = []

    def put(view) -> None:
        # the previous step's were written and cleared
        pending.append(len(view.storage.histograms) + len(view.storage.images))
        view.storage.put_histogram("weights", view.model[0].weight, bins=10)
        view.storage.put_image("weights_map", view.model[0].weight.detach().abs()[None] / 10)

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [CallbackHook(after_step=put)], logger=logger, log_every_n_steps=1)
    trainer.fit(TinyModule(batches=3))
    assert pending == [0] * 6
    events = EventAccumulator(logger.log_dir, size_guidance={HISTOGRAMS: 0, IMAGES: 0})
    events.Reload()
    written = events.Histograms("weights")
    assert [h.step for h in written] == list(range(6))
    assert all(h.histogram_value.num == 16 * 8 for h in written)
    pictures = events.Images("weights_map")
    assert [p.step for p in pictures] == list(range(6))
    assert {(p.height, p.width) for p in pictures} == {(16, 8)}  # the (16, 8) weight as a 1-channel image


class PutScalars(HookBase):
    """Puts ``hook_metric`` (10 x iter) after every step and ``epoch_metric`` after every epoch."""

    def after_step(self) -> None:
        self.trainer.storage.put_scalar("hook_metric", 10 * self.trainer.iter)

    def after_epoch(self) -> None:
        self.trainer.storage.put_scalar("epoch_metric", self.trainer.epoch, smoothing_hint=False)


def logged_rows(tmp_path: Path, log_every_n_steps: int) -> list[dict[str, str]]:
    """The CSV logger's rows of a 2-epoch TinyModule fit (3 steps each) with :class:`PutScalars`."""
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [PutScalars()], logger=logger, log_every_n_steps=log_every_n_steps).fit(TinyModule(batches=3))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_hook_scalars_reach_the_lightning_logger(tmp_path: Path) -> None:
    rows = logged_rows(tmp_path, log_every_n_steps=2)
    hook_rows = {int(r["step"]): float(r["hook_metric"]) for r in rows if r.get("hook_metric")}
    assert hook_rows == {1: 10.0, 3: 30.0, 5: 50.0}  # every log_every_n_steps=2 steps
    epoch_rows = {int(r["step"]): float(r["epoch_metric"]) for r in rows if r.get("epoch_metric")}
    assert epoch_rows == {2: 0.0, 5: 1.0}  # put in after_epoch: sent at the epoch's last step
    assert any(r.get("data_time") for r in rows) and "total_loss" not in rows[0]


def test_log_every_n_steps_0_sends_no_step_scalars_to_the_loggers(tmp_path: Path) -> None:
    # Lightning's log_every_n_steps=0 turns step logging off; the adapter sent every step instead
    rows = logged_rows(tmp_path, log_every_n_steps=0)
    assert not [r for r in rows if r.get("hook_metric") or r.get("lr") or r.get("data_time")]
    assert {int(r["step"]): float(r["epoch_metric"]) for r in rows if r.get("epoch_metric")} == {2: 0.0, 5: 1.0}


class Counter(HookBase):
    """Counts steps; its state (an int and a tensor) goes into checkpoints."""

    def __init__(self, increment: int) -> None:
        self.increment = increment
        self.count = 0
        self.loaded: int | None = None
        self.seen: list[tuple[int, int, int, int]] = []

    def before_train(self) -> None:
        view = self.trainer
        self.seen.append((view.start_iter, view.start_epoch, view.iter, view.storage.iter))

    def after_step(self) -> None:
        self.count += self.increment
        self.seen.append((self.trainer.iter, self.trainer.epoch, self.trainer.storage.iter, -1))

    def state_dict(self) -> dict:
        return {"count": self.count, "trace": torch.tensor([self.count, self.increment])}

    def load_state_dict(self, state_dict: dict) -> None:
        self.count = self.loaded = state_dict["count"]


def test_resume_continues_iterations_and_restores_hook_state(tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt_path: str | None) -> tuple[list[Counter], pl.Trainer]:
        hooks = [Counter(1), Counter(10), Counter(100)]
        hooks[2].hook_name = "named"
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"ckpt{max_epochs}", save_last=True)
        trainer = make_trainer(tmp_path, [*hooks, checkpoint], max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(TinyModule(batches=3), ckpt_path=ckpt_path)
        return hooks, trainer

    first, _ = run(2, None)
    last = tmp_path / "ckpt2" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["callbacks"]
    assert saved["Counter#0"]["count"] == 6 and saved["Counter#1"]["count"] == 60
    assert saved["Counter[named]"]["count"] == 600
    torch.testing.assert_close(saved["Counter#1"]["trace"], torch.tensor([60, 10]))

    resumed, trainer = run(3, str(last))
    assert [h.loaded for h in resumed] == [6, 60, 600]
    assert [h.count for h in resumed] == [9, 90, 900]
    start_iter, start_epoch, it, storage_iter = resumed[0].seen[0]
    assert (start_iter, start_epoch, it, storage_iter) == (6, 2, 6, 6)
    assert [s[:3] for s in resumed[0].seen[1:]] == [(6, 2, 6), (7, 2, 7), (8, 2, 8)]
    assert resumed[0].trainer.max_iter == 9 and trainer.global_step == 9


def test_second_fit_on_the_same_trainer_starts_a_new_run(tmp_path: Path) -> None:
    events: list = []
    trainer = make_trainer(tmp_path, [Recorder("a", events)], max_epochs=1)
    trainer.fit(TinyModule(batches=2))
    trainer.fit_loop.max_epochs = 2
    trainer.fit(TinyModule(batches=2))
    assert [e[2] for e in events_of(events, "before_train")] == [0, 2]
    assert [e[2] for e in events_of(events, "after_step")] == [0, 1, 2, 3]
    assert len(events_of(events, "after_train")) == 2


class NumpyBest(HookBase):
    """Keeps the best of something as a NumPy scalar (np.max of a list): not weights_only-loadable."""

    def __init__(self) -> None:
        self.best = None

    def after_step(self) -> None:
        self.best = np.max([self.trainer.iter, 0])

    def state_dict(self) -> dict:
        return {"scores": [1.0, {"best": self.best}]}


def test_a_hook_state_that_weights_only_loading_refuses_fails_at_the_first_save(tmp_path: Path) -> None:
    # the checkpoint would be written and then refused at resume time (torch.load(weights_only=True))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [NumpyBest(), checkpoint], enable_checkpointing=True)
    with pytest.raises(TypeError, match=r"hook NumpyBest#0 holds a numpy\.int64 at state\['scores'\]\[1\]\['best'\]") as info:
        trainer.fit(TinyModule(batches=3))
    assert "weights_only" in str(info.value)
    assert trainer.global_step == 3 and not (tmp_path / "last.ckpt").exists()


def test_hook_state_of_plain_types_and_tensors_saves(tmp_path: Path) -> None:
    class Plain(HookBase):
        def state_dict(self) -> dict:
            return {"a": (1, 2.0, "x", None, True), "b": [torch.ones(2)], 3: {"c": torch.zeros(1)}}

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    make_trainer(tmp_path, [Plain(), checkpoint], enable_checkpointing=True, max_epochs=1).fit(TinyModule(batches=2))
    (saved,) = [v for k, v in torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"].items() if "Plain" in k]
    assert saved["a"] == (1, 2.0, "x", None, True) and saved[3]["c"].shape == (1,)


def test_self_trainer_before_a_fit_says_when_it_exists(tmp_path: Path) -> None:
    class ReadsTrainer(HookBase):
        pass

    hook = ReadsTrainer()
    with pytest.raises(AttributeError, match=r"ReadsTrainer\.trainer is set when .*fit"):
        hook.trainer  # noqa: B018
    assert not hasattr(hook, "no_such_attribute")
