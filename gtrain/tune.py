"""`gtrain tune`: search a recipe's settings with an Optuna study.

A search space (SPACE.toml) names recipe keys and their ranges or choices; every value it
allows is validated against the recipe schema before any trial runs. Each trial is an
ordinary `gtrain fit` in its own run folder, DIR/trials/NNNN, so `gtrain runs`, `eval`
and `plot` work on it. After every epoch the trial reports its validation top-1 to the
study, whose pruner may end it there; a finished trial's value is its best top-1.

The study is Optuna's, kept in DIR/study.journal (or in any storage URL Optuna takes):
the same command again continues it, and several processes running it at once, on one
machine or many, share it, each taking its own trials. Nothing here schedules anything:
the sampler (TPE) and the pruner are Optuna's, the trials gtrain's.

Optuna is an extra (`gtrain[tune]`), imported only here.
"""

import copy
import hashlib
import json
import os
import socket
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from gtrain import distributed
from gtrain.files import write_text_atomic
from gtrain.errors import UserError, error_line
from gtrain.recipe import Recipe, flatten, parse_toml, unsafe_changes, validate_recipe
from gtrain.run_folder import RunFolder
from gtrain.run_lock import FileLock, held_by_a_live_process

JOURNAL = "study.journal"
STUDY_LOCK = "study.lock"  # held while a process joins the study or picks its next trial
SEARCH_ATTR = "gtrain_search_"  # + the search's hash: the recipe and the space a study searches
BEST_RECIPE = "best.toml"
PRUNERS = ("median", "halving", "none")


# ---------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Dimension:
    """One recipe key and the values a trial may give it: a range, or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step, "integer": self.integer}


RANGE_KEYS = {"low", "high", "log", "step"}


def load_space(path: Path, base: Recipe) -> list[Dimension]:
    """The dimensions SPACE.toml names, each value it allows checked against the recipe
    schema on top of `base`; every mistake is reported at once, each on its own line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the search space {path}: {error_line(error)}") from None
    entries = _space_entries(parse_toml(text, str(path)))
    if not entries:
        raise UserError(
            f'{path}: no keys to search: add lines such as "optim.lr" = {{low = 1e-3, high = 1.0, log = true}} '
            'or "data.mixup_alpha" = [0.0, 0.2]'
        )
    dimensions, problems = [], []
    for key, spec in entries.items():
        try:
            dimensions.append(_dimension(key, spec, base))
        except UserError as error:
            problems.append(str(error))
    if problems:
        if len(problems) == 1:
            raise UserError(f"{path}: {problems[0]}")
        raise UserError(f"{path}: {len(problems)} problems\n" + "\n".join(f"  {line}" for line in problems))
    return dimensions


