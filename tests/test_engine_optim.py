"""Optimizer parameter groups (fast-reid's rules) and the warmup + multistep schedule, checked
against fast-reid's schedulers driven as its LRScheduler hook drives them."""

import logging

import pytest
import torch
from conftest import compose_train, fit_tiny_bot
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from reid_lightning.engine.optim import (
    build_optimizer,
    build_param_groups,
    build_warmup_multistep,
    milestone_offset,
    warmup_multistep_factor,
)
from reid_lightning.modeling import build_bot


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


def test_batchnorm_biases_get_the_bias_settings_as_in_fastreid():
    # fast-reid's get_default_optimizer_params applies its "bias" override after the norm rule
    model = build_bot(num_classes=4, depth=18, pretrained="none")
    groups = build_param_groups(
        model, base_lr=1.0, weight_decay=0.1, weight_decay_norm=0.2, weight_decay_bias=0.0, bias_lr_factor=2.0
    )
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(setting[id(bn.bias)] == (2.0, 0.0) and setting[id(bn.weight)] == (1.0, 0.2) for bn in bns)
    neck = model.head.bnneck
    assert setting[id(neck.weight)] == (1.0, 0.2) and id(neck.bias) not in setting  # frozen bias stays out
    assert setting[id(model.head.classifier.weight)] == (1.0, 0.1)
    assert set(setting) == {id(p) for p in model.parameters() if p.requires_grad}


def test_bot_optimizer_is_adam_with_recipe_values():
    opt = build_optimizer(_Net(), name="Adam", base_lr=3.5e-4, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.Adam)
    assert all(g["lr"] == pytest.approx(3.5e-4) and g["weight_decay"] == pytest.approx(5e-4) for g in opt.param_groups)


def _step(net: _Net, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> None:
    """One optimizer step on ``images``, in which every parameter gets a gradient well above rounding."""
    features = net.conv(images).mean(dim=(2, 3))
    (net.fc(features).square().sum() + net.bn(features).pow(3).sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_fused_kernel_takes_the_same_steps_as_the_per_tensor_loop(name):
    torch.manual_seed(0)
    nets = [_Net(), _Net()]
    nets[1].load_state_dict(nets[0].state_dict())
    kwargs = dict(name=name, base_lr=1e-2, weight_decay=5e-4, weight_decay_norm=1e-3, weight_decay_bias=0.0, bias_lr_factor=2.0)
    optimizers = [build_optimizer(nets[0], fused=True, **kwargs), build_optimizer(nets[1], fused=False, **kwargs)]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    images = torch.randn(6, 3, 5, 5)
    for _ in range(3):
        for net, optimizer in zip(nets, optimizers):
            _step(net, optimizer, images)
    for fused, loop in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-5)  # rounding, grown over 3 steps


@pytest.mark.parametrize("saved_fused", [True, False])
def test_a_loaded_state_keeps_the_kernel_the_optimizer_was_built_with(saved_fused):
    # torch's load_state_dict copies the saved groups' settings, fused included: a run resumed with
    # another solver.fused (or clipping switched under mixed precision) would step the saved kernel
    torch.manual_seed(0)
    net = _Net()
    saved = build_optimizer(net, fused=saved_fused)
    _step(net, saved, torch.randn(6, 3, 5, 5))
    built = build_optimizer(net, fused=not saved_fused)
    state = saved.state_dict()
    built.load_state_dict(state)
    assert [bool(group["fused"]) for group in built.param_groups] == [not saved_fused] * len(built.param_groups)
    assert bool(state["param_groups"][0]["fused"]) is saved_fused  # the caller's state dict is left as it was
    loaded, expected = built.state_dict()["state"], saved.state_dict()["state"]
    assert all(torch.equal(loaded[i]["exp_avg"], expected[i]["exp_avg"]) for i in expected)  # the state itself is loaded
    if not saved_fused:  # built fused: under 16-mixed torch's GradScaler hands it the scale, which only the fused kernel takes
        built.grad_scale, built.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    _step(net, built, torch.randn(6, 3, 5, 5))


def test_fused_falls_back_where_the_device_has_no_kernel():
    net = _Net().to("meta")
    assert not build_optimizer(net, fused=True).defaults["fused"]


def test_solver_fused_reaches_the_optimizer():
    from reid_lightning.engine.settings import SolverSettings

    assert SolverSettings.from_mapping({"fused": False}).optimizer_kwargs()["fused"] is False
    assert SolverSettings.from_mapping(compose_train([]).solver).optimizer_kwargs()["fused"] is True


def _fit_optimizer(demo_root, precision: str, clip: float | None) -> torch.optim.Optimizer:
    """The optimizer of a 2-step BoT R18 fit of the real config on the CPU."""
    torch.set_num_threads(1)
    trainer, _ = fit_tiny_bot(demo_root, 2, precision=precision, gradient_clip_val=clip)
    assert trainer.global_step == 2
    return trainer.optimizers[0]


@pytest.mark.parametrize("precision", ["bf16-mixed", "32"])
def test_gradient_clipping_trains_under_every_precision(demo_root, precision, caplog):
    # Lightning raises at the first step when it must clip a fused optimizer under mixed precision
    with caplog.at_level(logging.INFO):
        optimizer = _fit_optimizer(demo_root, precision, clip=1.0)
    mixed = precision.endswith("-mixed")
    assert bool(optimizer.defaults["fused"]) is not mixed
    assert ("instead of the fused kernel" in caplog.text) is mixed


def test_mixed_precision_without_clipping_keeps_the_fused_kernel(demo_root):
    assert _fit_optimizer(demo_root, "bf16-mixed", clip=None).defaults["fused"]


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
def test_milestones_from_start_count_epochs_from_the_start(iteration, expected):
    got = warmup_multistep_factor(
        iteration, iters_per_epoch=100, warmup_iters=2000, warmup_factor=0.1, milestones=(40, 90), gamma=0.1,
        milestones_from="start",
    )
    assert got == pytest.approx(expected)


def fastreid_lrs(
    iters_per_epoch: int, max_epoch: int, base_lr: float = 3.5e-4, warmup_iters: int = 2000
) -> list[float]:
    """The LR of every iteration of fast-reid 1.4.0's BoT schedule, driven as its trainer does.

    build_lr_scheduler makes MultiStepLR(milestones [40, 90], gamma 0.1), then WarmupLR (LR =
    base * warmup factor at its step count; a LambdaLR with that factor is the same scheduler).
    LRScheduler hook: after_step steps the warmup while iter + 1 <= warmup_iters; after_epoch
    (trainer.iter already advanced to (epoch + 1) * iters_per_epoch) steps MultiStepLR when
    iter + 1 > warmup_iters.
    """
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=base_lr)
    multistep = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[40, 90], gamma=0.1)

    def warmup_factor(it: int) -> float:
        return 1.0 if it >= warmup_iters else 0.1 * (1 - it / warmup_iters) + it / warmup_iters

    warmup = LambdaLR(optimizer, warmup_factor)
    lrs, iteration = [], 0
    for _ in range(max_epoch):
        for _ in range(iters_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if iteration + 1 <= warmup_iters:
                warmup.step()
            iteration += 1
        if iteration + 1 > warmup_iters:
            multistep.step()
    return lrs


@pytest.mark.parametrize(
    "iters_per_epoch, decay_epochs",
    [(115, (57, 107)), (202, (49, 99))],  # CUHK03-NP (decays at iterations 6,555 and 12,305), Market-1501
)
def test_after_warmup_is_fastreids_lr_at_every_iteration(iters_per_epoch, decay_epochs):
    base = 3.5e-4
    expected = fastreid_lrs(iters_per_epoch, max_epoch=120, base_lr=base)
    ours = [
        base * warmup_multistep_factor(i, iters_per_epoch, 2000, 0.1, (40, 90), 0.1, milestones_from="after_warmup")
        for i in range(len(expected))
    ]
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)
    first, second = (epoch * iters_per_epoch for epoch in decay_epochs)
    assert expected[1999] == pytest.approx(base * (0.1 / 2000 + 1999 / 2000)) and expected[2000] == base
    assert expected[first - 1] == base and expected[first] == pytest.approx(base * 0.1)
    assert expected[second - 1] == pytest.approx(base * 0.1) and expected[second] == pytest.approx(base * 0.01)
    if iters_per_epoch == 115:
        assert (first, second) == (6555, 12305)


