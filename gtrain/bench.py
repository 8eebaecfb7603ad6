"""`gtrain bench`: how fast one model trains and infers here, and how close to the GPU's peak.

A training step is `gtrain fit`'s (the trainer's `train_step`: forward, loss, backward and
here an SGD-with-momentum step) on random images already on the device, so the data pipeline is left
out. Both training and inference are timed in `repeats` groups of `steps` steps after
`warmup` steps; a result is the median over the groups, with their spread.

FLOPs are counted on the forward pass at batch 1 (a multiply-add is 2 FLOPs) and a
training step is taken as 3x the forward: torch.utils.flop_counter's backward count is
wrong for grouped convolutions, and the backward of a conv or matmul costs two forwards
(the gradient of the input and of the weight).

    from gtrain.bench import BenchSettings, run_bench
    result = run_bench("resnext29_8x64d", BenchSettings(batch_size=256, precision="bf16", device="cuda"))
    print(result.to_json())
"""

import dataclasses
import functools
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gtrain import runtime
from gtrain.data.costs import ImageCosts, image_costs
from gtrain.errors import UserError
from gtrain.models import create_model, get_model_entry
from gtrain.models.summary import count_flops
from gtrain.distributed import World
from gtrain.recipe import Recipe
from gtrain.trainer import Trainer, check_batch_split, load_data

