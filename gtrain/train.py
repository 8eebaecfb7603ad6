"""`gtrain fit`: a recipe becomes a run, and the run is trained epoch by epoch.

`fit` reads top to bottom: set up, then for each epoch train it and end it (validate,
log, keep the best weights, checkpoint), then finish. `train_steps` is the loop itself:
batch, mix, step, log, pause or checkpoint. What the run trains and where it stands lives
in `TrainingRun` (gtrain/training_run.py), whose `train_step` takes each optimizer step;
precision, memory format, distribution and progress are small helpers they call.

An epoch may be trained in several segments: a segment ends at the epoch's end, at a
stop signal or after `train.checkpoint_minutes`; the run is checkpointed between
segments, so continuing after a pause and resuming after a crash take the same path.
"""

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import ValidationError
from torch import nn

from gtrain import distributed, faults, runtime
from gtrain.checkpoint import WeightsMeta, load_state, save_state, save_weights
from gtrain.files import write_text_atomic
from gtrain.data import DatasetInfo, Pipeline, batch_mix, build_data
from gtrain.data.loaders import EpochSampler, build_loaders
from gtrain.data.randomness import BATCH_STREAM, drawn_from
from gtrain.distributed import World
from gtrain.errors import UserError, error_line
from gtrain.evaluate import evaluate
from gtrain.progress import EpochRow, Reporter, format_seconds
from gtrain.recipe import SAFE_TO_CHANGE_ON_RESUME, Recipe, load_recipe, unsafe_changes
from gtrain.run_folder import MetricsLog, RunFolder, RunStatus, require_tensorboard
from gtrain.run_lock import RunLock
from gtrain.training_run import EpochTotals, StepSettings, TrainingRun, build_training_run, rng_state, set_rng_state

# The exit code of a run that stopped with a checkpoint to continue from, for a reason that
# is not the user's (preemption, a lost process): sysexits' EX_TEMPFAIL, "try again". The
# same command with --auto-resume, or --resume DIR, continues it.
RESUMABLE_EXIT_CODE = 75


