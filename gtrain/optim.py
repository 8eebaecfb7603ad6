"""Optimizers and learning-rate schedules.

The schedule is a pure function of the iteration, so a resumed run lands on exactly
the same learning rate, and every schedule gets the same linear warmup.
"""

import math

import torch
from torch import nn

from gtrain.recipe import OptimSection


def param_groups(model: nn.Module, weight_decay: float, *, norms_and_biases: bool = False) -> list[dict]:
    """Weight decay on conv and linear weights only: decaying norm scales and biases
    hurts accuracy (Goyal et al. 2017; the HorNet and ConvNeXt recipes do the same).
    `norms_and_biases` decays every parameter, as the ResNeXt paper's code does."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 and not norms_and_biases else decay).append(param)
    # Always two groups, so that a checkpoint's optimizer state fits whichever way it was written.
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    groups = param_groups(model, optim.weight_decay, norms_and_biases=optim.weight_decay_norms_and_biases)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, optim: OptimSection) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    total = steps_per_epoch * epochs
    warmup = round(optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    floor = optim.min_lr_ratio
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 after warmup
    if optim.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if optim.schedule == "onecycle":
        # Linear up during warmup, then linear down to the floor.
        return floor + (1 - floor) * (1 - progress)
    if optim.schedule == "multistep":
        epoch = step // steps_per_epoch
        return optim.gamma ** sum(epoch >= m for m in optim.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int, optim: OptimSection):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch=steps_per_epoch, epochs=epochs, optim=optim)
    )
