"""`gtrain fit`: a recipe becomes a model, loaders and a training loop.

`fit` sets the run up and walks the epochs; `train_steps` is the loop itself, read top
to bottom: batch, forward, loss, backward, step, log. Everything else (precision, memory
format, checkpoints, distribution, progress) is a small helper they call.

An epoch may be trained in several segments: a segment ends at the epoch's end, at a
stop signal or after `train.checkpoint_minutes`; the run is checkpointed between
segments, so continuing after a pause and resuming after a crash take the same path.
"""

import contextlib
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from gtrain import distributed, faults, runtime
from gtrain.checkpoint import WeightsMeta, load_into, load_state, save_state, save_weights, write_text_atomic
from gtrain.data import DataBundle, batch_mix, build_data
from gtrain.distributed import World
from gtrain.ema import WeightEMA
from gtrain.errors import UserError
from gtrain.evaluate import evaluate
from gtrain.loaders import EpochSampler, make_eval_loader, make_train_loader
from gtrain.memory_loader import InMemoryLoader, load_uint8
from gtrain.models import create_model
from gtrain.optim import build_optimizer, build_scheduler
from gtrain.progress import EpochRow, Reporter, format_seconds
from gtrain.recipe import SAFE_TO_CHANGE_ON_RESUME, Recipe, unsafe_changes
from gtrain.run_folder import MetricsLog, RunFolder, RunStatus, require_tensorboard


@dataclass
class Progress:
    """Where the run is: everything besides the modules that a resume needs."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current (unfinished) epoch
    epoch_loss_sum: float = 0.0  # sum of the per-step losses of those steps
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    epoch_data_wait_s: float = 0.0
    best_top1: float = -1.0
    best_epoch: int = 0
    best_top1_ema: float = -1.0  # of the weight average, with train.ema_decay
    best_epoch_ema: int = 0
    stopped_early: bool = False  # by train.early_stopping_patience
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # the rows of metrics.jsonl


class StopRequest:
    """First SIGINT/SIGTERM: finish the current step, checkpoint, exit. Second SIGINT:
    stop at once (the checkpoint on disk is still the previous, intact one)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


class Interrupted(Exception):
    def __init__(self, signum: int):
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(signal.Signals(signum).name)


AGREE_EVERY_GPU_STEPS = 16


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        self.step = step


@dataclass
class Segment:
    """What one call of `train_steps` did."""

    steps: int
    loss_sum: float
    images: int
    seconds: float
    data_wait_s: float  # of `seconds`, spent waiting for the data loader
    stopped: bool  # by a signal (on any process)


