"""ReIDModule in a real (tiny) Lightning fit: losses logged, LR schedule per step, eval metrics,
sanity check and partial validation, evaluation precision under bf16-mixed."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_train

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


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """6 queries (served first) + 18 gallery images in evaluation batches of 3."""
    from test_bad_input import write_folder_dataset

    identities = tuple(range(1, 7))
    root = write_folder_dataset(tmp_path_factory.mktemp("folder"), 4, query_ids=identities, gallery_ids=identities)
    dm = ReIDDataModule(
        "folder", root=str(root), height=64, width=32, batch_size=8, num_instances=4,
        test_batch_size=3, num_workers=0, batches_per_epoch=2,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _fit(dm, tmp_path, solver, epochs=2, hooks=(), **trainer_kwargs):
    model = build_bot(num_classes=dm.num_classes, depth=18, pretrained="none")
    module = ReIDModule(model, solver=solver, evaluation={"metric": "cosine"}, cfg={"note": "plain config"})
    recorder = _LRRecorder()
    options = dict(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, callbacks=[recorder, *hooks],
    )
    trainer = pl.Trainer(**{**options, **trainer_kwargs})
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
    batch = tiny_data.on_after_batch_transfer(next(iter(tiny_data.build_train_loader(0, 1))), 0)
    out = module.training_step(batch, 0)
    assert out["loss"].requires_grad
    assert set(out["loss_dict"]) == {"loss_cls", "loss_triplet"}
    assert torch.allclose(out["loss"].detach(), sum(out["loss_dict"].values()))
    with torch.no_grad():  # train-mode BatchNorm uses batch statistics: the same logits again
        logits = model(batch["images"])["cls_logits"]
    top1 = (logits.argmax(1) == batch["targets"]).float().mean()
    assert set(out["metrics"]) == {"cls_accuracy"} and out["metrics"]["cls_accuracy"] == top1


def test_training_logs_losses_and_accuracy_on_the_steps_the_trainer_writes(tiny_data, tmp_path, monkeypatch):
    put: list[tuple[int, float, float]] = []

    def record(view) -> None:
        latest = view.storage.latest()
        put.append((latest["cls_accuracy"][1], latest["cls_accuracy"][0], latest["total_loss"][0]))

    calls: list[str] = []
    real_log = ReIDModule.log
    monkeypatch.setattr(ReIDModule, "log", lambda self, name, *a, **k: calls.append(name) or real_log(self, name, *a, **k))
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    hooks = [CallbackHook(after_step=record)]
    # 2 epochs of 3 steps, written every 2nd optimizer step: steps 1, 3 and 5 (across the epoch
    # boundary); the module also logs the epochs' last steps (2 and 5) for trainer.callback_metrics
    trainer, _, _ = _fit(tiny_data, tmp_path, {"warmup_iters": 1}, epochs=2, hooks=hooks, limit_val_batches=0,
                         logger=logger, log_every_n_steps=2)
    assert [iteration for iteration, _, _ in put] == list(range(6))
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy, _ in put)
    train_logs = [name for name in calls if name.startswith("train/")]
    assert len(train_logs) == 4 * 4 and set(train_logs) == {
        "train/loss_cls", "train/loss_triplet", "train/total_loss", "train/cls_accuracy"}
    with open(Path(logger.log_dir) / "metrics.csv") as log_file:
        rows = [row for row in csv.DictReader(log_file) if row.get("train/total_loss")]
    assert [int(row["step"]) for row in rows] == [1, 3, 5]
    for row, (_, accuracy, total) in zip(rows, put[1::2]):
        assert float(row["train/total_loss"]) == pytest.approx(total)
        assert float(row["train/cls_accuracy"]) == pytest.approx(accuracy)
    assert float(trainer.callback_metrics["train/cls_accuracy"]) == pytest.approx(put[-1][1])


def test_non_finite_loss_names_iteration_and_terms(tiny_data):
    model = build_bot(num_classes=tiny_data.num_classes, depth=18, pretrained="none")
    module = ReIDModule(model)
    batch = tiny_data.on_after_batch_transfer(next(iter(tiny_data.build_train_loader(0, 1))), 0)
    batch["images"] = batch["images"] * float("nan")
    with pytest.raises(FloatingPointError, match=r"iteration 0 .*loss_cls=nan"):
        module.training_step(batch, 0)


def test_sanity_check_skips_the_ranking_and_a_full_validation_does_not_warn(small_data, tmp_path):
    # the sanity check's two batches hold the 6 queries only: nothing to rank
    assert len(small_data.splits.query) == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, _ = _fit(small_data, tmp_path, {"warmup_iters": 1}, epochs=1, num_sanity_val_steps=2)
    assert 0.0 <= float(trainer.callback_metrics["val/mAP"]) <= 100.0
    assert not [w for w in caught if "evaluated" in str(w.message)]


def test_partial_validation_warns_with_the_number_of_samples(small_data, tmp_path):
    assert len(small_data.test_samples) == 24
    with pytest.warns(UserWarning, match=r"val: evaluated 12 of the 24 samples \(query \+ gallery\)"):
        trainer, _, _ = _fit(small_data, tmp_path, {"warmup_iters": 1}, epochs=1, limit_val_batches=4)
    assert "val/mAP" in trainer.callback_metrics


def _bf16_test_features(dm, tmp_path, evaluation):
    """Features that reach the test metric in a bf16-mixed ``trainer.test``, and the float32 model's own."""
    torch.manual_seed(0)
    module = ReIDModule(build_bot(num_classes=dm.num_classes, depth=18), evaluation=evaluation)
    seen, images = [], []
    update = module.test_metrics[0].update

    def spy(features, *rest):
        seen.append(features.detach().clone())
        return update(features, *rest)

    class KeepImages(pl.Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            images.append(batch["images"].clone())

    module.test_metrics[0].update = spy
    trainer = pl.Trainer(
        accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path, callbacks=[KeepImages()],
    )
    trainer.test(module, datamodule=dm, verbose=False)
    with torch.no_grad():
        reference = torch.cat([module.model.eval()(batch) for batch in images])
    return torch.cat(seen), reference


def test_bf16_mixed_evaluation_features_are_float32(small_data, tmp_path):
    features, reference = _bf16_test_features(small_data, tmp_path, {"metric": "cosine"})
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, reference)