@pytest.mark.parametrize(
    "iters_per_epoch, warmup_iters, offset",
    [(100, 2000, 19), (100, 2001, 20), (100, 1999, 19), (100, 0, 0), (3000, 2000, 0), (1, 5, 4)],
)
def test_after_warmup_offset_at_the_boundaries(iters_per_epoch, warmup_iters, offset):
    assert milestone_offset(iters_per_epoch, warmup_iters, "after_warmup") == offset
    kwargs = dict(
        iters_per_epoch=iters_per_epoch, warmup_iters=warmup_iters, warmup_factor=0.1, milestones=(2,), gamma=0.5
    )
    decay = (2 + offset) * iters_per_epoch
    assert warmup_multistep_factor(decay - 1, **kwargs) == pytest.approx(1.0)
    assert warmup_multistep_factor(decay, **kwargs) == pytest.approx(0.5)


def test_bot_config_defaults_to_fastreids_milestones(tmp_path):
    solver = compose_train([], output_dir=tmp_path).solver
    assert solver.milestones_from == "after_warmup"
    optimizer = build_optimizer(_Net(), base_lr=1.0)
    sched = build_warmup_multistep(
        optimizer, iters_per_epoch=202, warmup_iters=solver.warmup_iters, warmup_factor=solver.warmup_factor,
        milestones=solver.milestones, gamma=solver.gamma, milestones_from=solver.milestones_from,
    )
    factor = sched.lr_lambdas[0]
    assert [factor(e * 202) for e in (48, 49, 98, 99)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    assert compose_train(["experiment=quickstart"], output_dir=tmp_path).solver.milestones_from == "start"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"milestones_from": "warmup"}, "unknown solver.milestones_from 'warmup': choose one of after_warmup, start"),
        ({"milestones": (0, 3)}, r"solver.milestones must be epochs >= 1, got \[0, 3\]"),
    ],
)
def test_bad_schedule_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_warmup_multistep(build_optimizer(_Net()), iters_per_epoch=10, **kwargs)


def test_scheduler_steps_per_iteration_and_resumes_from_state():
    net = _Net()
    opt = build_optimizer(net, base_lr=1.0, weight_decay=0.0, weight_decay_norm=0.0, weight_decay_bias=0.0)
    sched = build_warmup_multistep(
        opt, iters_per_epoch=10, warmup_iters=20, warmup_factor=0.1, milestones=(3,), gamma=0.5, milestones_from="start"
    )
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
    sched2 = build_warmup_multistep(
        opt2, iters_per_epoch=10, warmup_iters=20, warmup_factor=0.1, milestones=(3,), gamma=0.5, milestones_from="start"
    )
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr()[0] == pytest.approx(sched.get_last_lr()[0])
    assert sched2.last_epoch == 35


def test_iters_per_epoch_must_be_positive():
    opt = build_optimizer(_Net())
    with pytest.raises(ValueError, match="iters_per_epoch"):
        build_warmup_multistep(opt, iters_per_epoch=0)
