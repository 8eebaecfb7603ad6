"""The one place that writes and reads checkpoints and weights.

Training state (`checkpoints/last.pt`) holds only tensors and plain containers so it
loads with `torch.load(weights_only=True)`: unpickling a downloaded file can never run
code. Weights for sharing are safetensors with string metadata that is enough to
rebuild the model and its preprocessing (`gtrain eval model.safetensors`).

Every write goes through `gtrain.files.write_atomic`, so a crash at any moment leaves the
previous file intact. During training the writes go through a `BackgroundSaver`, which
writes them while the next steps train.
"""

import copy
import json
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from gtrain.version import __version__
from gtrain.errors import UserError, did_you_mean, error_line, printable
from gtrain.files import check_fits_in_memory, write_atomic
from gtrain.models import classifier_keys, create_model, stem_weight_key


# ---------------------------------------------------------------------------------------
# Training state


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, lambda file: torch.save(state, file))


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
    interpolation: str = "bilinear"  # of the evaluation resize; files from before it was saved used bilinear
    resize_size: int | None = None  # cropped data: the short side before the centre crop; None: image_size / 0.875
    full_decode: bool = False  # data.decode = "cpu-full": image files decoded whole, never at a smaller scale
    # Images per forward pass when the run validated these weights (each process's share of
    # data.batch_size): `gtrain eval` scores in the same batches, so it gives the logged
    # numbers. None in files from before it was saved, which validated in data.batch_size.
    eval_batch_size: int | None = None

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
            "interpolation": self.interpolation,
            **({"resize_size": str(self.resize_size)} if self.resize_size is not None else {}),
            "decode": "full" if self.full_decode else "scaled",
            **({"eval_batch_size": str(self.eval_batch_size)} if self.eval_batch_size is not None else {}),
            "gtrain_version": __version__,
        }

    @classmethod
    def from_strings(cls, meta: dict[str, str], source: Path) -> "WeightsMeta":
        """Parse and check the metadata of a weights file, field by field: it is free text
        that anyone can edit, and it decides what gets built."""
        missing = [key for key in ("model", "num_classes", "in_chans", "image_size", "mean", "std", "class_names")
                   if key not in meta]  # fmt: skip
        if missing:
            raise UserError(
                f"{printable(source)}: weights without gtrain metadata (no {', '.join(missing)}); "
                "was it written by gtrain fit? (to fine-tune from other weights, use model.pretrained)"
            )
        field = _MetaFields(meta, source)
        model = field.model()
        num_classes = field.integer("num_classes", 1, MAX_CLASSES)
        in_chans = field.integer("in_chans", 1, MAX_CHANNELS)
        class_names = field.json("class_names", list)
        if not all(isinstance(name, str) and len(name) <= MAX_NAME for name in class_names) or len(class_names) != num_classes:
            raise field.bad("class_names", meta["class_names"], f"must be {num_classes} names (num_classes), each a string")
        return cls(
            model=model, num_classes=num_classes, in_chans=in_chans,
            image_size=field.integer("image_size", 1, MAX_IMAGE_SIZE),
            mean=field.numbers("mean", in_chans, 0.0, 1.0), std=field.numbers("std", in_chans, 1e-6, 10.0),
            class_names=tuple(class_names), dataset=field.text("dataset"), model_settings=field.model_settings(model),
            interpolation=field.choice("interpolation", ("bilinear", "bicubic"), default="bilinear"),
            resize_size=field.integer("resize_size", 1, MAX_IMAGE_SIZE) if "resize_size" in meta else None,
            # Files from before the scaled decode were validated with whole decodes.
            full_decode=field.choice("decode", ("scaled", "full"), default="full") == "full",
            eval_batch_size=field.integer("eval_batch_size", 1, MAX_BATCH) if "eval_batch_size" in meta else None,
        )  # fmt: skip


# What a weights file's metadata may say; beyond these it is damaged or hostile.
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 64
MAX_IMAGE_SIZE = 8192
MAX_BATCH = 1_000_000
MAX_NAME = 1000  # characters of a class or dataset name


