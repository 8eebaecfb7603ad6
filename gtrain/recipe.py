"""Recipes: the TOML schema, loading, `--set` overrides and error messages.

A recipe sets only what differs from the defaults below. Every key is validated; all
mistakes in a recipe are reported together, each as one line naming the full key path,
the bad value and what is allowed.
"""

import dataclasses
import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gtrain.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(BaseModel):
    # Extra keys are the variant's own settings (drop_path_rate, zero_init_last_bn, ...);
    # they are checked against the chosen model's config in `model_overrides`.
    model_config = ConfigDict(extra="allow")

    name: str = "resnext29_4x16d"
    pretrained: str | None = Field(
        None,
        description="fine-tune from a local .pth/.safetensors (torchvision ResNeXt, official HorNet, gtrain); "
        "a head of another class count is re-initialized",
    )


class DataSection(Section):
    dataset: str = "digits"
    root: str = "data"
    download: bool = False
    batch_size: int = Field(128, ge=1, description="global batch: images per optimizer step")
    image_size: int | None = Field(None, ge=4, description="side in pixels; unset: the dataset's default")
    augment: bool = Field(True, description="the dataset's default train augmentation")
    val_split: str = Field("test", description="split used for validation after each epoch")
    workers: int = Field(2, ge=0, description="DataLoader worker processes")
    in_memory: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: small fixed-size datasets (CIFAR, MNIST, digits, ...) live on the device as uint8, "
        "unless auto_augment or random_erasing asks for per-image transforms",
    )
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = Field(
        "none", description="per-image augmentation policy added to the dataset's default one"
    )
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability of erasing a random rectangle per image")
    mixup_alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) MixUp of image pairs in a batch; 0: off")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix of image pairs in a batch; 0: off; both set: one per batch")


class OptimSection(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(5e-4, ge=0, description="not applied to norms and biases")
    schedule: Literal["cosine", "multistep", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup from 0, stepped per iteration")
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/onecycle: final lr as a fraction of lr")
    clip_grad_norm: float | None = Field(None, gt=0, description="max global gradient norm; unset: no clipping")


class TrainSection(Section):
    epochs: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    deterministic: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    channels_last: Literal["auto", "on", "off"] = "auto"
    checkpoint_minutes: float = Field(10.0, gt=0, description="also checkpoint within an epoch this often")
    sync_bn: bool = Field(False, description="SyncBatchNorm across processes under torchrun (CUDA)")
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs; slower on CPU)")
    accumulate_steps: int = Field(
        1, ge=1, description="split each batch into this many micro-batches, summing gradients: same math, less memory"
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights, updated every step"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a new best validation top-1"
    )


class LogSection(Section):
    tensorboard: bool = Field(False, description="also write TensorBoard event files to RUN/tensorboard")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    log: LogSection = Field(default_factory=LogSection)

    @model_validator(mode="after")
    def _milestones_within_epochs(self) -> "Recipe":
        late = [m for m in self.optim.milestones if m >= self.train.epochs]
        if self.optim.schedule == "multistep" and late:
            raise ValueError(f"optim.milestones {late} must be below train.epochs = {self.train.epochs}")
        return self

    @model_validator(mode="after")
    def _accumulation_fits_batch(self) -> "Recipe":
        if self.train.accumulate_steps > self.data.batch_size:
            raise ValueError(
                f"train.accumulate_steps = {self.train.accumulate_steps} splits each batch into micro-batches: "
                f"it cannot exceed data.batch_size = {self.data.batch_size}"
            )
        return self

    def model_overrides(self) -> dict[str, Any]:
        return dict(self.model.model_extra or {})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# Keys a resumed run may change: they do not alter what the run computes, only how long
# it goes on, where it reads its data from and how it is checkpointed.
SAFE_TO_CHANGE_ON_RESUME = frozenset(
    {
        "description", "train.epochs", "train.checkpoint_minutes", "train.device", "train.early_stopping_patience",
        "data.root", "data.download", "data.workers", "log.tensorboard",
    }
)  # fmt: skip


def flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unsafe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose value differs between two resolved recipes, except the safe ones."""
    old, new = flatten(saved), flatten(current)
    changed = {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
    return sorted(changed - SAFE_TO_CHANGE_ON_RESUME)


# ---------------------------------------------------------------------------------------
# Finding and loading recipes


def bundled_recipe_dir() -> Path:
    """Recipes ship inside the package in a wheel, and at the repository top in a checkout."""
    packaged = resources.files("gtrain") / "recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "recipes"


def bundled_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(bundled_recipe_dir().glob("*.toml"))}


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist: give a path to a .toml file or a bundled name (`gtrain recipes`)")
        return path
    bundled = bundled_recipes()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise UserError(f"no recipe named {name_or_path!r}: {_did_you_mean(name_or_path, list(bundled))} (`gtrain recipes` lists them)")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{source}: not valid TOML: {error}") from None


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> tuple[Recipe, str]:
    """Load a recipe file, apply `key.sub=value` overrides, validate; returns (recipe, name)."""
    path = find_recipe(name_or_path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read recipe {path}: {error}") from None
    document = parse_toml(text, str(path))
    apply_overrides(document, overrides)
    return validate_recipe(document, source=str(path)), path.stem


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> None:
    """`--set optim.lr=0.05`: the value is read as TOML (so 0.05 is a float, true a bool,
    [1, 2] a list); anything that is not a TOML value is taken as a string."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key.sub=value, for example --set optim.lr=0.05")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        *parents, leaf = key.split(".")
        node = document
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {part} is a value, not a section")
            node = child
        node[leaf] = value


