"""Recipes: the TOML schema, loading, `--set` overrides and error messages.

A recipe sets only what differs from the defaults below. Every key is validated; all
mistakes in a recipe are reported together, each as one line naming the full key path,
the bad value and what is allowed.
"""

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gtrain.errors import UserError, did_you_mean, error_line


# timm's RandAugment configuration (timm.data.auto_augment.rand_augment_transform): "rand",
# then "-" and a key with its value: magnitude m, ops per image n, magnitude noise mstd,
# magnitude cap mmax, increasing ops inc, probability per op p, op set t.
TIMM_RAND_AUGMENT = re.compile(r"rand(-(m\d+|n\d+|mstd\d+(\.\d+)?|mmax\d+|inc[01]|p\d*(\.\d+)?|t[a-z0-9]+))*")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(BaseModel):
    """The network: a model from `gtrain models`, optionally fine-tuned from a checkpoint."""

    # Extra keys are the variant's own settings (drop_path_rate, zero_init_last_bn, ...);
    # they are checked against the chosen model's config in `model_overrides`.
    model_config = ConfigDict(extra="allow")

    name: str = Field("resnext29_4x16d", description="a model name from `gtrain models`")
    pretrained: str | None = Field(
        None,
        description="path of a local .pth/.pt/.bin/.safetensors checkpoint to fine-tune from (torchvision ResNeXt, "
        "the official HorNet release, gtrain); a classifier for another class count is re-initialized",
    )


class DataSection(Section):
    """Where the images come from, how they are batched and how they are augmented."""

    dataset: str = Field(
        "digits", description='a torchvision dataset in the table of gtrain/data/datasets.py (CIFAR10, ...), "ImageFolder", "shards" or "digits"'
    )
    root: str = Field(
        "data",
        description="folder holding the dataset; for ImageFolder: train/, val/ and optionally test/; for shards: a "
        "folder of WebDataset .tar shards, a brace pattern or a URL",
    )
    download: bool = Field(False, description="download a torchvision dataset into root when it is missing")
    batch_size: int = Field(
        128, ge=1, description="global batch: images per optimizer step, over all processes and micro-batches"
    )
    image_size: int | None = Field(None, ge=4, description="side in pixels; unset: the dataset's default")
    eval_image_size: int | None = Field(
        None, ge=4, description="side of the evaluation crop, if not image_size (torchvision's newer recipes train at 176, test at 224)"
    )
    eval_resize_size: int | None = Field(
        None, ge=4, description="cropped data (ImageFolder, photos): short side before the evaluation's centre crop; unset: crop / 0.875"
    )
    augment: bool = Field(
        True, description="train with the dataset's own augmentation (random crop; flip where a mirror keeps the class)"
    )
    val_split: str = Field(
        "test", description='split evaluated after each epoch; "test" falls back to "val" where there is no test split'
    )
    workers: int = Field(2, ge=0, description="DataLoader worker processes (none for data held in memory)")
    in_memory: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: small fixed-size datasets (CIFAR, MNIST, digits, ...) live on the device as uint8, "
        "unless auto_augment or random_erasing asks for per-image transforms",
    )
    auto_augment: str = Field(
        "none",
        description="per-image augmentation policy added to the dataset's default one: none, randaugment or "
        "trivialaugment (torchvision's), or timm's RandAugment as its config string, e.g. rand-m9-mstd0.5-inc1 "
        "(needs gtrain[timm])",
    )
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability of erasing a random rectangle per image")
    random_erasing_fill: Literal["mean", "noise"] = Field(
        "mean", description="what an erased rectangle holds: the dataset's mean colour, or normal noise per pixel (timm's 'pixel')"
    )
    decode: Literal["cpu", "cpu-full", "device"] = Field(
        "cpu",
        description="how ImageFolder images are decoded: cpu (the DataLoader's workers, a JPEG only at the scale its "
        "crop needs: 1/8, 1/4, 1/2 or whole), cpu-full (the workers, every image whole: slower, the reference) or "
        "device (training JPEGs in batches with nvJPEG on CUDA, for hosts with few CPU cores per GPU; validation "
        "stays on the CPU)",
    )
    shard_cache_gb: float = Field(
        50.0, ge=0, description="shards: remote shards kept on local disk ($GTRAIN_CACHE), in GB; past it, samples are read with range requests"
    )
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="resampling of the train crop and the evaluation resize; saved with the weights for eval and predict"
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight each class's loss by N / (classes x its training images), for unbalanced data"
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle", description="shuffle: every image once per epoch; balanced: as many images of each class per epoch, drawn again where a class has fewer"
    )
    mixup_alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) MixUp of image pairs in a batch; 0: off")
    cutmix_alpha: float = Field(
        0.0, ge=0, description="Beta(alpha, alpha) CutMix of image pairs in a batch; 0: off; with mixup_alpha, one of the two per batch"
    )

    @field_validator("auto_augment")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value in ("none", "randaugment", "trivialaugment") or TIMM_RAND_AUGMENT.fullmatch(value):
            return value
        raise ValueError(
            f"data.auto_augment = {value!r}: none, randaugment, trivialaugment, or timm's rand-... string "
            "(sections m<int>, n<int>, mstd<float>, mmax<int>, inc<0|1>, p<float>, t<set>; e.g. rand-m9-mstd0.5-inc1)"
        )

    @property
    def full_decode(self) -> bool:
        """Image files decoded whole, never at a smaller scale (the training crops, the
        validation, and the weights' metadata, so that eval and predict decode the same way)."""
        return self.decode == "cpu-full"


