"""Evaluation: loss, top-1, top-5 and per-class accuracy over a whole split.

Used after every training epoch and by `gtrain eval`; needs no training state and no
process group.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from gtrain import runtime
from gtrain.checkpoint import WeightsMeta, load_into, read_weights
from gtrain.distributed import World, all_reduce_sum
from gtrain.errors import UserError


@dataclass
class EvalResult:
    loss: float
    top1: float  # fraction in [0, 1]
    top5: float
    images: int
    seconds: float
    class_correct: list[int]
    class_total: list[int]

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def per_class(self, class_names: tuple[str, ...]) -> list[dict[str, Any]]:
        return [
            {"class": name, "images": total, "top1": correct / total if total else None}
            for name, correct, total in zip(class_names, self.class_correct, self.class_total)
        ]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    device: torch.device,
    precision: str,
    channels_last: bool = False,
    world: World = World(),
) -> EvalResult:
    """Under torch.distributed each process evaluates its shard and the sums are reduced."""
    model.eval()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    class_correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    class_total = torch.zeros(num_classes, dtype=torch.int64, device=device)
    images = 0
    k = min(5, num_classes)
    for inputs, targets in loader:
        inputs, targets = runtime.to_device(inputs, targets, device, channels_last)
        with runtime.autocast(device, precision):
            logits = model(inputs)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        topk = logits.topk(k, dim=1).indices  # (N, k)
        hits = topk == targets[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        class_total += torch.bincount(targets, minlength=num_classes)
        class_correct += torch.bincount(targets[hits[:, 0]], minlength=num_classes)
        images += targets.numel()
    # One reduction for everything; float64 holds these counts exactly.
    counts = [correct1[None], correct5[None], torch.tensor([images], device=device), class_correct, class_total]
    sums = all_reduce_sum(torch.cat([loss_sum[None], *(c.double() for c in counts)]), world)
    loss_sum, correct1, correct5, images = sums[0], sums[1], sums[2], int(sums[3].item())
    class_correct, class_total = sums[4 : 4 + num_classes].long(), sums[4 + num_classes :].long()
    if images == 0:
        raise UserError("the evaluation split has no images")
    return EvalResult(
        loss=loss_sum.item() / images,
        top1=correct1.item() / images,
        top5=correct5.item() / images,
        images=images,
        seconds=time.perf_counter() - start,
        class_correct=class_correct.tolist(),
        class_total=class_total.tolist(),
    )


def load_model_for_eval(path: Path) -> tuple[nn.Module, WeightsMeta, Path]:
    """A run folder (its best weights, else final) or a .safetensors file -> model."""
    from gtrain.models import create_model

    path = Path(path)
    if path.is_dir():
        candidates = [path / "best.safetensors", path / "final.safetensors"]
        weights = next((p for p in candidates if p.is_file()), None)
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


def run_eval(path: Path, *, split: str, overrides: list[str], batch_size: int, device: str) -> dict[str, Any]:
    """`gtrain eval`: weights + the dataset they were trained on (or `--set data.*`) -> report."""
    from gtrain.data import build_eval_data
    from gtrain.loaders import make_eval_loader
    from gtrain.recipe import apply_overrides, parse_toml, validate_recipe

    path = Path(path)
    bad = [o for o in overrides if not o.strip().startswith("data.")]
    if bad:
        raise UserError(f"--set {bad[0]!r}: eval only takes data.* overrides (data.root, data.dataset, ...)")
    model, meta, weights = load_model_for_eval(path)
    run_recipe = path / "recipe.toml" if path.is_dir() else None
    if run_recipe is not None and run_recipe.is_file():
        document = parse_toml(run_recipe.read_text(), str(run_recipe))
    else:
        document = {"model": {"name": meta.model}, "data": {"dataset": meta.dataset}}
    apply_overrides(document, overrides)
    data = validate_recipe(document, source=str(run_recipe or weights)).data

    info, dataset = build_eval_data(
        data.dataset, root=Path(data.root), download=data.download, split=split, image_size=meta.image_size,
        class_names=meta.class_names,
    )  # fmt: skip
    if info.num_classes != meta.num_classes or info.in_chans != meta.in_chans:
        raise UserError(
            f"{info.name} has {info.num_classes} classes and {info.in_chans} channels, but {weights} was trained "
            f"for {meta.num_classes} classes and {meta.in_chans} channels: evaluate on the dataset it was trained on"
        )
    device_ = runtime.resolve_device(device)
    precision = runtime.resolve_precision("auto", device_)
    model.to(device_)
    loader = make_eval_loader(dataset, batch_size=batch_size, workers=data.workers, pin_memory=device_.type == "cuda")
    result = evaluate(model, loader, num_classes=meta.num_classes, device=device_, precision=precision)
    return {
        "model": meta.model,
        "weights": str(weights),
        "dataset": info.name,
        "split": split,
        "top1": result.top1,
        "top5": result.top5,
        "loss": result.loss,
        "images": result.images,
        "images_per_s": result.images_per_s,
        "per_class": result.per_class(meta.class_names),
    }
