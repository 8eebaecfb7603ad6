"""`gtrain fit`: the job around the trainer.

`fit` plans the run (a new folder, or the one to continue), holds the folder's lock,
builds the `Trainer` (gtrain/trainer.py) and the run's records, catches the signals that
stop it, keeps run.json saying where the run stands, prints the start and summary panels
and writes the final weights. The training itself is `Trainer.train`.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from gtrain import distributed, runtime
from gtrain.checkpoint import WeightsMeta, load_state
from gtrain.data import DataBundle
from gtrain.distributed import World
from gtrain.errors import UserError, error_line, unreadable_file
from gtrain.files import write_text_atomic
from gtrain.hub import licence_line, with_weights_preprocessing
from gtrain.progress import Reporter, format_seconds
from gtrain.recipe import Recipe, load_recipe
from gtrain.run_folder import MetricsLog, RunFolder, RunStatus, require_tensorboard
from gtrain.run_lock import RunLock
from gtrain.stopping import RESUMABLE_EXIT_CODE, Interrupted, StopRequest
from gtrain.trainer import EpochEnd, NonFiniteLoss, RunRecords, Trainer, check_batch_split, load_data


@dataclass(frozen=True)
class FitEnding:
    """How `gtrain fit` ends when something stops it: its exit code and its line on stderr."""

    exit_code: int
    line: str
    error: bool  # shown as an error
    every_process: bool = False  # said by every process, not the main one alone


def ending_of(error: BaseException, *, run_dir: Path | None, out_given: bool) -> FitEnding | None:
    """What `gtrain fit` says and exits with after `error` (None: not one it expects)."""
    if isinstance(error, distributed.LostPeer):
        # Every survivor says it: the lost process may have been the main one.
        line = (f"{error.message}; the last checkpoint in {run_dir} is intact: torchrun --max-restarts continues it, "
                "or the same command with --auto-resume")  # fmt: skip
        return FitEnding(RESUMABLE_EXIT_CODE, line, error=True, every_process=True)
    if isinstance(error, OSError):  # an unreadable or corrupt data file, a full disk
        error = unreadable_file(error, f"nothing in {run_dir} was damaged")
    if isinstance(error, UserError):
        return FitEnding(UserError.exit_code, str(error), error=True)
    if isinstance(error, Interrupted):
        again = "the same command with --auto-resume, or: " if out_given else ""
        line = f"stopped by {error}; checkpoint saved. Continue with {again}gtrain fit --resume {run_dir}"
        return FitEnding(error.exit_code, line, error=False)
    if isinstance(error, KeyboardInterrupt):
        return FitEnding(130, f"stopped at once; the last checkpoint in {run_dir} is intact", error=False)
    return None


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
    preprocessing: str | None = None  # what [data] took from model.pretrained's weights, for the start panel


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
    loaded, preprocessing = with_weights_preprocessing(loaded)
    if out is None:
        paths = RunFolder.new_default(name)
        notice = None
        if distributed.restart_count():
            notice = (
                f"this is restart {distributed.restart_count()} of the job, but without --out there is no folder to "
                f"continue: starting over in {paths.root} (give --out DIR to continue instead)"
            )
        return FitPlan(loaded, paths, name, "new", notice, preprocessing)
    restarted = distributed.restart_count() > 0
    return FitPlan(loaded, RunFolder(out), name, "either" if auto_resume or restarted else "new", None, preprocessing)


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
            trainer, records, start = set_up(recipe, paths, reporter, device=distributed.local_device(device_, world),
                                             resume=resume, world=world, recipe_name=plan.recipe_name)  # fmt: skip
            if plan.preprocessing:
                start["preprocessing"] = plan.preprocessing
            return train_and_finish(trainer, records, start, epoch_end)
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


def train_and_finish(
    trainer: Trainer, records: RunRecords, start: dict[str, str], epoch_end: EpochEnd | None = None
) -> dict[str, Any]:
    progress, status = trainer.progress, records.status
    records.reporter.start(start)
    # peers_watched inside recording: run.json then says that a process was lost (fit's own
    # watch covers the set-up, before there is a run.json).
    with (recording(status), distributed.peers_watched(trainer.world), StopRequest() as stop,
          contextlib.closing(records.metrics_log), contextlib.closing(trainer), records.saving()):  # fmt: skip
        status.update(
            status="running", epochs_done=progress.epoch, elapsed_s=progress.elapsed_s,
            best_top1=progress.best_top1 if progress.history else None, best_epoch=progress.best_epoch or None,
        )  # fmt: skip
        try:
            stopped_by = trainer.train(records, stop, epoch_end)
        except NonFiniteLoss as fault:
            with contextlib.suppress(Exception):  # the divergence is the error to show, whatever a write did
                records.wait_for_files()  # before the line says whether a checkpoint was written
            raise non_finite_error(fault.step, records.paths) from None
        records.save_weights(records.paths.final, trainer.model)
        if trainer.ema is not None:
            records.save_weights(records.paths.final_ema, trainer.ema.module)
        records.wait_for_files()  # "finished" once the final weights are there
        ending = {"status": "finished", "stopped_early": progress.stopped_early}
        if stopped_by:
            ending["stopped"] = stopped_by
        status.update(**ending)
    report = None
    if trainer.recipe.log.report and records.is_main:
        from gtrain.report import ReportSettings, write_report

        # After the run is finished and saved: a report that fails loses no training.
        report = write_report(records.paths.root, ReportSettings(split=trainer.recipe.data.val_split,
                                                                 device=str(trainer.settings.device)))  # fmt: skip
    return summarize(trainer, records, stopped_by, report)


def set_up(
    recipe: Recipe, paths: RunFolder, reporter: Reporter, *, device: torch.device, resume: bool, world: World,
    recipe_name: str,
) -> tuple[Trainer, RunRecords, dict[str, str]]:  # fmt: skip
    """The trainer, continued from the folder's checkpoint when `resume`, its records and
    the start panel's facts."""
    train = recipe.train
    # Each process draws its own augmentation; DDP copies rank 0's initial weights to all.
    runtime.seed_everything(train.seed + world.rank, train.deterministic)
    check_batch_split(recipe, world)
    if recipe.log.tensorboard and world.is_main:
        require_tensorboard()  # before any work: the run would fail at its first epoch's end
    data = load_data(recipe, world)
    trainer = Trainer.build(recipe, data, world=world, device=device, pretrained=bool(recipe.model.pretrained) and not resume)
    if resume:
        trainer.load_state_dict(load_state(paths.last), paths)
    if world.is_main:
        write_text_atomic(paths.recipe, recipe.to_toml())
    info = data.info
    facts = {"recipe": recipe_name, "model": recipe.model.name, "dataset": info.name, "epochs": train.epochs,
             "provenance": runtime.provenance(device) if world.is_main else {}}  # fmt: skip
    meta = WeightsMeta(
        model=recipe.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
        image_size=recipe.data.eval_image_size or info.image_size, resize_size=recipe.data.eval_resize_size,
        mean=info.mean, std=info.std, class_names=info.class_names, dataset=info.name,
        model_settings=recipe.model_overrides(), interpolation=recipe.data.interpolation,
        full_decode=recipe.data.full_decode,
        eval_batch_size=distributed.per_process_batch(recipe.data.batch_size, world),  # the validation's, as build_loaders makes it
    )  # fmt: skip
    records = RunRecords(
        paths=paths, meta=meta, reporter=reporter, is_main=world.is_main,
        metrics_log=MetricsLog(paths, tensorboard=recipe.log.tensorboard, enabled=world.is_main),
        status=RunStatus(paths, facts, enabled=world.is_main),
    )  # fmt: skip
    return trainer, records, start_facts(trainer, data, paths, resume)


