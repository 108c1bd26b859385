"""fast-reid's hooks ported onto HookBase, each run through a real pl.Trainer."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest
import torch
from hooks_support import CLASSES, FEATURES, RandomDicts, TinyModule, make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from reid_lightning.data import ReIDDataModule
from reid_lightning.engine.hooks import (
    CallbackHook,
    HookBase,
    IterationTimer,
    LayerFreeze,
    PeriodicWriter,
    PreciseBN,
    TorchProfiler,
)


def test_iteration_timer_puts_time_after_warmup_and_logs_a_summary(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="reid_lightning")
    timer = IterationTimer(warmup_iter=2)
    make_trainer(tmp_path, [timer]).fit(TinyModule(batches=3))
    history = timer.trainer.storage.history("time").values()
    assert [itr for _, itr in history] == [2, 3, 4, 5]  # the adapter left "time" to the timer
    assert all(seconds > 0 for seconds, _ in history) and timer.timed_steps == 4
    assert timer.timed_seconds == pytest.approx(sum(s for s, _ in history))
    assert "Overall training speed: 4 iterations" in caplog.text


class SlowLoading(TinyModule):
    """TinyModule whose loader takes ``LOAD_SECONDS`` per batch."""

    def train_dataloader(self):
        class Slow(RandomDicts):
            def __getitem__(self, i: int):
                time.sleep(LOAD_SECONDS / 4)
                return super().__getitem__(i)

        return torch.utils.data.DataLoader(Slow(self.batches * 4), batch_size=4)


LOAD_SECONDS = 0.08


def test_step_time_includes_the_loading_as_fast_reids_does(tmp_path: Path) -> None:
    # fast-reid's IterationTimer and its "time" scalar cover next(data_loader): Lightning fetches
    # the batch before the step hooks, so the step's data_time is part of its time
    timer, plain = IterationTimer(warmup_iter=0), HookBase()
    make_trainer(tmp_path, [timer]).fit(SlowLoading(batches=2))
    make_trainer(tmp_path, [plain]).fit(SlowLoading(batches=2))
    for hook in (timer, plain):
        storage = hook.trainer.storage
        times, data_times = storage.history("time").values(), storage.history("data_time").values()
        assert len(times) == len(data_times) == 4
        for (seconds, _), (data_seconds, _) in zip(times, data_times):
            assert data_seconds >= 0.9 * LOAD_SECONDS and seconds > data_seconds
    assert timer.timed_seconds > 4 * 0.9 * LOAD_SECONDS


LINE = re.compile(
    r"^eta: \d+:\d\d:\d\d  epoch/iter: (\d)/(\d)  total_loss: \S+  loss_cls: \S+  loss_reg: \S+  "
    r"time: \d+\.\d{4}  data_time: \d+\.\d{4}  lr: 1\.00e-01$"
)


def test_periodic_writer_prints_fast_reid_lines_and_json(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="reid_lightning")
    json_file = tmp_path / "out" / "metrics.jsonl"
    make_trainer(tmp_path, [PeriodicWriter(period=2, json_file=json_file)]).fit(TinyModule(batches=3))
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("writers")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [(int(m[1]), int(m[2])) for m in matches] == [(0, 1), (1, 3), (1, 5)]
    records = [json.loads(line) for line in json_file.read_text().splitlines()]
    assert [(r["iteration"], r["epoch"]) for r in records] == [(1, 0), (3, 1), (5, 1)]
    assert {"total_loss", "loss_cls", "loss_reg", "lr", "time", "data_time"} <= set(records[0])


def test_periodic_writer_auto_json_goes_to_the_log_dir_and_writes_the_last_iteration(tmp_path: Path) -> None:
    make_trainer(tmp_path, [PeriodicWriter(period=4, json_file="auto")]).fit(TinyModule(batches=3))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [3, 5]  # period, then max_iter - 1


class FreezeProbe(HookBase):
    """After each step, records whether layer 0 moved, has a grad, and whether the BN trains."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, bool, bool, bool, bool]] = []
        self._weight = None

    def before_step(self) -> None:
        self._weight = self.trainer.model[0].weight.detach().clone()
        self._bn_mean = self.trainer.model[1].running_mean.clone()

    def after_step(self) -> None:
        model = self.trainer.model
        moved = not torch.equal(model[0].weight, self._weight)
        bn_moved = not torch.equal(model[1].running_mean, self._bn_mean)
        self.rows.append((self.trainer.iter, moved, model[0].weight.grad is not None, model[1].training, bn_moved))


def test_layer_freeze_freezes_then_opens_the_layers(tmp_path: Path) -> None:
    probe = FreezeProbe()
    module = TinyModule(batches=3)
    make_trainer(tmp_path, [LayerFreeze(open_layer_iter=4, freeze_layers=["0", "1"]), probe]).fit(module)
    frozen = [(it, False, False, False, False) for it in range(4)]  # iter 3: after Lightning's epoch-start train()
    assert probe.rows[:4] == frozen
    assert probe.rows[4:] == [(4, True, True, True, True), (5, True, True, True, True)]
    assert all(p.requires_grad for p in module.parameters())


