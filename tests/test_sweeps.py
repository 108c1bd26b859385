"""Multirun sweeps: the summary callback (summary.md / summary.csv) and the Optuna search config."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_train, explain, run_script
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from reid_lightning.cli.train import train
from reid_lightning.launch.sweep_summary import (
    SweepSummary,
    collect_jobs,
    short_value,
    write_summary,
)

# a training job of a few seconds: 2 iterations of ResNet-18 on 32x16 demo images, no validation
TINY = [
    "experiment=quickstart", "data.height=32", "data.width=16", "data.padding=2", "data.num_workers=0",
    "solver.max_epochs=1", "solver.eval_period=2", "solver.warmup_iters=2", "solver.milestones=[5]",
    "+trainer.limit_train_batches=2", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
    "callbacks=none", "hooks=none", "logger=csv",
]


def make_job(sweep_dir: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    """A finished (``metrics``) or failed (None) job dir as Hydra and ``train()`` leave it."""
    job_dir = sweep_dir / name
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps(metrics))


def fake_sweep(sweep_dir: Path) -> None:
    """Jobs 0, 1, 2 and 10 over base_lr x seed; job 2 failed."""
    for num, (lr, seed) in enumerate([("1e-4", "1"), ("1e-4", "2"), ("3.5e-4", "1")]):
        metrics = None if num == 2 else {"Rank-1": 50.0 + num, "Rank-5": 70.0, "mAP": 30.0 + num, "mINP": 5.0}
        make_job(sweep_dir, str(num), ["experiment=quickstart", f"solver.base_lr={lr}", f"seed={seed}"], metrics)
    make_job(sweep_dir, "10", ["experiment=quickstart", "solver.base_lr=3.5e-4", "seed=2"],
             {"Rank-1": 60.0, "Rank-5": 80.0, "mAP": 40.5, "mINP": 9.25})


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the markdown table's rows (header first, separator dropped)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    return [rows[0], *rows[2:]]


def test_summary_table_lists_jobs_in_order_with_varying_overrides_and_failures(tmp_path):
    fake_sweep(tmp_path)
    markdown = write_summary(tmp_path)
    assert markdown == (tmp_path / "summary.md").read_text()
    rows = table_rows(markdown)
    assert rows[0] == ["job", "solver.base_lr", "seed", "Rank-1", "mAP", "mINP", "status"]
    assert rows[1:] == [
        ["0", "1e-4", "1", "50.00", "30.00", "5.00", "ok"],
        ["1", "1e-4", "2", "51.00", "31.00", "5.00", "ok"],
        ["2", "3.5e-4", "1", "-", "-", "-", "failed"],
        ["10", "3.5e-4", "2", "60.00", "40.50", "9.25", "ok"],
    ]
    assert "Overrides shared by all jobs: `experiment=quickstart`" in markdown
    assert "Best mAP: 40.50 (job 10)" in markdown


def test_summary_csv_holds_every_metric_and_the_full_overrides(tmp_path):
    fake_sweep(tmp_path)
    write_summary(tmp_path)
    with open(tmp_path / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert rows[3]["overrides"] == "experiment=quickstart solver.base_lr=3.5e-4 seed=2"
    assert (rows[3]["Rank-5"], rows[3]["mAP"], rows[3]["status"]) == ("80.0", "40.5", "ok")
    assert (rows[2]["mAP"], rows[2]["status"]) == ("", "failed")


def test_summary_finds_nested_job_dirs_and_ignores_other_files(tmp_path):
    make_job(tmp_path, "lr=1e-4/seed=1", ["solver.base_lr=1e-4", "seed=1"], {"Rank-1": 1.0, "mAP": 2.0, "mINP": 3.0})
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "lr=1e-4" / "notes.txt").write_text("x")
    (job,) = collect_jobs(tmp_path)
    assert (job.job, job.overrides, job.metrics["mAP"]) == ("lr=1e-4/seed=1", ["solver.base_lr=1e-4", "seed=1"], 2.0)


def test_sampled_floats_are_shortened_in_the_table_only(tmp_path):
    assert short_value("0.00010134344267417033") == "0.0001013"
    assert [short_value(v) for v in ("3.5e-4", "[5]", "bot_r18", "12345678901")] == ["3.5e-4", "[5]", "bot_r18", "12345678901"]
    for num, lr in enumerate(["0.00010134344267417033", "0.00035"]):
        make_job(tmp_path, str(num), [f"solver.base_lr={lr}"], {"Rank-1": 1.0, "mAP": 2.0, "mINP": 3.0})
    write_summary(tmp_path)
    assert table_rows((tmp_path / "summary.md").read_text())[1][1] == "0.0001013"
    assert "0.00010134344267417033" in (tmp_path / "summary.csv").read_text()


def test_callback_writes_after_multirun_jobs_only_and_prints_at_the_end(tmp_path, capsys):
    fake_sweep(tmp_path)
    callback = SweepSummary()
    run_cfg = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "sweep": {"dir": str(tmp_path)}}})
    callback.on_job_end(run_cfg, job_return=None)
    assert not (tmp_path / "summary.md").exists()
    multirun_cfg = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path)}}})
    callback.on_job_end(multirun_cfg, job_return=None)
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "summary.csv").is_file()
    assert capsys.readouterr().out == ""
    callback.on_multirun_end(multirun_cfg)
    assert "| 10 | 3.5e-4 | 2 | 60.00 | 40.50 | 9.25 | ok |" in capsys.readouterr().out


def compose_with_hydra(overrides: list[str]):
    """conf/train.yaml composed with its ``hydra`` node, as a multirun sees it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_summary_callback_is_registered_in_the_hydra_config():
    cfg = compose_with_hydra([])
    assert cfg.hydra.callbacks.sweep_summary._target_ == "reid_lightning.launch.sweep_summary.SweepSummary"