def start_facts(trainer: Trainer, data: DataBundle, paths: RunFolder, resume: bool) -> dict[str, str]:
    """The start panel: what is trained, on what, how, and where it is written."""
    recipe, settings, world, info = trainer.recipe, trainer.settings, trainer.world, data.info
    batch, accumulate = recipe.data.batch_size, settings.accumulate_steps
    per_process = batch // world.size
    params = sum(p.numel() for p in trainer.model.parameters())
    progress = trainer.progress
    facts = {
        "model": f"{recipe.model.name} ({params / 1e6:.2f}M parameters)",
        "dataset": f"{info.name}: {len(data.train):,} train / {len(data.val):,} val images, "
        f"{info.num_classes} classes, {info.in_chans}x{info.image_size}x{info.image_size}",
        "data": data.pipeline.label(recipe.data.workers),
        "device": f"{settings.device} ({settings.precision}, {'channels_last' if settings.channels_last else 'NCHW'}"
        + (", compiled" if recipe.train.compile else "") + ")",
        "batch": f"{batch} x {settings.steps_per_epoch} steps per epoch"
        + (f" ({world.size} processes x {per_process})" if world.distributed else ""),
        "epochs": f"{recipe.train.epochs}"
        + (f" (resuming after epoch {progress.epoch}, step {progress.this_epoch.steps})" if resume else ""),
        "output": str(paths.root),
    }
    if accumulate > 1:
        facts["batch"] = (
            f"effective {batch} x {settings.steps_per_epoch} steps per epoch: "
            + (f"{world.size} processes x " if world.distributed else "")
            + f"{accumulate} accumulated micro-batches of {-(-per_process // accumulate)}"
        )
    if trainer.pretrained is not None:
        facts["pretrained"] = trainer.pretrained.describe()
    if trainer.ema is not None:
        facts["ema"] = f"decay {recipe.train.ema_decay} per step (best_ema / final_ema.safetensors)"
    licence = licence_line(recipe.model.pretrained, recipe.model.name)
    if licence:
        facts["licence"] = licence
    if trainer.teacher is not None:
        distill = recipe.distill
        facts["teacher"] = f"{distill.teacher} (temperature {distill.temperature:g}, alpha {distill.alpha:g})"
    freeze = recipe.train.freeze_epochs
    tuning = [f"the classifier alone for {freeze} epoch{'s' * (freeze > 1)}, then every layer, the lr schedule starting again"] if freeze else []
    tuning += [f"layer decay {recipe.optim.layer_decay}"] if recipe.optim.layer_decay else []
    tuning += [f"classifier lr x{recipe.optim.head_lr_scale:g}"] if recipe.optim.head_lr_scale != 1.0 else []
    if tuning:
        facts["fine-tuning"] = "; ".join(tuning)
    balance = ["loss weighted by class"] if recipe.data.class_weights == "balanced" else []
    balance += ["every class drawn equally often"] if recipe.data.sampler == "balanced" else []
    if balance:
        facts["classes"] = "; ".join(balance)
    return facts


