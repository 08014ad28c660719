"""Optimizers, the SAM / gradient-norm-penalty wrappers, schedules, EMA, class weights and gradient clipping.

The wrapper tests compute the expected update by hand with autograd on a tiny linear model and compare it with
what :class:`GradientPerturbation` does around a real base optimizer.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from resnetlab.config import LossConfig, OptimConfig, RunConfig, ScheduleConfig
from resnetlab.engine.optim import (
    GradientPerturbation,
    create_optimizer,
    frozen_norm_statistics,
    parameter_groups,
    wrap_optimizer,
)
from resnetlab.engine.runtime import Runtime
from resnetlab.engine.schedule import Schedule
from resnetlab.engine.trainer import Trainer, create_ema, loss_class_weights
from resnetlab.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# SAM and the gradient-norm penalty, against hand-computed updates
# ---------------------------------------------------------------------------------------------------------------


def tiny_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=generator, dtype=torch.float64))
        model.bias.copy_(torch.randn(3, generator=generator, dtype=torch.float64))
    x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=generator)
    return model, x, y


def loss_at(model: nn.Module, params: dict[str, torch.Tensor], x, y) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def gradient_at(model, params, x, y) -> dict[str, torch.Tensor]:
    names = list(params)
    leaves = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    grads = torch.autograd.grad(loss_at(model, leaves, x, y), [leaves[n] for n in names])
    return dict(zip(names, grads))


def perturbed_gradient(model, x, y, radius: float, alpha: float):
    """Zhao et al. 2022, Algorithm 1: g = (1 - alpha) g1 + alpha g2, g2 taken at w + r g1 / ||g1||."""
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g1 = gradient_at(model, w, x, y)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1.values()))
    shifted = {n: w[n] + radius * g1[n] / norm for n in w}
    g2 = gradient_at(model, shifted, x, y)
    return w, g1, {n: (1 - alpha) * g1[n] + alpha * g2[n] for n in w}


def library_step(model, x, y, base: torch.optim.Optimizer, wrapper: GradientPerturbation) -> None:
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    base.zero_grad()
    closure()
    wrapper.step(closure)


def test_gradient_norm_penalty_update_matches_the_papers_formula():
    model, x, y = tiny_problem()
    lr, radius, alpha = 0.5, 0.05, 0.8
    w, g1, g = perturbed_gradient(model, x, y, radius, alpha)
    base = torch.optim.SGD(model.parameters(), lr=lr)
    library_step(model, x, y, base, GradientPerturbation(base, radius=radius, alpha=alpha))
    for name, param in model.named_parameters():
        expected = w[name] - lr * g[name]
        plain_sgd = w[name] - lr * g1[name]
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-12)
        assert (expected - plain_sgd).abs().max() > 1e-4  # the penalty really changes the update


def test_gradient_norm_penalty_follows_the_penalized_objective():
    """For small r the update direction is grad [L(w) + lambda ||grad L(w)||] with lambda = alpha * r (Eq. 1, 7)."""
    model, x, y = tiny_problem(1)
    radius, alpha = 1e-4, 0.8
    penalty = alpha * radius
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    loss = loss_at(model, leaves, x, y)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    objective = loss + penalty * torch.sqrt(sum((g ** 2).sum() for g in grads))
    exact = dict(zip(leaves, torch.autograd.grad(objective, list(leaves.values()))))

    base = torch.optim.SGD(model.parameters(), lr=1.0)
    wrapper = GradientPerturbation(base, radius=radius, alpha=alpha)
    base.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    wrapper.perturb()
    base.zero_grad()
    F.cross_entropy(model(x), y).backward()
    wrapper.restore()
    for name, param in model.named_parameters():
        penalty_part = exact[name] - plain[name]
        assert penalty_part.abs().max() > 1e-6
        torch.testing.assert_close(param.grad, exact[name], rtol=0, atol=1e-3 * penalty_part.abs().max().item())


def test_sam_with_adam_steps_adam_with_the_perturbed_gradient():
    model, x, y = tiny_problem(2)
    reference = nn.Linear(4, 3).double()
    reference.load_state_dict(model.state_dict())
    rho = 0.1
    _, g1, g2 = perturbed_gradient(model, x, y, rho, alpha=1.0)

    base = torch.optim.Adam(model.parameters(), lr=0.01)
    library_step(model, x, y, base, GradientPerturbation(base, radius=rho, alpha=1.0))
    # Adam's own step, fed the gradient at w + rho g1 / ||g1|| (Foret et al. 2021, Eq. 3)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    for name, param in reference.named_parameters():
        param.grad = g2[name].clone()
    ref_opt.step()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.detach(), ref.detach(), rtol=0, atol=1e-12)
    assert any((g2[n] - g1[n]).abs().max() > 1e-4 for n in g1)


def test_perturbation_with_a_loss_scale_matches_the_unscaled_step():
    """The training loop's halves: gradients s times too large in, the combined gradient s times too large out."""
    results = []
    for scale in (1.0, 1024.0):
        model, x, y = tiny_problem(3)
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapper = GradientPerturbation(base, radius=0.05, alpha=0.7)
        (F.cross_entropy(model(x), y) * scale).backward()
        wrapper.perturb(grad_scale=scale)
        base.zero_grad()
        (F.cross_entropy(model(x), y) * scale).backward()
        wrapper.restore(grad_scale=scale)
        results.append([p.grad / scale for p in model.parameters()])
    for unscaled, scaled in zip(*results):
        torch.testing.assert_close(unscaled, scaled, rtol=1e-10, atol=1e-12)