class StopRequest:
    """First SIGINT, SIGTERM or SIGUSR1 (what schedulers send before they preempt a job):
    finish the current step, checkpoint, exit. Second SIGINT: stop at once (the checkpoint
    on disk is still the previous, intact one)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
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
        # Ctrl-C keeps the shell's 130; a scheduler's signal says "resumable".
        self.exit_code = 130 if signum == signal.SIGINT else RESUMABLE_EXIT_CODE
        super().__init__(signal.Signals(signum).name)


AGREE_EVERY_GPU_STEPS = 16


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        self.step = step


@dataclass(frozen=True)
class LoopSettings:
    """How the loop around the steps runs: fixed when the run is set up."""

    step: StepSettings  # how each optimizer step is taken
    channels_last: bool
    mix: Any  # MixUp / CutMix of a batch on the device, or None
    seed: int  # of the run: the batches' draws for `mix` come from it
    steps_per_epoch: int
    pause_after_s: float  # end a segment this long after it began, to checkpoint
    checkpoint_steps: int | None  # and after every this many steps of the run
    world: World


def train_steps(
    run: TrainingRun, loader, settings: LoopSettings, *, first_step: int, global_step: int, reporter: Reporter,
    stop: "StopRequest",
) -> tuple[EpochTotals, bool]:  # fmt: skip
    """Train from step `first_step` of the epoch to its end, or until a stop request (then the
    second value is True, on every process), `settings.pause_after_s` seconds or a multiple of
    `settings.checkpoint_steps`; the caller checkpoints and calls again."""
    device, world, steps_per_epoch = settings.step.device, settings.world, settings.steps_per_epoch
    run.step_model.train()
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
        inputs, targets = runtime.to_device(inputs, targets, device, settings.channels_last)
        if settings.mix is not None:
            # Drawn from the batch's own stream: the same on a resumed run, whatever ran before.
            with drawn_from(settings.seed, global_step + steps, world.rank, BATCH_STREAM):
                inputs, targets = settings.mix(inputs, targets)  # targets become soft labels (N, classes)
        loss = run.train_step(inputs, targets, settings.step)

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
            eta_s = (steps_per_epoch - step) * (now - start) / steps
            reporter.step(step, loss.item(), run.lr, images / (now - start), eta_s)
        # Every process must leave at the same step, or the next collective deadlocks. Agreeing
        # is an all-reduce plus, on GPUs, a host sync that drains the kernel queue: there it is
        # done every few steps (the same steps on every process, counted within the epoch).
        if device.type == "cpu" or step % AGREE_EVERY_GPU_STEPS == 0 or step == steps_per_epoch:
            bad = world.distributed and first_bad_step.item() >= 0
            stopped, paused, bad = distributed.agree([bool(stop), now - start > settings.pause_after_s, bad], device, world)
            if bad:
                raise NonFiniteLoss(first_bad_step.item())
            if stopped or paused:
                break
        # The same step on every process: no need to agree on it.
        if settings.checkpoint_steps and (global_step + steps) % settings.checkpoint_steps == 0:
            break
        step_end = time.perf_counter()
    if first_bad_step.item() >= 0:
        raise NonFiniteLoss(first_bad_step.item())
    # Under torchrun: the loss over all processes' images, and all of their images.
    loss_sum = distributed.all_reduce_sum(loss_sum, world) / world.size
    totals = EpochTotals(steps, loss_sum.item(), images * world.size, time.perf_counter() - start, data_wait_s)
    return totals, stopped


class DivergedError(UserError):
    """The loss became NaN or infinite: the recipe's settings, not its data, are at fault
    (`gtrain tune` records the trial as failed and goes on)."""


def non_finite_error(step: int, paths: RunFolder) -> UserError:
    kept = f"the last good checkpoint {paths.last} is kept" if paths.last.exists() else "no checkpoint had been written yet"
    return DivergedError(
        f"the training loss became NaN or infinite at step {step}; {kept}. Try a lower optim.lr, "
        "optim.clip_grad_norm = 1.0, or train.precision = 'bf16' instead of 'fp16'"
    )


# ---------------------------------------------------------------------------------------
# fit: set up, train and end each epoch, finish


@dataclass(frozen=True)
class FitPlan:
    """What `gtrain fit` was asked for, before it holds the run folder."""

    recipe: Recipe
    paths: RunFolder
    recipe_name: str  # "" for a --resume, whose recipe is the folder's
    # "new": refuse a folder that holds a run; "continue": continue it (--resume);
    # "either": continue it if it holds one, else start it (--auto-resume, a launcher's restart).
    start: Literal["new", "continue", "either"]
    notice: str | None = None  # a line the command prints before it starts


def plan_fit(
    recipe: str | None, overrides: list[str], *, out: Path | None, resume: Path | None, auto_resume: bool = False
) -> FitPlan:
    """What `gtrain fit` trains and where: a new run of `recipe` (default: quickstart) in
    `out` (default: runs/<recipe>-<start time>); with `resume` the run in that folder, with
    its own recipe; with `auto_resume`, or when torchrun or SLURM restarted the job, the run
    in `out` if it has started, else a new one."""
    if resume is not None:
        if recipe is not None or out is not None:
            raise UserError(
                "--resume RUN_DIR continues that folder with its own recipe.toml: give no recipe and no --out with it"
            )
        paths = RunFolder(resume)
        if not paths.recipe.is_file():
            raise UserError(f"{resume} is not a gtrain run folder (no recipe.toml): give the folder `gtrain fit` wrote")
        loaded, _ = load_recipe(str(paths.recipe), overrides)
        return FitPlan(loaded, paths, "", "continue")
    if auto_resume and out is None:
        raise UserError(
            "--auto-resume continues the folder given by --out, and without --out every run gets a new folder: "
            "add --out DIR"
        )
    loaded, name = load_recipe(recipe or "quickstart", overrides)
    if out is None:
        paths = RunFolder.new_default(name)
        notice = None
        if distributed.restart_count():
            notice = (
                f"this is restart {distributed.restart_count()} of the job, but without --out there is no folder to "
                f"continue: starting over in {paths.root} (give --out DIR to continue instead)"
            )
        return FitPlan(loaded, paths, name, "new", notice)
    restarted = distributed.restart_count() > 0
    return FitPlan(loaded, RunFolder(out), name, "either" if auto_resume or restarted else "new")


# Called after each epoch with its number (from 1) and validation top-1; a reason returned
# ends the run there, as early stopping does (`gtrain tune` prunes trials with it).
EpochEnd = Callable[[int, float], str | None]


def fit(plan: FitPlan, *, reporter: Reporter, device: str | None = None, epoch_end: EpochEnd | None = None) -> dict[str, Any]:
    """Train the run `plan` describes, holding its folder; continue it from its last
    checkpoint when the plan says so.

    Under torchrun or srun every process runs this function, in the process group it joins
    here; only the main one holds the folder's lock, reports and writes files.
    """
    recipe = plan.recipe
    device_ = runtime.resolve_device(device or recipe.train.device)
    world = distributed.init(device_)
    lock: RunLock | None = None
    peer_lost = False
    try:
        with distributed.peers_watched(world):
            paths = distributed.broadcast_object(plan.paths, world)  # one start time in the folder's name for all
            lock = RunLock(paths)
            resume = distributed.decided_by_main(lambda: hold_and_decide(plan, paths, lock), world)
            if resume == "finished":
                reporter.summary({"nothing to do": f"{paths.root} has finished its {recipe.train.epochs} epochs"})
                return {"run_dir": str(paths.root), "already_finished": True}
            if lock.unlocked_because:
                reporter.notice(f"{lock.unlocked_because}: nothing stops a second process training into it")
            job = set_up(recipe, paths, reporter, device=distributed.local_device(device_, world), resume=resume,
                         world=world, recipe_name=plan.recipe_name)  # fmt: skip
            return train_and_finish(job, resume, epoch_end)
    except distributed.LostPeer:
        peer_lost = True  # the group cannot be torn down cleanly without its peer
        raise
    finally:
        if lock is not None:
            lock.release()
        if not peer_lost:
            distributed.shutdown(world)


def hold_and_decide(plan: FitPlan, paths: RunFolder, lock: RunLock) -> bool | str:
    """Lock the run folder, then decide under the lock: True to continue its run, False to
    start one, "finished" when an auto-resumed run has nothing left to do."""
    lock.acquire()
    if plan.start == "continue":
        return True
    if not paths.holds_a_run():
        return False
    if plan.start == "new":
        raise UserError(
            f"{paths.root} already holds a run: continue it with --resume {paths.root} (or the same command with "
            "--auto-resume), or pick another --out"
        )
    status = RunStatus.read(paths)
    if paths.final.exists() and status.get("status") == "finished" and status.get("epochs_done", 0) >= plan.recipe.train.epochs:
        return "finished"
    return True


def train_and_finish(job: "FitSetup", resume: bool, epoch_end: EpochEnd | None = None) -> dict[str, Any]:
    recipe, reporter, world = job.recipe, job.reporter, job.world
    progress = job.run.progress
    reporter.start(start_facts(job, resume))
    run_start = time.perf_counter() - progress.elapsed_s
    # peers_watched inside recording: run.json then says that a process was lost (fit's own
    # watch covers the set-up, before there is a run.json).
    with recording(job.status), distributed.peers_watched(world), StopRequest() as stop, contextlib.closing(job.metrics_log):
        job.status.update(
            status="running", epochs_done=progress.epoch, elapsed_s=progress.elapsed_s,
            best_top1=progress.best_top1 if progress.history else None, best_epoch=progress.best_epoch or None,
        )  # fmt: skip
        stopped_by = None
        for epoch in range(progress.epoch, recipe.train.epochs):
            train_epoch(job, epoch, stop, run_start)
            top1 = end_epoch(job, epoch, run_start)
            if progress.stopped_early:
                break
            stopped_by = epoch_end(epoch + 1, top1) if epoch_end is not None else None
            if stopped_by:
                job.status.update(stopped=stopped_by)
                break
            last_epoch = epoch + 1 == recipe.train.epochs  # then finish: only the final weights are left to write
            if not last_epoch and distributed.agree([bool(stop)], job.settings.step.device, world)[0]:
                raise Interrupted(stop.signum or signal.SIGTERM)
        job.save_weights(job.paths.final, job.run.model)
        if job.run.ema is not None:
            job.save_weights(job.paths.final_ema, job.run.ema.module)
        job.status.update(status="finished", stopped_early=progress.stopped_early)
    return summarize(job, stopped_by)


@dataclass
class FitSetup:
    """One `gtrain fit`, ready to train: the run, how it steps, its data and its records."""

    recipe: Recipe
    paths: RunFolder
    world: World
    reporter: Reporter
    run: TrainingRun
    settings: LoopSettings
    info: DatasetInfo
    train_images: int
    val_images: int
    pipeline: Pipeline  # how the training images are read, augmented, batched and finished
    loaders: tuple[Any, EpochSampler, Any]  # train loader, its sampler, val loader
    meta: WeightsMeta  # what every saved weights file says about itself
    metrics_log: MetricsLog
    status: RunStatus
    pretrained: Any = None  # the report of model.pretrained's loading, or None

    def checkpoint(self) -> None:
        # Every process's random state goes in, so that each continues its own augmentation.
        rng_of_ranks = distributed.gather_object(rng_state(), self.world) if self.world.distributed else None
        if self.world.is_main:
            save_state(self.paths.last, self.run.state_dict(rng_of_ranks))

    def save_weights(self, path: Path, module: nn.Module) -> None:
        if self.world.is_main:
            save_weights(path, module, self.meta)


def set_up(
    recipe: Recipe, paths: RunFolder, reporter: Reporter, *, device: torch.device, resume: bool, world: World,
    recipe_name: str,
) -> FitSetup:  # fmt: skip
    train, device_ = recipe.train, device
    # Each process draws its own augmentation; DDP copies rank 0's initial weights to all.
    runtime.seed_everything(train.seed + world.rank, train.deterministic)
    check_batch_split(recipe, world)
    if recipe.log.tensorboard and world.is_main:
        require_tensorboard()  # before any work: the run would fail at its first epoch's end

    data = load_data(recipe, world)
    info = data.info
    steps_per_epoch = len(data.train) // recipe.data.batch_size
    channels_last = runtime.resolve_channels_last(train.channels_last, device_)
    run, pretrained = build_training_run(
        recipe, num_classes=info.num_classes, in_chans=info.in_chans, steps_per_epoch=steps_per_epoch, device=device_,
        channels_last=channels_last, world=world, pretrained=bool(recipe.model.pretrained) and not resume,
    )  # fmt: skip
    loaders = build_loaders(
        data, global_batch=recipe.data.batch_size, seed=train.seed,
        workers=recipe.data.workers, device=device_, world=world,
    )  # fmt: skip
    step = StepSettings(
        device=device_, precision=runtime.resolve_precision(train.precision, device_, "train.precision"),
        label_smoothing=train.label_smoothing, clip_grad_norm=recipe.optim.clip_grad_norm,
        accumulate_steps=train.accumulate_steps,
    )  # fmt: skip
    settings = LoopSettings(
        step=step, channels_last=channels_last, steps_per_epoch=steps_per_epoch, seed=train.seed, world=world,
        mix=batch_mix(mixup_alpha=recipe.data.mixup_alpha, cutmix_alpha=recipe.data.cutmix_alpha, num_classes=info.num_classes),
        pause_after_s=train.checkpoint_minutes * 60, checkpoint_steps=train.checkpoint_steps,
    )  # fmt: skip
    if resume:
        resume_run(run, recipe, paths, world, steps_per_epoch)
    if world.is_main:
        write_text_atomic(paths.recipe, recipe.to_toml())
    facts = {"recipe": recipe_name, "model": recipe.model.name, "dataset": info.name, "epochs": train.epochs}
    meta = WeightsMeta(
        model=recipe.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
        image_size=recipe.data.eval_image_size or info.image_size, resize_size=recipe.data.eval_resize_size,
        mean=info.mean, std=info.std, class_names=info.class_names, dataset=info.name,
        model_settings=recipe.model_overrides(), interpolation=recipe.data.interpolation,
    )  # fmt: skip
    return FitSetup(
        recipe=recipe, paths=paths, world=world, reporter=reporter, run=run, settings=settings, info=info,
        train_images=len(data.train), val_images=len(data.val), pipeline=data.pipeline, loaders=loaders, meta=meta,
        metrics_log=MetricsLog(paths, tensorboard=recipe.log.tensorboard, enabled=world.is_main),
        status=RunStatus(paths, facts, enabled=world.is_main), pretrained=pretrained,
    )  # fmt: skip


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


def load_data(recipe: Recipe, world: World):
    data_recipe = recipe.data
    # Under torchrun the main process downloads alone; the others wait, then read its copy.
    with distributed.main_process_first(world):
        data = build_data(
            data_recipe.dataset, root=Path(data_recipe.root), download=data_recipe.download and world.is_main,
            image_size=data_recipe.image_size, augment=data_recipe.augment, val_split=data_recipe.val_split,
            auto_augment=data_recipe.auto_augment, random_erasing=data_recipe.random_erasing,
            random_erasing_fill=data_recipe.random_erasing_fill, interpolation=data_recipe.interpolation,
            eval_image_size=data_recipe.eval_image_size, eval_resize_size=data_recipe.eval_resize_size,
            decode=data_recipe.decode, in_memory=data_recipe.in_memory,
        )  # fmt: skip
    if len(data.train) < data_recipe.batch_size:
        raise UserError(
            f"data.batch_size = {data_recipe.batch_size} is larger than the {len(data.train)} training images "
            f"of {data.info.name}: lower data.batch_size"
        )
    return data


def resume_run(run: TrainingRun, recipe: Recipe, paths: RunFolder, world: World, steps_per_epoch: int) -> None:
    state = load_state(paths.last)
    run.check_state(state, paths.last)
    check_resumable(state, recipe, paths)
    run.load_state_dict(state, paths.last)
    progress = run.progress
    progress.stopped_early = False  # check_resumable let it go on
    if world.rank:  # the others' random states: their own, or on another world size a branch off the main one's
        saved = state.get("rng_of_ranks")
        if saved is not None and len(saved) == world.size:
            set_rng_state(saved[world.rank])
        else:
            step = progress.epoch * steps_per_epoch + progress.this_epoch.steps
            runtime.seed_everything(recipe.train.seed + 1_000_003 * world.rank + step, recipe.train.deterministic)


def start_facts(job: FitSetup, resume: bool) -> dict[str, str]:
    """The start panel: what is trained, on what, how, and where it is written."""
    recipe, info, settings, world = job.recipe, job.info, job.settings, job.world
    batch, accumulate = recipe.data.batch_size, settings.step.accumulate_steps
    per_process = batch // world.size
    params = sum(p.numel() for p in job.run.model.parameters())
    progress = job.run.progress
    facts = {
        "model": f"{recipe.model.name} ({params / 1e6:.2f}M parameters)",
        "dataset": f"{info.name}: {job.train_images:,} train / {job.val_images:,} val images, "
        f"{info.num_classes} classes, {info.in_chans}x{info.image_size}x{info.image_size}",
        "data": f"{job.pipeline}: {job.pipeline.description}"
        + ("" if job.pipeline == Pipeline.IN_MEMORY else f", {recipe.data.workers} workers"),
        "device": f"{settings.step.device} ({settings.step.precision}, {'channels_last' if settings.channels_last else 'NCHW'}"
        + (", compiled" if recipe.train.compile else "") + ")",
        "batch": f"{batch} x {settings.steps_per_epoch} steps per epoch"
        + (f" ({world.size} processes x {per_process})" if world.distributed else ""),
        "epochs": f"{recipe.train.epochs}"
        + (f" (resuming after epoch {progress.epoch}, step {progress.this_epoch.steps})" if resume else ""),
        "output": str(job.paths.root),
    }
    if accumulate > 1:
        facts["batch"] = (
            f"effective {batch} x {settings.steps_per_epoch} steps per epoch: "
            + (f"{world.size} processes x " if world.distributed else "")
            + f"{accumulate} accumulated micro-batches of {-(-per_process // accumulate)}"
        )
    if job.pretrained is not None:
        facts["pretrained"] = job.pretrained.describe()
    if job.run.ema is not None:
        facts["ema"] = f"decay {recipe.train.ema_decay} per step (best_ema / final_ema.safetensors)"
    return facts


def train_epoch(job: FitSetup, epoch: int, stop: "StopRequest", run_start: float) -> None:
    """Train the rest of `epoch`, in segments with a checkpoint between them."""
    run, settings, progress = job.run, job.settings, job.run.progress
    train_loader, sampler, _ = job.loaders
    job.reporter.epoch_start(epoch + 1, job.recipe.train.epochs, settings.steps_per_epoch, progress.this_epoch.steps)
    while progress.this_epoch.steps < settings.steps_per_epoch:
        done = progress.this_epoch.steps
        sampler.set_epoch(epoch, start_step=done)
        try:
            segment, stopped = train_steps(
                run, train_loader, settings, first_step=done, global_step=epoch * settings.steps_per_epoch + done,
                reporter=job.reporter, stop=stop,
            )  # fmt: skip
        except NonFiniteLoss as fault:
            raise non_finite_error(fault.step, job.paths) from None
        progress.this_epoch += segment
        if progress.this_epoch.steps < settings.steps_per_epoch:  # paused within the epoch
            progress.elapsed_s = time.perf_counter() - run_start
            job.checkpoint()
            if stopped:
                job.reporter.close()
                raise Interrupted(stop.signum or signal.SIGTERM)


def end_epoch(job: FitSetup, epoch: int, run_start: float) -> float:
    """Validate, log, keep the best weights, decide on early stopping, checkpoint; return
    the validation top-1."""
    run, settings, progress = job.run, job.settings, job.run.progress
    evaluation = dict(
        loader=job.loaders[2], num_classes=job.info.num_classes, device=settings.step.device,
        precision=settings.step.precision, channels_last=settings.channels_last, world=job.world,
    )  # fmt: skip
    distributed.share_main_buffers(run.model, job.world)
    if run.ema is not None:
        distributed.share_main_buffers(run.ema.module, job.world)
    result = evaluate(run.eval_model, **evaluation)
    result_ema = evaluate(run.ema.module, **evaluation) if run.ema is not None else None
    totals = progress.this_epoch
    row = EpochRow(
        epoch=epoch + 1, epochs=job.recipe.train.epochs, train_loss=totals.loss_sum / settings.steps_per_epoch,
        val_loss=result.loss, val_top1=result.top1, val_top5=result.top5, lr=run.lr,
        images_per_s=totals.images / totals.seconds, data_wait_fraction=totals.data_wait_s / totals.seconds,
        seconds=totals.seconds + result.seconds + (result_ema.seconds if result_ema else 0.0),
        val_loss_ema=result_ema.loss if result_ema else None, val_top1_ema=result_ema.top1 if result_ema else None,
    )  # fmt: skip
    job.reporter.epoch_end(row)
    progress.end_epoch(row.to_record())
    progress.elapsed_s = time.perf_counter() - run_start
    job.metrics_log.write(progress.history)
    if result.top1 > progress.best_top1:
        progress.best_top1, progress.best_epoch = result.top1, epoch + 1
        job.save_weights(job.paths.best, run.model)
    if result_ema is not None and result_ema.top1 > progress.best_top1_ema:
        progress.best_top1_ema, progress.best_epoch_ema = result_ema.top1, epoch + 1
        job.save_weights(job.paths.best_ema, run.ema.module)
    # Every process computed the same top-1 (reduced over all), so all stop together.
    patience = job.recipe.train.early_stopping_patience
    progress.stopped_early = patience is not None and progress.epoch - progress.best_epoch >= patience
    job.checkpoint()
    job.status.update(
        epochs_done=progress.epoch, best_top1=progress.best_top1, best_epoch=progress.best_epoch,
        elapsed_s=progress.elapsed_s,
    )  # fmt: skip
    return result.top1


def summarize(job: FitSetup, stopped_by: str | None = None) -> dict[str, Any]:
    """Print the summary panel; return what `fit` returns."""
    progress, train = job.run.progress, job.recipe.train
    summary = {
        "best top-1": f"{progress.best_top1:.2%} (epoch {progress.best_epoch})",
        "final top-1": f"{progress.history[-1]['val_top1']:.2%}" if progress.history else "-",
    }
    if job.run.ema is not None:
        summary["best EMA top-1"] = f"{progress.best_top1_ema:.2%} (epoch {progress.best_epoch_ema})"
    if progress.stopped_early:
        summary["stopped early"] = (
            f"after epoch {progress.epoch} of {train.epochs}: no better top-1 for {train.early_stopping_patience} epochs"
        )
    if stopped_by:
        summary["stopped"] = f"after epoch {progress.epoch} of {train.epochs}: {stopped_by}"
    summary.update({"time": format_seconds(progress.elapsed_s), "written to": str(job.paths.root)})
    job.reporter.summary(summary)
    return {
        "best_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        "epochs": progress.epoch,
        "stopped_early": progress.stopped_early,
        "stopped_by": stopped_by,
        "seconds": progress.elapsed_s,
        "run_dir": str(job.paths.root),
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
    except distributed.LostPeer as lost:
        status.update(status="interrupted", error=lost.message)
        raise
    except BaseException as error:
        status.update(status="failed", error=error_line(error, last=True))
        raise
