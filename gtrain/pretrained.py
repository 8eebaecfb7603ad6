"""Published weights into a gtrain model, to fine-tune it.

gtrain's models use torchvision's ResNeXt keys and the official HorNet release's keys,
so their checkpoints load as they are: a tensor is copied when its key and shape match.
Two differences are expected when fine-tuning, handled, and reported:

- another class count: the classifier keeps the model's fresh init;
- another number of input channels (1-channel MNIST from RGB weights): the stem's
  filters are summed, so a grey image gives the response it gave in RGB.

Anything else that does not fit is an error naming the keys, rather than a model that
quietly starts from partly random weights.

Only tensors are unpickled (`torch.load(weights_only=True)`): a downloaded .pth can
never run code.
"""

import argparse
import functools
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

from gtrain.errors import UserError, error_line
from gtrain.files import check_fits_in_memory
from gtrain.models import classifier_keys, create_model, list_models, stem_weight_key

PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# Where training scripts keep the weights inside a checkpoint, in the order tried: the
# HorNet release and gtrain's training state use "model" (the release adds "model_ema",
# "optimizer", "scaler", "epoch" and "args" to its training checkpoints), many other
# training scripts "state_dict", timm's "state_dict_ema" for its weight average.
CONTAINER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")
# DistributedDataParallel and DataParallel save "module.*", torch.compile "_orig_mod.*".
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class PretrainedReport:
    """What `load_pretrained` did with the checkpoint's tensors, for the run's log."""

    source: Path
    loaded: int  # tensors copied as they are
    reinitialized: tuple[str, ...]  # classifier keys that keep the model's fresh init
    adapted: dict[str, str]  # key -> how the checkpoint's tensor was changed to fit
    unused: tuple[str, ...]  # checkpoint keys the model has no place for
    checkpoint_classes: int | None  # None: the checkpoint has no classifier
    num_classes: int

    def describe(self) -> str:
        """One line, e.g. "loaded 318 tensors from X; re-initialized fc.weight, fc.bias (1000 → 10 classes)"."""
        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.reinitialized:
            why = (
                "the checkpoint has no classifier"
                if self.checkpoint_classes is None
                else f"{self.checkpoint_classes} → {self.num_classes} classes"
            )
            parts.append(f"re-initialized {', '.join(self.reinitialized)} ({why})")
        parts += [f"adapted {key} ({how})" for key, how in self.adapted.items()]
        if self.unused:
            more = ", ..." if len(self.unused) > 3 else ""
            parts.append(f"{len(self.unused)} checkpoint tensors unused ({', '.join(self.unused[:3])}{more})")
        return "; ".join(parts)


def load_pretrained(model: nn.Module, path: Path) -> PretrainedReport:
    """Copy into `model` every tensor of the checkpoint at `path` that fits it.

    The classifier keeps its fresh init when the class count differs, a stem for another
    number of input channels is adapted; any other tensor of the model that the
    checkpoint lacks or holds in another shape raises `UserError`.
    """
    path = Path(path)
    weights = unwrap_state_dict(read_checkpoint(path), path)
    plan = plan_load(model, weights)
    if plan.misfits:
        raise UserError(_misfit_message(model, weights, plan, path))

    state = model.state_dict()
    for key in plan.loaded:
        state[key] = weights[key]
    for key in plan.adapted_stem:
        state[key] = adapt_stem(weights[key], in_chans=state[key].shape[1])
    model.load_state_dict(state, strict=True)  # copies into the model's own tensors, casting dtype

    head = classifier_keys(model)
    theirs = weights.get(head[0])
    return PretrainedReport(
        source=path,
        loaded=len(plan.loaded),
        reinitialized=tuple(plan.reinitialized),
        adapted={key: _stem_change(weights[key].shape[1], state[key].shape[1]) for key in plan.adapted_stem},
        unused=tuple(plan.unused),
        checkpoint_classes=None if theirs is None else theirs.shape[0],
        num_classes=state[head[0]].shape[0],
    )


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: Path) -> Any:
    """The object saved at `path`: a .safetensors file, or a .pth/.pt/.bin holding only tensors."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: give the path of a local .pth, .pt, .bin or .safetensors file")
    # Its tensors take about as much memory as the file's size (safetensors and torch's zip
    # archives store them uncompressed).
    check_fits_in_memory(path.stat().st_size, path)
    if path.suffix == ".safetensors":
        try:
            return load_safetensors_file(path)
        except (SafetensorError, ValueError, OSError) as error:
            raise UserError(f"cannot read {path}: not a valid safetensors file ({error_line(error, with_type=True)})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise UserError(
            f"cannot read {path}: unknown checkpoint suffix {path.suffix!r}; expected .pth, .pt, .bin or .safetensors"
        )
    try:
        # The HorNet release's training checkpoints keep its argparse settings next to the
        # weights; a Namespace only holds attributes, so it is as safe to rebuild as a dict.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise UserError(f"cannot read {path}: not a PyTorch checkpoint ({error_line(error, with_type=True)})") from None
        # e.g. "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = found.group(1) if found else "pickled objects"
        raise UserError(
            f"refusing to load {path}: it holds {what}, not only tensors, and unpickling it could run code; "
            "if you trust its source, re-save just the weights with torch.save(model.state_dict(), ...)"
        ) from None
    except Exception as error:  # torch.load raises anything from EOFError to KeyError on a foreign file
        raise UserError(f"cannot read {path}: not a PyTorch checkpoint, or truncated ({error_line(error, with_type=True)})") from None


def unwrap_state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors, out of the usual containers and without wrapper prefixes."""
    weights = checkpoint
    if not _is_state_dict(weights) and isinstance(checkpoint, Mapping):
        weights = next((checkpoint[k] for k in CONTAINER_KEYS if _is_state_dict(checkpoint.get(k))), None)
    if not _is_state_dict(weights):
        raise UserError(
            f"{path} holds no model weights: expected a state_dict, or one under "
            f"{', '.join(repr(k) for k in CONTAINER_KEYS)}; found {_outline(checkpoint)}"
        )
    return _strip_wrapper_prefixes(dict(weights))