def test_non_finite_first_gradient_leaves_the_weights_in_place():
    model, x, y = tiny_problem(4)
    before = [p.detach().clone() for p in model.parameters()]
    wrapper = GradientPerturbation(torch.optim.SGD(model.parameters(), lr=0.1), radius=0.05)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    wrapper.perturb()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    wrapper.restore()


def test_wrapper_from_config_and_state_round_trip():
    model, _, _ = tiny_problem()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert wrap_optimizer(base, OptimConfig(wrapper="none")) is base
    sam = wrap_optimizer(base, OptimConfig(wrapper="sam", sam_rho=0.2))
    gnp = wrap_optimizer(base, OptimConfig(wrapper="gnp", gnp_r=0.03, gnp_alpha=0.6))
    assert (sam.radius, sam.alpha) == (0.2, 1.0)
    assert (gnp.radius, gnp.alpha) == (0.03, 0.6)
    assert gnp.state_dict()["param_groups"] == base.state_dict()["param_groups"]


def test_frozen_norm_statistics_keeps_running_stats():
    bn = nn.BatchNorm2d(3).train()
    bn(torch.randn(4, 3, 5, 5))
    mean, var, tracked = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    with frozen_norm_statistics(bn):
        bn(torch.randn(4, 3, 5, 5) * 3 + 2)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, tracked) and bn.momentum == 0.1
    bn(torch.randn(4, 3, 5, 5) * 3 + 2)
    assert not torch.equal(bn.running_mean, mean)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers and parameter groups
# ---------------------------------------------------------------------------------------------------------------


def test_norm_and_bias_parameters_are_not_decayed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(net, 1e-4, no_decay_norm_bias=True)
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-4, 0.0)
    (single,) = parameter_groups(net, 1e-4, no_decay_norm_bias=False)
    assert len(single["params"]) == 5 and single["weight_decay"] == 1e-4


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_create_optimizer(name, cls):
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optimizer = create_optimizer(net, OptimConfig(name=name, lr=0.02, weight_decay=0.1))
    assert type(optimizer) is cls
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.02 for g in optimizer.param_groups)
    if name == "sgd":
        assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    plain = create_optimizer(net, OptimConfig(name="sgd", momentum=0.0, nesterov=True))
    assert not plain.param_groups[0]["nesterov"]  # Nesterov needs momentum


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def lrs(cfg: ScheduleConfig, *, epochs: int = 5, steps: int = 10, lr: float = 1.0, metrics=None):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    schedule = Schedule(optimizer, cfg, epochs=epochs, steps_per_epoch=steps, base_lr=lr)
    seen = []
    for epoch in range(epochs):
        for _ in range(steps):
            seen.append(schedule.current_lr())
            optimizer.step()
            schedule.step_batch()
        schedule.step_epoch(None if metrics is None else metrics[epoch])
    return seen


