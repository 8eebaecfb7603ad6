"""Evaluation: loss, top-1, top-5 and the confusion matrix over a whole split, and the
report `gtrain eval` builds from them (per-class precision and recall, worst classes,
the most-confused pairs; gtrain/eval_tables.py lays it out as text).

`evaluate` is used after every training epoch and by `gtrain eval`; it needs no training
state and no process group.
"""

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from gtrain import runtime
from gtrain.checkpoint import load_model
from gtrain.distributed import World, all_reduce_sum
from gtrain.errors import UserError
from gtrain.run_folder import RunFolder, weights_file

# Test-time augmentation: "flip" also scores the horizontal mirror image.
TTA_MODES = ("none", "flip")


@dataclass
class EvalResult:
    loss: float
    top1: float  # fraction in [0, 1]
    top5: float
    images: int
    seconds: float
    class_correct: list[int]
    class_total: list[int]
    confusion: list[list[int]]  # confusion[t][p]: images of true class t predicted (top-1) as class p
    # With `evaluate(per_image=True)`: each image's loss, top-1 class and its probability, and
    # true class, in the split's order.
    images_scored: "ImageScores | None" = None

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def balanced_top1(self) -> float:
        """The mean of the per-class recalls, over the classes the split has: top-1 as if
        every class had as many images (what an unbalanced split's top-1 hides)."""
        recalls = [correct / total for correct, total in zip(self.class_correct, self.class_total) if total]
        return sum(recalls) / len(recalls)

    def per_class(self, class_names: tuple[str, ...]) -> list[dict[str, Any]]:
        """One row per class; top1 is the class's recall. A ratio with nothing to count is None."""
        predicted = [sum(column) for column in zip(*self.confusion)]
        return [
            {
                "class": name,
                "images": total,
                "top1": _ratio(correct, total),
                "precision": _ratio(correct, predicted[k]),
                "recall": _ratio(correct, total),
                # 2TP / (2TP + FP + FN), with 2TP + FP + FN = images + predicted: the harmonic mean of
                # precision and recall, and 0 rather than undefined for a class never predicted.
                "f1": _ratio(2 * correct, total + predicted[k]),
            }
            for k, (name, correct, total) in enumerate(zip(class_names, self.class_correct, self.class_total))
        ]

    def worst_classes(self, class_names: tuple[str, ...], k: int = 5) -> list[dict[str, Any]]:
        """The k classes with the lowest recall (classes without a mistake are never listed),
        each with the class its images are most often predicted as."""
        rows = []
        for t, (name, row) in enumerate(zip(class_names, self.confusion)):
            # max keeps the first of equal counts: the lower class index wins a tie.
            mistaken_for = max((p for p in range(len(row)) if p != t), key=row.__getitem__, default=None)
            if mistaken_for is None or row[mistaken_for] == 0:
                continue  # not one mistake
            rows.append({
                "class": name,
                "images": sum(row),
                "recall": row[t] / sum(row),
                "mistaken_for": class_names[mistaken_for],
                "mistaken_images": row[mistaken_for],
            })  # fmt: skip
        return sorted(rows, key=lambda r: r["recall"])[:k]  # a stable sort: equal recalls stay in class order

    def most_confused(self, class_names: tuple[str, ...], n: int = 10) -> list[dict[str, Any]]:
        """The n largest off-diagonal cells: which true class is most often predicted as which."""
        pairs = [
            {"true": class_names[t], "predicted": class_names[p], "images": count}
            for t, row in enumerate(self.confusion)
            for p, count in enumerate(row)
            if p != t and count
        ]
        return sorted(pairs, key=lambda pair: -pair["images"])[:n]


@dataclass
class ImageScores:
    """Each image of a split, scored: in the split's order."""

    loss: torch.Tensor  # float64 (N,)
    predicted: torch.Tensor  # int64 (N,): the top-1 class
    probability: torch.Tensor  # float64 (N,): its probability
    target: torch.Tensor  # int64 (N,)

    def highest_losses(self, k: int) -> list[int]:
        """The indices of the k images with the highest loss, highest first (a tie: the
        lower index first)."""
        return torch.argsort(self.loss, descending=True, stable=True)[:k].tolist()

    def examples(self, true: int, predicted: int, k: int) -> list[int]:
        """Up to k images of class `true` predicted as `predicted`, the most confident first."""
        chosen = ((self.target == true) & (self.predicted == predicted)).nonzero().flatten()
        return chosen[torch.argsort(self.probability[chosen], descending=True, stable=True)][:k].tolist()