class _MetaFields:
    """Reads one field of weights metadata at a time; anything off is one line naming it."""

    def __init__(self, meta: dict[str, str], source: Path):
        self.meta, self.source = meta, source

    def bad(self, key: str, value: Any, expected: str) -> UserError:
        shown = printable(repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "...")
        return UserError(
            f"{printable(self.source)}: metadata {key} = {shown} {expected}; the file was damaged or edited "
            "after gtrain wrote it"
        )

    def model(self) -> str:
        from gtrain.models import list_models

        name = self.meta["model"]
        if name not in list_models():
            raise self.bad("model", name, f"is not a gtrain model: {did_you_mean(name, list_models())}")
        return name

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.meta[key]
        if not (isinstance(value, str) and value.strip().isdigit() and low <= int(value) <= high):
            raise self.bad(key, value, f"must be a whole number from {low} to {high:,}")
        return int(value)

    def json(self, key: str, kind: type, default: str | None = None) -> Any:
        try:
            value = json.loads(self.meta.get(key, default) if default is not None else self.meta[key])
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, kind):
            raise self.bad(key, self.meta.get(key), f"must be a JSON {kind.__name__}")
        return value

    def numbers(self, key: str, count: int, low: float, high: float) -> tuple[float, ...]:
        values = self.json(key, list)
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) and low <= v <= high for v in values)
        if len(values) != count or not numeric:
            raise self.bad(key, self.meta[key], f"must be {count} numbers (one per channel) from {low:g} to {high:g}")
        return tuple(float(v) for v in values)

    def text(self, key: str) -> str:
        value = self.meta.get(key, "")
        if len(value) > MAX_NAME:
            raise self.bad(key, value, f"must be at most {MAX_NAME} characters")
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, default: str) -> str:
        value = self.meta.get(key, default)
        if value not in choices:
            raise self.bad(key, value, f"must be one of {', '.join(choices)}")
        return value

    def model_settings(self, model: str) -> dict[str, Any]:
        from gtrain.recipe import check_model_settings

        settings = self.json("model_settings", dict, default="{}")
        problems = check_model_settings(model, settings)
        if problems:
            raise self.bad("model_settings", self.meta.get("model_settings"), f"is not valid for {model}: {problems[0]}")
        return settings


