"""Logger presets (``conf/logger/*.yaml``) and the hyper-parameters every logger receives.

MLflow and Weights & Biases are optional extras (``.[mlflow]``, ``.[wandb]``): their tests skip
when the package is missing. One tiny training run of ``scripts/train.py`` logs to CSV and to
every installed optional logger: MLflow into its SQLite store in the run dir, W&B in offline mode.
A run resumed in place (``resume=true``) continues its MLflow run and keeps its W&B run id.
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import compose_train, run_script
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.loggers import (
    CSVLogger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)

from reid_lightning.checkpointing.resume import ResumePlan
from reid_lightning.cli.train import instantiate_group
from reid_lightning.engine.hparams import flatten_config, log_hyperparameters

OPTIONAL = [name for name in ("mlflow", "wandb") if importlib.util.find_spec(name) is not None]
LOGGER_CLASSES = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "mlflow": MLFlowLogger, "wandb": WandbLogger}
TINY_DEMO = {"seed": 0, "num_ids": 16, "images_per_id": 6, "num_distractors": 5, "num_junk": 2}
TINY = [
    "experiment=quickstart", "data.height=64", "data.width=32", "data.num_workers=0", "data.batch_size=8",
    "data.num_instances=4", "data.test_batch_size=32", "++data.batches_per_epoch=2",
    *(f"++data.dataset_kwargs.{key}={value}" for key, value in TINY_DEMO.items()),
    "solver.max_epochs=2", "solver.eval_period=1", "solver.warmup_iters=1", "trainer.log_every_n_steps=1",
    "hooks=none", "callbacks=none", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
]


def needs(package: str) -> None:
    if package not in OPTIONAL:
        pytest.skip(f"{package} is not installed (pip install -e '.[{package}]')")


def test_flatten_config_keys_the_leaves_like_overrides():
    tree = {"solver": {"base_lr": 3.5e-4, "milestones": [40, 90]}, "seed": 0, "hooks": {}, "ckpt_path": None}
    assert flatten_config(tree) == {"solver.base_lr": 3.5e-4, "solver.milestones": [40, 90], "seed": 0, "ckpt_path": None}


@pytest.mark.parametrize("preset", ["default", "csv", "tensorboard", "mlflow", "wandb"])
def test_each_preset_builds_its_loggers_writing_into_the_run_dir(preset, tmp_path):
    expected = ["csv", "tensorboard"] if preset == "default" else [preset]
    for name in expected:
        if name in ("mlflow", "wandb"):
            needs(name)
    cfg = compose_train([f"logger={preset}"], output_dir=tmp_path)
    loggers = instantiate_group(cfg.logger)
    assert [type(logger) for logger in loggers] == [LOGGER_CLASSES[name] for name in expected]
    for name, node in OmegaConf.to_container(cfg.logger, resolve=True).items():
        where = node.get("save_dir") or node["tracking_uri"]
        assert str(tmp_path) in where, f"logger.{name} writes outside the run dir: {where}"
    if preset == "wandb":
        assert cfg.logger.wandb.offline is True


def test_a_list_of_presets_combines_them(tmp_path):
    names = ["csv", "tensorboard", *OPTIONAL]
    cfg = compose_train([f"logger=[{','.join(names)}]"], output_dir=tmp_path)
    assert list(cfg.logger) == names
    assert [type(logger) for logger in instantiate_group(cfg.logger)] == [LOGGER_CLASSES[name] for name in names]


def test_every_logger_gets_the_resolved_config_flattened(tmp_path):
    cfg = compose_train(["logger=[csv,tensorboard]", "solver.base_lr=0.002"], output_dir=tmp_path)
    loggers = instantiate_group(cfg.logger)
    params = log_hyperparameters(loggers, cfg)
    assert params["solver.base_lr"] == 0.002 and params["paths.output_dir"] == str(tmp_path)
    csv_logger, tensorboard_logger = loggers
    saved = OmegaConf.load(Path(csv_logger.log_dir) / "hparams.yaml")
    assert saved["solver.base_lr"] == 0.002 and saved["model.depth"] == cfg.model.depth
    assert tensorboard_logger.hparams["solver.base_lr"] == 0.002


# ---------------------------------------------------------------------- one tiny training run
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Run dir of a tiny run logging to CSV and to each installed optional logger (W&B offline)."""
    work = tmp_path_factory.mktemp("loggers")
    run_dir = work / "run"
    wandb_home = work / "wandb_home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(wandb_home))  # keeps W&B's own files out of the home dir
        run_script(
            "train.py",
            [*TINY, f"logger=[{','.join(['csv', *OPTIONAL])}]", f"paths.data_dir={work / 'data'}", f"hydra.run.dir={run_dir}"],
            cwd=work,
        )
    return run_dir


