"""The run object: what a run trains and where it stands, and its one training step.

`TrainingRun` owns the trained things (the model as trained, as evaluated and as saved;
the optimizer, the lr schedule, the gradient scaler, the weight average) and the run's
progress. Its `state_dict` / `load_state_dict` are the one list of what a checkpoint holds.
`TrainingRun.train_step` is the one optimizer step (micro-batches, precision, loss,
backward, clipping, optimizer, schedule, weight average) that `gtrain fit`, `gtrain
lr-find` and `gtrain bench` all take.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gtrain import distributed, runtime
from gtrain.checkpoint import load_into
from gtrain.distributed import World
from gtrain.ema import WeightEMA
from gtrain.errors import UserError
from gtrain.models import create_model
from gtrain.models.layers import GhostBatchNorm2d
from gtrain.optim import build_optimizer, build_scheduler
from gtrain.recipe import Recipe


@dataclass
class EpochTotals:
    """What the trained steps of one epoch add up to (an epoch may be trained in segments)."""

    steps: int = 0  # optimizer steps
    loss_sum: float = 0.0  # of the per-step mean losses
    images: int = 0  # over all processes
    seconds: float = 0.0
    data_wait_s: float = 0.0  # of `seconds`, spent waiting for the data loader

    def __iadd__(self, other: "EpochTotals") -> "EpochTotals":
        self.steps += other.steps
        self.loss_sum += other.loss_sum
        self.images += other.images
        self.seconds += other.seconds
        self.data_wait_s += other.data_wait_s
        return self


@dataclass
class RunProgress:
    """Where the run is: everything besides the modules that a resume needs."""

    epoch: int = 0  # epochs completed
    this_epoch: EpochTotals = field(default_factory=EpochTotals)  # the unfinished epoch so far
    best_top1: float = -1.0
    best_epoch: int = 0
    best_top1_ema: float = -1.0  # of the weight average, with train.ema_decay
    best_epoch_ema: int = 0
    stopped_early: bool = False  # by train.early_stopping_patience
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # the rows of metrics.jsonl

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.epoch = record["epoch"]
        self.this_epoch = EpochTotals()
        self.history.append(record)

    # Checkpoints have always held this flat dict: older ones load unchanged.
    def state_dict(self) -> dict[str, Any]:
        totals = self.this_epoch
        return {
            "epoch": self.epoch, "step_in_epoch": totals.steps, "epoch_loss_sum": totals.loss_sum,
            "epoch_images": totals.images, "epoch_seconds": totals.seconds, "epoch_data_wait_s": totals.data_wait_s,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch, "best_top1_ema": self.best_top1_ema,
            "best_epoch_ema": self.best_epoch_ema, "stopped_early": self.stopped_early, "elapsed_s": self.elapsed_s,
            "history": self.history,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        totals = {"steps": "step_in_epoch", "loss_sum": "epoch_loss_sum", "images": "epoch_images",
                  "seconds": "epoch_seconds", "data_wait_s": "epoch_data_wait_s"}  # fmt: skip
        self.this_epoch = EpochTotals(**{mine: state[saved] for mine, saved in totals.items() if saved in state})
        for key in ("epoch", "best_top1", "best_epoch", "best_top1_ema", "best_epoch_ema", "stopped_early",
                    "elapsed_s", "history"):  # fmt: skip
            if key in state:  # a checkpoint from before the EMA keys: their defaults
                setattr(self, key, state[key])


@dataclass(frozen=True)
class StepSettings:
    """How every optimizer step of a run is taken: fixed when the run is set up."""

    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None  # max global gradient norm; None: no clipping
    accumulate_steps: int = 1  # micro-batches per step, whose gradients are summed


def micro_batches(inputs: torch.Tensor, targets: torch.Tensor, count: int):
    """(inputs, targets, share of the batch, is last) for each of `count` chunks of a batch."""
    if count == 1:
        yield inputs, targets, 1.0, True
        return
    chunks = list(zip(inputs.tensor_split(count), targets.tensor_split(count)))
    for index, (chunk_inputs, chunk_targets) in enumerate(chunks):
        yield chunk_inputs, chunk_targets, len(chunk_targets) / len(targets), index == len(chunks) - 1


@dataclass
class TrainingRun:
    model: nn.Module  # as saved: the plain module, whose state_dict checkpoints and weights hold
    step_model: nn.Module  # as trained: under DDP and/or torch.compile
    eval_model: nn.Module  # as evaluated: compiled or plain, never under DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # resolved, as saved with each checkpoint
    progress: RunProgress = field(default_factory=RunProgress)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, settings: StepSettings) -> torch.Tensor:
        """One optimizer step on a batch (targets: class indices, or soft labels (N, classes)
        after MixUp or CutMix); returns the batch's mean loss, on the device, unsynchronised."""
        model, optimizer, scaler = self.step_model, self.optimizer, self.scaler
        loss = torch.zeros((), device=settings.device)
        for index, (chunk_inputs, chunk_targets, share, last) in enumerate(
            micro_batches(inputs, targets, settings.accumulate_steps)
        ):
            with distributed.gradient_sync(model, last):
                with runtime.autocast(settings.device, settings.precision):
                    logits = model(chunk_inputs)
                chunk_loss = F.cross_entropy(logits.float(), chunk_targets, label_smoothing=settings.label_smoothing)
                if share != 1.0:
                    # Each chunk's mean loss weighted by its share of the batch: the gradients
                    # sum to those of the whole batch's mean loss.
                    chunk_loss = chunk_loss * share
                if index == 0:
                    # Freed after the forward pass, not before: the backward then reuses the
                    # old gradients' memory while it is warm (measured 3% faster on CPU).
                    optimizer.zero_grad(set_to_none=True)
                scaler.scale(chunk_loss).backward()
            loss += chunk_loss.detach()
        if settings.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), settings.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return loss

    def _parts(self) -> dict[str, Any]:
        """Everything with a state of its own, by its name in the checkpoint."""
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                 "progress": self.progress}  # fmt: skip
        if self.ema is not None:
            parts["ema"] = self.ema
        return parts

    def state_dict(self, rng_of_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """With `rng_of_ranks` (every process's `rng_state()`, under torchrun), a resume on as
        many processes gives each its own random state back."""
        state = {name: part.state_dict() for name, part in self._parts().items()}
        if rng_of_ranks is not None:
            state["rng_of_ranks"] = rng_of_ranks
        return {**state, "rng": rng_state(), "recipe": self.recipe}

    def check_state(self, state: dict[str, Any], source: Path) -> None:
        """One line unless `state` holds every part of this run."""
        missing = sorted({*self._parts(), "rng", "recipe"} - set(state))
        if missing:
            raise UserError(f"cannot load {source}: not a gtrain training state (it lacks {', '.join(missing)})")

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Restore a checkpoint (read from `source`) of this run. The random state is the
        main process's: the caller restores or re-seeds the others'."""
        self.check_state(state, source)
        for name, part in self._parts().items():
            if name == "model":
                load_into(part, state["model"], source)  # one line, not PyTorch's list of keys
            else:
                part.load_state_dict(state[name])
        set_rng_state(state["rng"])


def build_training_run(
    recipe: Recipe, *, num_classes: int, in_chans: int, steps_per_epoch: int, device: torch.device,
    channels_last: bool, world: World, pretrained: bool,
) -> tuple[TrainingRun, Any]:  # fmt: skip
    """The model (from published weights with `pretrained`), its DDP and compiled forms, the
    optimizer, the schedule, the scaler and the EMA; and the report of what was loaded."""
    train = recipe.train
    model = create_model(recipe.model.name, num_classes=num_classes, in_chans=in_chans, **recipe.model_overrides())
    loaded = None
    if pretrained:
        from gtrain.pretrained import load_pretrained

        loaded = load_pretrained(model, Path(recipe.model.pretrained))
    if train.bn_group_size is not None and not GhostBatchNorm2d.convert(model, train.bn_group_size):
        raise UserError(f"train.bn_group_size: {recipe.model.name} has no BatchNorm layers to group; leave it unset")
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained_model = distributed.wrap(model, train.sync_bn, device, world)
    optimizer = build_optimizer(model, recipe.optim)
    run = TrainingRun(
        model=model,
        # Compiled for speed, while checkpoints keep reading the plain module's state_dict.
        step_model=torch.compile(trained_model) if train.compile else trained_model,
        eval_model=torch.compile(model) if train.compile else model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, epochs=train.epochs, optim=recipe.optim),
        scaler=torch.amp.GradScaler(device.type, enabled=train.precision == "fp16"),
        # After the wrap: DDP has given every process the main process's initial weights.
        ema=WeightEMA(model, train.ema_decay, warmup=train.ema_warmup) if train.ema_decay else None,
        recipe=recipe.to_dict(),
    )
    return run, loaded


def rng_state() -> dict[str, Any]:
    # numpy's state as tensors and numbers: checkpoints are read with weights_only=True.
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position, "has_gauss": has_gauss,
                   "cached_gaussian": cached_gaussian}  # fmt: skip
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:  # checkpoints before it was saved: numpy drew nothing gtrain depended on
        saved = state["numpy"]
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        # The run may resume on a machine that sees fewer GPUs than the one that saved it.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
