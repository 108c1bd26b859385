"""What scripts/eval.py takes from the checkpoint's run when the command line does not say otherwise."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import compose_eval

import reid_lightning.cli.evaluate as evaluate_module
from reid_lightning.cli.evaluate import evaluate

BASE = ["trainer=cpu", "cmc_curve=false", "++trainer.enable_progress_bar=false"]


def _features(run_dir: Path) -> np.ndarray:
    with np.load(run_dir / "features.npz") as saved:
        return saved["features"]


def _saved_with(tiny_checkpoint: Path, tmp_path: Path, name: str, **changes) -> Path:
    """A copy of ``tiny_checkpoint`` whose saved config has ``changes`` (``"data.root": ...``)."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    for dotted, value in changes.items():
        group, key = dotted.split(".")
        ckpt["reid_config"][group][key] = value
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_data_on_the_command_line_keeps_the_checkpoints_input_size(tiny_checkpoint, tiny_market_root, tmp_path):
    # tiny_checkpoint was trained at 64x32; conf/data says 256x128
    run = [f"ckpt_path={tiny_checkpoint}", *BASE, "export_features=true"]
    evaluate(compose_eval(run, tmp_path / "saved"))
    evaluate(compose_eval([*run, "data=folder", f"paths.data_dir={tiny_market_root}", "data.num_workers=0"],
                          tmp_path / "given"))
    np.testing.assert_allclose(_features(tmp_path / "given"), _features(tmp_path / "saved"), rtol=0, atol=1e-6)
    # an explicit data.height / data.width still wins
    evaluate(compose_eval([*run, "data=folder", f"paths.data_dir={tiny_market_root}", "data.num_workers=0",
                           "data.height=128", "data.width=64"], tmp_path / "explicit"))
    assert not np.allclose(_features(tmp_path / "explicit"), _features(tmp_path / "saved"), atol=1e-3)


def test_paths_data_dir_finds_the_data_of_a_checkpoint_trained_elsewhere(tiny_checkpoint, tiny_market_root, tmp_path):
    moved = _saved_with(tiny_checkpoint, tmp_path, "moved.ckpt", **{"data.root": str(tmp_path / "gone"),
                                                                    "paths.data_dir": str(tmp_path / "gone")})
    expected = evaluate(compose_eval([f"ckpt_path={tiny_checkpoint}", *BASE], tmp_path / "here"))
    # the error of the missing root says to set paths.data_dir: doing so works
    metrics = evaluate(compose_eval([f"ckpt_path={moved}", *BASE, f"paths.data_dir={tiny_market_root}"],
                                    tmp_path / "moved"))
    assert metrics == expected
    with pytest.raises(FileNotFoundError, match="paths.data_dir"):
        evaluate(compose_eval([f"ckpt_path={moved}", *BASE, f"paths.data_dir={tmp_path / 'nowhere'}"],
                              tmp_path / "nowhere"))


def test_rank_lists_use_the_metric_of_the_evaluation(tiny_checkpoint, tmp_path, monkeypatch):
    euclidean = _saved_with(tiny_checkpoint, tmp_path, "euclidean.ckpt", **{"evaluation.metric": "euclidean"})
    used = []
    real = evaluate_module.compute_distance

    def spy(q_feat, g_feat, metric):
        used.append(metric)
        return real(q_feat, g_feat, metric)

    monkeypatch.setattr(evaluate_module, "compute_distance", spy)
    evaluate(compose_eval([f"ckpt_path={euclidean}", *BASE, "rank_lists.num_queries=2"], tmp_path / "run"))
    assert used == ["euclidean"]  # the run's metric, as the figures
    assert len(list((tmp_path / "run" / "rank_lists").glob("*.png"))) == 2
