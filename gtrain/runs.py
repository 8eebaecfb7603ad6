"""`gtrain runs`: what the run folders under a folder hold, read without loading a checkpoint.

A run folder is one `gtrain fit` wrote: `recipe.toml` plus `metrics.jsonl` (one row per
finished epoch) or `run.json` (the run's status, rewritten atomically at its start, after
every epoch and at its end). Each fact comes from `run.json` when it holds it, else from
the other files, so folders written before `run.json` existed are listed too. A file that
is missing, partial or corrupt never stops the listing: a fact nobody can read is None.

Status of a run without `run.json`: `final.safetensors` is written last, so with it the
run finished; without it the run stopped early (or is still running: that cannot be told
apart from the files alone) and is reported "interrupted".

A run that says "running" but whose process is gone on this host was killed (SIGKILL, out
of memory, a reboot) before it could say otherwise: it is reported "failed", detail
"killed". A run on another host is reported as it says, since its process cannot be
checked from here.
"""

import json
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gtrain.errors import UserError
from gtrain.progress import format_seconds
from gtrain.run_folder import RunFolder

STATUSES = ("running", "finished", "interrupted", "failed")

# runs/<group>/<sweep>/<run> is as deep as people nest runs; deeper search only costs time.
SEARCH_DEPTH = 3

@dataclass
class RunSummary:
    """One run folder; None wherever the files do not say."""

    path: Path
    run: str  # the folder, relative to the folder searched
    status: str
    detail: list[str] = field(default_factory=list)  # short notes: why the status, which files were unreadable
    recipe: str | None = None
    model: str | None = None
    dataset: str | None = None
    epochs_done: int | None = None
    epochs: int | None = None  # planned
    best_top1: float | None = None  # fraction, 0..1
    best_epoch: int | None = None
    elapsed_s: float | None = None
    started: datetime | None = None  # local time

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "path": str(self.path),
            "status": self.status,
            "detail": "; ".join(self.detail) or None,
            "recipe": self.recipe,
            "model": self.model,
            "dataset": self.dataset,
            "epochs_done": self.epochs_done,
            "epochs": self.epochs,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "elapsed_s": self.elapsed_s,
            "started": self.started.isoformat(timespec="seconds") if self.started else None,
        }


