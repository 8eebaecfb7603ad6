"""What a user sees while a run trains: a start panel, a live bar per epoch, one row per
finished epoch and a summary. On a terminal this is rich's live display; anywhere else
(CI, a log file) the same facts come as plain lines without control codes.
"""

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from gtrain.errors import printable


@dataclass
class EpochRow:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    images_per_s: float
    data_wait_fraction: float  # share of the training time spent waiting for batches
    seconds: float
    val_loss_ema: float | None = None  # of the weight average, with train.ema_decay
    val_top1_ema: float | None = None
    val_balanced_top1: float | None = None  # the mean of the per-class recalls

    def to_record(self) -> dict[str, Any]:
        """The metrics.jsonl line: every measured value."""
        return {key: value for key, value in vars(self).items() if key != "epochs" and value is not None}


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Reporter:
    """Progress on `console`; `quiet` keeps only the final summary (and errors)."""

    # Redraw at most this often: reading the loss forces a device sync on GPUs.
    refresh_s = 0.5

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console()
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._progress: Progress | None = None
        self._task = None
        self._last_plain = 0.0
        self._epoch_label = ""
        self._steps = 0

    # -- before training -------------------------------------------------------------
    def start(self, facts: dict[str, Any]) -> None:
        if not self.quiet:
            self._facts(facts, title="gtrain fit", style="bold cyan")

    def notice(self, line: str) -> None:
        """A line worth reading before the run starts (it prints even with --quiet)."""
        self.console.print(f"note: {printable(line)}", highlight=False, markup=False, soft_wrap=True)

    def _facts(self, facts: dict[str, Any], *, title: str, style: str) -> None:
        """A panel of `key value` rows on a terminal; `key: value` lines elsewhere. Values are
        shown as text, not markup, with control characters escaped: they hold dataset and
        folder names."""
        if self.live:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style=style)
            grid.add_column()
            for key, value in facts.items():
                grid.add_row(key, Text(printable(value)))
            self.console.print(Panel(grid, title=title, expand=False))
        else:
            for key, value in facts.items():
                self.console.print(f"{key}: {printable(value)}", highlight=False, markup=False, soft_wrap=True)

    # -- during an epoch -------------------------------------------------------------
    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int = 0) -> None:
        self._epoch_label = f"epoch {epoch}/{epochs}"
        self._steps = steps
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._epoch_label, total=steps, completed=start_step, stats="")
        self._last_plain = time.monotonic()

    def step(self, step: int, loss: float, lr: float, images_per_s: float, eta_s: float) -> None:
        stats = f"loss {loss:.4f}  lr {lr:.3g}  {images_per_s:,.0f} img/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif not self.quiet and time.monotonic() - self._last_plain > 30:
            # Plain output: a line every 30 s so long epochs still show signs of life.
            self._last_plain = time.monotonic()
            self.console.print(
                f"{self._epoch_label} step {step}/{self._steps} {stats} eta {format_seconds(eta_s)}",
                highlight=False,
                soft_wrap=True,
            )

    def epoch_end(self, row: EpochRow) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.quiet:
            return
        self.console.print(
            f"epoch {row.epoch:>3}/{row.epochs}  train_loss {row.train_loss:.4f}  val_loss {row.val_loss:.4f}  "
            f"top1 {row.val_top1:6.2%}  top5 {row.val_top5:6.2%}  "
            + (f"ema top1 {row.val_top1_ema:6.2%}  " if row.val_top1_ema is not None else "")
            + f"{row.images_per_s:,.0f} img/s  "
            f"{format_seconds(row.seconds)}",
            highlight=False,
            soft_wrap=True,
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- after training --------------------------------------------------------------
    def summary(self, facts: dict[str, Any]) -> None:
        self._facts(facts, title="done", style="bold green")