def train_steps(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    precision: str,
    channels_last: bool,
    label_smoothing: float,
    clip_grad_norm: float | None,
    accumulate_steps: int,
    mix,
    ema: WeightEMA | None,
    first_step: int,
    steps_per_epoch: int,
    global_step: int,
    reporter: Reporter,
    pause_after_s: float,
    stop: StopRequest,
    world: World,
) -> Segment:
    """Train from step `first_step` of the epoch to its end, or until a stop request or
    `pause_after_s` seconds (then the caller checkpoints and calls again)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    # The step of the first non-finite loss, found without a device sync per step.
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    images = steps = 0
    stopped = False
    start = last_report = time.perf_counter()
    data_wait_s = 0.0
    step_end = start
    for inputs, targets in loader:
        data_wait_s += time.perf_counter() - step_end  # the loop stood still waiting for this batch
        inputs, targets = runtime.to_device(inputs, targets, device, channels_last)
        if mix is not None:
            inputs, targets = mix(inputs, targets)  # targets become soft labels (N, classes)

        loss = torch.zeros((), device=device)
        for index, (chunk_inputs, chunk_targets, share, last) in enumerate(micro_batches(inputs, targets, accumulate_steps)):
            with distributed.gradient_sync(model, last):
                with runtime.autocast(device, precision):
                    logits = model(chunk_inputs)
                chunk_loss = F.cross_entropy(logits.float(), chunk_targets, label_smoothing=label_smoothing)
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
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update()

        loss_sum += loss
        first_bad_step.copy_(torch.where((first_bad_step < 0) & ~loss.isfinite(), global_step + steps + 1, first_bad_step))
        images += len(targets)
        steps += 1
        step = first_step + steps
        faults.maybe_signal_at_step(global_step + steps)

        now = time.perf_counter()
        if now - last_report > reporter.refresh_s or step == steps_per_epoch:
            last_report = now
            if not world.distributed and first_bad_step.item() >= 0:  # distributed: checked below, together
                raise NonFiniteLoss(first_bad_step.item())
            rate = images / (now - start)
            eta_s = (steps_per_epoch - step) * (now - start) / steps
            reporter.step(step, loss.item(), optimizer.param_groups[0]["lr"], rate, eta_s)
        # Every process must leave at the same step, or the next collective deadlocks. Agreeing
        # is an all-reduce plus, on GPUs, a host sync that drains the kernel queue: there it is
        # done every few steps (the same steps on every process, counted within the epoch).
        if device.type == "cpu" or step % AGREE_EVERY_GPU_STEPS == 0 or step == steps_per_epoch:
            bad = world.distributed and first_bad_step.item() >= 0
            stopped, paused, bad = distributed.agree([bool(stop), now - start > pause_after_s, bad], device, world)
            if bad:
                raise NonFiniteLoss(first_bad_step.item())
            if stopped or paused:
                break
        step_end = time.perf_counter()
    if first_bad_step.item() >= 0:
        raise NonFiniteLoss(first_bad_step.item())
    # Under torchrun: the loss over all processes' images, and all of their images.
    loss_sum = distributed.all_reduce_sum(loss_sum, world) / world.size
    return Segment(steps, loss_sum.item(), images * world.size, time.perf_counter() - start, data_wait_s, stopped)


def micro_batches(inputs: torch.Tensor, targets: torch.Tensor, count: int):
    """(inputs, targets, share of the batch, is last) for each of `count` chunks of a batch."""
    if count == 1:
        yield inputs, targets, 1.0, True
        return
    chunks = list(zip(inputs.tensor_split(count), targets.tensor_split(count)))
    for index, (chunk_inputs, chunk_targets) in enumerate(chunks):
        yield chunk_inputs, chunk_targets, len(chunk_targets) / len(targets), index == len(chunks) - 1


def non_finite_error(step: int, paths: "RunFolder") -> UserError:
    kept = f"the last good checkpoint {paths.last} is kept" if paths.last.exists() else "no checkpoint had been written yet"
    return UserError(
        f"the training loss became NaN or infinite at step {step}; {kept}. Try a lower optim.lr, "
        "optim.clip_grad_norm = 1.0, or train.precision = 'bf16' instead of 'fp16'"
    )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # The run may resume on a machine that sees fewer GPUs than the one that saved it.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def make_loaders(data: DataBundle, recipe: Recipe, batch_size: int, device: torch.device, world: World):
    """(train loader, its sampler, val loader) yielding `batch_size` images per process: on
    the device for small fixed-size datasets, else DataLoaders with workers."""
    shard = dict(rank=world.rank, world_size=world.size)
    in_memory = recipe.data.in_memory == "on" or (recipe.data.in_memory == "auto" and data.augmentation is not None)
    if not in_memory:
        pin_memory = device.type == "cuda"
        train_loader, sampler = make_train_loader(
            data.train, global_batch=recipe.data.batch_size, seed=recipe.train.seed, workers=recipe.data.workers,
            pin_memory=pin_memory, **shard,
        )  # fmt: skip
        val_loader = make_eval_loader(
            data.val, batch_size=batch_size, workers=recipe.data.workers,
            pin_memory=pin_memory, **shard,
        )  # fmt: skip
        return train_loader, sampler, val_loader
    if data.augmentation is None:
        per_image = recipe.data.auto_augment != "none" or recipe.data.random_erasing > 0
        reason = "data.auto_augment and data.random_erasing run per image" if per_image else (
            f"it is for small fixed-size datasets, which {data.info.name} is not"
        )
        raise UserError(f"data.in_memory = 'on' cannot be used: {reason}; set data.in_memory = 'auto' or 'off'")
    info = data.info
    sampler = EpochSampler(len(data.train), recipe.train.seed, global_batch=recipe.data.batch_size, **shard)
    train_images, train_labels = load_uint8(data.train, info.image_size, device)
    val_images, val_labels = load_uint8(data.val, info.image_size, device)
    normalize = dict(mean=info.mean, std=info.std)
    train_loader = InMemoryLoader(
        train_images, train_labels, batch_size=batch_size, sampler=sampler,
        augmentation=data.augmentation, seed=recipe.train.seed, **normalize,
    )  # fmt: skip
    # Process r evaluates images r, r + N, ...: each once, as with the DataLoader path.
    val_loader = InMemoryLoader(
        val_images[world.rank :: world.size], val_labels[world.rank :: world.size],
        batch_size=batch_size, **normalize,
    )  # fmt: skip
    return train_loader, sampler, val_loader


def fit(
    recipe: Recipe,
    run_dir: Path,
    *,
    reporter: Reporter,
    device: str | None = None,
    resume: bool = False,
    world: World = World(),
    recipe_name: str = "",
) -> dict[str, Any]:
    """Train `recipe` into `run_dir`; with `resume`, continue from its last checkpoint.

    Under torchrun (`world`), every process runs this function; only the main one
    reports and writes files.
    """
    paths = RunFolder(Path(run_dir))
    train, data_recipe = recipe.train, recipe.data
    device_ = distributed.local_device(runtime.resolve_device(device or train.device), world)
    precision = runtime.resolve_precision(train.precision, device_, "train.precision")
    channels_last = runtime.resolve_channels_last(train.channels_last, device_)
    # Each process draws its own augmentation; DDP copies rank 0's initial weights to all.
    runtime.seed_everything(train.seed + world.rank, train.deterministic)
    per_process_batch = distributed.per_process_batch(data_recipe.batch_size, world)
    if train.accumulate_steps > per_process_batch:
        raise UserError(
            f"train.accumulate_steps = {train.accumulate_steps} is more micro-batches than the {per_process_batch} "
            f"images each of the {world.size} processes gets per step: lower it, or raise data.batch_size"
        )
    if recipe.log.tensorboard and world.is_main:
        require_tensorboard()  # before any work: the run would fail at its first epoch's end

    # Under torchrun the main process downloads alone; the others wait, then read its copy.
    with distributed.main_process_first(world):
        data = build_data(
            data_recipe.dataset,
            root=Path(data_recipe.root),
            download=data_recipe.download and world.is_main,
            image_size=data_recipe.image_size,
            augment=data_recipe.augment,
            val_split=data_recipe.val_split,
            auto_augment=data_recipe.auto_augment,
            random_erasing=data_recipe.random_erasing,
        )
    info = data.info
    if len(data.train) < data_recipe.batch_size:
        raise UserError(
            f"data.batch_size = {data_recipe.batch_size} is larger than the {len(data.train)} training images "
            f"of {info.name}: lower data.batch_size"
        )
    model = create_model(
        recipe.model.name, num_classes=info.num_classes, in_chans=info.in_chans, **recipe.model_overrides()
    )
    pretrained = None
    if recipe.model.pretrained and not resume:  # a resumed run has its own weights
        from gtrain.pretrained import load_pretrained

        pretrained = load_pretrained(model, Path(recipe.model.pretrained))
    model.to(device_)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained_model = distributed.wrap(model, train.sync_bn, device_, world)
    # After the wrap: DDP has given every process the main process's initial weights.
    ema = WeightEMA(model, train.ema_decay) if train.ema_decay else None
    # Compiled for speed, while checkpoints keep reading the plain module's state_dict.
    step_model = torch.compile(trained_model) if train.compile else trained_model
    eval_model = torch.compile(model) if train.compile else model
    mix = batch_mix(mixup_alpha=data_recipe.mixup_alpha, cutmix_alpha=data_recipe.cutmix_alpha, num_classes=info.num_classes)

    train_loader, sampler, val_loader = make_loaders(data, recipe, per_process_batch, device_, world)
    steps_per_epoch = len(data.train) // data_recipe.batch_size
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, epochs=train.epochs, optim=recipe.optim)
    scaler = torch.amp.GradScaler(device_.type, enabled=precision == "fp16")
    progress = Progress()

    if resume:
        state = load_state(paths.last)
        check_resumable(state, recipe, paths)
        load_into(model, state["model"], paths.last)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        progress = Progress(**state["progress"])
        progress.stopped_early = False  # check_resumable let it go on
        set_rng_state(state["rng"])
        if world.rank:  # the checkpoint holds the main process's random state; others branch off it
            torch.manual_seed(train.seed + 1_000_003 * world.rank + progress.epoch * steps_per_epoch + progress.step_in_epoch)
    if world.is_main:
        write_text_atomic(paths.recipe, recipe.to_toml())
    metrics_log = MetricsLog(paths, tensorboard=recipe.log.tensorboard, enabled=world.is_main)
    status = RunStatus(
        paths,
        {"recipe": recipe_name, "model": recipe.model.name, "dataset": info.name, "epochs": train.epochs},
        enabled=world.is_main,
    )

    meta = WeightsMeta(
        model=recipe.model.name,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        image_size=info.image_size,
        mean=info.mean,
        std=info.std,
        class_names=info.class_names,
        dataset=info.name,
        model_settings=recipe.model_overrides(),
    )

    def checkpoint() -> None:
        if not world.is_main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": vars(progress),
            "rng": rng_state(),
            "recipe": recipe.to_dict(),
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_state(paths.last, state)

    params = sum(p.numel() for p in model.parameters())
    micro = -(-per_process_batch // train.accumulate_steps)
    facts = {
        "model": f"{recipe.model.name} ({params / 1e6:.2f}M parameters)",
        "dataset": f"{info.name}: {len(data.train):,} train / {len(data.val):,} val images, "
        f"{info.num_classes} classes, {info.in_chans}x{info.image_size}x{info.image_size}",
        "device": f"{device_} ({precision}, {'channels_last' if channels_last else 'NCHW'}"
        + (", compiled" if train.compile else "") + ")",
        "batch": f"{data_recipe.batch_size} x {steps_per_epoch} steps per epoch"
        + (f" ({world.size} processes x {per_process_batch})" if world.distributed else ""),
        "epochs": f"{train.epochs}" + (f" (resuming after epoch {progress.epoch}, step {progress.step_in_epoch})" if resume else ""),
        "output": str(paths.root),
    }
    if train.accumulate_steps > 1:
        facts["batch"] = (
            f"effective {data_recipe.batch_size} x {steps_per_epoch} steps per epoch: "
            + (f"{world.size} processes x " if world.distributed else "")
            + f"{train.accumulate_steps} accumulated micro-batches of {micro}"
        )
    if pretrained is not None:
        facts["pretrained"] = pretrained.describe()
    if ema is not None:
        facts["ema"] = f"decay {train.ema_decay} per step (best_ema / final_ema.safetensors)"
    reporter.start(facts)

    run_start = time.perf_counter() - progress.elapsed_s
    with recording(status), StopRequest() as stop, contextlib.closing(metrics_log):
        status.update(
            status="running", epochs_done=progress.epoch, elapsed_s=progress.elapsed_s,
            best_top1=progress.best_top1 if progress.history else None, best_epoch=progress.best_epoch or None,
        )  # fmt: skip
        for epoch in range(progress.epoch, train.epochs):
            reporter.epoch_start(epoch + 1, train.epochs, steps_per_epoch, progress.step_in_epoch)
            while progress.step_in_epoch < steps_per_epoch:
                sampler.set_epoch(epoch, start_step=progress.step_in_epoch)
                try:
                    segment = train_steps(
                        step_model, train_loader, optimizer, scheduler, scaler,
                        device=device_, precision=precision, channels_last=channels_last,
                        label_smoothing=train.label_smoothing, clip_grad_norm=recipe.optim.clip_grad_norm,
                        accumulate_steps=train.accumulate_steps, mix=mix, ema=ema,
                        first_step=progress.step_in_epoch, steps_per_epoch=steps_per_epoch,
                        global_step=epoch * steps_per_epoch + progress.step_in_epoch,
                        reporter=reporter, pause_after_s=train.checkpoint_minutes * 60, stop=stop, world=world,
                    )  # fmt: skip
                except NonFiniteLoss as fault:
                    raise non_finite_error(fault.step, paths) from None
                progress.step_in_epoch += segment.steps
                progress.epoch_loss_sum += segment.loss_sum
                progress.epoch_images += segment.images
                progress.epoch_seconds += segment.seconds
                progress.epoch_data_wait_s += segment.data_wait_s
                if progress.step_in_epoch < steps_per_epoch:  # paused within the epoch
                    progress.elapsed_s = time.perf_counter() - run_start
                    checkpoint()
                    if segment.stopped:
                        reporter.close()
                        raise Interrupted(stop.signum or signal.SIGTERM)

            evaluation = dict(
                loader=val_loader, num_classes=info.num_classes, device=device_,
                precision=precision, channels_last=channels_last, world=world,
            )  # fmt: skip
            result = evaluate(eval_model, **evaluation)
            result_ema = evaluate(ema.module, **evaluation) if ema is not None else None
            row = EpochRow(
                epoch=epoch + 1, epochs=train.epochs, train_loss=progress.epoch_loss_sum / steps_per_epoch,
                val_loss=result.loss, val_top1=result.top1, val_top5=result.top5,
                lr=optimizer.param_groups[0]["lr"], images_per_s=progress.epoch_images / progress.epoch_seconds,
                data_wait_fraction=progress.epoch_data_wait_s / progress.epoch_seconds,
                seconds=progress.epoch_seconds + result.seconds + (result_ema.seconds if result_ema else 0.0),
                val_loss_ema=result_ema.loss if result_ema else None,
                val_top1_ema=result_ema.top1 if result_ema else None,
            )  # fmt: skip
            reporter.epoch_end(row)
            progress.epoch = epoch + 1
            progress.step_in_epoch, progress.epoch_loss_sum, progress.epoch_images = 0, 0.0, 0
            progress.epoch_seconds = progress.epoch_data_wait_s = 0.0
            progress.elapsed_s = time.perf_counter() - run_start
            progress.history.append(row.to_record())
            metrics_log.write(progress.history)
            if result.top1 > progress.best_top1:
                progress.best_top1, progress.best_epoch = result.top1, epoch + 1
                if world.is_main:
                    save_weights(paths.best, model, meta)
            if result_ema is not None and result_ema.top1 > progress.best_top1_ema:
                progress.best_top1_ema, progress.best_epoch_ema = result_ema.top1, epoch + 1
                if world.is_main:
                    save_weights(paths.best_ema, ema.module, meta)
            # Every process computed the same top-1 (reduced over all), so all stop together.
            patience = train.early_stopping_patience
            progress.stopped_early = patience is not None and progress.epoch - progress.best_epoch >= patience
            checkpoint()
            status.update(
                epochs_done=progress.epoch, best_top1=progress.best_top1, best_epoch=progress.best_epoch,
                elapsed_s=progress.elapsed_s,
            )  # fmt: skip
            if progress.stopped_early:
                break
            last_epoch = epoch + 1 == train.epochs  # then finish: only the final weights are left to write
            if not last_epoch and distributed.agree([bool(stop)], device_, world)[0]:
                raise Interrupted(stop.signum or signal.SIGTERM)

        if world.is_main:
            save_weights(paths.final, model, meta)
            if ema is not None:
                save_weights(paths.final_ema, ema.module, meta)
        status.update(status="finished", stopped_early=progress.stopped_early)
    summary = {
        "best top-1": f"{progress.best_top1:.2%} (epoch {progress.best_epoch})",
        "final top-1": f"{progress.history[-1]['val_top1']:.2%}" if progress.history else "-",
    }
    if ema is not None:
        summary["best EMA top-1"] = f"{progress.best_top1_ema:.2%} (epoch {progress.best_epoch_ema})"
    if progress.stopped_early:
        summary["stopped early"] = (
            f"after epoch {progress.epoch} of {train.epochs}: no better top-1 for {train.early_stopping_patience} epochs"
        )
    summary.update({"time": format_seconds(progress.elapsed_s), "written to": str(paths.root)})
    reporter.summary(summary)
    return {
        "best_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        "epochs": progress.epoch,
        "stopped_early": progress.stopped_early,
        "seconds": progress.elapsed_s,
        "run_dir": str(paths.root),
    }


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


@contextlib.contextmanager
def recording(status: RunStatus):
    """Leave run.json saying how the run ended, whatever ended it."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        status.update(status="interrupted")
        raise
    except BaseException as error:
        # The last line: from a DataLoader worker, the message carries the worker's traceback.
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        status.update(status="failed", error=lines[-1].strip())
        raise
