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