class OptimSection(Section):
    """The optimizer and the learning-rate schedule, stepped every iteration."""

    name: Literal["sgd", "adamw"] = Field("sgd", description="SGD with momentum, or AdamW")
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum")
    nesterov: bool = Field(True, description="sgd: Nesterov momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw: decay rates of the gradient's moments")
    # 1e-4 as in the ResNeXt paper's ImageNet training and torchvision's references (5e-4 is
    # its CIFAR value, set in those recipes); docs/benchmarks.md compares it with timm's 2e-5.
    weight_decay: float = Field(1e-4, ge=0, description="on conv and linear weights; on norms and biases too with the switch below")
    weight_decay_norms_and_biases: bool = Field(
        False, description="also decay norm scales and biases (the ResNeXt paper's code decays every parameter)"
    )
    schedule: Literal["cosine", "multistep", "onecycle", "constant"] = Field(
        "cosine",
        description="lr after warmup: cosine decay, linear decay (onecycle), times gamma at each milestone "
        "(multistep) or constant",
    )
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup from 0, stepped per iteration")
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: lr factor at each milestone")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/onecycle: final lr as a fraction of lr")
    clip_grad_norm: float | None = Field(None, gt=0, description="max global gradient norm; unset: no clipping")
    head_lr_scale: float = Field(1.0, gt=0, description="the classifier's lr as a multiple of lr (fine-tuning: a new head learns faster)")
    layer_decay: float | None = Field(
        None, gt=0, le=1,
        description="each block's lr this factor times the next deeper block's (timm's --layer-decay; ResNeXt by "
        "bottleneck, HorNet by stage and block); the stem gets the smallest; unset: one lr",
    )  # fmt: skip