def list_runs(root: Path) -> list[RunSummary]:
    """Every run folder under `root` (or `root` itself), oldest first."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root} does not exist: give the folder that holds your runs (gtrain fit writes to runs/)")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the folder that holds your runs")
    runs = [read_run(folder, root) for folder in find_run_folders(root)]
    return sorted(runs, key=lambda r: (r.started is None, r.started or datetime.min, r.run))


def find_run_folders(folder: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    if is_run_folder(folder):
        return [folder]  # its checkpoints/ folder holds no further runs
    if depth == 0:
        return []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # an unreadable folder has no runs we could show
        return []
    return [run for child in children for run in find_run_folders(child, depth - 1)]


def is_run_folder(folder: Path) -> bool:
    paths = RunFolder(folder)
    return paths.recipe.is_file() and (paths.metrics.is_file() or paths.status.is_file())


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of metrics.jsonl that are JSON objects with an integer epoch, and how many lines were not."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return [], 0
    rows, unreadable = [], 0
    for line in filter(str.strip, lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and _is_int(row.get("epoch")):
            rows.append(row)
        else:
            unreadable += 1
    return rows, unreadable


def read_run(folder: Path, root: Path) -> RunSummary:
    """Facts from the files first, then whatever run.json states on top of them."""
    summary = summary_from_files(folder, root)
    status_file = RunFolder(folder).status
    if status_file.exists():
        state = _read_json_object(status_file)
        if state is None:
            summary.detail.append("run.json unreadable")
        else:
            apply_run_state(summary, state)
    return summary


def summary_from_files(folder: Path, root: Path) -> RunSummary:
    relative, paths = folder.relative_to(root), RunFolder(folder)
    summary = RunSummary(
        path=folder,
        run=folder.resolve().name if relative == Path(".") else relative.as_posix(),
        status="finished" if paths.final.is_file() else "interrupted",
    )
    recipe = _read_toml(paths.recipe)
    if recipe is None:
        summary.detail.append("recipe.toml unreadable")
        recipe = {}
    summary.model = _str_or_none(_section(recipe, "model").get("name"))
    summary.dataset = _str_or_none(_section(recipe, "data").get("dataset"))
    epochs = _section(recipe, "train").get("epochs")
    summary.epochs = epochs if _is_int(epochs) else None

    default_name = paths.parse_default_name()
    if default_name:
        summary.recipe, summary.started = default_name
    if summary.started is None:  # recipe.toml is written when the run starts (and again on each resume)
        summary.started = _modified_time(paths.recipe)

    metrics = paths.metrics
    rows, unreadable = read_metrics(metrics)
    if unreadable:
        summary.detail.append(f"metrics.jsonl: {unreadable} unreadable line{'s' * (unreadable > 1)}")
    summary.epochs_done = max((row["epoch"] for row in rows), default=None if unreadable else 0)
    scored = [row for row in rows if _is_number(row.get("val_top1"))]
    if scored:
        # The first epoch with the highest top-1, as training keeps best.safetensors.
        best = max(scored, key=lambda row: row["val_top1"])
        summary.best_top1, summary.best_epoch = float(best["val_top1"]), best["epoch"]
    seconds = [row["seconds"] for row in rows if _is_number(row.get("seconds"))]
    # Training and validation time only: start-up and data loading before epoch 1 are not in it.
    summary.elapsed_s = float(sum(seconds)) if seconds else None
    return summary


def apply_run_state(summary: RunSummary, state: dict[str, Any]) -> None:
    """Overwrite each fact run.json states with a value of the right type."""
    for key in ("recipe", "model", "dataset"):
        if isinstance(state.get(key), str) and state[key]:  # a resumed run may record its recipe name as ""
            setattr(summary, key, state[key])
    for key in ("epochs", "epochs_done", "best_epoch"):
        if _is_int(state.get(key)):
            setattr(summary, key, state[key])
    for key in ("best_top1", "elapsed_s"):
        if _is_number(state.get(key)):
            setattr(summary, key, float(state[key]))
    started = _parse_time(state.get("started"))
    if started is not None:
        summary.started = started

    if state.get("status") in STATUSES:
        summary.status = state["status"]
    else:
        summary.detail.append("run.json: no valid status")
    if summary.status == "running":
        check_still_running(summary, state.get("pid"), state.get("host"))
    if state.get("stopped_early") is True:
        summary.detail.append("stopped early")
    if isinstance(state.get("stopped"), str) and state["stopped"]:
        summary.detail.append(state["stopped"])
    if summary.status == "failed" and isinstance(state.get("error"), str):
        summary.detail.append(state["error"])


def check_still_running(summary: RunSummary, pid: Any, host: Any) -> None:
    """A "running" run whose process is gone was killed before it could record anything else."""
    if not isinstance(host, str) or not _is_int(pid) or pid <= 0:  # 0 and negatives would signal process groups
        summary.detail.append("no pid and host to check")
    elif host != socket.gethostname():
        summary.detail.append(f"on {host}, not checked")
    elif process_is_gone(pid):
        summary.status = "failed"
        summary.detail.append(f"killed: process {pid} gone")


def process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 checks that the process exists and sends nothing
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: it exists, owned by another user
        return False
    return False


def format_row(run: RunSummary) -> dict[str, str]:
    """The table cells for a human, "?" for what the files do not say; the CLI lays them out."""
    best = "?"
    if run.best_top1 is not None:
        best = f"{run.best_top1:.2%}" + (f" (ep {run.best_epoch})" if run.best_epoch is not None else "")
    elif run.epochs_done == 0:
        best = "-"
    return {
        "run": run.run,
        "recipe": _or_unknown(run.recipe),
        "model": _or_unknown(run.model),
        "dataset": _or_unknown(run.dataset),
        "epochs": f"{_or_unknown(run.epochs_done)}/{_or_unknown(run.epochs)}",
        "best top-1": best,
        "time": "?" if run.elapsed_s is None else format_seconds(run.elapsed_s),
        "status": run.status,
        "started": "?" if run.started is None else f"{run.started:%Y-%m-%d %H:%M}",
        "note": "; ".join(run.detail),
    }


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _section(document: dict[str, Any], name: str) -> dict[str, Any]:
    section = document.get(name)
    return section if isinstance(section, dict) else {}


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Local time without a zone, so that runs with and without an offset sort together.
    return moment.astimezone().replace(tzinfo=None) if moment.tzinfo else moment


def _modified_time(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime)
    except OSError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _or_unknown(value: Any) -> str:
    return "?" if value is None else str(value)
