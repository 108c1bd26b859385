"""Shared fixtures: the real Hydra configs composed with test overrides, paths to ../shared."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SHARED = REPO_ROOT.parent / "shared"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def compose_train(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as ``scripts/train.py`` would, with the Hydra runtime set.

    ``paths.output_dir`` (``${hydra:runtime.output_dir}``) resolves to ``output_dir``.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the job config holds no hydra node
    return cfg


def fit_tiny_bot(demo_root: Path, steps: int, workers: int = 0, precision: str = "32", overrides: list[str] | None = None,
                 **trainer_args):
    """Fit a BoT R18 (32x16, batch 8, random init) ``steps`` steps on the demo set under
    ``demo_root`` with the real config on the CPU (seed 0; no validation, checkpoints, progress bar
    or model summary; ``trainer_args`` on top). Returns ``(trainer, module)``."""
    from reid_lightning.cli import train_benchmark as bench
    from reid_lightning.cli.train import build_datamodule, build_model, build_trainer
    from reid_lightning.engine.module import ReIDModule

    cfg = bench.benchmark_config(model="bot_r18", height=32, width=16, batch=8, workers=workers, precision=precision,
                                 data_dir=str(demo_root), overrides=overrides)
    bench.seed(0)
    datamodule = build_datamodule(cfg.data)
    module = ReIDModule(build_model(cfg, datamodule.num_classes), solver=cfg.solver)
    with open_dict(cfg):
        cfg.trainer.update(max_steps=steps, limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False, **trainer_args)
    trainer = build_trainer(cfg, [], loggers=[])
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


def script_command(script: str, args: list[str], threads: int = 1, full_error: bool = True) -> tuple[list[str], dict[str, str]]:
    """Command line and environment that run ``scripts/<script>`` as a user would, with ``tests/``
    importable (for test-only callbacks and hooks) and ``threads`` torch threads."""
    env = {
        **os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    else:
        env.pop("HYDRA_FULL_ERROR", None)
    return [sys.executable, str(REPO_ROOT / "scripts" / script), *args], env


def explain(proc: subprocess.CompletedProcess) -> str:
    """Return code and the tails of a finished script's output, for assertion messages."""
    return f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def run_script(
    script: str, args: list[str], cwd: Path, *, check: bool = True, threads: int = 1,
    full_error: bool = True, timeout: int = 900,
) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>`` with ``args`` (see :func:`script_command`); with ``check`` a
    non-zero exit fails the test with the script's output."""
    command, env = script_command(script, args, threads, full_error)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{script} failed: {explain(proc)}"
    return proc


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A data root holding the demo set (seed 0), generated once per test session."""
    from reid_lightning.data.datasets.demo import prepare_demo

    root = tmp_path_factory.mktemp("reid_data")
    prepare_demo(root, seed=0)
    return root



@pytest.fixture(scope="session")
def tiny_market_root(demo_root, tmp_path_factory) -> Path:
    """A data root in the Market layout (``data=folder``) with a few demo images: 8 train, the
    first 6 queries, and the gallery images of their identities plus 4 others."""
    import shutil

    source = next(demo_root.glob("reid_demo_v1_seed*"))
    root = tmp_path_factory.mktemp("tiny_market")
    query = sorted((source / "query").glob("*.jpg"))[:6]
    pids = {path.name.split("_")[0] for path in query}
    gallery = sorted((source / "bounding_box_test").glob("*.jpg"))
    chosen = {
        "bounding_box_train": sorted((source / "bounding_box_train").glob("*.jpg"))[:8],
        "query": query,
        "bounding_box_test": [p for p in gallery if p.name.split("_")[0] in pids] + [p for p in gallery if p.name.split("_")[0] not in pids][:4],
    }
    for split, paths in chosen.items():
        (root / split).mkdir()
        for path in paths:
            shutil.copy(path, root / split / path.name)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_market_root, tmp_path_factory) -> Path:
    """A checkpoint of an untrained BoT R18 at 64x32 on ``tiny_market_root``, saved as train.py
    saves one (ReIDModule state_dict + ``reid_config`` from ``on_save_checkpoint``), with
    BatchNorm statistics from a few random batches so that eval-mode features are not trivial."""
    from hydra.utils import instantiate

    from reid_lightning.engine.module import ReIDModule

    out = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = compose_train(
        ["data=folder", f"paths.data_dir={tiny_market_root}", "model=bot_r18", "model.pretrained=none",
         "data.height=64", "data.width=32", "data.num_workers=0"],
        output_dir=out,
    )
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=4, _convert_="all")
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 64, 32) * 2 - 1)
    module = ReIDModule(model, cfg=cfg)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path = out / "tiny.ckpt"
    torch.save(ckpt, path)
    return path
