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


def test_single_data_and_model_keys_go_on_top_of_the_checkpoints_config(tiny_checkpoint, tmp_path):
    # e.g. a smaller test batch and no loader processes on the evaluating machine, or BoT's
    # before-BNNeck feature (fast-reid's MODEL.HEADS.NECK_FEAT), without restating the rest
    run = [f"ckpt_path={tiny_checkpoint}", *BASE, "export_features=true"]
    expected = evaluate(compose_eval(run, tmp_path / "saved"))
    metrics = evaluate(compose_eval([*run, "++data.test_batch_size=3", "++data.num_workers=0"], tmp_path / "batch"))
    assert metrics == expected
    np.testing.assert_allclose(_features(tmp_path / "batch"), _features(tmp_path / "saved"), rtol=0, atol=1e-5)
    evaluate(compose_eval([*run, "++model.neck_feat=before"], tmp_path / "before"))
    assert _features(tmp_path / "before").shape == _features(tmp_path / "saved").shape
    assert not np.allclose(_features(tmp_path / "before"), _features(tmp_path / "saved"), atol=1e-3)


def test_single_keys_need_a_whole_group_for_a_checkpoint_without_config(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["reid_config"] = None  # as a fast-reid checkpoint: no saved config
    bare = tmp_path / "bare.ckpt"
    torch.save(ckpt, bare)
    with pytest.raises(ValueError, match=r"holds no saved config .*: pass data=\.\.\. on the command line"):
        evaluate(compose_eval([f"ckpt_path={bare}", *BASE, "model=bot_r18", "++data.test_batch_size=3"], tmp_path / "x"))


def test_exported_features_are_the_models_also_with_query_expansion(tiny_checkpoint, tmp_path):
    from reid_lightning.inference import FeatureExtractor

    run = [f"ckpt_path={tiny_checkpoint}", *BASE, "export_features=true"]
    evaluate(compose_eval(run, tmp_path / "plain"))
    evaluate(compose_eval([*run, "evaluation.aqe=true", "rank_lists.num_queries=1"], tmp_path / "aqe"))
    # features.npz holds the model's features (what FeatureExtractor(normalize=False) gives), not the expanded ones
    np.testing.assert_allclose(_features(tmp_path / "aqe"), _features(tmp_path / "plain"), rtol=0, atol=1e-6)
    with np.load(tmp_path / "aqe" / "features.npz") as saved:
        paths = list(saved["paths"][:4])
    ours = FeatureExtractor.from_checkpoint(tiny_checkpoint, device="cpu")(paths, normalize=False)
    np.testing.assert_allclose(ours.numpy(), _features(tmp_path / "aqe")[:4], rtol=0, atol=1e-5)