def check_tensor_shapes(meta: WeightsMeta, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """The tensors must be those of the model the metadata describes, name for name and shape
    for shape: checked on the meta device, before anything is allocated."""
    with torch.device("meta"):
        model = create_model(meta.model, num_classes=meta.num_classes, in_chans=meta.in_chans, **meta.model_settings)
    expected = shapes_of(model.state_dict())
    head, stem = classifier_keys(model)[0], stem_weight_key(model)
    name = printable(source)
    if head in shapes and shapes[head][:1] != (meta.num_classes,):
        raise UserError(
            f"{name}: metadata num_classes = {meta.num_classes}, but the head tensor {head} has shape "
            f"{shapes[head]}: the file was damaged or edited after gtrain wrote it"
        )
    if stem in shapes and shapes[stem][1:2] != (meta.in_chans,):
        raise UserError(
            f"{name}: metadata in_chans = {meta.in_chans}, but the stem tensor {stem} has shape {shapes[stem]}: "
            "the file was damaged or edited after gtrain wrote it"
        )
    detail = shape_misfits(expected, shapes)
    if detail:
        raise UserError(f"{name}: its tensors are not those of {meta.model} as its metadata describes it: {detail}")


def save_weights(path: Path, model: nn.Module, meta: WeightsMeta) -> None:
    write_weights(path, weights_copy(model), meta)


def weights_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as a weights file holds them: contiguous, on the CPU, copied."""
    return {key: torch.empty_like(value, device="cpu", memory_format=torch.contiguous_format).copy_(value)
            for key, value in model.state_dict().items()}  # fmt: skip


def write_weights(path: Path, tensors: dict[str, torch.Tensor], meta: WeightsMeta) -> None:
    write_atomic(path, save_safetensors_bytes(tensors, metadata=meta.to_strings()))


# ---------------------------------------------------------------------------------------
# Saving while training goes on


class BackgroundSaver:
    """Writes training state and weights files on one thread, in the order they were
    asked for, while training goes on.

    Each save copies its tensors to the CPU when it is asked for, so the steps that follow
    cannot change what is written, and a file holds the run exactly at its step. A failed
    write (a full disk) is raised by `check`, the next save or `wait`; what was asked for
    after it is not done. At most `MAX_COPIES` saves wait at once: a run whose files take
    longer to write than its epochs take to train waits for them, rather than holding more
    copies in memory.
    """

    MAX_COPIES = 3  # an epoch's best weights, best weight average and training state

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gtrain-saver")
        self._pending: deque[tuple[Future, bool]] = deque()  # each write, and whether it holds a copy
        self._failed = False  # a write failed: what was asked for after it is skipped
        self._error: BaseException | None = None  # the first failed write's, once it was waited for

    def save_state(self, path: Path, state: dict[str, Any]) -> None:
        self._make_room()
        self._submit(True, save_state, path, _copied(state))

    def save_weights(self, path: Path, model: nn.Module, meta: WeightsMeta) -> None:
        self._make_room()
        self._submit(True, write_weights, path, weights_copy(model), meta)

    def after_writes(self, action: Callable[[], None]) -> None:
        """Run `action` on the saving thread once the files asked for before it are written."""
        self.check()
        self._submit(False, action)

    def check(self) -> None:
        """Raise the error of a write that has failed, without waiting for any."""
        while self._pending and self._pending[0][0].done():
            self._settle_first()

    def wait(self) -> None:
        """Return once every file asked for is written; raise the first failed write's error."""
        while self._pending:
            self._settle_first()

    def close(self, *, abandon_queued: bool = False) -> BaseException | None:
        """Wait for every write asked for, or with `abandon_queued` for the one under way
        alone; return the first failed write's error, or None."""
        if abandon_queued:
            for pending, _ in self._pending:
                pending.cancel()  # one that has started cannot be: it finishes
        while self._pending:
            try:
                self._settle_first()
            except Exception:  # kept in self._error; the next still has to finish
                pass
        self._executor.shutdown(wait=True)
        return self._error

    def _make_room(self) -> None:
        self.check()
        while sum(holds_copy for _, holds_copy in self._pending) >= self.MAX_COPIES:
            self._settle_first()

    def _settle_first(self) -> None:
        pending, _ = self._pending[0]
        try:
            pending.result()
        except CancelledError:
            pass
        except BaseException as error:
            if pending.done():  # the write's own error, not a signal that interrupted the wait
                self._error = self._error or error
            raise
        finally:
            if pending.done():  # not when a signal interrupted the wait: it is waited for again
                self._pending.popleft()

    def _submit(self, holds_copy: bool, write: Callable[..., None], *args: Any) -> None:
        self._pending.append((self._executor.submit(self._in_order, write, *args), holds_copy))

    def _in_order(self, write: Callable[..., None], *args: Any) -> None:
        # After a failed write, a later one would leave files that disagree (run.json saying
        # an epoch that last.pt does not hold): the run fails with the first error instead.
        if self._failed:
            return
        try:
            write(*args)
        except BaseException:
            self._failed = True
            raise


def _copied(value: Any) -> Any:
    """`value` with every tensor in a dict, list or tuple copied to the CPU and those
    containers copied (a state_dict's tensors are the live ones, and the progress's history
    grows); anything else deep-copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = copy.copy(value)  # the same type and attributes (a module state_dict's _metadata)
        for key, item in value.items():
            copied[key] = _copied(item)
        return copied
    if type(value) in (list, tuple):
        return type(value)(_copied(item) for item in value)
    return copy.deepcopy(value)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], WeightsMeta]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no weights file at {path}")
    try:
        with safe_open(path, "pt") as file:  # the header only: names, shapes, dtypes, metadata
            meta = file.metadata() or {}
            header = {key: file.get_slice(key) for key in file.keys()}
            shapes = {key: tuple(part.get_shape()) for key, part in header.items()}
            nbytes = sum(math.prod(shape) * _DTYPE_BYTES.get(part.get_dtype(), 8) for shape, part in zip(shapes.values(), header.values()))
    except (SafetensorError, ValueError, OSError) as error:
        raise UserError(f"cannot read {printable(path)}: not a valid safetensors file ({printable(error_line(error))})") from None
    parsed = WeightsMeta.from_strings(meta, path)
    check_tensor_shapes(parsed, shapes, path)
    check_fits_in_memory(nbytes, path)
    try:
        tensors = load_safetensors_file(path)
    except (SafetensorError, ValueError, OSError) as error:
        raise UserError(f"cannot read {printable(path)}: not a valid safetensors file ({printable(error_line(error))})") from None
    return tensors, parsed


# Bytes per element of the safetensors dtypes (unknown ones count as 8).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a one-line explanation instead of PyTorch's wall of key names."""
    detail = shape_misfits(shapes_of(model.state_dict()), shapes_of(state_dict))
    if detail:
        raise UserError(f"{printable(source)} does not fit this model: {detail}")
    model.load_state_dict(state_dict, strict=True)


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in tensors.items()}


def shape_misfits(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """How the tensors `found` (name -> shape) differ from those a model `expected`, in one
    line; None when they are the same."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [key for key in expected if key in found and found[key] != expected[key]]
    parts = [
        f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
        f"{len(unexpected)} unexpected (e.g. {printable(unexpected[0])})" if unexpected else "",
        f"{len(mismatched)} of another shape (e.g. {mismatched[0]}: {found[mismatched[0]]} in the file, "
        f"{expected[mismatched[0]]} for the model)" if mismatched else "",
    ]  # fmt: skip
    return "; ".join(part for part in parts if part) or None


def load_model(weights: Path) -> tuple[nn.Module, WeightsMeta]:
    """A weights file gtrain wrote -> the model and what the file says about it
    (`run_folder.weights_file` picks a run folder's)."""
    state_dict, meta = read_weights(weights)
    model = create_model(meta.model, num_classes=meta.num_classes, in_chans=meta.in_chans, **meta.model_settings)
    load_into(model, state_dict, weights)
    return model, meta