# Dense tensor-core peaks in TFLOP/s from NVIDIA's data sheets (their headline figures
# are with 2:4 sparsity, twice these). fp32 is measured against the TF32 peak: PyTorch
# runs convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), though matmuls
# (HorNet's Linear layers) stay full FP32, so HorNet's fp32 MFU reads low. fp16 and bf16
# share one peak on every card listed. The first pattern that matches
# torch.cuda.get_device_name() wins, so a variant comes before its family's plain name.
#   pattern (regex)    TF32     BF16/FP16
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    (r"\bH100 PCIe", 378.0, 756.5),
    (r"\bH100 NVL", 417.5, 835.5),
    (r"\bH100\b", 494.7, 989.4),  # SXM5: "NVIDIA H100 80GB HBM3"
    (r"\bH200 NVL", 417.5, 835.5),
    (r"\bH200\b", 494.7, 989.4),  # SXM, the same compute as H100 SXM5 with more memory
    (r"\bGH200\b", 494.7, 989.4),
    (r"\bA100\b", 156.0, 312.0),  # SXM4 and PCIe, 40 and 80 GB
    (r"\bA10\b", 62.5, 125.0),
    (r"\bL40S\b", 183.0, 362.05),
    (r"\bL4\b", 60.0, 121.0),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a known GPU at `precision`; None for a CPU or an unknown GPU."""
    for pattern, tf32, half in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tf32 if precision == "fp32" else half
    return None


@dataclass(frozen=True)
class BenchResult:
    model: str
    device: str  # "cuda:0" or "cpu"
    device_name: str  # "NVIDIA H100 80GB HBM3", or the CPU's model name
    torch_version: str
    precision: str  # fp32, bf16 or fp16, after resolving "auto"
    channels_last: bool
    compiled: bool
    batch_size: int
    image_size: int  # px
    steps: int  # timed steps per repeat
    repeats: int
    train_images_per_s: float  # median over the repeats
    train_spread_pct: float  # (max - min) / median over the repeats, in %
    infer_images_per_s: float
    infer_spread_pct: float
    flops_per_image: int  # forward pass only
    tflops: float  # achieved in training: 3 * flops_per_image * train_images_per_s / 1e12
    mfu: float | None  # tflops / peak_tflops, a fraction; None where the peak is unknown
    peak_tflops: float | None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def forward_flops(model_name: str, image_size: int, num_classes: int = 1000) -> int:
    """Forward FLOPs of one image; on the meta device, so nothing is allocated or computed."""
    with torch.device("meta"):
        model = create_model(model_name, num_classes=num_classes).eval()
    return count_flops(model, image_size)


@dataclass(frozen=True)
class BenchSettings:
    """What `gtrain bench MODEL` times, and how."""

    batch_size: int = 64
    image_size: int | None = None  # px; None: the model's default
    precision: str = "auto"
    channels_last: bool | None = None  # None: as `gtrain fit` decides
    compile: bool = False
    device: str = "auto"
    steps: int = 20  # timed steps per repeat
    warmup: int = 5  # untimed steps first
    repeats: int = 5  # timed groups; the result is their median


def model_recipe(model_name: str, settings: BenchSettings) -> Recipe:
    """A recipe that trains `model_name` as `settings` say, with plain SGD at a constant lr."""
    layout = {None: "auto", True: "on", False: "off"}[settings.channels_last]
    return Recipe.model_validate({
        "model": {"name": model_name},
        "optim": {"name": "sgd", "lr": 1e-3, "nesterov": False, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"precision": settings.precision, "channels_last": layout, "compile": settings.compile, "epochs": 1},
    })  # fmt: skip


def run_bench(model_name: str, settings: BenchSettings) -> BenchResult:
    """Time training steps and inference of `model_name`."""
    get_model_entry(model_name)  # an unknown name: one line that suggests the nearest
    runtime.resolve_precision(settings.precision, runtime.resolve_device(settings.device))  # --precision's own message
    return time_recipe_model(model_recipe(model_name, settings), settings)


def time_recipe_model(
    recipe: Recipe, settings: BenchSettings, *, num_classes: int = 1000, in_chans: int = 3
) -> BenchResult:  # fmt: skip
    """Time the training step of `recipe`'s model as `gtrain fit` takes it (its optimizer,
    precision, memory format, compilation and micro-batches), and its inference."""
    model_name = recipe.model.name
    image_size = settings.image_size or get_model_entry(model_name).input_size
    batch_size, steps, warmup, repeats = settings.batch_size, settings.steps, settings.warmup, settings.repeats
    for name, value, least in [
        ("batch size", batch_size, 1),
        ("image size", image_size, 1),
        ("steps", steps, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ]:
        if value < least:
            raise UserError(f"{name} = {value}: must be at least {least}")
    device_ = runtime.resolve_device(settings.device)
    # As `gtrain fit` does unless train.deterministic: cuDNN picks the fastest kernels.
    torch.backends.cudnn.benchmark = True
    trainer = Trainer.for_model(recipe, num_classes=num_classes, in_chans=in_chans, steps_per_epoch=1, world=World(),
                                device=device_)  # fmt: skip
    precision, channels_last = trainer.settings.precision, trainer.settings.channels_last
    images = torch.randn(batch_size, in_chans, image_size, image_size, device=device_)
    labels = torch.randint(0, num_classes, (batch_size,), device=device_)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    timing = dict(batch_size=batch_size, steps=steps, warmup=warmup, repeats=repeats, device=device_)
    trainer.step_model.train()
    train_rates = _images_per_s(functools.partial(trainer.train_step, images, labels, 0), **timing)
    trainer.model.eval()
    infer_rates = _images_per_s(functools.partial(_infer_step, trainer.eval_model, images, device_, precision), **timing)

    model_settings = recipe.model_overrides()
    flops_per_image = forward_flops(model_name, image_size, num_classes) if in_chans == 3 and not model_settings else 0
    train_images_per_s = statistics.median(train_rates)
    tflops = 3 * flops_per_image * train_images_per_s / 1e12
    name = _device_name(device_)
    peak = peak_tflops(name, precision) if device_.type == "cuda" else None
    return BenchResult(
        model=model_name, device=str(device_), device_name=name, torch_version=torch.__version__,
        precision=precision, channels_last=channels_last, compiled=recipe.train.compile,
        batch_size=batch_size, image_size=image_size, steps=steps, repeats=repeats,
        train_images_per_s=train_images_per_s, train_spread_pct=_spread_pct(train_rates),
        infer_images_per_s=statistics.median(infer_rates), infer_spread_pct=_spread_pct(infer_rates),
        flops_per_image=flops_per_image, tflops=tflops,
        mfu=tflops / peak if peak else None, peak_tflops=peak,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# gtrain bench --data: is the loader or the model the limit?


@dataclass
class DataBenchResult:
    recipe: str
    device: str
    loader: str  # which path, how many workers, what the batches hold
    batch_size: int  # images per process and step
    image_size: int
    batches: int  # timed
    loader_images_per_s: float  # the training loader alone, until the batch is on the device
    train_images_per_s: float  # the model's training step alone, on random images there
    limited_by: str  # "data" or "model"
    data_wait_fraction: float  # the share of a step the model would wait for data: 1 - loader / train, or 0
    image_costs: ImageCosts | None = None  # ms per image in each stage (image folders decoded by the workers)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def run_data_bench(
    recipe, recipe_name: str, *, device: str | None = None, batches: int = 200, warmup: int = 10, steps: int = 10,
    repeats: int = 3,
) -> DataBenchResult:  # fmt: skip
    """The recipe's training loader as `gtrain fit` builds it (its workers, batch,
    augmentation and path), for `batches` batches after `warmup`, and its model's training
    step on the same device at the same batch."""
    from gtrain.data import Pipeline
    from gtrain.data.loaders import build_loaders

    if batches < 1 or warmup < 0:
        raise UserError(f"--batches {batches} and --warmup {warmup}: need at least 1 batch and no negative warmup")
    world, train = World(), recipe.train
    device_ = runtime.resolve_device(device or train.device)
    runtime.seed_everything(train.seed, deterministic=False)
    check_batch_split(recipe, world)
    data = load_data(recipe, world)
    loader, sampler, _ = build_loaders(
        data, global_batch=recipe.data.batch_size, seed=train.seed, workers=recipe.data.workers, device=device_,
        world=world,
    )  # fmt: skip
    decodes_on_device = data.pipeline == Pipeline.DEVICE_DECODE
    images, epoch, timed, start = 0, 0, -warmup, time.perf_counter()
    while timed < batches:
        sampler.set_epoch(epoch)
        for inputs, _ in loader:
            inputs = inputs.to(device_, non_blocking=True)
            timed += 1
            if timed == 0:
                _synchronize(device_)
                start = time.perf_counter()
            elif timed > 0:
                images += len(inputs)
            if timed >= batches:
                break
        epoch += 1
    _synchronize(device_)
    loader_rate = images / (time.perf_counter() - start)
    costs = image_costs(data.train, batch_size=len(inputs), device=device_)
    # The step as fit takes it: its optimizer, precision, memory format and micro-batches.
    timing = BenchSettings(batch_size=len(inputs), image_size=data.info.image_size, device=str(device_), steps=steps,
                           warmup=2, repeats=repeats)  # fmt: skip
    step = time_recipe_model(recipe, timing, num_classes=data.info.num_classes, in_chans=data.info.in_chans)
    train_rate = step.train_images_per_s
    return DataBenchResult(
        recipe=recipe_name, device=str(device_), loader=data.pipeline.label(recipe.data.workers),
        batch_size=len(inputs), image_size=data.info.image_size, batches=batches, loader_images_per_s=loader_rate, train_images_per_s=train_rate,
        limited_by="data" if loader_rate < train_rate else "model",
        # Workers overlap the step, so only a slower loader makes it wait; decoding on the
        # device runs between steps, so its time adds to theirs.
        data_wait_fraction=(train_rate / (loader_rate + train_rate) if decodes_on_device
                            else max(0.0, 1 - loader_rate / train_rate)),  # fmt: skip
        image_costs=costs,
    )  # fmt: skip


def format_data_rows(result: DataBenchResult) -> list[tuple[str, str]]:
    r = result
    if r.limited_by == "data":
        verdict = (f"the data loader: the model could train {r.train_images_per_s / r.loader_images_per_s:.1f}x faster; "
                   f"it would wait for batches {r.data_wait_fraction:.0%} of the time")  # fmt: skip
    else:
        verdict = f"the model: the loader has {r.loader_images_per_s / r.train_images_per_s:.1f}x the images/s it needs"
    rows = [
        ("recipe", f"{r.recipe}, batch {r.batch_size} x {r.image_size} px, on {r.device}"),
        ("loader", r.loader),
        ("data", f"{r.loader_images_per_s:,.1f} img/s ({r.batches} batches, the loader alone)"),
        ("model", f"{r.train_images_per_s:,.1f} img/s (training steps alone, on random images)"),
        ("limit", verdict),
    ]
    return rows + (_cost_rows(r.image_costs, limited_by_data=r.limited_by == "data") if r.image_costs else [])


def _cost_rows(costs: ImageCosts, *, limited_by_data: bool) -> list[tuple[str, str]]:
    stages = ", ".join(f"{name.replace('_', ' ')} {ms:.2f}" for name, ms in costs.stages().items())
    rows = [("per image", f"{stages} ms (one thread, {costs.samples} images of {costs.stored_pixels:.2f} MP on average)")]
    speedup = costs.pre_resized_speedup()
    smaller = f"stored with a short side of {costs.pre_resized_side} px (JPEG q90), a worker would be {speedup:.1f}x faster"
    if speedup >= 1.5 and limited_by_data:
        rows.append(("pre-resize", f"worth it: {smaller}; the loader is the limit"))
    else:
        rows.append(("pre-resize", f"not needed: {smaller}" + ("" if limited_by_data else ", and the model is the limit")))
    return rows


def format_rows(result: BenchResult) -> list[tuple[str, str]]:
    """(label, value) rows for a human; the CLI lays them out."""
    r = result
    timed = f"median of {r.repeats} x {r.steps} steps; spread = (max - min) / median"
    layout = "channels_last" if r.channels_last else "NCHW"
    mode = "compiled" if r.compiled else "eager"
    mfu = "- (no known peak for this device)"
    if r.mfu is not None:
        peak_kind = "TF32" if r.precision == "fp32" else r.precision
        mfu = f"{r.mfu:.1%} of {r.peak_tflops:,.0f} TFLOP/s ({peak_kind} dense peak)"
    return [
        ("model", f"{r.model}, batch {r.batch_size} x {r.image_size} px"),
        ("device", f"{r.device} ({r.device_name}), torch {r.torch_version}"),
        ("setup", f"{r.precision}, {layout}, {mode}"),
        ("train", f"{r.train_images_per_s:,.1f} img/s (spread {r.train_spread_pct:.1f}%)"),
        ("inference", f"{r.infer_images_per_s:,.1f} img/s (spread {r.infer_spread_pct:.1f}%)"),
        ("timing", timed),
        ("FLOPs", f"{r.flops_per_image / 1e9:.3f} GFLOPs per image forward, 3x that per training step"),
        ("achieved", f"{r.tflops:.3f} TFLOP/s in training"),
        ("MFU", mfu),
    ]


@torch.no_grad()
def _infer_step(model: nn.Module, images, device: torch.device, precision: str) -> None:
    with runtime.autocast(device, precision):
        model(images)


def _images_per_s(step, *, batch_size: int, steps: int, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Images/s of each of `repeats` groups of `steps` calls of `step`, after `warmup` calls
    (kernel selection, allocator growth and, when compiled, compilation)."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _synchronize(device)  # CUDA runs asynchronously: wait for the queued kernels
        rates.append(batch_size * steps / (time.perf_counter() - start))
    return rates


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread_pct(rates: list[float]) -> float:
    return (max(rates) - min(rates)) / statistics.median(rates) * 100


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu"
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.MULTILINE)
    return model.group(1).strip() if model else "cpu"
