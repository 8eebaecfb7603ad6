"""The `gtrain` command line. Commands are thin: options, then one call into the library.

Every user mistake arrives here as a `UserError` and leaves as one line on stderr with
exit code 2; rich lives in this layer and in `progress`.
"""

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from gtrain.errors import UserError

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


def fail(error: UserError) -> typer.Exit:
    error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(UserError.exit_code)


@app.command()
def fit(
    recipe: Annotated[Optional[str], typer.Argument(help="Bundled recipe name or path to a .toml file.")] = None,
    overrides: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<recipe>-<timestamp>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder from its last checkpoint.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (overrides train.device).")] = None,
    nproc: Annotated[
        Optional[int], typer.Option(min=1, help="Train with N processes on this machine (runs torchrun for you).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final summary.")] = False,
) -> None:
    """Train a model from a recipe (default: quickstart) and write a run folder.

    data.batch_size is the global batch: under torchrun each of N processes takes 1/N of it.
    """
    from gtrain import distributed, runtime
    from gtrain.progress import Reporter
    from gtrain.recipe import load_recipe
    from gtrain.train import Interrupted, fit as run_fit

    if nproc is not None and not distributed.launched_by_torchrun():
        launch_torchrun(nproc)
    world = distributed.World.from_env()  # so that only rank 0 prints, even before it joins the group
    reporter = Reporter(console if world.is_main else Console(quiet=True), quiet=quiet or not world.is_main)
    run_dir = resume or out
    try:
        if resume is not None:
            if recipe is not None or out is not None:
                raise UserError(
                    "--resume RUN_DIR continues that folder with its own recipe.toml: give no recipe and no --out with it"
                )
            if not (resume / "recipe.toml").is_file():
                raise UserError(f"{resume} is not a gtrain run folder (no recipe.toml): give the folder `gtrain fit` wrote")
            loaded, name = load_recipe(str(resume / "recipe.toml"), overrides or [])
        else:
            loaded, name = load_recipe(recipe or "quickstart", overrides or [])
            run_dir = out or Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
            if (run_dir / "checkpoints" / "last.pt").exists():
                raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another --out")
        world = distributed.init(runtime.resolve_device(device or loaded.train.device))
        run_dir = distributed.broadcast_object(run_dir, world)  # one timestamp for all processes
        run_fit(loaded, run_dir, reporter=reporter, device=device, resume=resume is not None, world=world)
    except UserError as error:
        reporter.close()
        raise (fail(error) if world.is_main else typer.Exit(UserError.exit_code)) from None
    except OSError as error:  # an unreadable or corrupt data file, a full disk
        reporter.close()
        # From a DataLoader worker the message carries the worker's traceback: keep its last line.
        cause = [line for line in str(error).splitlines() if line.strip()][-1:] or [type(error).__name__]
        error = UserError(f"{cause[0].strip()}; fix or remove that file; nothing in {run_dir} was damaged")
        raise (fail(error) if world.is_main else typer.Exit(UserError.exit_code)) from None
    except Interrupted as stop:
        reporter.close()
        if world.is_main:
            error_console.print(f"stopped by {stop}; checkpoint saved. Resume with: gtrain fit --resume {run_dir}")
        raise typer.Exit(stop.exit_code) from None
    except KeyboardInterrupt:
        reporter.close()
        if world.is_main:
            error_console.print(f"stopped at once; the last checkpoint in {run_dir} is intact")
        raise typer.Exit(130) from None
    finally:
        distributed.shutdown(world)


def launch_torchrun(nproc: int) -> None:
    """`gtrain fit ... --nproc N` becomes `torchrun --standalone --nproc-per-node N -m gtrain fit ...`."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "gtrain", *args]
    os.execv(sys.executable, command)


@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="A run folder or a .safetensors file written by gtrain fit.")],
    split: Annotated[str, typer.Option(help="Dataset split to evaluate: test, val or train.")] = "test",
    overrides: SetOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
) -> None:
    """Evaluate saved weights on a dataset split: top-1, top-5, loss, per-class accuracy."""
    from gtrain.evaluate import run_eval

    try:
        report = run_eval(path, split=split, overrides=overrides or [], batch_size=batch_size, device=device)
    except UserError as error:
        raise fail(error) from None
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    console.print(
        f"{report['model']} on {report['dataset']} ({report['split']}, {report['images']:,} images): "
        f"top-1 {report['top1']:.2%}  top-5 {report['top5']:.2%}  loss {report['loss']:.4f}  "
        f"{report['images_per_s']:,.0f} img/s",
        highlight=False,
    )
    table = Table(title="per-class accuracy")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("top-1", justify="right")
    for row in report["per_class"]:
        table.add_row(row["class"], str(row["images"]), "-" if row["top1"] is None else f"{row['top1']:.2%}")
    console.print(table)


@app.command()
def recipes() -> None:
    """List the bundled recipes with their descriptions."""
    from gtrain.recipe import bundled_recipes, parse_toml

    table = Table(title="bundled recipes (gtrain fit NAME)")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, path in bundled_recipes().items():
        table.add_row(name, str(parse_toml(path.read_text(), str(path)).get("description", "")))
    console.print(table)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects.")] = False,
) -> None:
    """List every model: family, parameters, GFLOPs at its default input size."""
    from gtrain.models.summary import model_table

    rows = model_table()
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="models (gtrain fit --set model.name=NAME)")
    for column, justify in [("name", "left"), ("family", "left"), ("params", "right"), ("GFLOPs", "right"), ("input", "right")]:
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row["name"], row["family"], f"{row['params'] / 1e6:.2f}M", f"{row['gflops']:.2f}", f"{row['input_size']}px")
    console.print(table)


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="Model name (see `gtrain models`).")],
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
    repeats: Annotated[int, typer.Option(help="Timed groups; the result is their median.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
) -> None:
    """Training-step and inference images/s of one model, achieved TFLOP/s and MFU."""
    from gtrain.bench import format_rows, run_bench

    try:
        result = run_bench(
            model, batch_size=batch_size, image_size=image_size, precision=precision, channels_last=channels_last,
            compile=compile, device=device, steps=steps, warmup=warmup, repeats=repeats,
        )  # fmt: skip
    except UserError as error:
        raise fail(error) from None
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
        return
    table = Table(title=f"gtrain bench {model}", show_header=False)
    for label, value in format_rows(result):
        table.add_row(label, value)
    console.print(table)


def main() -> None:
    app()
