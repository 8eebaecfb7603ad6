"""The trainer: what a run trains, where it stands, and how it trains.

`Trainer` owns the trained things (the model as trained, as evaluated and as saved; the
optimizer, the lr schedule, the gradient scaler, the weight average), the data loaders,
the settings every step is taken with and the run's progress. `Trainer.build` makes one
from a recipe, its data and the process world.

- `train_step` is the one optimizer step (MixUp/CutMix, micro-batches, precision, loss,
  backward, clipping, optimizer, schedule, weight average, non-finite detection) that
  `gtrain fit`, `lr-find`, `bench` and `tune` take.
- `train` runs the remaining epochs top to bottom: epochs, segments, batches, step,
  report, pause or checkpoint; `end_epoch` (validate, log, keep the best, stop early)
  is beside it.
- `state_dict` / `load_state_dict` are the one place that knows what a checkpoint holds:
  every part's state, every process's random state, and the check that a checkpoint
  continues this recipe.

An epoch may be trained in several segments: a segment ends at the epoch's end, at a stop
request, after `train.checkpoint_minutes` or at a multiple of `train.checkpoint_steps`; the
run is checkpointed between segments, so continuing after a pause and resuming after a
crash take the same path. What a run writes goes through `RunRecords`, which `gtrain fit`
hands to `train`.
"""

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from gtrain import distributed, faults, runtime
from gtrain.checkpoint import BackgroundSaver, WeightsMeta, load_into
from gtrain.data import DataBundle, balanced_class_weights, batch_mix, build_data
from gtrain.data.loaders import build_loaders, stop_workers
from gtrain.data.randomness import BATCH_STREAM, drawn_from
from gtrain.distill import Teacher, load_teacher
from gtrain.distributed import World
from gtrain.ema import WeightEMA
from gtrain.errors import UserError
from gtrain.evaluate import evaluate
from gtrain.models import classifier_keys, create_model
from gtrain.models.layers import GhostBatchNorm2d
from gtrain.optim import build_optimizer, build_scheduler
from gtrain.progress import EpochRow, Reporter
from gtrain.recipe import SAFE_TO_CHANGE_ON_RESUME, Recipe, unsafe_changes
from gtrain.run_folder import MetricsLog, RunFolder, RunStatus
from gtrain.stopping import Interrupted, StopRequest

# On GPUs the processes agree on stopping every this many steps: agreeing drains the queue.
AGREE_EVERY_GPU_STEPS = 16


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        self.step = step  # the first optimizer step (from 1) whose loss was NaN or infinite


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
class TrainerSettings:
    """How a run's steps are taken and its loop runs: fixed when the trainer is built."""

    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    channels_last: bool  # resolved
    num_classes: int
    steps_per_epoch: int
    epochs: int = 1
    seed: int = 0  # of the run: the batches' MixUp/CutMix draws come from it
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None  # max global gradient norm; None: no clipping
    accumulate_steps: int = 1  # micro-batches per step, whose gradients are summed
    mix: Any = None  # MixUp / CutMix of a batch on the device, or None
    pause_after_s: float = math.inf  # end a segment this long after it began, to checkpoint
    checkpoint_steps: int | None = None  # and after every this many steps of the run
    early_stopping_patience: int | None = None
    freeze_epochs: int = 0  # epochs in which only the classifier trains
    class_weights: torch.Tensor | None = None  # of each class's loss, on the device; None: all 1

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, device: torch.device, num_classes: int, steps_per_epoch: int) -> "TrainerSettings":
        train = recipe.train
        return cls(
            device=device, precision=runtime.resolve_precision(train.precision, device, "train.precision"),
            channels_last=runtime.resolve_channels_last(train.channels_last, device), num_classes=num_classes,
            steps_per_epoch=steps_per_epoch, epochs=train.epochs, seed=train.seed, label_smoothing=train.label_smoothing,
            clip_grad_norm=recipe.optim.clip_grad_norm, accumulate_steps=train.accumulate_steps,
            mix=batch_mix(mixup_alpha=recipe.data.mixup_alpha, cutmix_alpha=recipe.data.cutmix_alpha, num_classes=num_classes),
            pause_after_s=train.checkpoint_minutes * 60, checkpoint_steps=train.checkpoint_steps,
            early_stopping_patience=train.early_stopping_patience, freeze_epochs=train.freeze_epochs,
        )  # fmt: skip