def _space_entries(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`"optim.lr" = {...}` and `[optim] lr = {...}` alike, as {"optim.lr": {...}}."""
    entries = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (set(value) & RANGE_KEYS):
            entries.update(_space_entries(value, f"{name}."))
        else:
            entries[name] = value
    return entries


def _dimension(key: str, spec: Any, base: Recipe) -> Dimension:
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{key} = []: give at least one choice")
        for value in spec:
            if not isinstance(value, bool | int | float | str):
                raise UserError(f"{key}: the choice {value!r} is not a number, string or boolean (Optuna's choices are)")
            _check_value(key, value, base, f"the choice {value!r}")
        return Dimension(key, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise UserError(
            f"{key} = {spec!r}: give a range {{low = ..., high = ...}} or a list of choices "
            "(a single value belongs in the recipe, or in --set)"
        )
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown or "low" not in spec or "high" not in spec:
        raise UserError(f"{key} = {spec!r}: a range has low and high, optionally log = true or step = N; "
                        + (f"not {', '.join(unknown)}" if unknown else "both bounds are needed"))  # fmt: skip
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)):
            raise UserError(f"{key}: {name} = {value!r} is not a finite number")
    if not isinstance(log, bool):
        raise UserError(f"{key}: log = {log!r}: true or false")
    if not low < high:
        raise UserError(f"{key}: low = {low!r} must be below high = {high!r}")
    if log and low <= 0:
        raise UserError(f"{key}: a log range needs low > 0, not {low!r}")
    if log and step is not None:
        raise UserError(f"{key}: a range is either log = true or has a step, not both")
    if step is not None and step <= 0:
        raise UserError(f"{key}: step = {step!r} must be positive")
    resolved = _check_value(key, low, base, f"low = {low!r}")
    _check_value(key, high, base, f"high = {high!r}")
    integer = isinstance(resolved, int) and not isinstance(resolved, bool)
    if integer and not all(isinstance(v, int) for v in (low, high, step if step is not None else 1)):
        raise UserError(f"{key} is an integer setting: give integer low, high and step")
    if not integer and not isinstance(resolved, float):
        raise UserError(f"{key} takes a {type(resolved).__name__}, not a number: give a list of choices")
    return Dimension(key, float(low) if not integer else low, float(high) if not integer else high, log, step, integer=integer)


def _check_value(key: str, value: Any, base: Recipe, what: str) -> Any:
    """Validate the recipe with `key` set to `value`; return the value as the schema holds it."""
    document = with_values(base.to_dict(), {key: value})
    try:
        recipe = validate_recipe(document, source="recipe")
    except UserError as error:
        reason = str(error).removeprefix("recipe: ")
        raise UserError(f"{key}: {what} does not make a valid recipe: {reason}") from None
    resolved = flatten(recipe.to_dict())
    if key not in resolved:
        raise UserError(f"{key}: not a recipe key")
    return resolved[key]


def with_values(document: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a recipe document with dotted keys set."""
    document = copy.deepcopy(document)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{key}: {part} is a value, not a section")
        node[leaf] = value
    return document


# ---------------------------------------------------------------------------------------
# The study


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("gtrain tune needs Optuna: pip install 'gtrain[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # gtrain prints its own line per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@dataclass(frozen=True)
class TuneSettings:
    trials: int  # this process runs this many; the study gathers those of every process
    pruner: Literal["median", "halving", "none"] = "median"
    startup_trials: int = 5  # trials that finish before the median pruner judges any
    min_epochs: int = 1  # no trial is pruned before this many epochs
    seed: int | None = None  # the sampler's: give each process its own, or none
    storage: str | None = None  # an Optuna storage URL; default DIR/study.journal
    study_name: str | None = None  # default: DIR's name
    device: str | None = None

    def __post_init__(self):
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner {self.pruner!r}: choose {', '.join(PRUNERS)}")


def join_study(out: Path, base: Recipe, space: list[Dimension], settings: TuneSettings):
    """The study in `out` (created by the first process to come), searching `base` over
    `space`; one line if it searches another recipe or space. Processes on one --out join
    one at a time, however many start at once."""
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(out / STUDY_LOCK):
        return open_study(out, base, space, settings)


def open_study(out: Path, base: Recipe, space: list[Dimension], settings: TuneSettings):
    optuna = import_optuna()
    if settings.pruner == "median":
        # Epochs are reported as steps 1, 2, ...; Optuna judges a step once it is not below n_warmup_steps.
        pruner = optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials, n_warmup_steps=settings.min_epochs)
    elif settings.pruner == "halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.min_epochs, reduction_factor=3)
    else:
        pruner = optuna.pruners.NopPruner()
    # constant_liar: a process does not sample next to the trials others are running.
    sampler = optuna.samplers.TPESampler(constant_liar=True)
    storage, name = study_storage(out, settings.storage), settings.study_name or out.resolve().name
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)  # fmt: skip
    except (ValueError, ImportError, ModuleNotFoundError) as error:
        raise UserError(f"--storage {settings.storage}: Optuna cannot open it ({error_line(error)})") from None
    except Exception as error:  # a database that refuses the connection, a journal on a read-only disk
        where = settings.storage or out / JOURNAL
        raise UserError(f"cannot open the study in {where}: {error_line(error, with_type=True)}") from None
    check_same_search(study, base, space, out)
    if settings.seed is not None:  # a continued study draws on from where it is, not its first trials again
        study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(study.trials), constant_liar=True)
    return study


