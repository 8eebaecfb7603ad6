"""One registry, one door: every model gtrain builds goes through `create_model`.

A family registers its variant table (name -> frozen config dataclass) and the one
model class that reads those configs. Overrides replace fields of the config, so a
user can change `drop_path_rate` without a new variant, and a misspelt override is an
error instead of being ignored.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from gtrain.errors import UserError, did_you_mean


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    config: Any  # the family's frozen config dataclass
    model_class: type[nn.Module]
    num_classes: int  # of the dataset the variant is published for: 1000 for ImageNet-1k

    @property
    def input_size(self) -> int:
        return self.config.input_size


@dataclass(frozen=True)
class ModelParts:
    """Where a family keeps the two layers that depend on the data rather than the
    architecture, as timm's pretrained_cfg names them: fine-tuning replaces the classifier
    for another class count and adapts the stem for another number of input channels."""

    classifier: str  # the Linear that gives the logits
    stem: str  # the first convolution, the only one that sees the image's channels
    # A parameter's block, ordered input to output (None outside the blocks): layer decay's depth.
    block_of: Callable[[str], tuple[int, ...] | None]


_REGISTRY: dict[str, ModelEntry] = {}
_PARTS: dict[type[nn.Module], ModelParts] = {}


def register_family(
    family: str, variants: dict[str, Any], model_class: type[nn.Module], num_classes: dict[str, int], parts: ModelParts
) -> None:
    """`num_classes`: the published class count of the variants not made for ImageNet-1k."""
    for name, config in variants.items():
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, family, config, model_class, num_classes.get(name, 1000))
    _PARTS[model_class] = parts


def classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """The state_dict keys of the model's classifier (weight, then bias)."""
    name = _PARTS[type(model)].classifier
    return tuple(f"{name}.{key}" for key, _ in model.get_submodule(name).named_parameters(recurse=False))


def stem_weight_key(model: nn.Module) -> str:
    """The state_dict key of the weight of the model's stem convolution."""
    return f"{_PARTS[type(model)].stem}.weight"


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth for layer decay, and the number of depths: 0 for the stem,
    one per block of the family's `block_of`, the last for what follows the blocks (the
    final norm and the classifier)."""
    block_of = _PARTS[type(model)].block_of
    names = [name for name, _ in model.named_parameters()]
    blocks = sorted({block for name in names if (block := block_of(name)) is not None})
    depth = {block: index + 1 for index, block in enumerate(blocks)}
    ids, seen_a_block = {}, False
    for name in names:
        block = block_of(name)
        seen_a_block |= block is not None
        ids[name] = depth[block] if block is not None else (len(blocks) + 1 if seen_a_block else 0)
    return ids, len(blocks) + 2


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise UserError(
            f"unknown model {name!r}: {did_you_mean(name, list(_REGISTRY))} "
            "(`gtrain models` lists them all)"
        )
    return _REGISTRY[name]


def create_model(name: str, *, num_classes: int, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """Build the registered model `name`; `overrides` replace fields of its variant config."""
    entry = get_model_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(
            f"model {name!r} has no setting {unknown[0]!r}: {did_you_mean(unknown[0], sorted(fields))}"
        )
    config = dataclasses.replace(entry.config, **overrides)
    return entry.model_class(config, num_classes=num_classes, in_chans=in_chans)
