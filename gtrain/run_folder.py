"""What a run folder holds, and the records `gtrain fit` keeps in it as it goes.

    RUN/recipe.toml                 the resolved recipe
    RUN/run.json                    status (running, finished, interrupted, failed) and totals
    RUN/metrics.jsonl               one line per finished epoch
    RUN/checkpoints/last.pt         the training state a resume continues from
    RUN/best.safetensors            weights of the best validation top-1 so far
    RUN/final.safetensors           weights after the last epoch
    RUN/best_ema.safetensors,
    RUN/final_ema.safetensors       the same for the weight average, with train.ema_decay
    RUN/tensorboard/                event files, with log.tensorboard
    RUN/.lock                       held by the process training into the folder (run_lock.py)
    RUN/.trial.lock                 a tune trial: held by the process running it (tune.py)

Only the main process writes, and every file is replaced atomically. Reading the layout
needs no torch (`gtrain runs` stays quick): the atomic writer, which does, is imported
where a file is written.
"""

import json
import os
import re
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gtrain.errors import UserError
from gtrain.files import write_text_atomic


# A run folder gtrain names itself: runs/<recipe>-<local start time>.
NAME_TIME_FORMAT = "%Y%m%d-%H%M%S"
_DEFAULT_NAME = re.compile(r"^(?P<recipe>.+)-(?P<stamp>\d{8}-\d{6})$")


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @classmethod
    def new_default(cls, recipe_name: str, parent: Path = Path("runs")) -> "RunFolder":
        """The folder `gtrain fit` writes to when it is given no --out."""
        return cls(parent / f"{recipe_name}-{datetime.now():{NAME_TIME_FORMAT}}")

    def parse_default_name(self) -> tuple[str, datetime] | None:
        """(recipe name, start time) of a folder named by `new_default`, else None."""
        match = _DEFAULT_NAME.match(self.root.resolve().name)
        if not match:
            return None
        try:
            return match["recipe"], datetime.strptime(match["stamp"], NAME_TIME_FORMAT)
        except ValueError:  # digits in the right places, but not a date (a hand-named folder)
            return None

    def holds_a_run(self) -> bool:
        """A run was started here: it has a checkpoint to continue from."""
        return self.last.exists()

    def eval_weights(self) -> Path | None:
        """The weights `gtrain eval` scores for the folder: the best, else the final ones."""
        return next((p for p in (self.best, self.final) if p.is_file()), None)

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.toml"

    @property
    def status(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def final(self) -> Path:
        return self.root / "final.safetensors"

    @property
    def best_ema(self) -> Path:
        return self.root / "best_ema.safetensors"

    @property
    def final_ema(self) -> Path:
        return self.root / "final_ema.safetensors"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def trial_lock(self) -> Path:
        return self.root / ".trial.lock"


class RunStatus:
    """run.json: what `gtrain runs` shows. Rewritten at the start, after every epoch and
    at the end; `pid` and `host` let a reader tell a live run from a killed one."""

    def __init__(self, paths: RunFolder, facts: dict[str, Any], *, enabled: bool = True):
        self.paths = paths
        self.enabled = enabled  # under torchrun, only the main process writes
        self.record = {
            "status": "running",
            **facts,
            "epochs_done": 0,
            "best_top1": None,
            "best_epoch": None,
            "elapsed_s": 0.0,
            "started": _now(),
            "updated": _now(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "error": None,
            "stopped_early": False,
        }
        if enabled and paths.status.is_file():  # a resumed run keeps its first start and its recipe name
            try:
                previous = json.loads(paths.status.read_text())
            except (OSError, ValueError):
                previous = {}
            self.record["started"] = previous.get("started", self.record["started"])
            self.record["recipe"] = facts.get("recipe") or previous.get("recipe", "")

    @staticmethod
    def read(paths: RunFolder) -> dict[str, Any]:
        """The folder's run.json, or {} when it is missing or unreadable."""
        try:
            record = json.loads(paths.status.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def update(self, **changes: Any) -> None:
        if not self.enabled:
            return
        self.record.update(changes, updated=_now())
        write_text_atomic(self.paths.status, json.dumps(self.record, indent=2) + "\n")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def require_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError(
            "log.tensorboard = true needs the tensorboard package: pip install 'gtrain[tensorboard]', "
            "or set log.tensorboard = false"
        ) from None


class MetricsLog:
    """metrics.jsonl, always; TensorBoard scalars as well with `tensorboard`."""

    def __init__(self, paths: RunFolder, *, tensorboard: bool, enabled: bool = True):
        self.paths = paths
        self.enabled = enabled  # under torchrun, only the main process writes
        self.writer = None
        if tensorboard and enabled:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(paths.tensorboard))

    def write(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl with every finished epoch; send the newest to TensorBoard."""
        if not self.enabled:
            return
        write_text_atomic(self.paths.metrics, "".join(json.dumps(row) + "\n" for row in history))
        if self.writer is not None and history:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float):
                    self.writer.add_scalar(_tensorboard_tag(key), value, global_step=row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_tag(key: str) -> str:
    """val_top1 -> val/top1, so TensorBoard groups the charts by split."""
    split, _, name = key.partition("_")
    return f"{split}/{name}" if split in ("train", "val") and name else key


def weights_file(path: Path) -> Path:
    """The weights file `path` names: a run folder's best weights (else its final ones),
    or the file itself."""
    if path.is_dir():
        weights = RunFolder(path).eval_weights()
        if weights is None:
            raise UserError(f"{path} has no best.safetensors or final.safetensors: is it a gtrain run folder?")
        return weights
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder or a .safetensors file")
    return path
