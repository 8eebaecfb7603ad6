"""`gtrain plot`: a run's curves per epoch, or several runs' side by side, as one PNG; and
the confusion-matrix PNG of `gtrain eval --plot`.

Three panels: loss (train solid, validation dashed), validation top-1 in percent (the
weight average dotted, for runs with EMA), and the learning rate at the end of each
epoch. Each run has one colour, labelled by its folder.
matplotlib is an optional extra (`pip install 'gtrain[plot]'`), imported only here, and
drawn with the Agg canvas so that no display and no pyplot state are involved.
"""

import io
import os
from pathlib import Path
from typing import Any

from gtrain.errors import UserError
from gtrain.files import write_atomic
from gtrain.run_folder import RunFolder
from gtrain.runs import read_metrics

MISSING_MATPLOTLIB = "gtrain plot needs matplotlib: pip install 'gtrain[plot]'"
# Beyond this many classes the plot's tick labels overlap: leave the axes unlabelled.
MAX_PLOT_LABELS = 30
# Up to this many classes each non-empty cell of the plot also shows its percentage.
MAX_ANNOTATED_CLASSES = 12


def plot_runs(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the PNG for `run_dirs` to `out` (default: see `default_out`); returns its path."""
    run_dirs = [Path(d) for d in run_dirs]
    curves = {label: load_curves(d) for label, d in zip(run_labels(run_dirs), run_dirs)}
    figure = metrics_figure(curves)
    out = Path(out) if out is not None else default_out(run_dirs)
    save_png(figure, out)
    return out


def default_out(run_dirs: list[Path]) -> Path:
    """Inside the run folder for one run; in the current folder for a comparison."""
    return run_dirs[0] / "metrics.png" if len(run_dirs) == 1 else Path("runs-comparison.png")


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, or the paths as given when two runs share a name (a/run, b/run)."""
    names = [d.resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def load_curves(run_dir: Path) -> list[dict[str, Any]]:
    """The finished epochs of a run, in order; unreadable lines are left out."""
    metrics = RunFolder(run_dir).metrics
    if not metrics.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl: give a run folder written by gtrain fit")
    rows, _ = read_metrics(metrics)
    if not rows:
        raise UserError(f"{run_dir} has no finished epoch in metrics.jsonl yet: nothing to plot")
    return sorted(rows, key=lambda row: row["epoch"])


def metrics_figure(curves: dict[str, list[dict[str, Any]]]):
    """A matplotlib Figure with the loss, top-1 and lr panels for each labelled run."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError(MISSING_MATPLOTLIB) from None

    figure = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # draws without a display, whatever backend pyplot may be using
    loss_ax, top1_ax, lr_ax = figure.subplots(1, 3, sharex=True)
    for index, (label, rows) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        loss_ax.plot(*_series(rows, "train_loss"), color=colour, linestyle="-")
        loss_ax.plot(*_series(rows, "val_loss"), color=colour, linestyle="--")
        top1_ax.plot(*_series(rows, "val_top1", scale=100), color=colour, marker=".", label=label)
        ema_epochs, ema_top1 = _series(rows, "val_top1_ema", scale=100)
        if ema_epochs:  # runs with train.ema_decay: the weight average, dotted
            top1_ax.plot(ema_epochs, ema_top1, color=colour, linestyle=":", label=f"{label} (EMA)")
        lr_ax.plot(*_series(rows, "lr"), color=colour)

    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    loss_ax.legend(
        handles=[Line2D([], [], color="k", linestyle="-"), Line2D([], [], color="k", linestyle="--")],
        labels=["train", "val"],
    )
    top1_ax.set(title="validation top-1", xlabel="epoch", ylabel="top-1 (%)")
    if len(curves) > 1 or any(line.get_linestyle() == ":" for line in top1_ax.get_lines()):
        top1_ax.legend(loc="lower right")
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    for ax in (loss_ax, top1_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
    figure.suptitle(next(iter(curves)) if len(curves) == 1 else f"{len(curves)} runs")
    return figure


def save_png(figure, out: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomic(out, buffer.getvalue())


def write_confusion_plot(path: Path, confusion: list[list[int]], class_names: tuple[str, ...], *, title: str) -> None:
    """The confusion matrix as a PNG, each row divided by its class's images, so the diagonal
    reads as per-class recall whatever the class sizes."""
    import numpy as np

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MISSING_MATPLOTLIB) from None

    counts = np.asarray(confusion, dtype=np.float64)
    normalized = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # a class with no images: a zero row
    n = len(class_names)
    side_inches = min(4 + 0.3 * n, 20)
    # A Figure on the Agg canvas, not pyplot: no GUI backend, and no global state for a caller to inherit.
    figure = Figure(figsize=(side_inches + 1.5, side_inches), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(normalized, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    axes.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= MAX_PLOT_LABELS:
        axes.set_xticks(range(n), class_names, rotation=90)
        axes.set_yticks(range(n), class_names)
    if n <= MAX_ANNOTATED_CLASSES:
        for t, p in zip(*normalized.nonzero()):
            shade = "white" if normalized[t, p] > 0.5 else "black"
            axes.text(p, t, f"{normalized[t, p]:.0%}", ha="center", va="center", color=shade, fontsize=8)
    save_png(figure, path)


def write_lr_find_plot(path: Path, lrs: list[float], losses: list[float], smoothed: list[float], suggested: float | None) -> None:
    """`gtrain lr-find --plot`: loss against lr on a log axis, the suggestion marked."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MISSING_MATPLOTLIB) from None

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(lrs, losses, color="0.75", linewidth=1, label="loss per step")
    axes.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed")
    if suggested is not None:
        axes.axvline(suggested, color="C3", linestyle="--", label=f"suggested lr {suggested:.3g}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    if smoothed:  # the diverging end would squash the part worth reading
        low, start = min(min(losses), min(smoothed)), smoothed[0]
        axes.set_ylim(low - 0.05 * (start - low + 1e-3), max(start, low) + 1.5 * (start - low) + 0.2 * abs(start))
    axes.legend()
    save_png(figure, path)


def _series(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(epochs, values) for the rows that hold a number under `key`."""
    kept = [row for row in rows if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
    return [row["epoch"] for row in kept], [row[key] * scale for row in kept]


def check_plot_path(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: the plot is a PNG image: give a path that ends in .png")
    try:
        import matplotlib  # noqa: F401  (an optional extra)
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'gtrain[plot]'") from None
    # write_atomic creates missing folders: the nearest one that exists must take a new file.
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--plot {path}: cannot write in {folder}: choose a writable folder")