def study_storage(out: Path, storage: str | None):
    """Where the study is kept: DIR/study.journal, or the storage URL given."""
    if storage is not None:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(out / JOURNAL)))


def check_same_search(study, base: Recipe, space: list[Dimension], out: Path) -> None:
    """A study continued with another recipe or space would compare trials of different
    searches: refuse it. Each search is recorded whole, in one user attribute named by its
    hash: processes that start the same search at the same instant write the same record,
    and of two that start different ones, at least the later is refused (it reads the
    other's record after writing its own)."""
    searched = {"recipe": base.to_dict(), "space": {d.key: d.to_dict() for d in space}}
    mine = SEARCH_ATTR + hashlib.sha256(json.dumps(searched, sort_keys=True).encode()).hexdigest()[:16]
    refuse_other_searches(study, searched, mine, out)
    if mine not in study.user_attrs:
        study.set_user_attr(mine, searched)
        refuse_other_searches(study, searched, mine, out)


def refuse_other_searches(study, searched: dict[str, Any], mine: str, out: Path) -> None:
    attrs = study.user_attrs
    recorded = [value for key, value in attrs.items() if key.startswith(SEARCH_ATTR) and key != mine]
    if "gtrain_recipe" in attrs:  # recorded as two attributes, before searches were recorded whole
        recorded.append({"recipe": attrs["gtrain_recipe"], "space": attrs.get("gtrain_space")})
    for other in recorded:
        differ = search_differences(other, searched)
        if differ:
            raise UserError(
                f"the study {study.study_name} in {out} searched another recipe or space (differs in "
                f"{', '.join(differ[:6])}{', ...' if len(differ) > 6 else ''}): give another --out, or the same recipe and space"
            )


def search_differences(recorded: dict[str, Any], searched: dict[str, Any]) -> list[str]:
    # Where the data lies and which device trains may differ between the processes of a
    # study; what a trial computes, and for how many epochs, may not.
    recipe_old, recipe_new = flatten(recorded["recipe"] or {}), flatten(searched["recipe"])
    differ = [f"recipe {key}" for key in unsafe_changes(recorded["recipe"] or {}, searched["recipe"])]
    differ += [f"recipe {key}" for key in ("train.epochs", "train.early_stopping_patience")
               if recipe_old.get(key) != recipe_new.get(key)]  # fmt: skip
    space_old, space_new = flatten(recorded["space"] or {}), flatten(searched["space"])
    differ += [f"space {key}" for key in sorted(space_old.keys() | space_new.keys()) if space_old.get(key) != space_new.get(key)]
    return differ


# ---------------------------------------------------------------------------------------
# Trials


@dataclass
class TrialRecord:
    number: int
    state: str  # complete, pruned, failed, interrupted, running
    value: float | None  # best validation top-1 (pruned: the last reported)
    params: dict[str, Any]
    epochs: int
    seconds: float | None
    run_dir: str | None
    note: str = ""
    process: str = ""  # host:pid of the process that ran it

    def to_json(self) -> dict[str, Any]:
        return vars(self).copy()


@dataclass
class TuneResult:
    study_name: str
    trials: list[TrialRecord]  # every trial of the study, by number
    ran_here: list[int] = field(default_factory=list)  # the trials this process ran
    best: TrialRecord | None = None
    best_recipe: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.study_name, "best_value": self.best.value if self.best else None,
            "best_params": self.best.params if self.best else None, "best_trial": self.best.number if self.best else None,
            "best_recipe": str(self.best_recipe) if self.best_recipe else None, "ran_here": self.ran_here,
            "trials_per_process": self.trials_per_process(), "trials": [t.to_json() for t in self.trials],
        }  # fmt: skip

    def ranked(self) -> list[TrialRecord]:
        """The leaderboard: complete trials before the others, each group by top-1, best first (no
        top-1 counts as 0), then by trial number."""
        return sorted(self.trials, key=lambda t: (t.state != "complete", -(t.value or 0.0), t.number))

    def state_counts(self) -> dict[str, int]:
        """How many trials are in each state, the states in the order they first occur."""
        return dict(Counter(trial.state for trial in self.trials))

    def trials_per_process(self) -> dict[str, int]:
        """How many trials each process (host:pid) has run or is running."""
        return dict(Counter(trial.process for trial in self.trials if trial.process))