def _strip_wrapper_prefixes(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A loop, as wrappers nest: DDP around a compiled model saves "module._orig_mod.*".
    while prefix := next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in weights)), None):
        weights = {key.removeprefix(prefix): value for key, value in weights.items()}
    return weights


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _outline(checkpoint: Any) -> str:
    if isinstance(checkpoint, Mapping):
        keys = [repr(k) for k in list(checkpoint)[:6]]
        return f"a dict with keys {', '.join(keys)}" if keys else "an empty dict"
    return f"a {type(checkpoint).__name__}"


# ----------------------------------------------------------------------------- matching


@dataclass
class LoadPlan:
    """What happens to each of the model's tensors, decided from shapes alone."""

    loaded: list[str] = field(default_factory=list)  # same key, same shape
    reinitialized: list[str] = field(default_factory=list)  # the classifier, for another class count
    adapted_stem: list[str] = field(default_factory=list)  # the stem, for another number of input channels
    misfits: dict[str, str] = field(default_factory=dict)  # key -> why it cannot be loaded
    unused: list[str] = field(default_factory=list)  # checkpoint keys the model lacks


def plan_load(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> LoadPlan:
    head = classifier_keys(model)
    stem = stem_weight_key(model)
    own = model.state_dict()
    plan = LoadPlan(unused=[key for key in weights if key not in own])
    for key, tensor in own.items():
        theirs = weights.get(key)
        if theirs is not None and theirs.shape == tensor.shape:
            plan.loaded.append(key)
        elif key in head:
            plan.reinitialized.append(key)
        elif theirs is not None and key == stem and _differs_only_in_input_channels(theirs.shape, tensor.shape):
            plan.adapted_stem.append(key)
        elif theirs is None and key.endswith("num_batches_tracked"):
            # Checkpoints saved before PyTorch 0.4.1 lack this BatchNorm step counter; it
            # only matters with momentum=None, which gtrain does not use. The model keeps 0.
            continue
        elif theirs is None:
            plan.misfits[key] = "missing"
        else:
            plan.misfits[key] = f"{tuple(theirs.shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
    return plan


def _differs_only_in_input_channels(theirs: torch.Size, ours: torch.Size) -> bool:
    return len(theirs) == len(ours) == 4 and theirs[0] == ours[0] and theirs[2:] == ours[2:]


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Stem filters for `in_chans` input channels from filters for another count (RGB, mostly).

    An image whose channels are all equal (a grey image copied to each) keeps the response
    it had: for one channel the filters are summed over their input channels; for more,
    they are tiled over the new channels and scaled so their sum stays the same (exactly
    so when `in_chans` is a multiple of the old count). timm adapts its stems the same way.
    """
    source_chans = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)  # (out, source_chans, k, k) -> (out, 1, k, k)
    repeats = math.ceil(in_chans / source_chans)
    # (out, source_chans, k, k) -> (out, source_chans * repeats, k, k) -> (out, in_chans, k, k)
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_chans]
    return tiled * (source_chans / in_chans)


def _stem_change(source_chans: int, in_chans: int) -> str:
    how = "filters summed" if in_chans == 1 else f"filters tiled, scaled by {source_chans}/{in_chans}"
    return f"{source_chans} → {in_chans} input channels, {how}"


# ----------------------------------------------------------------------------- errors


def _misfit_message(model: nn.Module, weights: Mapping[str, torch.Tensor], plan: LoadPlan, path: Path) -> str:
    examples = "; ".join(f"{key}: {why}" for key, why in list(plan.misfits.items())[:3])
    ours = matching_variants(model.state_dict())
    target = ours[0] if len(ours) == 1 else f"this {type(model).__name__}"
    theirs = [name for name in matching_variants(weights) if name not in ours]
    if theirs:
        hint = f"they look like {' or '.join(theirs)} weights: set model.name = {theirs[0]!r}"
    else:
        hint = "were they saved from another model, or with other model settings?"
    count = f"{len(plan.misfits)} of its {len(model.state_dict())} tensors"
    return f"{path} does not fit {target}: {count} missing or of another shape (e.g. {examples}); {hint}"


def matching_variants(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered models that these tensors fill exactly, up to the classifier and the stem's channels."""
    matches = []
    for name in list_models():
        plan = plan_load(_shapes_only(name), weights)
        if not plan.misfits and not plan.unused:
            matches.append(name)
    return matches


@functools.cache
def _shapes_only(name: str) -> nn.Module:
    # On the meta device: shapes without memory or init time, even for the 200M-parameter variants.
    with torch.device("meta"):
        return create_model(name, num_classes=1000)
