"""The `gtrain` command line. Commands are thin: options, then one call into the library.

Every user mistake arrives here as a `UserError` and leaves as one line on stderr with
exit code 2; rich lives in this layer and in `progress`.
"""

import gc
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.table import Table

from gtrain.errors import UserError, printable, unreadable_file

app = typer.Typer(
    help="Train grouped-convolution image classifiers (ResNeXt, HorNet) from TOML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True, soft_wrap=True)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set optim.lr=0.05 (repeatable).", metavar="KEY=VALUE"),
]

# How saved weights are run (gtrain eval, gtrain predict): by default as the run validated them.
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOption = Annotated[
    Optional[str],
    typer.Option(help="auto, fp32, bf16 or fp16 (default: the run's train.precision; auto for other weights)."),
]
ChannelsLastOption = Annotated[
    Optional[bool],
    typer.Option(
        "--channels-last/--no-channels-last",
        help="Memory format (default: the run's train.channels_last; auto for other weights).",
    ),
]


def say(line: object, *, error: bool = True) -> None:
    """One line on stderr, as an error or not."""
    # Escaped: a message may hold brackets ('gtrain[plot]', a list of keys) that rich would take for markup.
    # printable: a message may quote a class name, a folder name or a path from someone else's disk.
    error_console.print(("[bold red]error:[/] " if error else "") + escape(printable(line)), highlight=False, soft_wrap=True)


def fail(error: UserError) -> typer.Exit:
    say(error)
    return typer.Exit(UserError.exit_code)


@app.command()
def fit(
    recipe: Annotated[Optional[str], typer.Argument(help="Bundled recipe name or path to a .toml file.")] = None,
    overrides: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<recipe>-<timestamp>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder from its last checkpoint.")] = None,
    auto_resume: Annotated[
        bool,
        typer.Option(
            "--auto-resume",
            help="Continue the --out folder if it holds a run of this recipe, else start it: the same command "
            "again after a preemption or a crash (torchrun's restarts do this by themselves).",
        ),
    ] = False,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (overrides train.device).")] = None,
    nproc: Annotated[
        Optional[int], typer.Option(min=1, help="Train with N processes on this machine (runs torchrun for you).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final summary.")] = False,
) -> None:
    """Train a model from a recipe (default: quickstart) and write a run folder.

    data.batch_size is the global batch: under torchrun or srun each of N processes takes 1/N of it.

    Exit codes: 0 done; 2 a mistake to fix (one line says which); 130 Ctrl-C, resumable.

    75: stopped with a checkpoint by SIGTERM, SIGUSR1 or a lost process; continue with --auto-resume.
    """
    from gtrain import distributed
    from gtrain.fit import ending_of, fit as run_fit, plan_fit
    from gtrain.progress import Reporter
    from gtrain.stopping import Interrupted

    if nproc is not None and not distributed.launched_distributed():
        os.execv(sys.executable, distributed.torchrun_command(sys.executable, sys.argv[1:], nproc))
    world = distributed.World.from_env()  # so that only rank 0 prints, even before it joins the group
    reporter = Reporter(console if world.is_main else Console(quiet=True), quiet=quiet or not world.is_main)
    run_dir = resume or out
    try:
        plan = plan_fit(recipe, overrides or [], out=out, resume=resume, auto_resume=auto_resume)
        run_dir = plan.paths.root
        if plan.notice and world.is_main:
            reporter.notice(plan.notice)
        run_fit(plan, reporter=reporter, device=device)
    except (distributed.LostPeer, UserError, OSError, Interrupted, KeyboardInterrupt) as error:
        reporter.close()
        ending = ending_of(error, run_dir=run_dir, out_given=out is not None)
        if world.is_main or ending.every_process:
            say(ending.line, error=ending.error)
        raise typer.Exit(ending.exit_code) from None


