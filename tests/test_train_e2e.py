"""End to end: ``scripts/train.py`` and ``scripts/eval.py`` in subprocesses on the demo data.

One tiny training run (ResNet-18, 64x32, 6 epochs, validation every epoch, the user-style
example hooks of ``tests/example_hooks.py`` listed through the config) is shared by the tests.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import run_script
from PIL import Image

pytestmark = pytest.mark.slow

QUICK = [
    "experiment=quickstart",
    "data.height=64", "data.width=32", "data.num_workers=0",
    "solver.max_epochs=6", "solver.eval_period=1", "solver.warmup_iters=30", "solver.milestones=[5]",
]


def logged_column(run_dir: Path, column: str) -> list[float]:
    """Every logged value of ``column``, in order, from the CSV logger."""
    (metrics_csv,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(metrics_csv) as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]


@pytest.fixture(scope="module")
def trained_run(demo_root, tmp_path_factory):
    """(run dir, completed process) of the shared tiny training run."""
    work = tmp_path_factory.mktemp("e2e")
    run_dir = work / "run"
    hooks = ["+hooks.step_timer._target_=example_hooks.StepTimer", "+hooks.step_timer.period=5"]
    proc = run_script("train.py", [*QUICK, *hooks, f"paths.data_dir={demo_root}", f"hydra.run.dir={run_dir}"], cwd=work, threads=2)
    return run_dir, proc


def test_quickstart_trains_and_the_metric_rises(trained_run):
    run_dir, proc = trained_run
    maps = logged_column(run_dir, "val/mAP")
    assert len(maps) == 6
    assert maps[-1] > maps[0] + 5.0, f"val/mAP did not rise: {maps}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}
    assert metrics["mAP"] == pytest.approx(maps[-1], abs=0.01)
    # the last epoch's validation ranked the test set with the final weights: taken as the test
    assert logged_column(run_dir, "test/mAP") == pytest.approx([maps[-1]])
    assert 0.0 < metrics["Rank-1"] <= metrics["Rank-5"] <= metrics["Rank-10"] <= 100.0
    assert 0.0 < metrics["mINP"] <= 100.0
    assert "mAP" in proc.stdout and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "config_tree.log").is_file()


def test_config_listed_user_hook_runs_and_reaches_the_loggers(trained_run):
    run_dir, proc = trained_run
    log_text = (run_dir / "train.log").read_text()
    assert "iter 4 took" in log_text and "iter 9 took" in log_text
    step_seconds = logged_column(run_dir, "step_seconds")
    assert step_seconds and all(0.0 < s < 60.0 for s in step_seconds)
    # fast-reid's PeriodicWriter line from the default hooks
    assert "total_loss:" in log_text and "data_time:" in log_text


def test_eval_script_reproduces_the_test_metrics_and_draws_pictures(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "eval"
    run_script(
        "eval.py",
        [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={out}",
         "rank_lists.num_queries=4", "export_features=true", "evaluation.tpr_fprs=[1e-2]", "trainer=cpu"],
        cwd=tmp_path, threads=2,
    )
    trained = json.loads((run_dir / "metrics.json").read_text())
    evaluated = json.loads((out / "metrics.json").read_text())
    for key in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-3)
    assert 0.0 <= evaluated["TPR@FPR=1e-02"] <= 100.0
    pictures = sorted((out / "rank_lists").glob("*.png"))
    assert len(pictures) == 4
    sizes = {Image.open(p).size for p in pictures}
    assert len(sizes) == 1 and next(iter(sizes))[0] > 11 * 32  # query + top-10 tiles of 32 px width
    assert Image.open(out / "cmc.png").size == (600, 400)
    import numpy as np

    exported = np.load(out / "features.npz")
    assert exported["features"].shape[0] == len(exported["paths"]) == len(exported["pids"])
    assert exported["is_query"].sum() == 184  # demo query split
