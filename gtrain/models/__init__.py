"""The model zoo: ResNeXt and HorNet families behind one registry.

    from gtrain.models import create_model, list_models
    model = create_model("resnext29_4x16d", num_classes=10)
"""

from gtrain.models import hornet, resnext
from gtrain.models.registry import (
    ModelEntry, ModelParts, classifier_keys, create_model, get_model_entry, layer_ids, list_models, register_family,
    stem_weight_key,
)  # fmt: skip

register_family("resnext", resnext.VARIANTS, resnext.ResNeXt, resnext.NUM_CLASSES,
                ModelParts(classifier="fc", stem="conv1", block_of=resnext.block_of))  # fmt: skip
register_family("hornet", hornet.VARIANTS, hornet.HorNet, hornet.NUM_CLASSES,
                ModelParts(classifier="head", stem="downsample_layers.0.0", block_of=hornet.block_of))  # fmt: skip

__all__ = [
    "ModelEntry", "ModelParts", "classifier_keys", "create_model", "get_model_entry", "layer_ids", "list_models",
    "stem_weight_key",
]  # fmt: skip
