"""build_hooks from config mappings (conf/hooks/*.yaml and user entries) and the example hooks."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train
from hooks_support import TinyModule, make_trainer
from omegaconf import OmegaConf

from reid_lightning.engine.hooks import (
    IterationTimer,
    PeriodicWriter,
    PreciseBN,
    build_hooks,
)


def test_build_hooks_instantiates_targets_in_order_and_skips_nulls() -> None:
    cfg = OmegaConf.create({
        "timer": {"_target_": "reid_lightning.engine.hooks.IterationTimer", "warmup_iter": 1},
        "removed": None,
        "writer": {"_target_": "reid_lightning.engine.hooks.PeriodicWriter", "period": 5},
    })
    hooks = build_hooks(cfg)
    assert [type(h) for h in hooks] == [IterationTimer, PeriodicWriter]
    assert hooks[0].warmup_iter == 1 and hooks[1].period == 5
    assert [h.state_key for h in hooks] == ["IterationTimer[timer]", "PeriodicWriter[writer]"]
    assert build_hooks(None) == [] and build_hooks({}) == []


def test_build_hooks_rejects_entries_that_are_not_hooks() -> None:
    with pytest.raises(TypeError, match=r"hooks\.bad: expected a mapping with '_target_'"):
        build_hooks({"bad": {"period": 3}})
    with pytest.raises(TypeError, match=r"hooks\.odd: _target_ 'collections.OrderedDict' built a OrderedDict"):
        build_hooks({"odd": {"_target_": "collections.OrderedDict"}})


def test_hook_configs_compose_and_build(tmp_path: Path) -> None:
    default = build_hooks(compose_train([]).hooks)
    assert [h.hook_name for h in default] == ["iteration_timer", "periodic_writer"]
    assert default[1].period == 20
    assert build_hooks(compose_train(["hooks=none"]).hooks) == []
    fastreid = build_hooks(compose_train(["hooks=fastreid"]).hooks)
    assert [type(h) for h in fastreid] == [IterationTimer, PreciseBN, PeriodicWriter]
    edited = compose_train([
        "~hooks.periodic_writer", "+hooks.step_timer._target_=example_hooks.StepTimer", "+hooks.step_timer.period=2",
    ]).hooks
    assert [h.hook_name for h in build_hooks(edited)] == ["iteration_timer", "step_timer"]


def test_example_hooks_run_from_a_hooks_mapping(tmp_path: Path) -> None:
    cfg = OmegaConf.create({
        "step_timer": {"_target_": "example_hooks.StepTimer", "period": 2},
        "lr_decay": {"_target_": "example_hooks.StepLRDecay", "milestones": [2, 4], "gamma": 0.5},
    })
    hooks = build_hooks(cfg)
    trainer = make_trainer(tmp_path, hooks)
    trainer.fit(TinyModule(batches=3, lr=0.1))
    storage = hooks[0].trainer.storage
    assert [itr for _, itr in storage.history("step_seconds").values()] == list(range(6))
    # the adapter records the lr each step used: decayed after the 2nd and the 4th step
    assert [lr for lr, _ in storage.history("lr").values()] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)
