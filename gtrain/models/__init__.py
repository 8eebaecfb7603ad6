"""The model zoo: ResNeXt and HorNet families behind one registry.

    from gtrain.models import create_model, list_models
    model = create_model("resnext29_4x16d", num_classes=10)
"""

from gtrain.models import hornet, resnext
from gtrain.models.registry import ModelEntry, create_model, get_model_entry, list_models, register_family

register_family("resnext", resnext.VARIANTS, resnext.ResNeXt, resnext.NUM_CLASSES)
register_family("hornet", hornet.VARIANTS, hornet.HorNet, hornet.NUM_CLASSES)

__all__ = ["ModelEntry", "create_model", "get_model_entry", "list_models"]
