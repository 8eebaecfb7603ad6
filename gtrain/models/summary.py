"""Size and cost of every registered model, for `gtrain models`."""

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from gtrain.models.registry import create_model, get_model_entry, list_models


def count_flops(model: torch.nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Forward FLOPs for one image (a multiply-add counts as 2)."""
    # Without autograd's bookkeeping: a third faster on the meta device.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, input_size, input_size, device=next(model.parameters()).device))
    return counter.get_total_flops()


def model_summary(name: str) -> dict[str, Any]:
    """Parameters with the head for the variant's own dataset, and the forward cost of one
    image in GMACs: multiply-adds, the unit the papers call "FLOPs" (ResNeXt-50: 4.2G)."""
    entry = get_model_entry(name)
    # On the meta device nothing is allocated or computed: shapes and FLOPs only.
    with torch.device("meta"):
        model = create_model(name, num_classes=entry.num_classes).eval()
    return {
        "name": name,
        "family": entry.family,
        "params": sum(p.numel() for p in model.parameters()),
        "num_classes": entry.num_classes,
        "gmacs": count_flops(model, entry.input_size) / 2 / 1e9,
        "input_size": entry.input_size,
    }


def model_table() -> list[dict[str, Any]]:
    return [model_summary(name) for name in list_models()]