def test_bf16_mixed_evaluation_can_opt_into_autocast(small_data, tmp_path):
    features, reference = _bf16_test_features(small_data, tmp_path, {"metric": "cosine", "precision": "autocast"})
    assert not torch.allclose(features.float(), reference, rtol=1e-4, atol=1e-4)


def test_unknown_evaluation_precision_is_named():
    with pytest.raises(ValueError, match=r"evaluation.precision must be one of \['32', 'autocast'\].*got '16'"):
        ReIDModule(build_bot(num_classes=2, depth=18), evaluation={"precision": 16})


@pytest.mark.parametrize(
    ("group", "kwargs", "key"),
    [("solver", {"solver": {"base_lrr": 1e-3}}, "base_lrr"), ("evaluation", {"evaluation": {"flipp": True}}, "flipp")],
)
def test_a_misspelt_solver_or_evaluation_key_is_an_error_naming_it(group, kwargs, key):
    with pytest.raises(ValueError, match=rf"unknown {group} setting\(s\) \['{key}'\]"):
        ReIDModule(build_bot(num_classes=2, depth=18), **kwargs)


def test_the_real_solver_and_evaluation_configs_are_read_whole():
    cfg = compose_train(["experiment=quickstart"])
    module = ReIDModule(build_bot(num_classes=2, depth=18), solver=cfg.solver, evaluation=cfg.evaluation)
    assert module.solver.milestones == tuple(cfg.solver.milestones)
    assert module.solver.milestones_from == cfg.solver.milestones_from
    assert module.evaluation.metric_kwargs()["max_chunk_mb"] == cfg.evaluation.max_chunk_mb


def test_module_names_an_unnormalised_batch(tiny_data) -> None:
    batch = {"images": torch.zeros(4, 3, 32, 16, dtype=torch.uint8), "targets": torch.zeros(4, dtype=torch.long)}
    module = ReIDModule(build_bot(num_classes=tiny_data.num_classes, depth=18, pretrained="none"))
    with pytest.raises(TypeError, match="normalize_on_device"):
        module.training_step(batch, 0)