class TuneInterrupted(Exception):
    def __init__(self, trial: int, run_dir: Path, exit_code: int, finished: int):
        self.trial, self.run_dir, self.exit_code, self.finished = trial, run_dir, exit_code, finished
        super().__init__(f"trial {trial}")


def tune(
    base: Recipe, recipe_name: str, space: list[Dimension], *, out: Path, settings: TuneSettings,
    on_trial: Callable[[TrialRecord], None] = lambda record: None,
) -> TuneResult:  # fmt: skip
    """Run trials of the study in `out` until it has `settings.trials` finished ones, then
    return every trial of it. Any number of processes may do so at once: one at a time,
    each continues a trial whose process died, or asks the study for a new one."""
    from gtrain.stopping import Interrupted

    if distributed.launched_distributed():
        raise UserError(
            "gtrain tune runs each trial in one process: instead of torchrun, start one gtrain tune per device "
            "(--device cuda:N) with the same --out; they share the study"
        )
    try:
        (out / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {out / 'trials'}: {error_line(error)}; give a writable --out") from None
    optuna = import_optuna()
    study = join_study(out, base, space, settings)
    ran_here = []
    while (claimed := next_trial(study, out, settings.trials)) is not None:
        trial, claim = claimed
        ran_here.append(trial.number)
        fail = optuna.trial.TrialState.FAIL
        try:
            record = run_trial(trial, base, recipe_name, space, out, settings.device)
        except (Interrupted, KeyboardInterrupt) as stop:
            if trial.number not in {t.number for t in study.trials if t.state.is_finished()}:
                trial.set_user_attr("interrupted", True)
            study.tell(trial, state=fail, skip_if_finished=True)
            finished = sum(t.state.is_finished() for t in study.trials) - 1
            run_dir = trial_folder(out, trial.user_attrs.get("run_dir", ""))
            raise TuneInterrupted(trial.number, run_dir, getattr(stop, "exit_code", 130), finished) from None
        except BaseException:
            study.tell(trial, state=fail, skip_if_finished=True)  # never left "running" in a shared study
            raise
        finally:
            claim.release()  # after the study was told: until then the trial is running, and held
            forget_compiled_graphs()
        on_trial(record)
        if record.state == "complete":
            best = study.best_trial
            if best.number == trial.number:
                write_best_recipe(out, base, trial_record(best, out), len(study.trials))
    return summarize_study(study, out, base, ran_here)


def next_trial(study, out: Path, total: int):
    """The next trial this process runs, and its claim (the lock it holds while it runs it),
    or None when the study has `total` trials finished or under way. Decided under the
    study's lock, so that no two processes pick the same trial or go past `total`."""
    import optuna

    with FileLock(out / STUDY_LOCK):
        continue_dead_trials(study, out)
        trials = study.get_trials(deepcopy=False)
        waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
        if not waiting and counted_trials(trials) >= total:
            return None
        trial = study.ask()  # a waiting trial (one to continue) first
        recorded = trial.user_attrs.get("run_dir") or f"trials/{trial.number:04d}"
        trial.set_user_attr("run_dir", recorded)
        trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")
        run_dir = trial_folder(out, recorded)
        run_dir.mkdir(parents=True, exist_ok=True)
        claim = FileLock(RunFolder(run_dir).trial_lock)
        claim.acquire()  # free: a trial's claim is taken under the study's lock, by one process
    return trial, claim


def counted_trials(trials) -> int:
    """The trials that count towards --trials: finished (complete, pruned or failed),
    running or waiting to run; not those that another trial continues."""
    continued = {t.user_attrs.get("continues") for t in trials}
    return sum(1 for t in trials if not (t.number in continued or t.user_attrs.get("interrupted")))


def continue_dead_trials(study, out: Path) -> None:
    """A trial whose process died (SIGKILL, a lost node, a preemption without warning) is
    failed, and a trial with its settings and run folder is queued to continue it from its
    last checkpoint; so is a trial stopped by Ctrl-C or a scheduler's signal. A running
    trial whose claim is held, or whose claim is not on this filesystem, is left alone."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    continued = {t.user_attrs.get("continues") for t in trials}
    for old in trials:
        if old.number in continued or "run_dir" not in old.user_attrs:
            continue
        if old.state == optuna.trial.TrialState.RUNNING:
            claim = RunFolder(trial_folder(out, old.user_attrs["run_dir"])).trial_lock
            if held_by_a_live_process(claim) is not False:
                continue
            study.tell(old.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        elif not old.user_attrs.get("interrupted"):
            continue
        study.enqueue_trial(old.params, user_attrs={"continues": old.number, "run_dir": old.user_attrs["run_dir"]})


def trial_folder(out: Path, recorded: str) -> Path:
    """A trial's run folder: recorded relative to DIR, so that every process and machine
    sharing the study finds it under its own --out."""
    return out / recorded if recorded else out


def forget_compiled_graphs() -> None:
    """What one trial compiled or cached on the GPU would pile up over many: Dynamo's
    graphs (it falls back to eager after a few recompilations) and the allocator's cache."""
    import gc

    import torch

    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_trial(trial, base: Recipe, recipe_name: str, space: list[Dimension], out: Path, device: str | None) -> TrialRecord:
    """Train one trial as a gtrain run; tell the study how it ended."""
    import optuna
    import torch
    from rich.console import Console

    from gtrain.progress import Reporter
    from gtrain.run_folder import RunFolder, RunStatus
    from gtrain.runs import read_metrics
    from gtrain.distributed import World
    from gtrain.fit import DivergedError, FitPlan, fit
    from gtrain.trainer import check_batch_split

    params = {dimension.key: dimension.suggest(trial) for dimension in space}
    run_dir = trial_folder(out, trial.user_attrs["run_dir"])
    start = time.perf_counter()

    def finish(state: str, value: float | None, epochs: int, note: str = "") -> TrialRecord:
        optuna_state = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}
        if note:
            trial.set_user_attr("note", note)
        trial.set_user_attr("epochs", epochs)
        trial.study.tell(trial, value if state == "complete" else None, state=optuna_state.get(state, optuna.trial.TrialState.FAIL))
        return TrialRecord(trial.number, state, value, params, epochs, time.perf_counter() - start, str(run_dir), note,
                           trial.user_attrs.get("process", ""))  # fmt: skip

    try:
        recipe = validate_recipe(with_values(base.to_dict(), params), source=f"trial {trial.number}")
        check_batch_split(recipe, World())
    except UserError as error:  # each value is valid, but not this combination of them
        return finish("failed", None, 0, str(error))

    # A trial that continues an interrupted one reports the epochs that one had finished.
    epochs_done = 0
    continued = read_metrics(RunFolder(run_dir).metrics)[0] if trial.user_attrs.get("continues") is not None else []
    for row in sorted(continued, key=lambda row: row["epoch"]):
        trial.report(row["val_top1"], row["epoch"])
        epochs_done = row["epoch"]
    reported = {"epochs": epochs_done, "top1": None}

    def epoch_end(epoch: int, top1: float) -> str | None:
        trial.report(top1, epoch)
        reported.update(epochs=epoch, top1=top1)
        if epoch < recipe.train.epochs and trial.should_prune():  # after the last epoch there is nothing to save
            return f"pruned by gtrain tune after epoch {epoch} (top-1 {top1:.2%})"
        return None

    start_as = "either" if trial.user_attrs.get("continues") is not None else "new"
    plan = FitPlan(recipe, RunFolder(run_dir), recipe_name, start_as)
    try:
        result = fit(plan, reporter=Reporter(Console(quiet=True), quiet=True), device=device, epoch_end=epoch_end)
    except DivergedError as error:
        return finish("failed", None, reported["epochs"], str(error).partition(";")[0])
    except torch.OutOfMemoryError:  # these settings do not fit the device; the next may
        forget_compiled_graphs()
        return finish("failed", None, reported["epochs"], "out of device memory")
    if result.get("already_finished"):  # interrupted after its run had ended
        status = RunStatus.read(RunFolder(run_dir))
        if status.get("stopped"):
            return finish("pruned", None, status.get("epochs_done", 0), status["stopped"])
        return finish("complete", status.get("best_top1"), status.get("epochs_done", 0))
    if result["stopped_by"]:
        return finish("pruned", reported["top1"], result["epochs"], f"pruned at epoch {result['epochs']}")
    return finish("complete", result["best_top1"], result["epochs"])


