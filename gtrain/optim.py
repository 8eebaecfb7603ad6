"""Optimizers and learning-rate schedules.

The schedule is a pure function of the iteration, so a resumed run lands on exactly
the same learning rate, and every schedule gets the same linear warmup.
"""

import math

import torch
from torch import nn

from gtrain.models import classifier_keys, layer_ids
from gtrain.recipe import OptimSection


def param_groups(
    model: nn.Module, weight_decay: float, *, norms_and_biases: bool = False, layer_decay: float | None = None,
    head_lr_scale: float = 1.0,
) -> list[dict]:  # fmt: skip
    """Weight decay on conv and linear weights only: decaying norm scales and biases
    hurts accuracy (Goyal et al. 2017; the HorNet and ConvNeXt recipes do the same).
    `norms_and_biases` decays every parameter, as the ResNeXt paper's code does.

    Each group's "lr_scale" is the multiple of optim.lr it trains at: with `layer_decay`,
    depth d of D (the stem 0, each block, then the head) trains at layer_decay ** (D - 1 - d)
    (timm's layer decay); the classifier at `head_lr_scale` times that."""
    head = set(classifier_keys(model)) if head_lr_scale != 1.0 else set()
    depth_of, depths = layer_ids(model) if layer_decay is not None else ({}, 1)
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = param.ndim > 1 or norms_and_biases
        depth = depth_of.get(name, 0)
        scale = (layer_decay ** (depths - 1 - depth) if layer_decay is not None else 1.0) * (head_lr_scale if name in head else 1.0)
        key = (depth, scale, not decays) if layer_decay is not None or head_lr_scale != 1.0 else (0, 1.0, not decays)
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale})
        group["params"].append(param)
    # At least the two groups of decayed and undecayed parameters, so that a checkpoint's
    # optimizer state fits whichever way it was written.
    for undecayed in (False, True):
        groups.setdefault((0, 1.0, undecayed), {"params": [], "weight_decay": 0.0 if undecayed else weight_decay, "lr_scale": 1.0})
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    groups = param_groups(model, optim.weight_decay, norms_and_biases=optim.weight_decay_norms_and_biases,
                          layer_decay=optim.layer_decay, head_lr_scale=optim.head_lr_scale)  # fmt: skip
    for group in groups:
        group["lr"] = optim.lr * group["lr_scale"]
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, optim: OptimSection, freeze_epochs: int = 0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    With `freeze_epochs` the run has two phases, each with the whole schedule, warmup then
    decay: the frozen epochs, in which only the classifier trains, and then every layer, as
    fastai's fine_tune runs them. Without a warmup of its own, the backbone's first steps
    would come at the peak lr."""
    frozen_epochs = freeze_epochs if freeze_epochs < epochs else 0  # a run frozen throughout: one phase
    frozen = frozen_epochs * steps_per_epoch
    if step < frozen:
        return _phase_factor(step, frozen, steps_per_epoch, optim, first_epoch=0)
    return _phase_factor(step - frozen, steps_per_epoch * epochs - frozen, steps_per_epoch, optim, first_epoch=frozen_epochs)


def _phase_factor(step: int, total: int, steps_per_epoch: int, optim: OptimSection, *, first_epoch: int) -> float:
    """The schedule at `step` of a phase of `total` steps that starts at epoch `first_epoch`."""
    warmup = min(round(optim.warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return (step + 1) / warmup
    floor = optim.min_lr_ratio
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 after warmup
    if optim.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if optim.schedule == "onecycle":
        # Linear up during warmup, then linear down to the floor.
        return floor + (1 - floor) * (1 - progress)
    if optim.schedule == "multistep":  # milestones count the run's epochs, not the phase's
        epoch = first_epoch + step // steps_per_epoch
        return optim.gamma ** sum(epoch >= m for m in optim.milestones)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int, optim: OptimSection, freeze_epochs: int = 0
):  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, steps_per_epoch=steps_per_epoch, epochs=epochs, optim=optim, freeze_epochs=freeze_epochs),
    )