@dataclass
class RunRecords:
    """What a run leaves as it trains: its checkpoint and weights files, metrics.jsonl,
    run.json and the progress on the terminal. Files are written by the main process only.

    Checkpoint and weights files are written in the background while training goes on
    (a ResNeXt-50's take seconds each); metrics.jsonl and run.json are written after them,
    so that neither says more than the checkpoint holds. `saving` makes every way out of a
    run wait for them.
    """

    paths: RunFolder
    meta: WeightsMeta  # what every saved weights file says about itself
    reporter: Reporter
    metrics_log: MetricsLog
    status: RunStatus
    is_main: bool
    saver: BackgroundSaver = field(default_factory=BackgroundSaver)

    def save_state(self, state: dict[str, Any]) -> None:
        if self.is_main:
            self.saver.save_state(self.paths.last, state)

    def save_weights(self, path: Path, module: nn.Module) -> None:
        if self.is_main:
            self.saver.save_weights(path, module, self.meta)

    def log_epoch(self, history: list[dict[str, Any]], **status_changes: Any) -> None:
        """Write metrics.jsonl with `history` and update run.json, once the files asked for
        before are written."""
        if self.is_main:
            history = list(history)  # as it is now: the run appends to it

            def log() -> None:
                self.metrics_log.write(history)
                self.status.update(**status_changes)

            self.saver.after_writes(log)

    def check_files(self) -> None:
        """Raise the error of a background write that failed (a full disk): the run ends at
        once, not at its next checkpoint."""
        self.saver.check()

    def wait_for_files(self) -> None:
        self.saver.wait()

    @contextlib.contextmanager
    def saving(self) -> Iterator["RunRecords"]:
        """Every file asked for is written before the run ends, however it ends."""
        try:
            yield self
        except KeyboardInterrupt:  # a second Ctrl-C: the write under way finishes, no other
            self.saver.close(abandon_queued=True)
            raise
        except BaseException as error:
            failed = self.saver.close()
            # After a stop request, the checkpoint its line promises ("checkpoint saved") is
            # not there. Any other error is the one to show: what it says of the files stays
            # true, each one being written whole or not at all.
            if failed is not None and isinstance(error, Interrupted):
                raise failed from None
            raise
        failed = self.saver.close()
        if failed is not None:
            raise failed


# Called after each epoch with its number (from 1) and validation top-1; a reason returned
# ends the run there, as early stopping does (`gtrain tune` prunes trials with it).
EpochEnd = Callable[[int, float], str | None]


def micro_batches(inputs: torch.Tensor, targets: torch.Tensor, count: int):
    """(inputs, targets, share of the batch, is last) for each of `count` chunks of a batch."""
    if count == 1:
        yield inputs, targets, 1.0, True
        return
    chunks = list(zip(inputs.tensor_split(count), targets.tensor_split(count)))
    for index, (chunk_inputs, chunk_targets) in enumerate(chunks):
        yield chunk_inputs, chunk_targets, len(chunk_targets) / len(targets), index == len(chunks) - 1


