"""scripts/eval.py's evaluation settings: those of the checkpoint's run, so that its test figures
come out again, with the keys given on the command line on top."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from test_bad_input import compose_eval

from reid_lightning.cli.evaluate import evaluation_settings


def _saved_run(cfg: DictConfig, **changes) -> DictConfig:
    """A checkpoint's ``reid_config`` whose run evaluated with ``changes`` (and a key since removed)."""
    evaluation = {**OmegaConf.to_container(cfg.evaluation), **changes, "removed_key": 1}
    return OmegaConf.create({"evaluation": evaluation})


@pytest.mark.parametrize(
    ("overrides", "flip", "rerank", "rerank_k1"),
    [
        ([], True, True, 30),                              # the run's settings
        (["evaluation.flip=false"], False, True, 30),      # a key on the command line wins
        (["evaluation.rerank_k1=5"], True, True, 5),       # the other keys stay the run's
        (["evaluation=default"], False, False, 20),        # the whole group chosen: conf/evaluation
    ],
)
def test_eval_takes_the_checkpoints_evaluation_settings(tmp_path: Path, overrides, flip, rerank, rerank_k1) -> None:
    cfg = compose_eval(["ckpt_path=run.ckpt", *overrides], tmp_path)
    settings = evaluation_settings(cfg, _saved_run(cfg, flip=True, rerank=True, rerank_k1=30, max_chunk_mb=4096))
    assert settings["max_chunk_mb"] == cfg.evaluation.max_chunk_mb  # the memory bound is this machine's
    assert (settings["flip"], settings["rerank"]) == (flip, rerank)
    assert settings["rerank_k1"] == rerank_k1
    assert "removed_key" not in settings and set(settings) == set(cfg.evaluation)


def test_a_checkpoint_without_saved_settings_takes_conf_evaluation(tmp_path: Path) -> None:
    cfg = compose_eval(["ckpt_path=model_final.pth", "evaluation.flip=true"], tmp_path)
    assert evaluation_settings(cfg, OmegaConf.create({})) == OmegaConf.to_container(cfg.evaluation)
