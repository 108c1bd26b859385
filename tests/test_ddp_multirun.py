"""DDP under Hydra: the children of each multirun job run that job alone, in its own dir.

The end-to-end tests run ``scripts/train.py`` with ``trainer=ddp_cpu`` (2 gloo processes)
as a subprocess, never ``strategy=ddp`` inside pytest.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
from conftest import CONF_DIR, compose_train, explain, run_script
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict
from pytorch_lightning.strategies.launchers import subprocess_script
from test_sweeps import TINY, table_rows

from reid_lightning.launch.hydra_ddp import (
    DDP_ENV_VARS,
    LightningAPIChanged,
    check_lightning_api,
    child_command,
    config_flags,
    hydra_job_ddp,
)


def test_ddp_cpu_config_is_two_gloo_processes_in_float32(tmp_path):
    trainer = compose_train(["trainer=ddp_cpu"], output_dir=tmp_path).trainer
    assert (trainer.accelerator, trainer.devices, trainer.strategy, trainer.precision) == ("cpu", 2, "ddp", 32)
    assert trainer.use_distributed_sampler is False


def test_ddp_configs_only_use_trainer_arguments(tmp_path):
    accepted = set(inspect.signature(pl.Trainer).parameters)
    for option in ("ddp", "ddp_cpu"):
        trainer = compose_train([f"trainer={option}"], output_dir=tmp_path).trainer
        assert "sync_batchnorm" in trainer
        assert set(trainer) - {"_target_"} <= accepted, option


@pytest.mark.parametrize(
    "argv, kept",
    [
        (["-m", "seed=1,2"], []),
        (["-cn", "train", "--multirun", "a=1"], ["-cn", "train"]),
        (["--config-dir=/x", "-m", "--config-name", "eval", "b=2"], ["--config-dir=/x", "--config-name", "eval"]),
    ],
)
def test_config_flags_keep_only_the_config_choice(argv, kept):
    assert config_flags(argv) == kept


@pytest.fixture
def multirun_job(tmp_path, monkeypatch):
    """HydraConfig as inside job 1 of ``train.py -m -cn train seed=1,2 hydra.sweep.dir=...``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["seed=2"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.overrides.task = ["experiment=quickstart", "solver.milestones=[5]", "seed=2"]
        cfg.hydra.overrides.hydra = [
            f"hydra.sweep.dir={tmp_path}", "hydra.mode=MULTIRUN", "hydra/job_logging=disabled",
            "hydra.sweeper.max_batch_size=4", "hydra.job.chdir=false",
        ]
        cfg.hydra.runtime.output_dir = str(tmp_path / "1")
        cfg.hydra.runtime.cwd = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(sys, "argv", ["scripts/train.py", "-m", "-cn", "train", "seed=1,2", f"hydra.sweep.dir={tmp_path}"])
    yield tmp_path
    GlobalHydra.instance().clear()


def test_child_command_runs_the_job_alone_in_its_dir(multirun_job, monkeypatch):
    import __main__

    monkeypatch.setattr(__main__, "__spec__", None)  # started as `python scripts/train.py`
    command, cwd = child_command(1)
    assert cwd == str(multirun_job)
    assert command[:2] == [sys.executable, str(multirun_job / "scripts" / "train.py")]
    assert command[2:] == [
        "-cn", "train",
        "experiment=quickstart", "solver.milestones=[5]", "seed=2",
        "hydra/job_logging=disabled", "hydra.job.chdir=false",
        f'hydra.run.dir="{multirun_job / "1"}"', "hydra.output_subdir=null",
        "hydra.job.name=train_ddp_process_1", "hydra.mode=RUN",
    ]
    monkeypatch.setattr(__main__, "__spec__", SimpleNamespace(name="scripts.train"))  # `python -m scripts.train`
    assert child_command(1)[0][:3] == [sys.executable, "-m", "scripts.train"]


def test_job_scope_patches_the_launcher_then_waits_and_restores_the_environment(monkeypatch):
    for name in DDP_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    original = subprocess_script._hydra_subprocess_cmd
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[child])))
    with hydra_job_ddp(trainer):
        assert subprocess_script._hydra_subprocess_cmd is child_command
        # what Lightning's launcher leaves behind in the process that started the children
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", NODE_RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    assert subprocess_script._hydra_subprocess_cmd is original
    assert child.returncode == 0 and trainer.strategy.launcher.procs == []
    assert os.environ["MASTER_ADDR"] == "10.0.0.1"
    assert not {"MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"} & set(os.environ)


def test_job_scope_kills_the_children_of_a_failed_job(monkeypatch):
    for name in DDP_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stuck in a collective
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[child])))
    with pytest.raises(ValueError, match="bad lr"):
        with hydra_job_ddp(trainer):
            os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2")
            raise ValueError("bad lr")
    assert child.returncode is not None and child.returncode < 0
    assert trainer.strategy.launcher.procs == [] and not {"LOCAL_RANK", "WORLD_SIZE"} & set(os.environ)


def test_job_scope_leaves_a_run_without_children_alone(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child: its launcher starts nobody
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=None))
    with hydra_job_ddp(trainer):
        os.environ["WORLD_SIZE"] = "2"
    assert os.environ["LOCAL_RANK"] == "1" and os.environ.pop("WORLD_SIZE") == "2"