@dataclass
class Trainer:
    model: nn.Module  # as saved: the plain module, whose state_dict checkpoints and weights hold
    step_model: nn.Module  # as trained: under DDP and/or torch.compile
    eval_model: nn.Module  # as evaluated: compiled or plain, never under DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    settings: TrainerSettings
    recipe: Recipe  # saved with each checkpoint, resolved
    world: World = field(default_factory=World)
    ema: WeightEMA | None = None
    loaders: tuple[Any, Any, Any] | None = None  # train loader, its EpochSampler, validation loader
    pretrained: Any = None  # the report of model.pretrained's loading, or None
    progress: RunProgress = field(default_factory=RunProgress)
    frozen: bool = False  # only the classifier trains (train.freeze_epochs)
    teacher: Teacher | None = None  # distill.teacher, whose outputs the student learns from too

    def __post_init__(self):
        # The first step (from 1) whose loss was not finite, kept on the device: checking
        # it costs a host sync, so the loop does so only when it reports or agrees.
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.settings.device)

    @classmethod
    def build(cls, recipe: Recipe, data: DataBundle, *, world: World, device: torch.device, pretrained: bool) -> "Trainer":
        """The trainer of `recipe` on `data`, with the model from published weights when
        `pretrained`, and the data loaders of this process."""
        balanced = recipe.data.sampler == "balanced"
        # A balanced epoch: as many images of each class, the epoch's size rounded down to a multiple of the classes.
        images = len(data.train) // data.info.num_classes * data.info.num_classes if balanced else len(data.train)
        trainer = cls.for_model(
            recipe, num_classes=data.info.num_classes, in_chans=data.info.in_chans,
            steps_per_epoch=images // recipe.data.batch_size, world=world, device=device, pretrained=pretrained,
            normalization=(data.info.mean, data.info.std),
        )  # fmt: skip
        trainer.loaders = build_loaders(
            data, global_batch=recipe.data.batch_size, seed=recipe.train.seed, workers=recipe.data.workers,
            device=device, world=world, balanced=balanced,
        )  # fmt: skip
        if recipe.data.class_weights == "balanced":
            weights = balanced_class_weights(data.train, data.info.num_classes).to(device)
            trainer.settings = dataclasses.replace(trainer.settings, class_weights=weights)
        return trainer

    @classmethod
    def for_model(
        cls, recipe: Recipe, *, num_classes: int, in_chans: int, steps_per_epoch: int, world: World,
        device: torch.device, pretrained: bool = False, normalization: tuple[tuple, tuple] | None = None,
    ) -> "Trainer":  # fmt: skip
        """The model (from published weights with `pretrained`), its DDP and compiled forms,
        the optimizer, the schedule, the scaler, the EMA and the teacher, without data loaders.
        `normalization`: the data's (mean, std), for a teacher that was trained with others."""
        train = recipe.train
        settings = TrainerSettings.from_recipe(recipe, device=device, num_classes=num_classes, steps_per_epoch=steps_per_epoch)
        model = create_model(recipe.model.name, num_classes=num_classes, in_chans=in_chans, **recipe.model_overrides())
        loaded = None
        if pretrained:
            from gtrain.hub import local_file
            from gtrain.pretrained import load_pretrained

            loaded = load_pretrained(model, local_file(recipe.model.pretrained, recipe.model.name))
        if train.bn_group_size is not None and not GhostBatchNorm2d.convert(model, train.bn_group_size):
            raise UserError(f"train.bn_group_size: {recipe.model.name} has no BatchNorm layers to group; leave it unset")
        model.to(device)
        if settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        trained_model = distributed.wrap(model, train.sync_bn, device, world)
        optimizer = build_optimizer(model, recipe.optim)
        mean, std = normalization if normalization is not None else (None, None)
        teacher = load_teacher(recipe.distill, num_classes=num_classes, in_chans=in_chans, mean=mean, std=std,
                               device=device, channels_last=settings.channels_last)  # fmt: skip
        return cls(
            model=model,
            # Compiled for speed, while checkpoints keep reading the plain module's state_dict.
            step_model=torch.compile(trained_model) if train.compile else trained_model,
            eval_model=torch.compile(model) if train.compile else model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, epochs=train.epochs, optim=recipe.optim,
                                      freeze_epochs=train.freeze_epochs),
            scaler=torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16"),
            settings=settings, recipe=recipe, world=world, pretrained=loaded, teacher=teacher,
            # After the wrap: DDP has given every process the main process's initial weights.
            ema=WeightEMA(model, train.ema_decay, warmup=train.ema_warmup) if train.ema_decay else None,
        )  # fmt: skip

    @property
    def lr(self) -> float:
        """optim.lr as the schedule has it now (groups with a layer decay or head scale train at multiples of it)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def freeze_backbone(self, frozen: bool) -> None:
        """While `frozen`, only the classifier trains: the rest gets no gradients, so keeps
        its weights, and `train_mode` keeps its BatchNorm statistics."""
        if frozen == self.frozen:
            return
        head = set(classifier_keys(self.model))
        for name, param in self.model.named_parameters():
            if name not in head:
                param.requires_grad_(not frozen)
        self.frozen = frozen
        if self.world.distributed or self.recipe.train.compile:
            # DDP registers the parameters that train when it wraps the model, and a compiled
            # graph assumes them: both are made again.
            trained = distributed.wrap(self.model, False, self.settings.device, self.world)
            self.step_model = torch.compile(trained) if self.recipe.train.compile else trained

    def close(self) -> None:
        """Stop the loaders' worker processes (the run is over, however it ended)."""
        train_loader, _, val_loader = self.loaders
        stop_workers(train_loader, val_loader)

    def train_mode(self) -> None:
        self.step_model.train()
        if self.frozen:  # running statistics that change would change the frozen backbone
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    # -----------------------------------------------------------------------------------
    # The step

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, step: int) -> torch.Tensor:
        """Optimizer step `step` of the run (from 0) on a batch from the loader; returns the
        batch's mean loss, on the device, unsynchronised."""
        settings, model, optimizer, scaler = self.settings, self.step_model, self.optimizer, self.scaler
        inputs, targets = runtime.to_device(inputs, targets, settings.device, settings.channels_last)
        if settings.mix is not None:
            # Drawn from the batch's own stream: the same on a resumed run, whatever ran before.
            with drawn_from(settings.seed, step, self.world.rank, BATCH_STREAM):
                inputs, targets = settings.mix(inputs, targets)  # targets become soft labels (N, classes)
        loss = torch.zeros((), device=settings.device)
        for index, (chunk_inputs, chunk_targets, share, last) in enumerate(
            micro_batches(inputs, targets, settings.accumulate_steps)
        ):
            with distributed.gradient_sync(model, last):
                with runtime.autocast(settings.device, settings.precision):
                    logits = model(chunk_inputs)
                chunk_loss = F.cross_entropy(logits.float(), chunk_targets, weight=settings.class_weights,
                                             label_smoothing=settings.label_smoothing)  # fmt: skip
                if self.teacher is not None:
                    with runtime.autocast(settings.device, settings.precision):
                        teacher_logits = self.teacher.logits(chunk_inputs)
                    chunk_loss = self.teacher.loss(logits.float(), teacher_logits, chunk_loss)
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
        bad = self.first_bad_step
        bad.copy_(torch.where((bad < 0) & ~loss.isfinite(), step + 1, bad))
        return loss

    def check_finite(self) -> None:
        """Raise `NonFiniteLoss` if any step so far had a NaN or infinite loss (a host sync)."""
        if self.first_bad_step.item() >= 0:
            raise NonFiniteLoss(self.first_bad_step.item())

    # -----------------------------------------------------------------------------------
    # The loop

    def train(self, records: RunRecords, stop: StopRequest, epoch_end: EpochEnd | None = None) -> str | None:
        """Train the remaining epochs; return why the run ended before its last one (early
        stopping or `epoch_end`), or None. A stop request checkpoints, then raises `Interrupted`."""
        settings, progress, reporter = self.settings, self.progress, records.reporter
        steps_per_epoch = settings.steps_per_epoch
        train_loader, sampler, _ = self.loaders
        run_start = time.perf_counter() - progress.elapsed_s
        for epoch in range(progress.epoch, settings.epochs):
            reporter.epoch_start(epoch + 1, settings.epochs, steps_per_epoch, progress.this_epoch.steps)
            self.freeze_backbone(epoch < settings.freeze_epochs)
            while progress.this_epoch.steps < steps_per_epoch:  # segments, with a checkpoint between them
                segment = Segment(self, epoch, first_step=progress.this_epoch.steps)
                sampler.set_epoch(epoch, start_step=segment.first_step)
                self.train_mode()
                for inputs, targets in train_loader:
                    segment.batch_arrived()
                    loss = self.train_step(inputs, targets, segment.global_step)
                    segment.step_taken(loss, len(targets))
                    records.check_files()
                    faults.maybe_signal_at_step(segment.global_step, records.wait_for_files)
                    if segment.report_due(reporter.refresh_s):
                        if not self.world.distributed:  # distributed: checked as the processes agree, together
                            self.check_finite()
                        reporter.step(segment.step_in_epoch, loss.item(), self.lr, *segment.speed())
                    if segment.ends(stop):
                        break
                progress.this_epoch += segment.totals()
                if progress.this_epoch.steps < steps_per_epoch:  # paused within the epoch
                    progress.elapsed_s = time.perf_counter() - run_start
                    records.save_state(self.state_dict())
                    if segment.stopped:
                        reporter.close()
                        raise Interrupted(stop.signum)
            top1 = self.end_epoch(epoch, records, run_start)
            if progress.stopped_early:
                return None  # the summary says so
            stopped_by = epoch_end(epoch + 1, top1) if epoch_end is not None else None
            if stopped_by:
                return stopped_by
            last_epoch = epoch + 1 == settings.epochs  # then finish: only the final weights are left to write
            if not last_epoch and distributed.agree([bool(stop)], settings.device, self.world)[0]:
                raise Interrupted(stop.signum)
        return None

    def end_epoch(self, epoch: int, records: RunRecords, run_start: float) -> float:
        """Validate, log, keep the best weights, decide on early stopping, checkpoint; return
        the validation top-1."""
        progress, totals = self.progress, self.progress.this_epoch
        result, result_ema = self.validate()
        row = EpochRow(
            epoch=epoch + 1, epochs=self.settings.epochs, train_loss=totals.loss_sum / self.settings.steps_per_epoch,
            val_loss=result.loss, val_top1=result.top1, val_top5=result.top5, lr=self.lr,
            images_per_s=totals.images / totals.seconds, data_wait_fraction=totals.data_wait_s / totals.seconds,
            seconds=totals.seconds + result.seconds + (result_ema.seconds if result_ema else 0.0),
            val_loss_ema=result_ema.loss if result_ema else None, val_top1_ema=result_ema.top1 if result_ema else None,
            val_balanced_top1=result.balanced_top1,
        )  # fmt: skip
        records.reporter.epoch_end(row)
        progress.end_epoch(row.to_record())
        progress.elapsed_s = time.perf_counter() - run_start
        if result.top1 > progress.best_top1:
            progress.best_top1, progress.best_epoch = result.top1, epoch + 1
            records.save_weights(records.paths.best, self.model)
        if result_ema is not None and result_ema.top1 > progress.best_top1_ema:
            progress.best_top1_ema, progress.best_epoch_ema = result_ema.top1, epoch + 1
            records.save_weights(records.paths.best_ema, self.ema.module)
        # Every process computed the same top-1 (reduced over all), so all stop together.
        patience = self.settings.early_stopping_patience
        progress.stopped_early = patience is not None and progress.epoch - progress.best_epoch >= patience
        records.save_state(self.state_dict())
        records.log_epoch(progress.history, epochs_done=progress.epoch, best_top1=progress.best_top1,
                          best_epoch=progress.best_epoch, elapsed_s=progress.elapsed_s)  # fmt: skip
        return result.top1

    def validate(self):
        """The validation split's results for the model and for its weight average (or None)."""
        settings = self.settings
        evaluation = dict(
            loader=self.loaders[2], num_classes=settings.num_classes, device=settings.device,
            precision=settings.precision, channels_last=settings.channels_last, world=self.world,
        )  # fmt: skip
        # Every process validates with the main process's BatchNorm statistics, as saved.
        distributed.share_main_buffers(self.model, self.world)
        if self.ema is not None:
            distributed.share_main_buffers(self.ema.module, self.world)
        result = evaluate(self.eval_model, **evaluation)
        return result, evaluate(self.ema.module, **evaluation) if self.ema is not None else None

    # -----------------------------------------------------------------------------------
    # What a checkpoint holds

    def _parts(self) -> dict[str, Any]:
        """Everything with a state of its own, by its name in the checkpoint."""
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                 "progress": self.progress}  # fmt: skip
        if self.ema is not None:
            parts["ema"] = self.ema
        return parts

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. Under torchrun every process calls it: each one's
        random state goes in, so that a resume on as many processes gives each its own back."""
        state = {name: part.state_dict() for name, part in self._parts().items()}
        if self.world.distributed:
            state["rng_of_ranks"] = distributed.gather_object(rng_state(), self.world)
        return {**state, "rng": rng_state(), "recipe": self.recipe.to_dict()}

    def load_state_dict(self, state: dict[str, Any], paths: RunFolder) -> None:
        """Continue from `state`, the checkpoint of the run in `paths`: one line unless it is
        a gtrain training state that this recipe continues."""
        missing = sorted({*self._parts(), "rng", "recipe"} - set(state))
        if missing:
            raise UserError(f"cannot load {paths.last}: not a gtrain training state (it lacks {', '.join(missing)})")
        check_resumable(state, self.recipe, paths)
        for name, part in self._parts().items():
            if name == "model":
                load_into(part, state["model"], paths.last)  # one line, not PyTorch's list of keys
            else:
                part.load_state_dict(state[name])
        self.progress.stopped_early = False  # check_resumable let it go on
        set_rng_state(state["rng"])
        if self.world.rank:  # the others' random states: their own, or on another world size a branch off the main one's
            saved = state.get("rng_of_ranks")
            if saved is not None and len(saved) == self.world.size:
                set_rng_state(saved[self.world.rank])
            else:
                step = self.progress.epoch * self.settings.steps_per_epoch + self.progress.this_epoch.steps
                train = self.recipe.train
                runtime.seed_everything(train.seed + 1_000_003 * self.world.rank + step, train.deterministic)


class Segment:
    """The bookkeeping of one segment of an epoch: its loss and images, its timing, when to
    report and when to end it (every process at the same step)."""

    def __init__(self, trainer: Trainer, epoch: int, *, first_step: int):
        self.trainer, self.settings, self.world = trainer, trainer.settings, trainer.world
        self.first_step = first_step  # within the epoch
        self.first_global_step = epoch * self.settings.steps_per_epoch + first_step
        self.steps = self.images = 0
        self.loss_sum = torch.zeros((), device=self.settings.device)
        self.stopped = False
        self.start = self.last_report = self.step_end = time.perf_counter()
        self.data_wait_s = 0.0

    @property
    def global_step(self) -> int:
        """The run's step being taken (from 0) until `step_taken`, then the number of steps taken."""
        return self.first_global_step + self.steps

    @property
    def step_in_epoch(self) -> int:
        return self.first_step + self.steps

    def batch_arrived(self) -> None:
        self.data_wait_s += time.perf_counter() - self.step_end  # the loop stood still waiting for this batch

    def step_taken(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss
        self.images += images
        self.steps += 1

    def report_due(self, refresh_s: float) -> bool:
        self.now = time.perf_counter()
        if self.now - self.last_report > refresh_s or self.step_in_epoch == self.settings.steps_per_epoch:
            self.last_report = self.now
            return True
        return False

    def speed(self) -> tuple[float, float]:
        """images/s and the seconds left in the epoch, as the segment has gone so far."""
        seconds = self.now - self.start
        return self.images / seconds, (self.settings.steps_per_epoch - self.step_in_epoch) * seconds / self.steps

    def ends(self, stop: StopRequest) -> bool:
        """Whether the segment ends after this step: on a stop request, after
        `pause_after_s`, or at a multiple of `checkpoint_steps`."""
        settings, step = self.settings, self.step_in_epoch
        # Every process must leave at the same step, or the next collective deadlocks. Agreeing
        # is an all-reduce plus, on GPUs, a host sync that drains the kernel queue: there it is
        # done every few steps (the same steps on every process, counted within the epoch).
        if settings.device.type == "cpu" or step % AGREE_EVERY_GPU_STEPS == 0 or step == settings.steps_per_epoch:
            bad = self.world.distributed and self.trainer.first_bad_step.item() >= 0
            paused = time.perf_counter() - self.start > settings.pause_after_s
            self.stopped, paused, bad = distributed.agree([bool(stop), paused, bad], settings.device, self.world)
            if bad:
                self.trainer.check_finite()
            if self.stopped or paused:
                return True
        # The same step on every process: no need to agree on it.
        if settings.checkpoint_steps and self.global_step % settings.checkpoint_steps == 0:
            return True
        self.step_end = time.perf_counter()
        return False

    def totals(self) -> EpochTotals:
        self.trainer.check_finite()
        # Under torchrun: the loss over all processes' images, and all of their images.
        loss_sum = distributed.all_reduce_sum(self.loss_sum, self.world) / self.world.size
        seconds = time.perf_counter() - self.start
        return EpochTotals(self.steps, loss_sum.item(), self.images * self.world.size, seconds, self.data_wait_s)


def check_batch_split(recipe: Recipe, world: World) -> None:
    """Each process's share of a batch must split into the micro-batches and BatchNorm
    groups the recipe asks for."""
    train = recipe.train
    per_process_batch = distributed.per_process_batch(recipe.data.batch_size, world)
    if train.accumulate_steps > per_process_batch:
        raise UserError(
            f"train.accumulate_steps = {train.accumulate_steps} is more micro-batches than the {per_process_batch} "
            f"images each of the {world.size} processes gets per step: lower it, or raise data.batch_size"
        )
    group = train.bn_group_size
    micro_batch = per_process_batch // train.accumulate_steps
    if group is not None and (per_process_batch % train.accumulate_steps or micro_batch % group):
        raise UserError(
            f"train.bn_group_size = {group} must divide the {per_process_batch} images each process gets per step"
            + (f", split into {train.accumulate_steps} equal micro-batches" if train.accumulate_steps > 1 else "")
            + ": pick a divisor, or change data.batch_size"
        )


def load_data(recipe: Recipe, world: World) -> DataBundle:
    """The recipe's training and validation data; under torchrun the main process
    downloads alone, and the others then read its copy."""
    data_recipe = recipe.data
    with distributed.main_process_first(world):
        data = build_data(data_recipe, download=data_recipe.download and world.is_main)
    if len(data.train) < data_recipe.batch_size:
        raise UserError(
            f"data.batch_size = {data_recipe.batch_size} is larger than the {len(data.train)} training images "
            f"of {data.info.name}: lower data.batch_size"
        )
    return data


def check_resumable(state: dict[str, Any], recipe: Recipe, paths: RunFolder) -> None:
    """Refuse a resume that would not continue the same run, or has nothing left to do."""
    try:  # a checkpoint from an older gtrain lacks newer keys: they had their defaults' effect
        saved_recipe = Recipe.model_validate(state["recipe"]).to_dict()
    except ValidationError:
        saved_recipe = state["recipe"]
    changed = unsafe_changes(saved_recipe, recipe.to_dict())
    if changed:
        raise UserError(
            f"cannot resume {paths.root}: the recipe differs from the one it was trained with in "
            f"{', '.join(changed)}; only {', '.join(sorted(SAFE_TO_CHANGE_ON_RESUME))} may change "
            "(start a new run for anything else)"
        )
    saved = state["progress"]
    patience = recipe.train.early_stopping_patience
    if saved.get("stopped_early") and patience is not None and saved["epoch"] - saved["best_epoch"] >= patience:
        raise UserError(
            f"{paths.root} stopped early after epoch {saved['epoch']} (best top-1 at epoch {saved['best_epoch']}): "
            f"to train on, raise it with --set train.early_stopping_patience=N"
        )
    done = saved["epoch"] + (saved["step_in_epoch"] > 0)
    if recipe.train.epochs < done or (recipe.train.epochs == done == saved["epoch"] and paths.final.exists()):
        raise UserError(
            f"{paths.root} has trained {done} of its epochs: resume with more, "
            f"e.g. --set train.epochs={saved['epoch'] + 10}"
        )


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