def _ratio(count: int, of: int) -> float | None:
    return count / of if of else None


def class_scores(
    model: nn.Module, inputs: torch.Tensor, *, tta: str, device: torch.device, precision: str
) -> torch.Tensor:
    """(N, classes) float32 scores whose softmax is the prediction: the logits, or under flip TTA
    the log of the mean probability over the image and its mirror image.

    Probabilities, not logits, are averaged: the result is the mean of the two predictive
    distributions, so the reported loss is the cross-entropy of what is predicted, and one view
    with large logits cannot outvote the other the way it would in a logit average.
    """
    views = [inputs, inputs.flip(-1)] if tta == "flip" else [inputs]  # flip(-1): W of (N, C, H, W)
    with runtime.autocast(device, precision):
        logits = [model(view) for view in views]
    if len(logits) == 1:
        return logits[0].float()
    log_probs = torch.stack([view.float().log_softmax(dim=1) for view in logits])  # (views, N, classes)
    return log_probs.logsumexp(dim=0) - math.log(len(views))


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
    tta: str = "none",
    per_image: bool = False,
    on_batch=None,
) -> EvalResult:
    """Under torch.distributed each process evaluates its shard and the sums are reduced.
    `tta`: "none", or "flip" to also score each image's mirror image (see `class_scores`).
    `per_image` (one process only) keeps every image's scores (`EvalResult.images_scored`);
    `on_batch(images)` is called after each batch (a progress bar)."""
    check_tta(tta)
    assert not (per_image and world.size > 1), "per-image scores are kept by one process"
    kept: list[tuple[torch.Tensor, ...]] = []
    model.eval()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)  # flattened (true, predicted)
    images = 0
    k = min(5, num_classes)
    for inputs, targets in loader:
        inputs, targets = runtime.to_device(inputs, targets, device, channels_last)
        scores = class_scores(model, inputs, tta=tta, device=device, precision=precision)
        loss_sum += F.cross_entropy(scores, targets, reduction="sum")
        topk = scores.topk(k, dim=1).indices  # (N, k)
        correct5 += (topk == targets[:, None]).any(dim=1).sum()
        confusion += torch.bincount(targets * num_classes + topk[:, 0], minlength=num_classes * num_classes)
        images += targets.numel()
        if per_image:
            probability = scores.softmax(dim=1).max(dim=1).values
            losses = F.cross_entropy(scores, targets, reduction="none")
            kept.append(tuple(t.cpu() for t in (losses.double(), topk[:, 0], probability.double(), targets)))
        if on_batch is not None:
            on_batch(targets.numel())
    # One reduction for everything; float64 holds these counts exactly (up to 2**53).
    counts = [correct5[None], torch.tensor([images], device=device), confusion]
    sums = all_reduce_sum(torch.cat([loss_sum[None], *(c.double() for c in counts)]), world)
    loss_sum, correct5, images = sums[0], sums[1], int(sums[2].item())
    confusion = sums[3:].long().view(num_classes, num_classes)  # (true, predicted)
    if images == 0:
        raise UserError("the evaluation split has no images")
    class_correct = confusion.diagonal()
    return EvalResult(
        loss=loss_sum.item() / images,
        top1=class_correct.sum().item() / images,
        top5=correct5.item() / images,
        images=images,
        seconds=time.perf_counter() - start,
        class_correct=class_correct.tolist(),
        class_total=confusion.sum(dim=1).tolist(),
        confusion=confusion.tolist(),
        images_scored=ImageScores(*(torch.cat(column) for column in zip(*kept))) if per_image else None,
    )


def check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise UserError(f"--tta {tta!r} is not a test-time augmentation: valid: {', '.join(TTA_MODES)}")