def trial_record(trial, out: Path, continued: set[int] = frozenset()) -> TrialRecord:
    """`continued`: the numbers of the trials that other trials continue."""
    state = {"fail": "failed"}.get(trial.state.name.lower(), trial.state.name.lower())
    if trial.user_attrs.get("interrupted") or trial.number in continued:
        state = "interrupted"
    value = trial.value  # a pruned or interrupted trial's: its last report
    if value is None and trial.last_step is not None:
        value = trial.intermediate_values.get(trial.last_step)
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete and trial.datetime_start else None
    recorded = trial.user_attrs.get("run_dir")
    return TrialRecord(trial.number, state, value, dict(trial.params), trial.user_attrs.get("epochs", trial.last_step or 0),
                       seconds, str(trial_folder(out, recorded)) if recorded else None, trial.user_attrs.get("note", ""),
                       trial.user_attrs.get("process", ""))  # fmt: skip


def write_best_recipe(out: Path, base: Recipe, best: TrialRecord, trial_count: int) -> Path:
    """DIR/best.toml: the base recipe with the best trial's values, complete, to train as-is."""
    params = best.params
    description = f"gtrain tune's best of {trial_count} trials: {best.value:.2%} validation top-1"
    recipe = validate_recipe(with_values(base.to_dict(), {**params, "description": description}), source="best trial")
    settings = ", ".join(f"{key} = {value!r}" for key, value in params.items())
    header = (
        f"# The best of {trial_count} trials of gtrain tune in {out}: trial {best.number}, validation top-1 "
        f"{best.value:.2%}\n# in {best.run_dir}, with {settings}.\n"
        "# Every key is set: `gtrain fit` trains this file as-is.\n"
    )
    path = out / BEST_RECIPE
    write_text_atomic(path, header + recipe.to_toml())
    return path


