"""Every config group composes; wrong overrides and missing values fail naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_train
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

GROUPS = {
    group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for group in ("data", "model", "solver", "trainer", "callbacks", "hooks", "logger", "experiment")
}


def test_required_group_options_exist():
    assert {"demo", "market1501", "dukemtmc", "msmt17", "cuhk03_np", "folder"} <= set(GROUPS["data"])
    assert {"bot_r50", "bot_r50_ibn", "bot_r18"} <= set(GROUPS["model"])
    assert {"cpu", "gpu", "ddp"} <= set(GROUPS["trainer"])
    assert "bot" in GROUPS["solver"] and "quickstart" in GROUPS["experiment"]


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g, options in GROUPS.items() for o in options if not (g == "data" and o == "base")],
)
def test_every_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}"], output_dir=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["output_dir"] == str(tmp_path)
    if group == "data":
        assert resolved["data"]["_target_"] == "reid_lightning.data.ReIDDataModule"
        assert resolved["data"]["dataset"] == ("cuhk03_np" if option == "cuhk03_np" else option)
    if group == "model":
        assert resolved["model"]["_target_"] == "reid_lightning.modeling.build_bot"


def test_bot_defaults_match_the_recipe(tmp_path):
    cfg = compose_train([], output_dir=tmp_path)
    assert (cfg.data.height, cfg.data.width, cfg.data.batch_size, cfg.data.num_instances) == (256, 128, 64, 4)
    assert (cfg.data.flip_prob, cfg.data.padding, cfg.data.erasing_prob) == (0.5, 10, 0.5)
    assert (cfg.model.depth, cfg.model.last_stride, cfg.model.pooling) == (50, 1, "avg")
    assert (cfg.model.ce_eps, cfg.model.triplet_margin, cfg.model.triplet_hard_mining) == (0.1, 0.3, True)
    s = cfg.solver
    assert (s.optimizer, s.base_lr, s.weight_decay, s.weight_decay_norm) == ("Adam", 3.5e-4, 5e-4, 5e-4)
    assert (s.warmup_iters, s.warmup_factor, list(s.milestones), s.gamma, s.max_epochs) == (2000, 0.1, [40, 90], 0.1, 120)
    assert cfg.trainer.max_epochs == 120 and cfg.trainer.use_distributed_sampler is False
    assert cfg.evaluation.metric == "cosine" and not cfg.evaluation.rerank and not cfg.evaluation.flip
    # fast-reid validates on the test split of its one data set
    assert cfg.data.val_identities == 0 and cfg.data.train_sets is None and cfg.data.test_sets is None


def test_data_dir_comes_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REID_DATA", str(tmp_path / "reid"))
    cfg = compose_train(["data=market1501"], output_dir=tmp_path)
    assert cfg.data.root == str(tmp_path / "reid")


def test_unknown_group_option_names_the_group():
    with pytest.raises(MissingConfigException, match="data"):
        compose_train(["data=market1502"])


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigCompositionException, match="model.depthh"):
        compose_train(["model.depthh=34"])


def test_missing_required_value_names_the_key(tmp_path):
    cfg = compose_train(["data=base"], output_dir=tmp_path)
    with pytest.raises(MissingMandatoryValue, match="dataset"):
        OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)


def test_quickstart_builds_datamodule_model_and_trainer(tmp_path):
    from reid_lightning.cli.train import build_model, build_trainer, instantiate_group

    cfg = compose_train(
        ["experiment=quickstart", f"paths.data_dir={tmp_path / 'data'}", "data.num_workers=0", "hooks=none"],
        output_dir=tmp_path,
    )
    assert cfg.model.depth == 18 and cfg.model.pretrained == "none" and cfg.trainer.accelerator == "cpu"
    datamodule = instantiate(cfg.data)
    assert (datamodule.dataset, datamodule.size, datamodule.batch_size) == ("demo", (96, 48), 32)
    model = build_model(cfg, num_classes=10)
    assert model.head.classifier.out_features == 10
    trainer = build_trainer(cfg, instantiate_group(cfg.callbacks), instantiate_group(cfg.logger))
    assert trainer.max_epochs == cfg.solver.max_epochs
    assert Path(trainer.default_root_dir) == tmp_path


def test_gradient_clipping_is_set_from_the_trainer_config(tmp_path):
    from reid_lightning.cli.train import build_trainer

    cfg = compose_train(["trainer.gradient_clip_val=5", "trainer.gradient_clip_algorithm=value"], output_dir=tmp_path)
    trainer = build_trainer(cfg, [], loggers=[])
    assert (trainer.gradient_clip_val, trainer.gradient_clip_algorithm) == (5, "value")
    unclipped = build_trainer(compose_train([], output_dir=tmp_path), [], loggers=[])
    assert unclipped.gradient_clip_val is None


@pytest.mark.parametrize("override", ["solver.eval_period=0", "solver.eval_period=-1"])
def test_an_eval_period_below_1_is_refused_naming_the_setting(tmp_path: Path, override: str) -> None:
    # fast-reid's TEST.EVAL_PERIOD=0 habit: Lightning took it and failed at the fit's start with
    # "ZeroDivisionError: integer modulo by zero"
    from reid_lightning.cli.train import build_trainer

    cfg = compose_train([override], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"solver\.eval_period.*>= 1.*solver\.max_epochs"):
        build_trainer(cfg, [], loggers=[])


@pytest.mark.parametrize(
    ("override", "group", "expected"),
    [
        ("+callbacks.early_stop.monitor=val/mAP", "callbacks", r"callbacks\.early_stop: expected a mapping with '_target_'"),
        ("+callbacks.early_stop._taget_=pytorch_lightning.callbacks.EarlyStopping", "callbacks", r"callbacks\.early_stop"),
        ("+logger.extra=5", "logger", r"logger\.extra: expected a mapping with '_target_'.*got 5"),
    ],
)
def test_a_callback_or_logger_entry_without_target_is_refused_naming_it(
    tmp_path: Path, override: str, group: str, expected: str
) -> None:
    # it was dropped without a word (a misspelt _target_: no early stopping), or failed with
    # "argument of type 'int' is not iterable"
    from reid_lightning.cli.train import instantiate_group

    cfg = compose_train([override], output_dir=tmp_path)
    with pytest.raises(TypeError, match=expected):
        instantiate_group(cfg[group], group)
