"""Optimizer parameter groups and the warmup + multistep schedule at key iterations."""

import pytest
import torch
from torch import nn

from reid_lightning.engine.optim import (
    build_optimizer,
    build_param_groups,
    build_warmup_multistep,
    warmup_multistep_factor,
)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.bn.bias.requires_grad_(False)
        self.fc = nn.Linear(4, 2)


def test_param_groups_split_norm_bias_and_skip_frozen():
    net = _Net()
    groups = build_param_groups(net, base_lr=1.0, weight_decay=0.1, weight_decay_norm=0.2, weight_decay_bias=0.3, bias_lr_factor=2.0)
    by_setting = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}
    assert by_setting[(1.0, 0.1)] == {id(net.conv.weight), id(net.fc.weight)}
    assert by_setting[(1.0, 0.2)] == {id(net.bn.weight)}
    assert by_setting[(2.0, 0.3)] == {id(net.conv.bias), id(net.fc.bias)}
    all_params = set().union(*by_setting.values())
    assert id(net.bn.bias) not in all_params


def test_bot_optimizer_is_adam_with_recipe_values():
    opt = build_optimizer(_Net(), name="Adam", base_lr=3.5e-4, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.Adam)
    assert all(g["lr"] == pytest.approx(3.5e-4) and g["weight_decay"] == pytest.approx(5e-4) for g in opt.param_groups)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'Adan'.*Adam, AdamW, SGD"):
        build_optimizer(_Net(), name="Adan")


@pytest.mark.parametrize(
    "iteration, expected",
    [
        (0, 0.1),                      # warmup starts at 0.1x
        (1000, 0.1 * 0.5 + 0.5),       # half way: linear
        (1999, 0.1 * (1 / 2000) + 1999 / 2000),
        (2000, 1.0),                   # warmup over
        (39 * 100 + 99, 1.0),          # last step of epoch 39
        (40 * 100, 0.1),               # epoch 40: first milestone
        (89 * 100 + 99, 0.1),
        (90 * 100, 0.01),              # epoch 90: second milestone
        (119 * 100 + 99, 0.01),
    ],
)
def test_warmup_multistep_factor_at_key_iterations(iteration, expected):
    got = warmup_multistep_factor(iteration, iters_per_epoch=100, warmup_iters=2000, warmup_factor=0.1, milestones=(40, 90), gamma=0.1)
    assert got == pytest.approx(expected)


def test_fastreid_counting_shifts_milestones_by_warmup_epochs():
    # 2000 warmup iters at 100 iters/epoch = 20 warmup epochs: fast-reid decays at epoch 60, not 40
    kwargs = dict(iters_per_epoch=100, warmup_iters=2000, warmup_factor=0.1, milestones=(40, 90), gamma=0.1, milestones_after_warmup=True)
    assert warmup_multistep_factor(40 * 100, **kwargs) == pytest.approx(1.0)
    assert warmup_multistep_factor(60 * 100 - 1, **kwargs) == pytest.approx(1.0)
    assert warmup_multistep_factor(60 * 100, **kwargs) == pytest.approx(0.1)
    assert warmup_multistep_factor(110 * 100, **kwargs) == pytest.approx(0.01)


def test_scheduler_steps_per_iteration_and_resumes_from_state():
    net = _Net()
    opt = build_optimizer(net, base_lr=1.0, weight_decay=0.0, weight_decay_norm=0.0, weight_decay_bias=0.0)
    sched = build_warmup_multistep(opt, iters_per_epoch=10, warmup_iters=20, warmup_factor=0.1, milestones=(3,), gamma=0.5)
    lrs = []
    for _ in range(35):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1 * 0.5 + 0.5)
    assert lrs[20] == pytest.approx(1.0)
    assert lrs[30] == pytest.approx(0.5)
    # a fresh scheduler loaded from the state continues at the same position
    opt2 = build_optimizer(_Net(), base_lr=1.0, weight_decay=0.0, weight_decay_norm=0.0, weight_decay_bias=0.0)
    sched2 = build_warmup_multistep(opt2, iters_per_epoch=10, warmup_iters=20, warmup_factor=0.1, milestones=(3,), gamma=0.5)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr()[0] == pytest.approx(sched.get_last_lr()[0])
    assert sched2.last_epoch == 35


def test_iters_per_epoch_must_be_positive():
    opt = build_optimizer(_Net())
    with pytest.raises(ValueError, match="iters_per_epoch"):
        build_warmup_multistep(opt, iters_per_epoch=0)
