"""The one place that writes and reads checkpoints and weights.

Training state (`checkpoints/last.pt`) holds only tensors and plain containers so it
loads with `torch.load(weights_only=True)`: unpickling a downloaded file can never run
code. Weights for sharing are safetensors with string metadata that is enough to
rebuild the model and its preprocessing (`gtrain eval model.safetensors`).

Every write goes to a temporary file in the same folder, is fsynced, then renamed over
the old file, so a crash at any moment leaves the previous file intact.
"""

import io
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from gtrain import __version__, faults
from gtrain.errors import UserError, error_line
from gtrain.models import create_model
from gtrain.run_folder import RunFolder


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}; choose a writable folder with --out") from None
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH) & ~umask)
        with os.fdopen(fd, "wb") as file:
            if faults.kill_during_save(path.name):
                file.write(data[: len(data) // 2])
                file.flush()
                faults.kill_now()
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror}; the previous file is unchanged") from None


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


# ---------------------------------------------------------------------------------------
# Training state


def save_state(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise UserError(f"no training state at {path}: is this a gtrain run folder?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or a pickle that wants to run code
        raise UserError(f"cannot load {path}: not a valid gtrain checkpoint ({error_line(error)})") from None
    if not isinstance(state, dict):  # what it must hold is TrainingRun's to say
        raise UserError(f"cannot load {path}: not a gtrain training state (a {type(state).__name__}, not a dict)")
    return state


# ---------------------------------------------------------------------------------------
# Shareable weights


@dataclass(frozen=True)
class WeightsMeta:
    """What `gtrain eval` needs to rebuild the model and its preprocessing."""

    model: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    dataset: str
    model_settings: dict[str, Any]

    def to_strings(self) -> dict[str, str]:
        return {
            "model": self.model,
            "num_classes": str(self.num_classes),
            "in_chans": str(self.in_chans),
            "image_size": str(self.image_size),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "class_names": json.dumps(list(self.class_names)),
            "dataset": self.dataset,
            "model_settings": json.dumps(self.model_settings),
            "gtrain_version": __version__,
        }

    @classmethod
    def from_strings(cls, meta: dict[str, str], source: Path) -> "WeightsMeta":
        try:
            return cls(
                model=meta["model"],
                num_classes=int(meta["num_classes"]),
                in_chans=int(meta["in_chans"]),
                image_size=int(meta["image_size"]),
                mean=tuple(json.loads(meta["mean"])),
                std=tuple(json.loads(meta["std"])),
                class_names=tuple(json.loads(meta["class_names"])),
                dataset=meta.get("dataset", ""),
                model_settings=json.loads(meta.get("model_settings", "{}")),
            )
        except (KeyError, ValueError) as error:
            raise UserError(f"{source}: weights without gtrain metadata ({error}); was it written by gtrain fit?") from None


def save_weights(path: Path, model: nn.Module, meta: WeightsMeta) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, save_safetensors_bytes(tensors, metadata=meta.to_strings()))


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], WeightsMeta]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no weights file at {path}")
    try:
        tensors = load_safetensors_file(path)
        with safe_open(path, "pt") as file:
            meta = file.metadata() or {}
    except (SafetensorError, ValueError, OSError) as error:
        raise UserError(f"cannot read {path}: not a valid safetensors file ({error})") from None
    return tensors, WeightsMeta.from_strings(meta, path)


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a one-line explanation instead of PyTorch's wall of key names."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        detail = (
            f"{len(missing)} missing keys (e.g. {missing[:2]}), " if missing else ""
        ) + (f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}), " if unexpected else "") + (
            f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]}: {tuple(state_dict[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)})"
            if mismatched
            else ""
        )
        raise UserError(f"{source} does not fit this model: {detail.rstrip(', ')}")
    model.load_state_dict(state_dict, strict=True)


def load_model(path: Path) -> tuple[nn.Module, WeightsMeta, Path]:
    """A run folder (its best weights, else final) or a .safetensors file -> model."""
    path = Path(path)
    if path.is_dir():
        weights = RunFolder(path).eval_weights()
        if weights is None:
            raise UserError(f"{path} has no best.safetensors or final.safetensors: is it a gtrain run folder?")
    elif path.exists():
        weights = path
    else:
        raise UserError(f"{path} does not exist: give a run folder or a .safetensors file")
    state_dict, meta = read_weights(weights)
    model = create_model(meta.model, num_classes=meta.num_classes, in_chans=meta.in_chans, **meta.model_settings)
    load_into(model, state_dict, weights)
    return model, meta, weights
