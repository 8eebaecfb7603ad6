"""Size and cost of every registered model, for `gtrain models`."""

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from gtrain.models.registry import create_model, get_model_entry, list_models


def count_flops(model: torch.nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Forward FLOPs for one image (a multiply-add counts as 2)."""
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, input_size, input_size, device=next(model.parameters()).device))
    return counter.get_total_flops()


def model_summary(name: str, num_classes: int = 1000) -> dict[str, Any]:
    entry = get_model_entry(name)
    # On the meta device nothing is allocated or computed: shapes and FLOPs only.
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes).eval()
    return {
        "name": name,
        "family": entry.family,
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": count_flops(model, entry.input_size) / 1e9,
        "input_size": entry.input_size,
    }


def model_table() -> list[dict[str, Any]]:
    return [model_summary(name) for name in list_models()]