def validate_recipe(document: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(document)
    except ValidationError as error:
        lines = [_describe(e, document) for e in error.errors()]
        raise UserError(_join(source, lines)) from None
    lines = _check_model_settings(recipe)
    if lines:
        raise UserError(_join(source, lines))
    return recipe


def _join(source: str, lines: list[str]) -> str:
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source}: {len(lines)} problems\n" + "\n".join(f"  {line}" for line in lines)


def _check_model_settings(recipe: Recipe) -> list[str]:
    """Extra [model] keys must be settings of the chosen variant, of the same type."""
    from gtrain.models import get_model_entry  # the registry imports torch: only when needed

    try:
        entry = get_model_entry(recipe.model.name)
    except UserError as error:
        return [f"model.name: {error}"]
    settings = {f.name for f in dataclasses.fields(entry.config)}
    lines = []
    for key, value in recipe.model_overrides().items():
        if key not in settings:
            lines.append(f"unknown key model.{key}: {_did_you_mean(key, ['name', 'pretrained', *settings])}")
            continue
        default = getattr(entry.config, key)
        coerced = _coerce_like(default, value)
        if coerced is None:
            lines.append(f"model.{key} = {value!r}: expected a {type(default).__name__} like {default!r}")
        else:
            setattr(recipe.model, key, coerced)
    if not lines and recipe.model_overrides():
        lines = _try_build(recipe)
    return lines


def _try_build(recipe: Recipe) -> list[str]:
    """Values of the right type can still make no network (cardinality 0, drop path 1.5):
    build it where nothing is allocated and report what PyTorch objects to."""
    import torch

    from gtrain.models import create_model

    try:
        with torch.device("meta"):
            create_model(recipe.model.name, num_classes=10, **recipe.model_overrides())
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, IndexError) as error:
        settings = ", ".join(f"model.{k} = {v!r}" for k, v in recipe.model_overrides().items())
        return [f"{settings}: {recipe.model.name} cannot be built with that ({error})"]
    return []


def _coerce_like(default: Any, value: Any) -> Any:
    """`value` converted to the type of `default`, or None when it does not fit."""
    if isinstance(default, bool) or isinstance(value, bool):
        return value if isinstance(default, bool) and isinstance(value, bool) else None
    if isinstance(default, float) and isinstance(value, int | float):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if default is None or isinstance(value, type(default)):
        return value
    return None


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "valid: " + ", ".join(sorted(choices))


def _describe(error: dict[str, Any], document: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "recipe"
    if error["type"] == "extra_forbidden":
        *parents, leaf = loc
        section = {
            (): Recipe, ("model",): ModelSection, ("data",): DataSection,
            ("optim",): OptimSection, ("train",): TrainSection, ("log",): LogSection,
        }.get(tuple(parents))
        valid = list(section.model_fields) if section else []
        return f"unknown key {key}: {_did_you_mean(leaf, valid)}"
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    value = error.get("input")
    message = error["msg"]
    if error["type"] == "literal_error":
        message = "allowed: " + message.removeprefix("Input should be ")
    elif error["type"] == "model_type":
        message = "must be a [section] table"
    return f"{key} = {value!r}: {message[0].lower()}{message[1:]}"