def summarize_study(study, out: Path, base: Recipe | None, ran_here: list[int]) -> TuneResult:
    """Every trial of the study; with `base`, DIR/best.toml rewritten from the best."""
    trials = study.trials
    continued = {t.user_attrs.get("continues") for t in trials}
    records = [trial_record(t, out, continued) for t in trials]
    complete = [r for r in records if r.state == "complete"]
    best = max(complete, key=lambda r: (r.value, -r.number)) if complete else None
    best_recipe = None
    if best is not None and base is not None:  # rewritten from the whole study: another process may have found the best
        best_recipe = write_best_recipe(out, base, best, len(records))
    elif (out / BEST_RECIPE).exists():
        best_recipe = out / BEST_RECIPE
    return TuneResult(study.study_name, records, ran_here, best, best_recipe)


def study_status(out: Path, *, storage: str | None = None, study_name: str | None = None) -> TuneResult:
    """`gtrain tune --status DIR`: every trial of the study, without changing it. A running
    trial whose process is gone says so: the next `gtrain tune` on DIR continues it."""
    optuna = import_optuna()
    if storage is None and not (out / JOURNAL).is_file():
        raise UserError(f"{out} holds no study ({out / JOURNAL} is missing): give the --out of a gtrain tune")
    name = study_name or out.resolve().name
    try:
        study = optuna.load_study(study_name=name, storage=study_storage(out, storage))
    except KeyError:
        raise UserError(f"there is no study {name!r} in {storage or out / JOURNAL}: give its --study name") from None
    except (ValueError, ImportError, ModuleNotFoundError) as error:
        raise UserError(f"--storage {storage}: Optuna cannot open it ({error_line(error)})") from None
    result = summarize_study(study, out, None, [])
    for record in result.trials:
        if record.state == "running" and record.run_dir:
            if held_by_a_live_process(RunFolder(Path(record.run_dir)).trial_lock) is False:
                record.note = f"its process is gone: the next gtrain tune on {out} continues it"
    return result