@pytest.mark.parametrize(
    ("solver", "message"),
    [
        ({"optimizer": "adam"}, r"solver.optimizer must be one of Adam, AdamW, SGD \(did you mean 'Adam'\?\), got 'adam'"),
        ({"base_lr": -0.1}, r"solver.base_lr must be > 0, got -0.1"),
        ({"milestones": [9, 3]}, r"solver.milestones must be strictly increasing epochs, got \(9, 3\)"),
        ({"milestones": [40, 40]}, r"solver.milestones must be strictly increasing epochs"),
        ({"milestones": 5}, r"solver.milestones must be a list of epochs, e.g. \[40, 90\], got 5"),
        ({"milestones": None}, r"solver.milestones must be a list of epochs.*got None"),
        ({"base_lr": "abc"}, r"solver.base_lr must be a number, got 'abc'"),
        ({"warmup_iters": 2.5}, r"solver.warmup_iters must be an integer, got 2.5"),
        ({"nesterov": "yes"}, r"solver.nesterov must be true or false"),
        ({"milestones": [0, 3]}, r"solver.milestones must be epochs >= 1"),
        ({"gamma": 0}, r"solver.gamma must be > 0"),
        ({"warmup_iters": -5}, r"solver.warmup_iters must be >= 0"),
        ({"weight_decay_bias": -1e-4}, r"solver.weight_decay_bias must be >= 0"),
        ({"max_epochs": 0}, r"solver.max_epochs must be >= 1"),
        ({"max_epochs": -2}, r"solver.max_epochs must be >= 1 \(or -1: no epoch limit"),
        ({"milestones_from": "warmup"}, r"solver.milestones_from must be one of after_warmup, start, got 'warmup'"),
        ({"optimizer": "SGD", "nesterov": True, "momentum": 0}, r"solver.nesterov=true needs solver.momentum > 0"),
    ],
)
def test_a_bad_solver_value_is_an_error_naming_its_key(solver, message):
    with pytest.raises(ValueError, match=message):
        ReIDModule(build_bot(num_classes=2, depth=18), solver=solver)


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({"metric": "cosin"}, r"evaluation.metric must be one of cosine, euclidean, got 'cosin'"),
        ({"flip": "yes"}, r"evaluation.flip must be true or false, got 'yes'"),
        ({"aqe_k": 0}, r"evaluation.aqe_k must be >= 1, got 0"),
        ({"rerank_k1": 2.5}, r"evaluation.rerank_k1 must be an integer, got 2.5"),
        ({"rerank_lambda": 1.5}, r"evaluation.rerank_lambda must lie in \[0, 1\], got 1.5"),
        ({"max_rank": 0}, r"evaluation.max_rank must be >= 1"),
        ({"tpr_fprs": [0.01, 0]}, r"evaluation.tpr_fprs must be false-positive rates in \(0, 1\], got \(0.01, 0\)"),
        ({"max_chunk_mb": 0}, r"evaluation.max_chunk_mb must be > 0"),
    ],
)
def test_a_bad_evaluation_value_is_an_error_naming_its_key(evaluation, message):
    with pytest.raises(ValueError, match=message):
        ReIDModule(build_bot(num_classes=2, depth=18), evaluation=evaluation)


def test_a_bad_solver_value_fails_the_run_before_the_data_is_read(tmp_path):
    from reid_lightning.cli.train import train

    cfg = compose_train(["solver.gamma=0", f"paths.data_dir={tmp_path / 'absent'}"], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="solver.gamma must be > 0"):
        train(cfg)
    cfg = compose_train(["evaluation.aqe_k=0", f"paths.data_dir={tmp_path / 'absent'}"], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="evaluation.aqe_k must be >= 1"):
        train(cfg)
    assert not (tmp_path / "absent").exists()  # the demo set was not generated


def test_solver_max_epochs_minus_one_leaves_the_length_to_max_steps():
    assert ReIDModule(build_bot(num_classes=2, depth=18), solver={"max_epochs": -1}).solver.max_epochs == -1
    # eval_period null: trainer.check_val_every_n_epoch=None, validation by trainer.val_check_interval steps
    assert ReIDModule(build_bot(num_classes=2, depth=18), solver={"eval_period": None}).solver.eval_period is None


def test_partial_validation_warns_under_ddp_where_each_rank_loads_its_share(small_data):
    # two ranks, each with its half of the 24 samples (a Subset) and 6 of them evaluated: the count
    # summed over the ranks (12) was compared with one rank's share (12), and nothing was said
    class TwoRanks:
        def reduce(self, tensor, reduce_op):
            assert reduce_op == "sum"
            return tensor * 2  # both ranks hold the same numbers

    share = small_data.build_test_loader(0, 2)
    assert len(share.dataset) == 12
    module = ReIDModule(build_bot(num_classes=small_data.num_classes, depth=18, pretrained="none"))
    module._trainer = SimpleNamespace(strategy=TwoRanks(), val_dataloaders=share)
    module._eval_samples = 6
    with pytest.warns(UserWarning, match=r"val: evaluated 12 of the 24 samples \(query \+ gallery\)"):
        module._warn_partial_split("val")
    module._eval_samples = 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._warn_partial_split("val")  # every sample of the split, over the two ranks