def test_layer_freeze_names_a_missing_layer(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [LayerFreeze(open_layer_iter=2, freeze_layers=["backbone"])])
    with pytest.raises(ValueError, match=r"no submodule 'backbone'; its children are \['0', '1', '2', '3'\]"):
        trainer.fit(TinyModule(batches=2))


def test_precise_bn_sets_running_stats_to_the_data_statistics(tmp_path: Path) -> None:
    module = TinyModule(batches=3, lr=0.0)  # lr 0: the model stays as initialised
    make_trainer(tmp_path, [PreciseBN(num_iter=5)], max_epochs=1).fit(module)
    data = RandomDicts(12).images.view(3, 4, -1)
    batches = [data[i % 3] for i in range(5)]  # the loader is restarted after 3 batches
    with torch.no_grad():
        features = [module.model[0](x) for x in batches]
    mean = torch.stack([f.mean(0) for f in features]).mean(0)
    var = torch.stack([f.var(0, unbiased=True) for f in features]).mean(0)
    bn = module.model[1]
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 5


def test_precise_bn_reads_its_own_fresh_loader_not_the_epochs_batches(demo_root: Path, tmp_path: Path) -> None:
    dm = ReIDDataModule(
        "demo", root=str(demo_root), height=16, width=8, batch_size=8, num_instances=4, num_workers=0,
        pin_memory=False, batches_per_epoch=3,
    )
    dm.prepare_data()
    dm.setup("fit")
    trained: list[list[int]] = []
    read: list[list[int]] = []

    def features(batch: dict) -> torch.Tensor:
        return batch["images"].flatten(1)[:, :FEATURES]

    def images(batch: dict) -> torch.Tensor:
        read.append(batch["targets"].tolist())
        return features(batch)

    class OnReIDBatches(TinyModule):
        def training_step(self, batch: dict, batch_idx: int) -> dict:
            trained.append(batch["targets"].tolist())
            return super().training_step({"images": features(batch), "targets": batch["targets"] % CLASSES}, batch_idx)

    hook = PreciseBN(num_iter=5, get_images=images)
    make_trainer(tmp_path, [hook], max_epochs=1, use_distributed_sampler=False).fit(OnReIDBatches(), datamodule=dm)
    assert len(trained) == 3 and len(read) == 5
    expected = [b["targets"].tolist() for epoch in (0, 1) for b in dm.build_train_loader(0, 1, epoch=epoch, stream=1)]
    assert read == expected[:5]  # its own loader (stream 1) from the current epoch on, then the next epoch
    assert read[:3] != trained


def test_precise_bn_reads_images_with_a_callable(tmp_path: Path) -> None:
    taken: list[int] = []

    def images(batch: dict) -> torch.Tensor:
        taken.append(len(batch["images"]))
        return batch["images"]

    make_trainer(tmp_path, [PreciseBN(num_iter=2, get_images=images)], max_epochs=1).fit(TinyModule(batches=3))
    assert taken == [4, 4]