def summarize(trainer: Trainer, records: RunRecords, stopped_by: str | None = None, report: Path | None = None) -> dict[str, Any]:
    """Print the summary panel; return what `fit` returns."""
    progress, train = trainer.progress, trainer.recipe.train
    summary = {
        "best top-1": f"{progress.best_top1:.2%} (epoch {progress.best_epoch})",
        "final top-1": f"{progress.history[-1]['val_top1']:.2%}" if progress.history else "-",
    }
    if trainer.ema is not None:
        summary["best EMA top-1"] = f"{progress.best_top1_ema:.2%} (epoch {progress.best_epoch_ema})"
    if progress.stopped_early:
        summary["stopped early"] = (
            f"after epoch {progress.epoch} of {train.epochs}: no better top-1 for {train.early_stopping_patience} epochs"
        )
    if stopped_by:
        summary["stopped"] = f"after epoch {progress.epoch} of {train.epochs}: {stopped_by}"
    summary.update({"time": format_seconds(progress.elapsed_s), "written to": str(records.paths.root)})
    if report is not None:
        summary["report"] = str(report)
    records.reporter.summary(summary)
    return {
        "best_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        "epochs": progress.epoch,
        "stopped_early": progress.stopped_early,
        "stopped_by": stopped_by,
        "seconds": progress.elapsed_s,
        "run_dir": str(records.paths.root),
    }


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