@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="A run folder or a .safetensors file written by gtrain fit.")],
    split: Annotated[str, typer.Option(help="Dataset split to evaluate: test, val or train.")] = "test",
    overrides: SetOption = None,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Images per batch; default: the batch the run validated the weights in.")
    ] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = None,
    channels_last: ChannelsLastOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
    tta: Annotated[
        str, typer.Option(help="Test-time augmentation: none, or flip (mean probability of the image and its mirror).")
    ] = "none",
    plot: Annotated[
        Optional[Path], typer.Option(help="Also write the confusion matrix as a PNG here (needs matplotlib).")
    ] = None,
    worst: Annotated[int, typer.Option(min=1, help="Classes, and images (highest loss), to list as the worst.")] = 5,
) -> None:
    """Evaluate saved weights on a dataset split: top-1, top-5, loss, per-class precision and
    recall, the worst classes and the confusion matrix.

    Weights in a run folder are scored as the run validated them (its precision and memory
    format), so in fp32 the validation split gives the logged top-1 exactly."""
    from rich.text import Text

    from gtrain.eval_tables import report_tables
    from gtrain.evaluate import EvalSettings, run_eval

    settings = EvalSettings(
        split=split, overrides=tuple(overrides or ()), batch_size=batch_size, device=device, precision=precision,
        channels_last=channels_last, tta=tta, plot=plot, worst=worst,
    )  # fmt: skip
    try:
        report = run_eval(path, settings)
    except UserError as error:
        raise fail(error) from None
    except OSError as error:  # an unreadable or corrupt image of the split
        raise fail(unreadable_file(error)) from None
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    console.print(
        f"{report['model']} on {printable(report['dataset'])} ({report['split']}, {report['images']:,} images): "
        f"top-1 {report['top1']:.2%}  balanced {report['balanced_top1']:.2%}  top-5 {report['top5']:.2%}  "
        f"loss {report['loss']:.4f}  "
        f"{report['images_per_s']:,.0f} img/s  {report['device']} {report['precision']}"
        + (f"  tta {report['tta']}" if report["tta"] else ""),
        highlight=False,
        markup=False,
    )
    for block in report_tables(report):
        table = Table(title=block.title)
        for i, column in enumerate(block.columns):
            table.add_column(column, justify="left" if i < block.name_columns else "right")
        for row in block.rows:
            table.add_row(*(Text(printable(cell)) for cell in row))  # Text: a class named "[red]" is not markup
        console.print(table)
    if report["plot"]:
        console.print(f"confusion matrix plot: {printable(report['plot'])}", highlight=False, markup=False)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run folder (or a weights file in one).")],
    split: Annotated[str, typer.Option(help="Split to score: val, test or train.")] = "val",
    out: Annotated[Optional[Path], typer.Option(help="The HTML file to write (default: RUN/report.html).")] = None,
    compare: Annotated[Optional[Path], typer.Option(help="A second run to show beside the first.")] = None,
    gallery: Annotated[int, typer.Option(min=1, help="Highest-loss images to show, with Grad-CAM.")] = 24,
    device: DeviceOption = "auto",
    overrides: SetOption = None,
) -> None:
    """Write one self-contained HTML file that shows a run: recipe and provenance, curves, the
    confusion matrix, per-class precision and recall, the most confused pairs with examples,
    and the highest-loss images with where the model looked (Grad-CAM). Opens offline."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gtrain.report import ReportSettings, write_report

    settings = ReportSettings(split=split, out=out, compare=compare, gallery=gallery, device=device,
                              overrides=tuple(overrides or ()))  # fmt: skip
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=error_console, disable=not error_console.is_terminal) as bar:

            def progress(description: str, total: int | None):
                task = bar.add_task(description, total=total)
                return lambda images: bar.advance(task, images)

            written = write_report(run, settings, progress=progress)
    except UserError as error:
        raise fail(error) from None
    except OSError as error:
        raise fail(unreadable_file(error)) from None
    console.print(f"report: {printable(written)}", highlight=False, markup=False)


@app.command("lr-find")
def lr_find(
    recipe: Annotated[Optional[str], typer.Argument(help="Bundled recipe name or path to a .toml file.")] = None,
    overrides: SetOption = None,
    steps: Annotated[int, typer.Option(help="Steps of the test (at most the recipe's first epoch).")] = 100,
    start_lr: Annotated[Optional[float], typer.Option(help="lr of the first step (default: optim.lr / 1000).")] = None,
    end_lr: Annotated[Optional[float], typer.Option(help="lr of the last step (default: optim.lr x 100).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (overrides train.device).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw loss against lr as a PNG here (needs matplotlib).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
) -> None:
    """Find a learning rate: train a few steps while the lr grows exponentially, and suggest
    the largest lr at which the smoothed loss still fell. Writes nothing (except --plot).
    """
    from gtrain.lr_find import lr_range_test
    from gtrain.recipe import load_recipe

    try:
        loaded, name = load_recipe(recipe or "quickstart", overrides or [])
        result = lr_range_test(loaded, steps=steps, start_lr=start_lr, end_lr=end_lr, device=device, plot=plot)
    except UserError as error:
        raise fail(error) from None
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        return
    tested = f"{len(result.lrs)} steps, lr {result.lrs[0]:.2g} to {result.lrs[-1]:.2g}" if result.lrs else "no steps"
    console.print(f"lr range test: {tested}" + (f"; stopped: {result.stopped}" if result.stopped else ""),
                  highlight=False, markup=False, soft_wrap=True)  # fmt: skip
    if result.suggested_lr is None:
        console.print("no suggestion: the loss did not fall; try a higher --end-lr or more --steps", markup=False)
    else:
        suggested = f"{result.suggested_lr:.2g}"
        console.print(
            f"suggested lr {suggested} (the minimum of the smoothed loss; steepest descent at "
            f"{result.steepest_lr or float('nan'):.2g}): "
            f"gtrain fit {printable(recipe or name)} --set optim.lr={suggested}",
            highlight=False, markup=False, soft_wrap=True,
        )  # fmt: skip
    if plot is not None:
        console.print(f"plot: {printable(plot)}", highlight=False, markup=False)


@app.command()
def tune(
    recipe: Annotated[Optional[str], typer.Argument(help="Bundled recipe name or path to a .toml file.")] = None,
    overrides: SetOption = None,
    space: Annotated[
        Optional[Path], typer.Option(help="TOML file of recipe keys to search: ranges {low, high, log} or lists.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Study folder: DIR/study.journal, DIR/trials/NNNN, DIR/best.toml.")] = None,
    trials: Annotated[
        int,
        typer.Option(min=1, help="Finished trials the study should have, counted over every process that shares it."),
    ] = 20,
    pruner: Annotated[str, typer.Option(help="median (Optuna's MedianPruner), halving (successive halving) or none.")] = "median",
    startup_trials: Annotated[int, typer.Option(min=0, help="median: trials that finish before any is pruned.")] = 5,
    min_epochs: Annotated[int, typer.Option(min=1, help="No trial is pruned before this many epochs.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the sampler (give each process its own).")] = None,
    storage: Annotated[
        Optional[str], typer.Option(help="An Optuna storage URL (e.g. postgresql://...) instead of DIR/study.journal.")
    ] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name in --storage (default: the --out folder's name).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (overrides train.device).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary and nothing else.")] = False,
    status: Annotated[
        Optional[Path],
        typer.Option(help="Show the study in this folder (trials by state, the best, running trials) and change nothing."),
    ] = None,
) -> None:
    r"""Search recipe settings with an Optuna study (pip install 'gtrain\[tune]'): TPE sampling, trials
    pruned on their per-epoch validation top-1, each trial a run folder under DIR/trials.

    The same command again continues the study; several at once (on one machine or many,
    with a shared --out or --storage) share it, until it has --trials finished trials. A
    trial whose process died is continued from its checkpoint by the next process to look.
    Writes DIR/best.toml, a complete recipe.
    Exit codes: 0 done; 2 a mistake to fix; 130 Ctrl-C (the same command continues).
    """
    from gtrain.recipe import load_recipe
    from gtrain.tune import TuneInterrupted, TuneSettings, load_space, study_status, tune as run_tune

    if status is not None:
        try:
            result = study_status(status, storage=storage, study_name=study)
        except UserError as error:
            raise fail(error) from None
        if as_json:
            sys.stdout.write(json.dumps(result.to_json()) + "\n")
        else:
            print_leaderboard(result, status)
        return
    if space is None or out is None:
        raise fail(UserError("gtrain tune needs --space SPACE.toml and --out DIR (or --status DIR to look at a study)"))
    try:
        settings = TuneSettings(trials=trials, pruner=pruner, startup_trials=startup_trials, min_epochs=min_epochs,
                                seed=seed, storage=storage, study_name=study, device=device)  # fmt: skip
        base, name = load_recipe(recipe or "quickstart", overrides or [])
        dimensions = load_space(space, base)
        if base.data.val_split == "test" and not as_json:
            console.print(
                "note: trials are scored on the test split (data.val_split): the best top-1 is then a tuned figure, "
                "not a held-out one; where the data has a val split, --set data.val_split=val",
                style="yellow", highlight=False, markup=False, soft_wrap=True,
            )  # fmt: skip
        result = run_tune(base, name, dimensions, out=out, settings=settings,
                          on_trial=lambda record: None if as_json else print_trial_line(record))  # fmt: skip
    except UserError as error:
        raise fail(error) from None
    except OSError as error:  # an unreadable or corrupt data file, a full disk
        raise fail(unreadable_file(error, f"the study in {out} keeps its trials")) from None
    except TuneInterrupted as stop:
        error_console.print(
            f"stopped: trial {stop.trial} was interrupted (its checkpoint is in {printable(stop.run_dir)}); the study keeps "
            f"its {stop.finished} finished trials. The same command continues it, trial {stop.trial}'s settings first",
            highlight=False, markup=False, soft_wrap=True,
        )  # fmt: skip
        raise typer.Exit(stop.exit_code) from None
    except KeyboardInterrupt:  # between trials, or a second Ctrl-C
        error_console.print(f"stopped at once; the study in {printable(out)} keeps its finished trials: the same "
                            "command continues it", markup=False, highlight=False, soft_wrap=True)  # fmt: skip
        raise typer.Exit(130) from None
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
    else:
        print_leaderboard(result, out)


def print_trial_line(record) -> None:
    settings = "  ".join(f"{key}={_short(value)}" for key, value in record.params.items())
    value = f"top-1 {record.value:.2%}" if record.value is not None else "no top-1"
    ending = {"complete": f"{record.epochs} epochs", "pruned": f"pruned after epoch {record.epochs}"}
    console.print(f"trial {record.number}  {printable(settings)}  {value}  {ending.get(record.state, record.state)}"
                  f"  {record.seconds:.0f} s" + (f"  ({printable(record.note)})" if record.state == "failed" else ""),
                  highlight=False, markup=False, soft_wrap=True)  # fmt: skip


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_leaderboard(result, out: Path, rows: int = 10) -> None:
    ranked = result.ranked()
    counts = ", ".join(f"{n} {state}" for state, n in result.state_counts().items())
    table = Table(title=Text(f"study {printable(result.study_name)}: {counts}"))
    keys = list(ranked[0].params) if ranked else []
    for column in ["trial", "state", "top-1", "epochs", *keys]:
        table.add_column(column, justify="left" if column in ("state",) else "right")
    for trial in ranked[:rows]:
        value = f"{trial.value:.2%}" if trial.value is not None else "-"
        table.add_row(str(trial.number), trial.state, value, str(trial.epochs),
                      *(printable(_short(trial.params.get(key, "-"))) for key in keys))  # fmt: skip
    console.print(table)
    for trial in result.trials:
        if trial.state == "running":
            console.print(f"running: trial {trial.number} in {printable(trial.run_dir)} by {printable(trial.process or '?')}"
                          + (f"; {printable(trial.note)}" if trial.note else ""), highlight=False, markup=False, soft_wrap=True)  # fmt: skip
    per_process = result.trials_per_process()
    if per_process:
        console.print("trials per process: " + ", ".join(f"{printable(p)} {n}" for p, n in per_process.items()),
                      highlight=False, markup=False, soft_wrap=True)  # fmt: skip
    if result.best is None:
        console.print("no trial has finished yet: nothing to write to best.toml", markup=False)
    else:
        recipe = f"; its recipe: gtrain fit {printable(result.best_recipe)}" if result.best_recipe else ""
        console.print(f"best: trial {result.best.number}, top-1 {result.best.value:.2%}{recipe}",
                      highlight=False, markup=False, soft_wrap=True)  # fmt: skip


# A terminal shows a table of predictions up to this many images, a progress bar beyond.
PREDICT_TABLE_MAX = 20


@app.command()
def predict(
    weights: Annotated[Path, typer.Argument(help="A run folder (its best weights) or a .safetensors file gtrain wrote.")],
    inputs: Annotated[
        list[str], typer.Argument(help="Image files, folders (searched recursively) or @list.txt (one path a line).")
    ],
    out: Annotated[Optional[Path], typer.Option(help="Write the predictions to a .jsonl or .csv file.")] = None,
    topk: Annotated[int, typer.Option(min=1, help="Classes per image, best first.")] = 5,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Images per batch; default: the run's data.batch_size (64 for a bare file).")
    ] = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader processes that read and resize images.")] = 2,
    device: DeviceOption = "auto",
    precision: PrecisionOption = None,
    channels_last: ChannelsLastOption = None,
    tta: Annotated[str, typer.Option(help="Test-time augmentation: none, or flip.")] = "none",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON Lines (one object per image) and nothing else.")] = False,
) -> None:
    """Classify images with trained weights: the top classes of each, with probabilities.

    Images are prepared exactly as `gtrain eval` prepares them for these weights.

    Exit codes: 0 all classified; 1 some could not be read (each listed with its error); 2 a mistake."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.text import Text

    from gtrain.predict import PredictSettings, run_predict

    rows: list[dict] = []  # a few images: shown as a table at the end
    bar: dict = {}  # many: a progress bar with images/s

    def on_record(record: dict, total: int) -> None:
        if as_json:
            return
        if total <= PREDICT_TABLE_MAX:
            rows.append(record)
            return
        if not bar:
            bar["progress"] = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                                       TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console)  # fmt: skip
            bar["progress"].start()
            bar["task"] = bar["progress"].add_task("predict", total=total, rate="")
            bar["start"], bar["done"] = time.perf_counter(), 0
        bar["done"] += 1
        rate = bar["done"] / max(time.perf_counter() - bar["start"], 1e-9)
        bar["progress"].update(bar["task"], completed=bar["done"], rate=f"{rate:,.0f} img/s")

    settings = PredictSettings(topk=topk, batch_size=batch_size, workers=workers, device=device, precision=precision,
                               channels_last=channels_last, tta=tta)  # fmt: skip
    try:
        summary = run_predict(weights, inputs, settings, out=out, stream=sys.stdout if as_json else None,
                              on_record=on_record)  # fmt: skip
    except UserError as error:
        raise fail(error) from None
    finally:
        if bar:
            bar["progress"].stop()
    if rows:
        table = Table(title=Text(f"predictions ({printable(weights)})"))
        table.add_column("path")
        for k in range(1, topk + 1):
            table.add_column(f"#{k}" if topk > 1 else "class")
        for record in rows:
            cells = [f"{c['class']} {c['probability']:.1%}" for c in record.get("predictions", [])]
            if "error" in record:
                cells = [f"error: {record['error']}"] + [""] * (topk - 1)
            table.add_row(*(Text(printable(cell)) for cell in [record["path"], *cells]))
        console.print(table)
    line = (
        f"{summary.images:,} images, {summary.failed:,} failed, {summary.seconds:.1f} s "
        f"({summary.images_per_s:,.0f} img/s)" + (f"; written to {printable(out)}" if out is not None else "")
    )
    (error_console if as_json else console).print(line, highlight=False, markup=False)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def recipes(
    name: Annotated[
        Optional[str], typer.Argument(help="Print this recipe (bundled name or .toml path) fully resolved, as TOML.")
    ] = None,
    overrides: SetOption = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="Print every recipe key (type, default, meaning) as Markdown instead.")
    ] = False,
) -> None:
    """List the bundled recipes; with NAME, print that recipe fully resolved as TOML.

    With NAME: what `gtrain fit NAME` would train, every key with its value, defaults
    included. With --reference: every recipe key, as Markdown."""
    from gtrain.recipe import bundled_recipes, load_recipe, parse_toml, recipe_reference, resolved_toml

    if reference:
        sys.stdout.write(recipe_reference())  # plain Markdown, no rich markup: for docs and pipes
        return
    if name is not None:
        try:
            loaded, _ = load_recipe(name, overrides or [])
        except UserError as error:
            raise fail(error) from None
        sys.stdout.write(resolved_toml(loaded))  # plain TOML: to read, diff or save as a recipe
        return
    table = Table(title="bundled recipes (gtrain fit NAME)")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, path in bundled_recipes().items():
        table.add_row(name, str(parse_toml(path.read_text(), str(path)).get("description", "")))
    console.print(table)