class TrainSection(Section):
    """The training loop: length, precision, device, checkpoints and what runs around each step."""

    epochs: int = Field(10, ge=1, description="epochs to train; the lr schedule spans all of them")
    seed: int = Field(0, ge=0, description="seeds the initial weights, the data order and the augmentation")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast where the device computes bf16 natively, else fp32; "
        "fp16 adds a gradient scaler and needs CUDA",
    )
    deterministic: bool = Field(
        False, description="deterministic kernels: the same weights run after run on the same machine and versions"
    )
    # 0.1 as in timm's train.py, torchvision's current recipes and the HorNet release: on a
    # ResNeXt-50 from scratch it gave 49.6% against 46.6% without (docs/benchmarks.md).
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy loss")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="channels-last (NHWC) memory format; auto: on for CUDA and CPU, where it measured faster"
    )
    checkpoint_minutes: float = Field(10.0, gt=0, description="also checkpoint within an epoch this often")
    checkpoint_steps: int | None = Field(
        None, ge=1, description="also checkpoint every this many optimizer steps: a restart loses at most that many, "
        "and those trained while the checkpoint was written",
    )
    sync_bn: bool = Field(False, description="SyncBatchNorm across processes under torchrun (CUDA)")
    bn_group_size: int | None = Field(
        None,
        ge=2,
        description="BatchNorm statistics over groups of this many consecutive images of each micro-batch "
        "(ghost batch norm): the per-GPU statistics of a multi-GPU run without sync_bn, on one device in one pass",
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs; slower on CPU)")
    accumulate_steps: int = Field(
        1,
        ge=1,
        description="split each data.batch_size batch into this many micro-batches and sum their gradients: "
        "one optimizer step per batch in less memory (BatchNorm normalizes over each micro-batch)",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the weights, updated every step, validated every epoch "
        "and saved as best_ema/final_ema.safetensors",
    )
    ema_warmup: bool = Field(
        True,
        description="start the average short, decay min(ema_decay, (1 + n) / (10 + n)) after n steps; false: ema_decay "
        "from the first step, as timm's ModelEma in the HorNet release",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a new best validation top-1"
    )
    freeze_epochs: int = Field(
        0, ge=0,
        description="fine-tuning: for this many epochs only the classifier trains (a linear probe on model.pretrained); "
        "the rest keeps its weights and BatchNorm statistics; then every layer trains, the schedule (warmup, then decay) "
        "starting again as fastai's fine_tune does",
    )  # fmt: skip


class DistillSection(Section):
    """Knowledge distillation: a trained teacher's softened outputs as a second target."""

    teacher: str | None = Field(
        None, description="a run folder or a .safetensors file written by gtrain fit, for the same classes; unset: no teacher"
    )
    temperature: float = Field(1.0, gt=0, description="both models' logits are divided by it before the softmax")
    alpha: float = Field(
        0.5, ge=0, le=1,
        description="the weight of the teacher's soft loss (KL divergence, times temperature squared); 1 - alpha the labels'",
    )  # fmt: skip


class LogSection(Section):
    """What is logged besides metrics.jsonl and run.json."""

    tensorboard: bool = Field(
        False, description="also write TensorBoard event files to RUN/tensorboard (needs gtrain[tensorboard])"
    )
    report: bool = Field(
        False, description="write RUN/report.html at the end (gtrain report: curves, confusions, the worst images, Grad-CAM)"
    )


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field("", description="one line that `gtrain recipes` shows: what the recipe trains and its evidence")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    log: LogSection = Field(default_factory=LogSection)

    @model_validator(mode="after")
    def _milestones_within_epochs(self) -> "Recipe":
        late = [m for m in self.optim.milestones if m >= self.train.epochs]
        if self.optim.schedule == "multistep" and late:
            raise ValueError(f"optim.milestones {late} must be below train.epochs = {self.train.epochs}")
        return self

    @model_validator(mode="after")
    def _per_image_augmentation_needs_augment(self) -> "Recipe":
        data = self.data
        if not data.augment and (data.auto_augment != "none" or data.random_erasing > 0):
            raise ValueError(
                "data.auto_augment and data.random_erasing add to the default augmentation, which "
                "data.augment = false turns off: set data.augment = true, or leave them unset"
            )
        return self

    @model_validator(mode="after")
    def _frozen_epochs_need_published_weights(self) -> "Recipe":
        if self.train.freeze_epochs and not self.model.pretrained:
            raise ValueError(
                f"train.freeze_epochs = {self.train.freeze_epochs} trains only the classifier on top of published "
                "weights, but model.pretrained is unset: set it, or set train.freeze_epochs = 0"
            )
        return self

    @model_validator(mode="after")
    def _one_kind_of_batch_statistics(self) -> "Recipe":
        if self.train.sync_bn and self.train.bn_group_size is not None:
            raise ValueError(
                "train.sync_bn (statistics over every process's images) and train.bn_group_size (over groups "
                "within each): set one of them"
            )
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
        "description", "train.epochs", "train.checkpoint_minutes", "train.checkpoint_steps", "train.device", "train.early_stopping_patience",
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


def resolved_toml(recipe: Recipe) -> str:
    """The recipe as TOML, every key with its value; keys left unset (TOML has no null) are
    listed in a closing comment, so that none goes unmentioned."""
    given = flatten(recipe.to_dict())
    unset = [key for key in _every_key(Recipe) if key not in given]
    text = recipe.to_toml()
    return text + (f"\n# unset (no value): {', '.join(unset)}\n" if unset else "")