def test_bot_optuna_search_composes_with_the_optuna_sweeper():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra is not installed")
    cfg = compose_with_hydra(["hparams_search=bot_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert sweeper.direction == "maximize" and sweeper.n_trials >= 2
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert set(sweeper.params) == {"solver.base_lr", "solver.weight_decay", "model.triplet_margin", "model.ce_eps"}
    assert sweeper.params["solver.base_lr"].startswith("tag(log, interval(")
    # every searched key exists in the composed config
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key
    assert cfg.solver.weight_decay_norm == cfg.solver.weight_decay == cfg.solver.weight_decay_bias
    # the search selects on held-out training identities, not on the test split
    assert 0 < cfg.data.val_identities < 1


def test_bot_optuna_builds_a_validation_split(demo_root):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra is not installed")
    cfg = compose_with_hydra(["hparams_search=bot_optuna", "data.num_workers=0"])
    data = OmegaConf.to_container(cfg.data, resolve=False)
    data["seed"], data["root"] = 0, str(demo_root)
    datamodule = instantiate(data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    held_out = {s.pid for s in datamodule.val_split.query}
    assert len(held_out) == 6 and datamodule.num_classes == 54  # 10% of the demo's 60 training identities
    assert datamodule.val_set_names == ["validation"]


def test_summary_shows_each_test_set_and_the_validation_map(tmp_path):
    per_set = {"test_sets": {"market1501": {"mAP": 30.0}, "dukemtmc": {"mAP": 20.0}}}
    for num, (val, best) in enumerate([(50.0, 55.0), (60.0, 52.0)]):
        make_job(tmp_path, str(num), [f"seed={num}"], {
            "Rank-1": 40.0 + num, "mAP": 30.0 + num, "mINP": 5.0, **per_set, "val": {"mAP": val},
            "best": {"epoch": 3, "val_mAP": best, "checkpoint": "c.ckpt", "mAP": 29.0, **per_set},
        })
    markdown = write_summary(tmp_path)
    rows = table_rows(markdown)
    assert rows[0] == ["job", "seed", "Rank-1", "mAP", "mINP", "market1501/mAP", "dukemtmc/mAP", "val/mAP", "status"]
    assert rows[1] == ["0", "0", "40.00", "30.00", "5.00", "30.00", "20.00", "50.00", "ok"]
    # the best job is the one the sweeper preferred: by the best checkpoint's validation mAP
    assert "Best val mAP (best checkpoint): 55.00 (job 0)" in markdown
    with open(tmp_path / "summary.csv") as handle:
        row = next(csv.DictReader(handle))
    assert (row["best/epoch"], row["best/dukemtmc/mAP"], row["best/checkpoint"]) == ("3", "20.0", "c.ckpt")


@pytest.mark.slow
def test_sweep_writes_a_summary_with_the_failed_job(demo_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_script(
        "train.py", ["-m", *TINY, f"paths.data_dir={demo_root}", f"hydra.sweep.dir={sweep_dir}", "solver.base_lr=3.5e-4,-1.0"],
        cwd=tmp_path, check=False, threads=2, timeout=400,
    )
    # Hydra's basic sweeper stops at the failed job (lr=-1 is refused) and exits non-zero
    assert proc.returncode != 0 and "solver.base_lr must be > 0, got -1.0" in proc.stderr + proc.stdout, explain(proc)
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    rows = table_rows((sweep_dir / "summary.md").read_text())
    assert rows[0] == ["job", "solver.base_lr", "Rank-1", "mAP", "mINP", "status"]
    assert rows[1] == ["0", "0.00035", f"{metrics['Rank-1']:.2f}", f"{metrics['mAP']:.2f}", f"{metrics['mINP']:.2f}", "ok"]
    assert rows[2] == ["1", "-1.0", "-", "-", "-", "failed"]


@pytest.mark.slow
def test_optuna_search_runs_two_trials_and_summarises_them(demo_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra is not installed")
    sweep_dir = tmp_path / "sweep"
    proc = run_script(
        "train.py", [*TINY, f"paths.data_dir={demo_root}", f"hydra.sweep.dir={sweep_dir}", "hparams_search=bot_optuna",
         "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1"],
        cwd=tmp_path, check=False, threads=2, timeout=400,
    )
    assert proc.returncode == 0, explain(proc)
    trials = [json.loads((sweep_dir / str(n) / "metrics.json").read_text()) for n in (0, 1)]
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    # each trial returned its validation mAP (held-out identities); the test figures are reported beside it
    assert results.best_value == pytest.approx(max(trial["val"]["mAP"] for trial in trials))
    assert all("mAP" in trial and "best" not in trial for trial in trials)  # callbacks=none: no best checkpoint
    assert set(results.best_params) == {"solver.base_lr", "solver.weight_decay", "model.triplet_margin", "model.ce_eps"}
    rows = table_rows((sweep_dir / "summary.md").read_text())
    assert [r[0] for r in rows[1:]] == ["0", "1"] and all(r[-1] == "ok" for r in rows[1:])
    assert {"solver.base_lr", "solver.weight_decay", "model.ce_eps"} <= set(rows[0])
    assert sorted(os.listdir(tmp_path)) == ["sweep"]


def test_a_job_without_test_or_validation_figures_is_listed_as_ok(demo_root, tmp_path):
    # run_test=false and no validation split: the job finishes with no figures, and is not a failed job
    job_dir = tmp_path / "sweep" / "0"
    cfg = compose_train([*TINY, f"paths.data_dir={demo_root}", "run_test=false"], output_dir=job_dir)
    assert train(cfg) == {}
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(["run_test=false"])))
    rows = table_rows(write_summary(tmp_path / "sweep"))
    assert rows[1] == ["0", "-", "-", "-", "ok"]