def test_the_private_lightning_api_swapped_for_multirun_ddp_is_still_there():
    """Fails after a Lightning upgrade that moves it, with a message naming the symbol and version."""
    try:
        check_lightning_api()
    except LightningAPIChanged as error:
        pytest.fail(str(error))


@pytest.mark.parametrize(
    "change, named",
    [
        ("removed", "_hydra_subprocess_cmd is missing"),
        ("new signature", r"_hydra_subprocess_cmd\(rank, env\) .* no longer takes \(local_rank\)"),
        ("called elsewhere", "_call_children_scripts .* no longer calls"),
    ],
)
def test_a_moved_lightning_symbol_is_named_when_a_ddp_job_starts(change, named, monkeypatch):
    if change == "removed":
        monkeypatch.delattr(subprocess_script, "_hydra_subprocess_cmd")
    elif change == "new signature":
        monkeypatch.setattr(subprocess_script, "_hydra_subprocess_cmd", lambda rank, env: ([], "."))
    else:
        monkeypatch.setattr(subprocess_script._SubprocessScriptLauncher, "_call_children_scripts", lambda self: None)
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[])))
    with pytest.raises(LightningAPIChanged, match=named) as error:
        with hydra_job_ddp(trainer):
            pass
    assert f"pytorch_lightning {pl.__version__}" in str(error.value)
    with hydra_job_ddp(SimpleNamespace(strategy=SimpleNamespace(launcher=None))):  # one device: nothing to swap
        pass


def rank1_seeds(output: str) -> list[str]:
    """Seeds set by rank 1 processes, in order, from Lightning's "[rank: 1] Seed set to N" lines."""
    return re.findall(r"\[rank: 1\] Seed set to (\d+)", output)


@pytest.mark.slow
def test_multirun_with_ddp_gives_each_job_its_own_children(demo_root, tmp_path):
    # default (time-stamped) sweep dir: a child that re-ran the sweep would make a second one
    proc = run_script("train.py", ["-m", *TINY, f"paths.data_dir={demo_root}", "trainer=ddp_cpu", "seed=1,2"], cwd=tmp_path, check=False, timeout=400)
    assert proc.returncode == 0, explain(proc)
    output = proc.stdout + proc.stderr
    assert output.count("Launching 2 jobs") == 1, "a DDP child ran the sweep again"
    assert output.count("distributed_backend=gloo") == 2
    assert rank1_seeds(output) == ["1", "2"]
    (sweep_dir,) = (tmp_path / "outputs" / "quickstart" / "multiruns").iterdir()
    assert sorted(os.listdir(tmp_path)) == ["outputs"] and sorted(os.listdir(tmp_path / "outputs")) == ["quickstart"]
    assert sorted(os.listdir(tmp_path / "outputs" / "quickstart")) == ["multiruns"]
    assert sorted(os.listdir(sweep_dir)) == ["0", "1", "multirun.yaml", "summary.csv", "summary.md"]
    for job in ("0", "1"):
        assert (sweep_dir / job / "metrics.json").is_file(), job
        assert (sweep_dir / job / "train_ddp_process_1.log").is_file(), f"rank 1 of job {job} ran elsewhere"
    rows = table_rows((sweep_dir / "summary.md").read_text())
    assert rows[0][:2] == ["job", "seed"] and [r[:2] for r in rows[1:]] == [["0", "1"], ["1", "2"]]
    assert all(r[-1] == "ok" for r in rows[1:])


@pytest.mark.slow
def test_a_failed_ddp_job_does_not_break_the_next_one(demo_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_script(
        "train.py", ["-m", *TINY, f"paths.data_dir={demo_root}", f"hydra.sweep.dir={sweep_dir}", "trainer=ddp_cpu",
         "model._target_=test_resume_faults.nan_bot", "+model.nan_at_step=0,1000000"],
        cwd=tmp_path, check=False, timeout=400,
    )
    # job 0 fails inside its DDP fit (a NaN loss in every rank); the basic sweeper runs the whole
    # batch, then exits non-zero for it
    assert proc.returncode == 1 and "Loss became infinite or NaN" in proc.stdout + proc.stderr, explain(proc)
    assert not (sweep_dir / "0" / "metrics.json").exists()
    assert (sweep_dir / "1" / "metrics.json").is_file(), explain(proc)
    rows = table_rows((sweep_dir / "summary.md").read_text())
    assert [(r[0], r[-1]) for r in rows[1:]] == [("0", "failed"), ("1", "ok")]


@pytest.mark.slow
def test_single_run_with_ddp_still_works(demo_root, tmp_path):
    proc = run_script("train.py", [*TINY, f"paths.data_dir={demo_root}", "trainer=ddp_cpu", "seed=3"], cwd=tmp_path, check=False, timeout=400)
    assert proc.returncode == 0, explain(proc)
    assert rank1_seeds(proc.stdout + proc.stderr) == ["3"]
    (run_dir,) = (tmp_path / "outputs" / "quickstart" / "runs").iterdir()
    assert sorted(os.listdir(tmp_path)) == ["outputs"]
    assert (run_dir / "metrics.json").is_file() and (run_dir / "train_ddp_process_1.log").is_file()
    assert not (run_dir / "summary.md").exists()
