"""Resume and faults.

A run of ``scripts/train.py`` killed with SIGKILL in the middle of an epoch and resumed with
``resume=true`` ends bit-identical to the uninterrupted run (weights, optimizer, schedule,
metrics.json, CSV log, one logger version); a non-finite loss stops the run with an error naming
the iteration and leaves the last good checkpoint loadable; a missing checkpoint is named. Unit
checks of the pieces that make the resume exact: RNG states, per-item augmentation seeds,
logger continuation.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train, run_script, script_command
from omegaconf import OmegaConf, open_dict
from PIL import Image
from pytorch_lightning.loggers import CSVLogger

from reid_lightning.checkpointing.resume import (
    ResumePlan,
    collect_rng_states,
    set_rng_states,
)
from reid_lightning.cli.train import train
from reid_lightning.data import ImageDataset, SeededSampler, build_train_transforms
from reid_lightning.data.datasets.demo import prepare_demo
from reid_lightning.data.samples import Sample
from reid_lightning.modeling import build_bot

TESTS_DIR = Path(__file__).resolve().parent
# 8 training identities (about 48 images), about 45 test images
SMALL_DEMO = {"seed": 0, "num_ids": 16, "images_per_id": 6, "num_distractors": 5, "num_junk": 2}
STEPS_PER_EPOCH = 4
# ResNet-18 at 64x32, 4 identities x 4 images per step, 3 epochs of 4 steps, validation every
# epoch; the warmup (10 steps) runs past the first epochs, the LR drops at epoch 2
TINY = [
    "experiment=quickstart", "data.height=64", "data.width=32", "data.batch_size=16",
    f"++data.batches_per_epoch={STEPS_PER_EPOCH}", *(f"++data.dataset_kwargs.{k}={v}" for k, v in SMALL_DEMO.items()),
    "solver.max_epochs=3", "solver.eval_period=1", "solver.warmup_iters=10", "solver.milestones=[2]",
    "trainer.deterministic=true", "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar", "~callbacks.model_summary", "++trainer.enable_progress_bar=false",
]
TIME_COLUMNS = {"time", "data_time"}


@pytest.fixture(scope="module")
def small_demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_demo")
    prepare_demo(root, **SMALL_DEMO)
    return root


def kill_after_iteration(args: list[str], run_dir: Path, iteration: int, cwd: Path, written: Path | None = None) -> None:
    """Start ``train.py`` and SIGKILL it once its ``metrics.jsonl`` (PeriodicWriter, period 1)
    records ``iteration`` (and the file ``written`` exists: checkpoints are written in the background)."""
    command, env = script_command("train.py", args)
    log_path = cwd / f"{run_dir.name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    jsonl = run_dir / "csv" / "version_0" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            lines = jsonl.read_text().splitlines() if jsonl.is_file() else []
            reached = any(json.loads(line)["iteration"] >= iteration for line in lines if line.endswith("}"))
            if reached and (written is None or written.exists()):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        returncode = proc.wait()
    assert returncode == -signal.SIGKILL, f"train.py was not killed ({returncode}):\n{log_path.read_text()[-5000:]}"


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the run's only CSV log, without the wall-clock columns."""
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(handle)]