@dataclass(frozen=True)
class EvalSettings:
    """What `gtrain eval` scores and how. device, precision and channels_last as given (None:
    the run's own, see `scoring_settings`); in the report, as resolved."""

    split: str = "test"
    overrides: tuple[str, ...] = ()  # `--set data.*` only: where the data lies, not what the model is
    batch_size: int | None = None  # None: the batch the run validated the weights with
    device: str = "auto"
    precision: str | None = None
    channels_last: bool | None = None
    tta: str = "none"
    plot: Path | None = None  # also write the confusion matrix here as a PNG
    worst: int = 5  # classes, and images (the highest losses), to list as the worst


@dataclass
class ScoredWeights:
    """Weights scored on a split, with what scored them: for `gtrain eval` and `gtrain report`."""

    weights: Path
    model: nn.Module  # on `settings.device`, in eval mode
    meta: Any  # WeightsMeta
    recipe: Any  # the run's Recipe, with the overrides
    info: Any  # DatasetInfo of the split
    dataset: Any  # the split, its items uint8 images as the model saw them (before normalising)
    result: EvalResult  # with every image's scores
    settings: EvalSettings  # device, precision and memory format as resolved


def score_weights(path: Path, settings: EvalSettings = EvalSettings(), *, progress=None) -> ScoredWeights:
    """Weights (a run folder or a file) scored on the dataset they were trained on (or
    `--set data.*`), every image's scores kept. Weights in a run folder are scored the way
    the run validated them: with its precision and memory format (from its recipe.toml)
    unless `settings` say otherwise; weights elsewhere with "auto" for both. `progress(images)`
    returns what to call with each batch's image count (a progress bar)."""
    from gtrain.data.loaders import make_eval_loader

    settings = check_eval_settings(settings)
    weights = weights_file(Path(path))
    model, meta = load_model(weights)
    recipe = recipe_of(weights, meta, list(settings.overrides))
    data = recipe.data
    info, dataset, finish = eval_split(data, meta, weights, split=settings.split, tta=settings.tta)
    device, precision, channels_last = scoring_settings(
        recipe, settings.device, settings.precision, settings.channels_last
    )
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # The run's own batch (its validation's), so that each image is scored in the same batch.
    batch_size = settings.batch_size or meta.eval_batch_size or data.batch_size
    loader = make_eval_loader(dataset, batch_size=batch_size, workers=data.workers,
                              pin_memory=device.type == "cuda", finish=finish, device=device)  # fmt: skip
    result = evaluate(
        model, loader, num_classes=meta.num_classes, device=device, precision=precision, channels_last=channels_last,
        tta=settings.tta, per_image=True, on_batch=None if progress is None else progress(len(dataset)),
    )  # fmt: skip
    scored = replace(settings, device=str(device), precision=precision, channels_last=channels_last)
    return ScoredWeights(weights, model, meta, recipe, info, dataset, result, scored)