def csv_column(run_dir: Path, column: str) -> list[str]:
    """Every logged value of ``column`` as the CSV logger wrote it."""
    (metrics_csv,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(metrics_csv) as handle:
        return [row[column] for row in csv.DictReader(handle) if row.get(column)]


@pytest.mark.slow
def test_csv_hparams_hold_the_flat_run_config_only(logged_run):
    (hparams_yaml,) = logged_run.glob("csv/version_*/hparams.yaml")
    hparams = OmegaConf.to_container(OmegaConf.load(hparams_yaml))
    run_config = OmegaConf.to_container(OmegaConf.load(logged_run / ".hydra" / "config.yaml"))
    assert hparams["solver.base_lr"] == run_config["solver"]["base_lr"] and hparams["model.depth"] == 18
    assert "height" not in hparams  # the data module's own arguments are not logged a second time


@pytest.mark.slow
def test_mlflow_store_in_the_run_dir_holds_params_and_val_test_metrics(logged_run):
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{logged_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["solver.base_lr"] == "0.0007" and run.data.params["data.height"] == "64"
    val_maps = [m.value for m in client.get_metric_history(run.info.run_id, "val/mAP")]
    assert val_maps == pytest.approx([float(v) for v in csv_column(logged_run, "val/mAP")]) and len(val_maps) == 2
    metrics = json.loads((logged_run / "metrics.json").read_text())
    assert run.data.metrics["test/mAP"] == pytest.approx(metrics["mAP"], abs=1e-3)


@pytest.mark.slow
def test_wandb_offline_run_dir_holds_the_config_and_metrics(logged_run):
    needs("wandb")
    (offline_run,) = (logged_run / "wandb").glob("offline-run-*")
    (records,) = offline_run.glob("run-*.wandb")
    # a log of protobuf records: keys and JSON-encoded values are stored as plain bytes
    data = records.read_bytes()
    assert b"solver.base_lr" in data and b"0.0007" in data
    for key in ("val/mAP", "test/mAP"):
        assert key.encode() in data, f"{key} missing from {records}"
    for value in csv_column(logged_run, "val/mAP") + csv_column(logged_run, "test/mAP"):
        assert value.encode() in data, f"logged value {value} missing from {records}"


# ---------------------------------------------------------------------- resume=true in place
def test_a_resumed_wandb_logger_keeps_its_latest_run_id(tmp_path):
    cfg = compose_train(["logger=wandb"], output_dir=tmp_path)
    assert ResumePlan("last.ckpt", 7).logger_config(cfg.logger).wandb.id is None  # nothing logged yet
    for name in ("offline-run-20260101_090000-first1", "offline-run-20260102_080000-second2", "latest-run"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    resumed = ResumePlan("last.ckpt", 7).logger_config(cfg.logger).wandb
    assert (resumed.id, resumed.resume) == ("second2", "allow")
    assert ResumePlan("last.ckpt", None).logger_config(cfg.logger).wandb.id is None  # a new run dir: a new run


def test_a_resumed_mlflow_logger_continues_its_run_and_keeps_its_params(tmp_path):
    needs("mlflow")
    cfg = compose_train(["logger=mlflow", "seed=3"], output_dir=tmp_path)
    assert ResumePlan("last.ckpt", 7).logger_config(cfg.logger).mlflow.run_id is None  # no store yet
    (first,) = instantiate_group(cfg.logger)
    log_hyperparameters([first], cfg)
    first.log_metrics({"val/mAP": 10.0}, step=3)
    first.finalize("success")

    with open_dict(cfg):
        cfg.resume = True
    resumed_cfg = ResumePlan("last.ckpt", 7).logger_config(cfg.logger)
    assert resumed_cfg.mlflow.run_id == first.run_id
    (resumed,) = instantiate_group(resumed_cfg)
    log_hyperparameters([resumed], cfg)  # MLflow refuses to change a param: resume=false stays logged
    resumed.log_metrics({"val/mAP": 20.0}, step=8)
    resumed.finalize("success")
    run = resumed.experiment.get_run(first.run_id)
    assert run.data.params["resume"] == "False" and run.data.params["seed"] == "3"
    assert [m.value for m in resumed.experiment.get_metric_history(first.run_id, "val/mAP")] == [10.0, 20.0]


def test_logger_none_trains_without_loggers_and_without_the_lr_monitor(demo_root: Path, tmp_path: Path) -> None:
    from reid_lightning.cli.train import train

    overrides = [*TINY, "logger=none", "callbacks=default", "~callbacks.progress_bar", f"paths.data_dir={demo_root}"]
    cfg = compose_train(overrides, output_dir=tmp_path)
    assert "lr_monitor" in cfg.callbacks and not cfg.logger
    metrics = train(cfg)
    assert 0 <= metrics["mAP"] <= 100
    assert json.loads((tmp_path / "metrics.json").read_text())["mAP"] == metrics["mAP"]
    assert not (tmp_path / "csv").exists() and not (tmp_path / "tensorboard").exists()