def test_callback_hook_calls_each_function_with_the_trainer_view(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []

    def record(name: str):
        return lambda view: calls.append((name, view.iter))

    names = ["before_train", "after_train", "before_epoch", "after_epoch", "before_step", "after_step"]
    hook = CallbackHook(**{name: record(name) for name in names})
    make_trainer(tmp_path, [hook]).fit(TinyModule(batches=3))
    counts = {name: sum(1 for n, _ in calls if n == name) for name in names}
    assert counts == {
        "before_train": 1, "after_train": 1, "before_epoch": 2, "after_epoch": 2, "before_step": 6, "after_step": 6
    }
    assert [it for n, it in calls if n == "after_step"] == list(range(6))


def test_torch_profiler_writes_a_trace_for_the_chosen_iterations(tmp_path: Path) -> None:
    out = tmp_path / "prof"
    make_trainer(tmp_path, [TorchProfiler(iters=[1], output_dir=out, use_cuda=False)], max_epochs=1).fit(
        TinyModule(batches=3)
    )
    assert sorted(p.name for p in out.iterdir()) == ["table_iter1.txt", "trace_iter1.json"]
    trace = json.loads((out / "trace_iter1.json").read_text())
    assert any("addmm" in event.get("name", "") for event in trace["traceEvents"])
    assert "Self CPU" in (out / "table_iter1.txt").read_text()


def test_precise_bn_runs_at_after_train_when_stopped_early_but_not_after_an_exception(tmp_path: Path) -> None:
    def stop_after_iter_1(view) -> None:
        if view.iter == 1:
            view.pl_trainer.should_stop = True

    stopped = TinyModule(batches=3)
    hooks = [PreciseBN(num_iter=3), CallbackHook(after_step=stop_after_iter_1)]
    trainer = make_trainer(tmp_path, hooks)
    trainer.fit(stopped)
    assert trainer.global_step == 2 and int(stopped.model[1].num_batches_tracked) == 3  # reset, then 3 batches

    failed = TinyModule(batches=3, fail_at=2)
    with pytest.raises(RuntimeError, match="failing on purpose"):
        make_trainer(tmp_path, [PreciseBN(num_iter=3)]).fit(failed)
    assert int(failed.model[1].num_batches_tracked) == 2  # the two training steps only


def test_periodic_writer_json_drops_the_replayed_steps_of_a_resumed_run(tmp_path: Path) -> None:
    # a run that stops in the middle of epoch 1 resumes from the end of epoch 0 (step 3) and
    # replays steps 3-4: the JSON file keeps one line per iteration, in order, like the CSV log
    json_file = tmp_path / "metrics.jsonl"
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [PeriodicWriter(period=1, json_file=json_file), checkpoint],
                           enable_checkpointing=True, max_epochs=3)
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.fit(TinyModule(batches=3, fail_at=5))
    assert {3, 4} <= {json.loads(line)["iteration"] for line in json_file.read_text().splitlines()}

    trainer = make_trainer(tmp_path, [PeriodicWriter(period=1, json_file=json_file)], max_epochs=3)
    trainer.fit(TinyModule(batches=3), ckpt_path=str(tmp_path / "last.ckpt"))
    records = [json.loads(line) for line in json_file.read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(9))
    assert [r["epoch"] for r in records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


class PutsIter(HookBase):
    """Puts ``user_iter`` = the step's iteration in ``after_step``."""

    def after_step(self) -> None:
        self.trainer.storage.put_scalar("user_iter", self.trainer.iter, smoothing_hint=False)


def test_periodic_writer_lines_hold_the_scalars_of_hooks_listed_after_it(tmp_path: Path, caplog) -> None:
    # `+hooks.my_hook._target_=...` lists a hook after periodic_writer: the writer's line of step i
    # holds what that hook put at step i (fast-reid runs its writers after the other hooks)
    json_file = tmp_path / "metrics.jsonl"
    make_trainer(tmp_path, [PeriodicWriter(period=2, json_file=json_file), PutsIter()]).fit(TinyModule(batches=3))
    records = [json.loads(line) for line in json_file.read_text().splitlines()]
    assert [(r["iteration"], r.get("user_iter")) for r in records] == [(1, 1.0), (3, 3.0), (5, 5.0)]


@pytest.mark.parametrize(("period", "iterations"), [(1, [0, 1, 2, 3, 4]), (2, [1, 3, 4])])
def test_periodic_writer_last_line_after_a_failed_step_is_the_last_finished_step(
    tmp_path: Path, period: int, iterations: list[int]
) -> None:
    # step 5 raises in training_step: the last line is step 4's, not an empty or mislabelled step 5
    json_file = tmp_path / "metrics.jsonl"
    trainer = make_trainer(tmp_path, [PeriodicWriter(period=period, json_file=json_file)])
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.fit(TinyModule(batches=3, fail_at=5))
    records = [json.loads(line) for line in json_file.read_text().splitlines()]
    assert [r["iteration"] for r in records] == iterations
    assert all("total_loss" in r for r in records)


class PutsEpochScalar(HookBase):
    """Puts ``epoch_acc`` in ``after_epoch`` (it lands at the epoch's last step)."""

    def after_epoch(self) -> None:
        self.trainer.storage.put_scalar("epoch_acc", 0.5 + self.trainer.epoch, smoothing_hint=False)


@pytest.mark.parametrize(("period", "expected"), [(3, [(2, 0.5), (5, 1.5)]), (2, [(1, None), (3, 0.5), (5, 1.5)])])
def test_periodic_writer_line_of_an_epochs_last_step_holds_what_hooks_put_in_after_epoch(
    tmp_path: Path, period: int, expected: list
) -> None:
    # a hook's epoch-level scalar (put in after_epoch, at the epoch's last step) reaches metrics.jsonl
    # in the line of that step; it was dropped when that step's line had been written already
    json_file = tmp_path / "metrics.jsonl"
    make_trainer(tmp_path, [PeriodicWriter(period=period, json_file=json_file), PutsEpochScalar()]).fit(
        TinyModule(batches=3)
    )
    records = [json.loads(line) for line in json_file.read_text().splitlines()]
    assert [(r["iteration"], r.get("epoch_acc")) for r in records] == expected


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_precise_bn_casts_its_batches_to_the_precision_plugins_input_type(tmp_path: Path, precision: str) -> None:
    # a "-true" precision keeps the model in that dtype; Lightning casts each training batch to it
    # before the transfer, and PreciseBN's own batches need the same cast (float32 inputs failed)
    module = TinyModule(batches=3, lr=0.0)
    make_trainer(tmp_path, [PreciseBN(num_iter=2)], max_epochs=1, precision=precision).fit(module)
    bn = module.model[1]
    assert bn.running_mean.dtype == module.model[0].weight.dtype != torch.float32
    assert int(bn.num_batches_tracked) == 2