@app.command()
def shards(
    source: Annotated[str, typer.Argument(help="An image folder (train/, val/, test/), or a recipe whose data to write.")],
    out: Annotated[Path, typer.Argument(help="Folder for the shards, classes.txt and _info.json.")],
    max_side: Annotated[
        Optional[int], typer.Option(help="Re-encode images with a longer side as JPEGs of this side (default: keep the files).")
    ] = None,
    quality: Annotated[int, typer.Option(help="JPEG quality of re-encoded images.")] = 90,
    shard_size: Annotated[str, typer.Option(help="Bytes per shard, e.g. 500MB or 1GB.")] = "500MB",
    overrides: SetOption = None,
) -> None:
    """Write a dataset as WebDataset tar shards per split (KEY.jpg and KEY.cls, with timm's
    _info.json), for `data.dataset = "shards"`. Run again after an interruption: it continues
    after the last complete shard."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gtrain.data.shard_writer import ShardWriterSettings, parse_size, source_of, write_shards
    from gtrain.recipe import DataSection, load_recipe

    try:
        settings = ShardWriterSettings(max_side=max_side, quality=quality, shard_bytes=parse_size(shard_size))
        if Path(source).is_dir():
            data = DataSection(dataset="ImageFolder", root=source)
        elif "/" in source and not Path(source).exists():
            raise UserError(f"{source} does not exist: give an image folder (with train/ and val/) or a recipe")
        else:
            data = load_recipe(source, overrides or [])[0].data
        shard_source = source_of(data)
        total = sum(len(split) for split in shard_source.splits.values())
        columns = (TextColumn("writing shards"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=error_console, disable=not error_console.is_terminal) as progress:
            task = progress.add_task("shards", total=total)
            report = write_shards(shard_source, out, settings, advance=lambda n: progress.advance(task, n))
    except UserError as error:
        raise fail(error) from None
    except OSError as error:
        raise fail(unreadable_file(error)) from None
    for line in report.unreadable:
        say(f"left out, unreadable: {line}", error=False)
    for split, written in report.written.items():
        resumed = f" ({report.resumed[split]} were already written)" if report.resumed.get(split) else ""
        console.print(f"{split}: {written} images in {report.shards[split]} shards{resumed}", highlight=False, markup=False)
    if report.unreadable:
        say(f"{len(report.unreadable)} unreadable images left out (listed above)", error=False)
    console.print(f"wrote {printable(out)}: train from it with data.dataset = \"shards\" and data.root = \"{printable(out)}\"",
                  highlight=False, markup=False)  # fmt: skip


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects.")] = False,
    weights: Annotated[
        bool, typer.Option("--weights", help="List the published weights model.pretrained can name instead.")
    ] = False,
) -> None:
    """List every model: family, parameters, GMACs (the papers' "FLOPs") at its input size.

    Parameters are counted with the head for the class count the variant is published for."""
    from gtrain.models.summary import model_table

    if weights:
        print_weights_table(as_json)
        return

    rows = model_table()
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(
        title="models (gtrain fit --set model.name=NAME)",
        caption="GMACs: multiply-adds of one forward pass at the input size, the unit the papers call FLOPs",
    )
    columns = [("name", "left"), ("family", "left"), ("params", "right"), ("classes", "right"), ("GMACs", "right"),
               ("input", "right")]  # fmt: skip
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(
            row["name"], row["family"], f"{row['params'] / 1e6:.2f}M", str(row["num_classes"]), f"{row['gmacs']:.2f}",
            f"{row['input_size']}px",
        )  # fmt: skip

    console.print(table)


def print_weights_table(as_json: bool) -> None:
    from gtrain.hub import weights_table

    rows = weights_table()
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="published weights (model.pretrained = NAME; gtrain weights fetch NAME --model MODEL)")
    for column in ("model", "name", "ImageNet top-1", "licence", "cached"):
        table.add_column(column, justify="right" if column == "ImageNet top-1" else "left")
    for row in rows:
        top1 = f"{row['top1']:.2%}" if row["top1"] is not None else "-"
        table.add_row(row["model"], row["name"], top1, row["licence"], "yes" if row["cached"] else "no")
    console.print(table)


weights_app = typer.Typer(help="Published weights by name: fetch them ahead of an offline job.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("fetch")
def weights_fetch(
    name: Annotated[str, typer.Argument(help="torchvision:TAG (with --model) or https://...#sha256=HEX.")],
    model: Annotated[Optional[str], typer.Option(help="The model whose torchvision weights TAG names.")] = None,
) -> None:
    """Download published weights into PyTorch's hub cache ($TORCH_HOME/hub/checkpoints), checked
    against their hash, so that a later `gtrain fit` with model.pretrained = NAME needs no network."""
    from gtrain.hub import TORCHVISION, fetch, resolve

    try:
        if name.startswith(TORCHVISION) and model is None:
            raise UserError(f"{name} is one of a model's torchvision weights: add --model MODEL (`gtrain models --weights` lists them)")
        path = fetch(resolve(name, model or ""))
    except UserError as error:
        raise fail(error) from None
    console.print(f"{printable(name)}: {printable(path)}", highlight=False, markup=False)


@app.command()
def bench(
    model: Annotated[Optional[str], typer.Argument(help="Model name (see `gtrain models`).")] = None,
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="Instead of a model: this recipe's training loader against its model's step."),
    ] = None,
    overrides: SetOption = None,
    batches: Annotated[int, typer.Option(help="--data: batches of the loader to time.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    image_size: Annotated[Optional[int], typer.Option(help="Image side in pixels (default: the model's).")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    channels_last: Annotated[
        Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Memory format (default: per device).")
    ] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model first.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    steps: Annotated[int, typer.Option(help="Timed steps per repeat.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 5,
    repeats: Annotated[
        Optional[int], typer.Option(help="Timed groups; the result is their median (default 5; 3 with --data).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
) -> None:
    """Training-step and inference images/s of one model, achieved TFLOP/s and MFU; with
    --data RECIPE, whether that recipe's data loader or its model limits a run, and by how much."""
    from gtrain.bench import BenchSettings, format_data_rows, format_rows, run_bench, run_data_bench

    if (model is None) == (data is None):
        raise fail(UserError("give a model name, or --data RECIPE (not both): `gtrain bench resnext50_32x4d`, "
                             "`gtrain bench --data my_recipe.toml`"))  # fmt: skip
    if data is not None:
        from gtrain.recipe import load_recipe

        try:
            recipe, name = load_recipe(data, overrides or [])
            result = run_data_bench(recipe, name, device=None if device == "auto" else device, batches=batches,
                                    warmup=warmup, steps=steps, repeats=repeats or 3)  # fmt: skip
        except UserError as error:
            raise fail(error) from None
        except OSError as error:  # an unreadable or corrupt data file
            raise fail(unreadable_file(error)) from None
        if as_json:
            sys.stdout.write(result.to_json() + "\n")
            return
        table = Table(title=f"gtrain bench --data {printable(data)}", show_header=False)
        for label, value in format_data_rows(result):
            table.add_row(label, printable(value))
        console.print(table)
        return
    if overrides:
        raise fail(UserError("--set changes a recipe: use it with --data RECIPE"))
    try:
        settings = BenchSettings(batch_size=batch_size, image_size=image_size, precision=precision,
                                 channels_last=channels_last, compile=compile, device=device, steps=steps,
                                 warmup=warmup, repeats=repeats or 5)  # fmt: skip
        result = run_bench(model, settings)
    except UserError as error:
        raise fail(error) from None
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
        return
    table = Table(title=f"gtrain bench {model}", show_header=False)
    for label, value in format_rows(result):
        table.add_row(label, value)
    console.print(table)


@app.command()
def runs(
    folder: Annotated[Path, typer.Argument(help="Folder to search, 3 levels deep, or one run folder.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects.")] = False,
) -> None:
    """List the runs in a folder, oldest first: recipe, model, epochs, best top-1, time, status.

    A run still marked running whose process is gone on this machine shows as failed (killed).
    Facts a corrupt or missing file hides show as "?".
    """
    from gtrain.runs import format_row, list_runs

    try:
        found = list_runs(folder)
    except UserError as error:
        raise fail(error) from None
    if as_json:
        sys.stdout.write(json.dumps([run.to_json() for run in found]) + "\n")
        return
    if not found:
        console.print(f"no runs in {printable(folder)} (gtrain fit writes them to runs/)", highlight=False, markup=False)
        return
    rows = [format_row(run) for run in found]
    columns = [column for column in rows[0] if any(row[column] for row in rows)]  # no empty note column
    table = Table(title=Text(f"runs in {printable(folder)}"))
    for column in columns:
        justify = "right" if column in ("epochs", "best top-1", "time") else "left"
        # In a narrow terminal a run's name folds and its status stays whole, rather than either losing its end.
        table.add_column(column, justify=justify, overflow="fold" if column == "run" else "ellipsis", no_wrap=column == "status")
    for row in rows:
        table.add_row(*(Text(printable(row[column])) for column in columns))
    console.print(table, highlight=False)


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run folders written by gtrain fit.")],
    out: Annotated[
        Optional[Path],
        typer.Option(help="PNG to write (default: RUN_DIR/metrics.png for one run, ./runs-comparison.png for several)."),
    ] = None,
) -> None:
    """Plot loss, validation top-1 and learning rate per epoch into one PNG; one colour per run."""
    from gtrain.plot import plot_runs

    try:
        written = plot_runs(run_dirs, out)
    except UserError as error:
        raise fail(error) from None
    console.print(f"wrote {printable(written)}", highlight=False, markup=False)


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="A run folder or a .safetensors file written by gtrain fit.")],
    export_format: Annotated[
        str, typer.Option("--format", help="onnx, exported-program (.pt2, torch.export) or torchscript.")
    ],
    out: Annotated[
        Optional[Path], typer.Option(help="File or folder to write (default: next to the weights, e.g. best.onnx).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images in the check batch; a batch of one more is checked too.")
    ] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
) -> None:
    """Export saved weights for inference: ONNX, torch.export or TorchScript, checked first.

    The file takes any batch size. Its logits are compared with PyTorch's before it is
    written; a file that fails the check is not written."""
    from gtrain.export import export_model

    try:
        result = export_model(path, export_format=export_format, out=out, batch_size=batch_size)
    except UserError as error:
        raise fail(error) from None
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
        return
    if result.checked:
        sizes = " and ".join(map(str, result.check_batch_sizes))
        check = f"max abs diff {result.max_abs_diff:.2g} at batch {sizes} (tolerance {result.tolerance:.2g}): checked"
    else:
        check = "not checked"
    size = f"{result.size_bytes / 1e6:.1f} MB"
    console.print(
        f"{result.format}: {printable(result.path)} ({size}, {result.image_size} px), {check}", highlight=False, markup=False, soft_wrap=True
    )
    if result.note:
        console.print(result.note, highlight=False, markup=False)


def main() -> None:
    try:
        app()
    finally:
        # Python's last garbage collection at exit walks every object that importing torch
        # and torchvision made: about a second, spent on nothing. Frozen, they are left to
        # the operating system, as the process's memory is.
        gc.freeze()