def test_linear_warmup_then_cosine_per_batch():
    seen = lrs(ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.1, min_lr=0.01))
    assert seen[0] == pytest.approx(0.1)
    assert seen[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert seen[10] == pytest.approx(1.0)
    after = seen[10:]
    assert all(a > b for a, b in zip(after, after[1:]))  # decays every batch, not every epoch
    assert after[-1] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))


def test_step_and_multistep_change_at_epoch_boundaries():
    step = lrs(ScheduleConfig(name="step", step_size=2, gamma=0.1))
    assert step[:20] == [pytest.approx(1.0)] * 20 and step[20:40] == [pytest.approx(0.1)] * 20
    multi = lrs(ScheduleConfig(name="multistep", milestones=[1, 3], gamma=0.5))
    assert multi[9] == pytest.approx(1.0) and multi[10] == pytest.approx(0.5) and multi[30] == pytest.approx(0.25)
    warm = lrs(ScheduleConfig(name="step", step_size=2, gamma=0.1, warmup_epochs=0.5))
    assert warm[0] < warm[4] < warm[5] == pytest.approx(1.0)


def test_constant_and_onecycle():
    assert set(lrs(ScheduleConfig(name="constant"))) == {1.0}
    seen = lrs(ScheduleConfig(name="onecycle", warmup_epochs=1, max_lr=2.0))
    peak = int(np.argmax(seen))
    assert peak == 9 and seen[peak] == pytest.approx(2.0)  # torch ends the warm-up phase at pct_start * total - 1
    assert seen[0] < 0.2 and seen[-1] < 1e-3


def test_plateau_reduces_after_patience_and_warms_up_first():
    seen = lrs(ScheduleConfig(name="plateau", plateau_patience=1, plateau_factor=0.5, warmup_epochs=1),
               epochs=5, metrics=[0.5, 0.6, 0.6, 0.6, 0.6])
    assert seen[0] == pytest.approx(0.1) and seen[10] == pytest.approx(1.0)
    by_epoch = [seen[i * 10] for i in range(5)]
    assert by_epoch[1:] == [pytest.approx(v) for v in (1.0, 1.0, 1.0, 0.5)]


def test_schedule_state_round_trip_and_length_change():
    cfg = ScheduleConfig(name="onecycle")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    schedule = Schedule(optimizer, cfg, epochs=3, steps_per_epoch=4, base_lr=1.0)
    for _ in range(5):
        optimizer.step()
        schedule.step_batch()
    state = schedule.state_dict()
    expected_next = []
    for _ in range(7):
        optimizer.step()
        schedule.step_batch()
        expected_next.append(schedule.current_lr())

    optimizer2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    same = Schedule(optimizer2, cfg, epochs=3, steps_per_epoch=4, base_lr=1.0)
    assert same.load_state_dict(state) is None
    replay = []
    for _ in range(7):
        optimizer2.step()
        same.step_batch()
        replay.append(same.current_lr())
    assert replay == expected_next

    optimizer3 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    longer = Schedule(optimizer3, cfg, epochs=6, steps_per_epoch=4, base_lr=1.0)
    warning = longer.load_state_dict(state)
    assert warning and "12 steps" in warning and "24" in warning
    for _ in range(19):  # beyond the old 12-step length: the new phases apply, no error
        optimizer3.step()
        longer.step_batch()
    assert longer.current_lr() < 0.01