def flat(tree, prefix: str = ""):
    """(path, leaf) pairs of nested dicts / lists / tuples."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flat(value, f"{prefix}.{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from flat(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def differing(a, b) -> list[str]:
    left, right = dict(flat(a)), dict(flat(b))
    assert left.keys() == right.keys()
    same = lambda x, y: torch.equal(x, y) if torch.is_tensor(x) else x == y  # noqa: E731
    return [key for key in left if not same(left[key], right[key])]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(small_demo_root: Path, tmp_path: Path) -> None:
    # one persistent loader worker: its batches must not depend on the process that drew them
    args = [*TINY, "data.num_workers=1", "hooks.periodic_writer.period=1", f"paths.data_dir={small_demo_root}"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_script("train.py", [*args, f"hydra.run.dir={whole}"], cwd=tmp_path)

    # killed after the first step of epoch 1 (steps 4-7), in the warmup, once last.ckpt of epoch 0
    # is on disk (async_checkpoints: written while epoch 1 runs)
    last = broken / "checkpoints" / "last.ckpt"
    kill_after_iteration([*args, f"hydra.run.dir={broken}"], broken, STEPS_PER_EPOCH, cwd=tmp_path, written=last)
    killed_at = torch.load(last, map_location="cpu", weights_only=True)
    assert (killed_at["epoch"], killed_at["global_step"]) == (0, STEPS_PER_EPOCH)
    assert not (broken / "metrics.json").exists()

    run_script("train.py", [*args, f"hydra.run.dir={broken}", "resume=true"], cwd=tmp_path)
    expected = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (2, 3 * STEPS_PER_EPOCH)
    assert differing(expected["state_dict"], resumed["state_dict"]) == []
    assert differing(expected["optimizer_states"], resumed["optimizer_states"]) == []
    assert differing(expected["lr_schedulers"], resumed["lr_schedulers"]) == []
    assert json.loads((broken / "metrics.json").read_text()) == json.loads((whole / "metrics.json").read_text())
    # the same checkpoint files (best by val/mAP + last), no last-v1.ckpt, no temp file left
    assert sorted(os.listdir(broken / "checkpoints")) == sorted(os.listdir(whole / "checkpoints"))
    # the loggers went on in their version dir: the CSV log equals the uninterrupted one
    for logger in ("csv", "tensorboard"):
        assert sorted(os.listdir(broken / logger)) == ["version_0"], logger
    assert csv_rows(broken) == csv_rows(whole)


def nan_bot(nan_at_step: int, **kwargs):
    """``build_bot(**kwargs)`` whose ``loss_cls`` is NaN from its ``nan_at_step``-th loss
    computation on (0-based: the training step); listed as ``model._target_``."""
    model = build_bot(**kwargs)
    losses, calls = model.losses, itertools.count()

    def nan_losses(outputs, targets):
        terms = losses(outputs, targets)
        if next(calls) >= nan_at_step:
            terms["loss_cls"] = terms["loss_cls"] * float("nan")
        return terms

    model.losses = nan_losses
    return model


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small_demo_root: Path, tmp_path: Path) -> None:
    nan_step = STEPS_PER_EPOCH + 2  # in epoch 1, after last.ckpt of epoch 0
    cfg = compose_train(
        [*TINY, "data.num_workers=0", "hooks=none", "logger=csv", f"paths.data_dir={small_demo_root}",
         "model._target_=test_resume_faults.nan_bot", f"+model.nan_at_step={nan_step}"],
        output_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match=rf"iteration {nan_step} \(epoch 1\): loss_cls=nan, loss_triplet="):
        train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, STEPS_PER_EPOCH)
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_a_nan_loss_is_caught_before_a_step_checkpoint_saves_its_weights(small_demo_root: Path, tmp_path: Path) -> None:
    # last.ckpt after every optimizer step, the losses read only every 50 steps: the save after
    # the NaN step (its weights updated with NaN gradients) must fail instead of writing them
    nan_step = STEPS_PER_EPOCH + 2
    cfg = compose_train(
        [*TINY, "data.num_workers=0", "hooks=none", "logger=csv", f"paths.data_dir={small_demo_root}",
         "trainer.log_every_n_steps=50", "callbacks.last_checkpoint.every_n_epochs=null",
         "+callbacks.last_checkpoint.every_n_train_steps=1",
         "model._target_=test_resume_faults.nan_bot", f"+model.nan_at_step={nan_step}"],
        output_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match=rf"iteration {nan_step} \(epoch 1\): loss_cls=nan"):
        train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == nan_step  # the weights before the NaN step
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


def test_resume_names_the_missing_checkpoint(tmp_path: Path) -> None:
    cfg = compose_train(["resume=true"], output_dir=tmp_path / "run")
    missing = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"resume=true found no checkpoint at {missing}: pass the")):
        ResumePlan.from_config(cfg)
    cfg = compose_train([f"ckpt_path={tmp_path / 'gone.ckpt'}"], output_dir=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=re.escape(f"ckpt_path={tmp_path / 'gone.ckpt'}: no such checkpoint file")):
        ResumePlan.from_config(cfg)
    cfg = compose_train(["resume=true", "callbacks=none"], output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="resume=true needs a ModelCheckpoint writing last.ckpt"):
        ResumePlan.from_config(cfg)


def test_resume_plan_reads_the_checkpoint_and_warns_about_changed_settings(tmp_path: Path, caplog) -> None:
    cfg = compose_train(["resume=true"], output_dir=tmp_path)
    assert ResumePlan.from_config(compose_train([], output_dir=tmp_path)) == ResumePlan()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    saved = compose_train(["solver.base_lr=0.01"], output_dir=tmp_path)
    torch.save({"global_step": 40, "state_dict": {}, "reid_config": OmegaConf.to_container(saved, resolve=True)}, last)
    with caplog.at_level(logging.WARNING, logger="reid_lightning.checkpointing.resume"):
        plan = ResumePlan.from_config(cfg)
    assert plan == ResumePlan(str(last), 40, {"solver.base_lr": 0.01})
    assert "solver.base_lr: 0.01 -> 0.00035" in caplog.text and "model." not in caplog.text
    # the restored optimizer state keeps the checkpoint's learning rate: so does the run's config
    assert "solver.base_lr: not applied when resuming; the run goes on with the checkpoint's values" in caplog.text
    plan.keep_held_settings(cfg)
    assert cfg.solver.base_lr == 0.01
    # ckpt_path alone starts a new run from the file: its loggers start afresh
    with open_dict(cfg):
        cfg.resume, cfg.ckpt_path = False, str(last)
    assert ResumePlan.from_config(cfg) == ResumePlan(str(last), None)  # the config now has the checkpoint's rate


def test_resumed_loggers_keep_their_version_and_history(tmp_path: Path) -> None:
    cfg = compose_train(["logger=default"], output_dir=tmp_path)
    for folder in ("csv/version_0", "csv/version_3", "csv/version_x", "tensorboard/version_1"):
        (tmp_path / folder).mkdir(parents=True)
    logger_cfg = ResumePlan("last.ckpt", 7).logger_config(cfg.logger)
    assert logger_cfg.csv.version == 3 and "purge_step" not in logger_cfg.csv
    assert logger_cfg.tensorboard.version == 1 and logger_cfg.tensorboard.purge_step == 7
    assert ResumePlan("last.ckpt", None).logger_config(cfg.logger) is cfg.logger  # not in place

    rows = [{"epoch": "0", "step": str(step), "train/loss": f"{1 / (step + 1):.6g}"} for step in range(10)]
    rows[5]["val/mAP"] = "12.5"
    metrics_csv = tmp_path / "csv" / "version_3" / "metrics.csv"
    with open(metrics_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "step", "train/loss", "val/mAP"])
        writer.writeheader()
        writer.writerows(rows)
    logger = CSVLogger(str(tmp_path), name="csv", version=3)
    ResumePlan("last.ckpt", 7).keep_logged_history([logger])
    logger.log_metrics({"train/loss": 0.5, "epoch": 1}, step=7)
    logger.save()
    with open(metrics_csv, newline="") as handle:
        kept = list(csv.DictReader(handle))
    assert [row["step"] for row in kept] == ["0", "1", "2", "3", "4", "5", "6", "7"]
    assert [row["train/loss"] for row in kept[:7]] == [row["train/loss"] for row in rows[:7]]
    assert kept[5]["val/mAP"] == "12.5" and kept[7]["train/loss"] == "0.5"


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.save({"rng": collect_rng_states()}, tmp_path / "rng.ckpt")
    draws = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    set_rng_states(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert draws[:3] == again[:3] and torch.equal(draws[3], again[3])


class Epochs(list):
    """An index list that records ``set_epoch`` calls."""

    epochs: list[int]

    def set_epoch(self, epoch: int) -> None:
        self.epochs = [*getattr(self, "epochs", []), epoch]


def test_seeded_sampler_gives_every_item_its_own_reproducible_seed() -> None:
    inner = Epochs([3, 1, 3, 0])
    sampler = SeededSampler(inner, seed=5, rank=0)
    sampler.set_epoch(2)
    first = list(sampler)
    assert inner.epochs == [2] and len(sampler) == 4
    assert [index for index, _ in first] == [3, 1, 3, 0]
    assert len({seed for _, seed in first}) == 4  # index 3 drawn twice: two seeds
    assert list(sampler) == first
    sampler.set_epoch(3)
    assert [seed for _, seed in sampler] != [seed for _, seed in first]
    other_rank = SeededSampler(inner, seed=5, rank=1)
    assert [seed for _, seed in other_rank] != [seed for _, seed in SeededSampler(inner, seed=5)]


def test_a_seeded_item_ignores_and_keeps_the_global_generator(tmp_path: Path) -> None:
    path = tmp_path / "0001_c1s1_000001_00.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(path)
    dataset = ImageDataset([Sample(str(path), 0, 0)], build_train_transforms((64, 32), padding=4, erasing_prob=0.5))
    torch.manual_seed(1)
    a = dataset[(0, 123)]["images"]
    after_a = torch.rand(1)
    torch.manual_seed(2)
    b = dataset[(0, 123)]["images"]
    torch.manual_seed(1)
    assert torch.equal(a, b) and torch.equal(torch.rand(1), after_a)  # the global stream went on untouched
    assert not all(torch.equal(a, dataset[(0, seed)]["images"]) for seed in range(4))


def test_resume_keeps_the_optimizer_its_checkpoint_state_belongs_to(tmp_path: Path, caplog) -> None:
    from reid_lightning.engine.module import ReIDModule
    from reid_lightning.engine.optim import build_optimizer
    from reid_lightning.engine.settings import SolverSettings

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    saved = compose_train(["solver.optimizer=SGD"], output_dir=tmp_path)
    model = build_bot(num_classes=3, depth=18, pretrained="none")
    sgd = build_optimizer(model, **SolverSettings.from_mapping(saved.solver).optimizer_kwargs())
    torch.save({"global_step": 4, "state_dict": {}, "reid_config": OmegaConf.to_container(saved, resolve=True)}, last)
    cfg = compose_train(["resume=true"], output_dir=tmp_path)  # solver.optimizer: Adam
    with caplog.at_level(logging.WARNING, logger="reid_lightning.checkpointing.resume"):
        plan = ResumePlan.from_config(cfg)
    assert plan.held_settings == {"solver.optimizer": "SGD"}
    assert "solver.optimizer: not applied when resuming" in caplog.text
    plan.keep_held_settings(cfg)
    # the module the run builds takes the saved optimizer state and steps with it
    optimizer = build_optimizer(model, **ReIDModule(model, solver=cfg.solver).solver.optimizer_kwargs())
    optimizer.load_state_dict(sgd.state_dict())
    for param in model.parameters():
        param.grad = torch.zeros_like(param) if param.requires_grad else None
    optimizer.step()
    assert isinstance(optimizer, torch.optim.SGD)
