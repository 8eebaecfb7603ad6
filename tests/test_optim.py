"""Learning-rate schedules and weight-decay groups: what a recipe's optim section promises."""

import pytest
from torch import nn

from gtrain.optim import build_optimizer, lr_factor, param_groups
from gtrain.recipe import OptimSection


def factors(optim, steps_per_epoch=10, epochs=10, freeze_epochs=0):
    return [lr_factor(s, steps_per_epoch=steps_per_epoch, epochs=epochs, optim=optim, freeze_epochs=freeze_epochs)
            for s in range(steps_per_epoch * epochs)]  # fmt: skip


def test_warmup_rises_linearly_to_the_peak_then_cosine_decays_to_the_floor():
    f = factors(OptimSection(schedule="cosine", warmup_epochs=1, min_lr_ratio=0.1))
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_after_the_frozen_epochs_every_layer_starts_its_own_warmup_and_decay():
    optim = OptimSection(schedule="cosine", warmup_epochs=1, min_lr_ratio=0.0)
    f = factors(optim, steps_per_epoch=2, epochs=6, freeze_epochs=2)
    frozen, unfrozen = f[:4], f[4:]
    assert frozen == pytest.approx(factors(optim, steps_per_epoch=2, epochs=2))  # the classifier's own schedule
    assert unfrozen == pytest.approx(factors(optim, steps_per_epoch=2, epochs=4))  # then it starts again
    assert unfrozen[:3] == pytest.approx([0.5, 1.0, 1.0])  # warmup from the first unfrozen step, then the peak


def test_multistep_milestones_count_the_runs_epochs_with_frozen_ones_too():
    f = factors(OptimSection(schedule="multistep", milestones=[5, 8], gamma=0.1), freeze_epochs=3)
    assert f[49] == 1.0 and f[50] == pytest.approx(0.1) and f[80] == pytest.approx(0.01)


def test_multistep_divides_at_each_milestone_epoch():
    f = factors(OptimSection(schedule="multistep", milestones=[5, 8], gamma=0.1))
    assert f[49] == 1.0 and f[50] == pytest.approx(0.1) and f[80] == pytest.approx(0.01)


def test_onecycle_goes_up_then_linearly_down():
    f = factors(OptimSection(schedule="onecycle", warmup_epochs=3))
    assert max(f) == pytest.approx(1.0) and f.index(max(f)) in (29, 30)
    assert f[-1] < 0.02


def test_norms_and_biases_get_no_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(__import__("torch").zeros(1, 3, 5, 5))
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert len(no_decay["params"]) == 4  # conv bias, bn weight and bias, linear bias


@pytest.mark.parametrize("norms_and_biases", [False, True])
def test_the_switch_decays_norms_and_biases_too(norms_and_biases):
    import torch

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optim = OptimSection(lr=0.1, momentum=0.0, weight_decay=0.5, weight_decay_norms_and_biases=norms_and_biases)
    optimizer = build_optimizer(model, optim)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a step of weight decay alone
    optimizer.step()
    for name, p in model.named_parameters():
        shrunk = before[name] * (1 - 0.1 * 0.5)
        expected = shrunk if p.ndim > 1 or norms_and_biases else before[name]
        assert torch.allclose(p, expected), name