# ---------------------------------------------------------------------------------------------------------------
# EMA, class weights, one training step (clipping, loss scaling)
# ---------------------------------------------------------------------------------------------------------------


def test_ema_warmup_decay():
    net = nn.Linear(2, 1)
    ema = create_ema(net, decay=0.99, warmup=True)
    ema.update_parameters(net)  # the first update copies
    start = net.weight.detach().clone()
    for n in range(1, 4):
        with torch.no_grad():
            net.weight.add_(1.0)
        before = ema.module.weight.detach().clone()
        ema.update_parameters(net)
        decay = min(0.99, (1 + n) / (10 + n))
        torch.testing.assert_close(ema.module.weight, before * decay + net.weight.detach() * (1 - decay))
    assert (ema.module.weight - start).abs().max() < (net.weight - start).abs().max()


def test_class_weights():
    counts = np.array([10, 30, 60])
    balanced = loss_class_weights(LossConfig(class_weights="balanced"), counts)
    torch.testing.assert_close(balanced, torch.tensor([100 / 30, 100 / 90, 100 / 180]))
    assert loss_class_weights(LossConfig(), counts) is None
    torch.testing.assert_close(loss_class_weights(LossConfig(class_weights=[1, 2, 3]), counts),
                               torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match="3 classes"):
        loss_class_weights(LossConfig(class_weights=[1, 2]), counts)


def step_trainer(tmp_path, overrides: dict, scaler: torch.amp.GradScaler | None = None):
    """A Trainer over one fixed batch (no data pipeline), and the weights after one step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    images, targets = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    cfg = RunConfig.model_validate({
        "optim": {"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, **overrides.get("optim", {})},
        "train": {"epochs": 1, **overrides.get("train", {})}, "schedule": {"name": "constant"}})
    data = SimpleNamespace(train=[(images, targets)], val=[(images, targets)], train_counts=np.array([3, 3, 2]),
                           source=SimpleNamespace(num_classes=3))
    runtime = Runtime(device=torch.device("cpu"), precision="fp32", channels_last=False, threads=1, reasons=[])
    trainer = Trainer(cfg, data, model, runtime, run_dir=tmp_path, log=print, model_kwargs={})
    if scaler is not None:
        trainer.scaler = scaler
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    _, _, norm = trainer.train_step(images, targets)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return before, after, float(norm)


def test_gradient_clipping_by_norm_and_value(tmp_path):
    before, after, norm = step_trainer(tmp_path, {})
    assert norm > 0.2
    torch.testing.assert_close(torch.linalg.vector_norm(after - before), torch.tensor(norm), rtol=1e-5, atol=0)
    before, after, clipped_norm = step_trainer(tmp_path, {"train": {"grad_clip_norm": 0.2}})
    assert clipped_norm == pytest.approx(norm)  # the log shows the norm before clipping
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(0.2, rel=1e-4)
    before, after, _ = step_trainer(tmp_path, {"train": {"grad_clip_value": 0.01}})
    assert (after - before).abs().max().item() == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("wrapper", ["sam", "gnp"])
def test_training_step_with_loss_scaling_matches_the_unscaled_step(wrapper, tmp_path):
    """fp16 runs scale the loss; the wrappers must hand the scaler a gradient in its scale (checked in fp32)."""
    plain_before, plain_after, plain_norm = step_trainer(tmp_path, {"optim": {"wrapper": wrapper}})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    before, after, norm = step_trainer(tmp_path, {"optim": {"wrapper": wrapper}}, scaler=scaler)
    assert torch.equal(before, plain_before)
    torch.testing.assert_close(after, plain_after, rtol=1e-5, atol=1e-6)
    assert norm == pytest.approx(plain_norm, rel=1e-5)
    none_before, none_after, _ = step_trainer(tmp_path, {})
    assert (none_after - plain_after).abs().max() > 1e-4  # the wrapper changed the step