def run_eval(path: Path, settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """`gtrain eval`: weights + the dataset they were trained on (or `--set data.*`) -> report."""
    scored = score_weights(path, settings)
    result, meta, info = scored.result, scored.meta, scored.info
    report = eval_report(result, meta, scored.settings, weights=scored.weights, dataset=info.name)
    report["worst_images"] = worst_images(result, meta.class_names, scored.dataset, settings.split, settings.worst)
    if scored.settings.plot is not None:
        title = f"{meta.model} on {info.name} ({settings.split}): top-1 {result.top1:.1%}"
        from gtrain.plot import write_confusion_plot

        write_confusion_plot(scored.settings.plot, result.confusion, meta.class_names, title=title)
    return report


def worst_images(result: EvalResult, class_names, dataset, split: str, k: int) -> list[dict[str, Any]]:
    """The k images with the highest loss, highest first: where each is (a file, a shard's
    member, or its index in the split), its class, the class predicted and how sure."""
    from gtrain.data import item_name

    scores = result.images_scored
    return [
        {"index": i, "image": item_name(dataset, i, split), "class": class_names[int(scores.target[i])],
         "predicted": class_names[int(scores.predicted[i])], "probability": float(scores.probability[i]),
         "loss": float(scores.loss[i])}  # fmt: skip
        for i in scores.highest_losses(k)
    ]


def check_eval_settings(settings: EvalSettings) -> EvalSettings:
    """Refuse a bad option before the evaluation, which can take long, not after it; the
    settings with `plot` as a Path."""
    check_tta(settings.tta)
    if settings.plot is not None:
        from gtrain.plot import check_plot_path

        settings = replace(settings, plot=Path(settings.plot))
        check_plot_path(settings.plot)
    bad = [o for o in settings.overrides if not o.strip().startswith("data.")]
    if bad:
        raise UserError(f"--set {bad[0]!r}: eval only takes data.* overrides (data.root, data.dataset, ...)")
    return settings


def eval_split(data, meta, weights: Path, *, split: str, tta: str) -> tuple[Any, Any, Any]:
    """The split to score, from the recipe's [data] (`data`) with the weights' own geometry:
    (dataset info, dataset, the device's finish of its batches). Refused where the weights
    were trained for other classes or channels, or where flip TTA would change a class."""
    from gtrain.data import build_eval_data, check_flip_keeps_the_class

    info, dataset, finish = build_eval_data(
        data.dataset, root=data.root, download=data.download, split=split, image_size=meta.image_size,
        class_names=meta.class_names, interpolation=meta.interpolation, resize_size=meta.resize_size,
        full_decode=meta.full_decode, shard_cache_gb=data.shard_cache_gb,
    )  # fmt: skip
    if info.num_classes != meta.num_classes or info.in_chans != meta.in_chans:
        raise UserError(
            f"{info.name} has {info.num_classes} classes and {info.in_chans} channels, but {weights} was trained "
            f"for {meta.num_classes} classes and {meta.in_chans} channels: evaluate on the dataset it was trained on"
        )
    if tta == "flip":
        check_flip_keeps_the_class(info.name)
    return info, dataset, finish


def scoring_settings(
    recipe, device: str, precision: str | None, channels_last: bool | None
) -> tuple[torch.device, str, bool]:
    """Device, precision and memory format to score weights with: those given, else the run's
    own (`recipe`, from `recipe_of`), resolved here as they were in training; a bare file's
    are "auto"."""
    device_ = runtime.resolve_device(device)
    precision = runtime.resolve_precision(precision or recipe.train.precision, device_, "--precision")
    if channels_last is None:
        channels_last = runtime.resolve_channels_last(recipe.train.channels_last, device_)
    return device_, precision, channels_last


def recipe_of(weights: Path, meta, overrides: list[str]):
    """The recipe of the run the weights come from (their folder's recipe.toml, when it names
    their model), else one made of the weights' own facts; with the `--set data.*` overrides."""
    from gtrain.recipe import apply_overrides, parse_toml, validate_recipe

    run_recipe = RunFolder(weights.parent).recipe
    document = parse_toml(run_recipe.read_text(), str(run_recipe)) if run_recipe.is_file() else {}
    if document.get("model", {}).get("name") != meta.model:
        run_recipe, document = None, {"model": {"name": meta.model}, "data": {"dataset": meta.dataset}}
    apply_overrides(document, overrides)
    return validate_recipe(document, source=str(run_recipe or weights))


def eval_report(result: EvalResult, meta, settings: EvalSettings, *, weights: Path, dataset: str) -> dict[str, Any]:
    """`gtrain eval --json`: what was scored, how (`settings` as resolved: the device,
    precision and memory format the weights ran with), and everything measured."""
    return {
        "model": meta.model,
        "weights": str(weights),
        "dataset": dataset,
        "split": settings.split,
        "tta": None if settings.tta == "none" else settings.tta,
        "device": settings.device,
        "precision": settings.precision,
        "channels_last": settings.channels_last,
        "top1": result.top1,
        "balanced_top1": result.balanced_top1,
        "top5": result.top5,
        "loss": result.loss,
        "images": result.images,
        "images_per_s": result.images_per_s,
        "per_class": result.per_class(meta.class_names),
        "worst_classes": result.worst_classes(meta.class_names, settings.worst),
        "most_confused": result.most_confused(meta.class_names),
        "confusion_matrix": result.confusion,
        "plot": None if settings.plot is None else str(settings.plot),
    }