def _every_key(model_class: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every dotted key of a schema, sections walked into."""
    for key, info in model_class.model_fields.items():
        if _is_section(info.annotation):
            yield from _every_key(info.annotation, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


# ---------------------------------------------------------------------------------------
# The reference: every key, rendered from the schema above. README.md holds a copy that
# tests/test_docs.py keeps equal to it; `make docs` rewrites that copy.

# [model] settings worth knowing, with what they do; the other settings of a variant's
# config are listed by name.
MODEL_SETTING_EXAMPLES = {
    "zero_init_last_bn": "zero the last BatchNorm scale of each block, so every block starts as the identity",
    "cardinality": "groups in every 3x3 conv: the paper's C",
    "width_per_group": "channels per group in the first stage, doubling per stage: the paper's d",
    "drop_path_rate": "stochastic depth of the last block, rising linearly from 0 over the blocks",
    "layer_scale_init": "initial scale of both residual branches; 0 disables layer scale",
    "orders": "gnConv order per stage, e.g. [2, 3, 4, 5]",
}

# pydantic's constraints as they read after the type: `int ≥ 1`, `float < 1`.
_LOWER_BOUNDS = {"ge": "≥", "gt": ">"}
_UPPER_BOUNDS = {"le": "≤", "lt": "<"}
_BEFORE_THE_TYPE = {"≥": "≤", ">": "<"}  # a lower bound written first: `0 ≤ float < 1`


def recipe_reference() -> str:
    """Every recipe key as Markdown: one table per section (key, type, default, meaning),
    and the [model] settings that come from the chosen variant's config."""
    fields = Recipe.model_fields
    sections = [name for name, field in fields.items() if _is_section(field.annotation)]
    top = {name: field for name, field in fields.items() if name not in sections}
    parts = [_section_table("Top level", "Keys outside any [section].", top)]
    for name in sections:
        section = fields[name].annotation
        parts.append(_section_table(f"`[{name}]`", section.__doc__, section.model_fields))
        if section is ModelSection:
            parts.append(_model_settings())
    return "\n".join(parts)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _section_table(title: str, summary: str, fields: dict[str, Any]) -> str:
    rows = [
        f"| `{name}` | {_type_name(field.annotation, field.metadata)} | {_default(field)} | {_cell(field.description)} |"
        for name, field in fields.items()
    ]
    return "\n".join([f"### {title}", "", summary, "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])


def _type_name(annotation: Any, metadata: list[Any]) -> str:
    """`int ≥ 1`, `0 ≤ float < 1`, `"auto" | "on"`, `float or unset`, `list of int`, `[float, float]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return r" \| ".join(f'`"{arg}"`' for arg in args)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return f"{_type_name(inner, metadata)} or unset"
    if origin is list:
        return f"list of {_type_name(args[0], [])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(arg, []) for arg in args) + "]"
    return _with_bounds({str: "string"}.get(annotation, annotation.__name__), metadata)


def _with_bounds(name: str, metadata: list[Any]) -> str:
    """`int ≥ 1`, `float > 0`, `0 ≤ float < 1` from pydantic's ge, gt, le and lt constraints."""
    lower = [(sign, getattr(c, attr)) for c in metadata for attr, sign in _LOWER_BOUNDS.items() if hasattr(c, attr)]
    upper = [(sign, getattr(c, attr)) for c in metadata for attr, sign in _UPPER_BOUNDS.items() if hasattr(c, attr)]
    if lower and upper:
        (low_sign, low), (high_sign, high) = lower[0], upper[0]
        return f"{low} {_BEFORE_THE_TYPE[low_sign]} {name} {high_sign} {high}"
    return name + "".join(f" {sign} {value}" for sign, value in lower + upper)


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{_toml_value(value)}`"


def _toml_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _cell(text: str | None) -> str:
    return (text or "").replace("|", r"\|")


def _model_settings() -> str:
    from gtrain.models import get_model_entry, list_models  # the registry imports torch: only when needed

    settings: dict[str, list[str]] = {}
    for name in list_models():
        entry = get_model_entry(name)
        settings.setdefault(entry.family, [f.name for f in dataclasses.fields(entry.config)])
    # An example renamed in its config dataclass fails here, so the docs test catches it.
    family_of = {key: family for family, keys in settings.items() for key in keys}
    lines = [
        "Besides `name` and `pretrained`, `[model]` takes any setting of the chosen variant's config, which",
        "replaces the variant's value (a tuple is written as a TOML array). A name the variant does not",
        "have, or a value of another type, is an error. `gtrain models` lists the variants; their",
        "settings, by family:",
        "",
        *(f"- {family}: " + ", ".join(f"`{key}`" for key in keys) for family, keys in settings.items()),
        "",
        "For example:",
        "",
        "| setting | family | meaning |",
        "|---|---|---|",
        *(f"| `{key}` | {family_of[key]} | {_cell(meaning)} |" for key, meaning in MODEL_SETTING_EXAMPLES.items()),
        "",
    ]
    return "\n".join(lines)


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
    raise UserError(f"no recipe named {name_or_path!r}: {did_you_mean(name_or_path, list(bundled))} (`gtrain recipes` lists them)")


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
        # The [model] settings are checked too when the rest fails, so every mistake comes at once.
        model = _valid_model_section(document)
        lines += _check_model_settings(model) if model is not None else []
        raise UserError(_join(source, lines)) from None
    lines = _check_model_settings(recipe.model)
    if lines:
        raise UserError(_join(source, lines))
    return recipe


def _valid_model_section(document: dict[str, Any]) -> "ModelSection | None":
    try:
        return ModelSection.model_validate(document.get("model", {}))
    except ValidationError:  # already among the reported problems
        return None


def _join(source: str, lines: list[str]) -> str:
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source}: {len(lines)} problems\n" + "\n".join(f"  {line}" for line in lines)


def check_model_settings(name: str, settings: dict[str, Any]) -> list[str]:
    """What is wrong with `settings` as [model] keys of the variant `name` (of a weights file's
    metadata, say): nothing when the list is empty."""
    clashing = [key for key in settings if key in ModelSection.model_fields]
    if clashing:
        return [f"{clashing[0]!r} is not a model setting"]
    try:
        return _check_model_settings(ModelSection(name=name, **settings))
    except ValidationError as error:
        return [error_line(error)]


def _check_model_settings(model: ModelSection) -> list[str]:
    """Extra [model] keys must be settings of the chosen variant, of the same type."""
    from gtrain.models import get_model_entry  # the registry imports torch: only when needed

    try:
        entry = get_model_entry(model.name)
    except UserError as error:
        return [f"model.name: {error}"]
    settings = {f.name for f in dataclasses.fields(entry.config)}
    overrides = dict(model.model_extra or {})
    lines = []
    for key, value in overrides.items():
        if key not in settings:
            lines.append(f"unknown key model.{key}: {did_you_mean(key, ['name', 'pretrained', *settings])}")
            continue
        default = getattr(entry.config, key)
        coerced = _coerce_like(default, value)
        if coerced is None:
            lines.append(f"model.{key} = {value!r}: expected a {type(default).__name__} like {default!r}")
        else:
            setattr(model, key, coerced)
    if not lines and overrides:
        lines = _try_build(model.name, dict(model.model_extra or {}))
    return lines


def _try_build(name: str, overrides: dict[str, Any]) -> list[str]:
    """Values of the right type can still make no network (cardinality 0, drop path 1.5):
    build it where nothing is allocated and report what PyTorch objects to."""
    import torch

    from gtrain.models import create_model

    try:
        with torch.device("meta"):
            create_model(name, num_classes=10, **overrides)
    except (UserError, ValueError, TypeError, RuntimeError, ZeroDivisionError, IndexError) as error:
        settings = ", ".join(f"model.{k} = {v!r}" for k, v in overrides.items())
        return [f"{settings}: {name} cannot be built with that ({error})"]
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
        return f"unknown key {key}: {did_you_mean(leaf, valid)}"
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    value = error.get("input")
    message = error["msg"]
    if error["type"] == "literal_error":
        message = "allowed: " + message.removeprefix("Input should be ")
    elif error["type"] == "model_type":
        message = "must be a [section] table"
    return f"{key} = {value!r}: {message[0].lower()}{message[1:]}"
