"""gtrain's training loop against a minimal hand-written PyTorch loop: overhead and defaults.

Both loops train the same model from the same seed on the same in-memory data (a
TensorDataset of random images, moved to the device batch by batch as `gtrain fit`
does), with the same batch, precision, memory format, SGD settings and DataLoader
settings, for the same number of timed steps after the same warm-up. gtrain's side is
`Trainer.train` (gtrain/trainer.py) set up as `fit` sets it up (EpochSampler loader,
param-group optimizer, LR scheduler, GradScaler, non-finite-loss guard, progress reporter,
the stop agreement), timed as it times an epoch for metrics.jsonl; the hand
loop is forward, cross_entropy, zero_grad, backward, step. Every run is its own process
and the two alternate, so neither inherits the other's allocator or caches and slow
phases of a shared machine hit both alike. Target (the issue): gtrain's images/s at
least 98% of the hand loop's.

With `--compare defaults` the hand loop runs in plain fp32 NCHW while gtrain uses its
default precision and memory format for the device (`precision = "auto"`,
`channels_last = "auto"`): what the defaults buy over a naive loop (target: 1.4x).

    python benchmarks/overhead.py                          # CPU: about 3 min on 2 cores
    python benchmarks/overhead.py --compare defaults
    python benchmarks/overhead.py --device cuda --model resnext29_8x64d --batch-size 256 --precision bf16

The default batch is 16, not 64: a resnext29_2x16d step at 32 px and batch 64 takes
about 6 s on one core (AMD EPYC), too long for a 3-minute run, and a shorter step makes
any per-step overhead of gtrain's loop more visible, not less.
"""

import argparse
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from gtrain import runtime
from gtrain.data.loaders import make_train_loader
from gtrain.models import create_model
from gtrain.optim import build_optimizer, build_scheduler
from gtrain.progress import Reporter
from gtrain.recipe import OptimSection, Recipe
from gtrain.run_folder import MetricsLog, RunFolder, RunStatus
from gtrain.stopping import StopRequest
from gtrain.trainer import RunRecords, Trainer, TrainerSettings

NUM_CLASSES = 10
WARMUP_STEPS = 3  # first-call allocation, oneDNN primitive and cuDNN kernel selection
# Both loops: SGD with Nesterov momentum and weight decay, as gtrain's default recipe;
# lr below gtrain's 0.1 so that random labels cannot blow the loss up to NaN.
OPTIM = OptimSection(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine")


def run_gtrain(model, dataset, *, args, device, precision, channels_last) -> float:
    loader, sampler = make_train_loader(
        dataset, global_batch=args.batch_size, seed=0, workers=0, pin_memory=device.type == "cuda"
    )
    val_loader = DataLoader(TensorDataset(*dataset[: args.batch_size]), batch_size=args.batch_size)
    optimizer = build_optimizer(model, OPTIM)
    trainer = Trainer(
        model=model, step_model=model, eval_model=model, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, steps_per_epoch=args.steps, epochs=2, optim=OPTIM),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        settings=TrainerSettings(device=device, precision=precision, channels_last=channels_last,
                                 num_classes=NUM_CLASSES, steps_per_epoch=args.steps),
        recipe=Recipe(optim=OPTIM), loaders=(loader, sampler, val_loader),
    )  # fmt: skip
    for step, (images, labels) in enumerate(itertools.islice(loader, WARMUP_STEPS)):
        trainer.train_step(images, labels, step)
    sampler.set_epoch(0)
    synchronize(device)
    # Not a terminal: the reporter takes its plain path, as under CI or with output to a file.
    # Not the main process: nothing is written.
    paths = RunFolder(Path(tempfile.mkdtemp()))
    records = RunRecords(
        paths=paths, meta=None, reporter=Reporter(Console(file=io.StringIO())), is_main=False,
        metrics_log=MetricsLog(paths, tensorboard=False, enabled=False), status=RunStatus(paths, {}, enabled=False),
    )  # fmt: skip
    trainer.train(records, StopRequest())
    # The epoch's images/s as the loop measures it: from its first batch to its last step's
    # loss on the host (synchronised), validation left out.
    return trainer.progress.history[-1]["images_per_s"]


def run_hand(model, dataset, *, args, device, precision, channels_last) -> float:
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    optimizer = torch.optim.SGD(
        model.parameters(), lr=OPTIM.lr, momentum=OPTIM.momentum, nesterov=OPTIM.nesterov,
        weight_decay=OPTIM.weight_decay,
    )  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def epoch(batches) -> int:
        images_seen = 0
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            images_seen += labels.numel()
        loss.item()
        return images_seen

    epoch(itertools.islice(loader, WARMUP_STEPS))
    synchronize(device)
    start = time.perf_counter()
    images = epoch(loader)
    synchronize(device)
    return images / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args) -> None:
    """One timed run of one loop; prints {"images_per_s": ...} as its last line."""
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(args.precision, device)
    channels_last = runtime.resolve_channels_last("auto", device)
    if args.compare == "defaults" and args.run == "hand":
        precision, channels_last = "fp32", False  # the naive baseline
    runtime.seed_everything(0, deterministic=False)
    model = create_model(args.model, num_classes=NUM_CLASSES).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Normalised random images (N, 3, H, W) and labels, in memory on the CPU.
    size = args.image_size
    dataset = TensorDataset(
        torch.randn(args.batch_size * args.steps, 3, size, size),
        torch.randint(0, NUM_CLASSES, (args.batch_size * args.steps,)),
    )
    run = run_gtrain if args.run == "gtrain" else run_hand
    images_per_s = run(model, dataset, args=args, device=device, precision=precision, channels_last=channels_last)
    layout = "channels_last" if channels_last else "NCHW"
    print(json.dumps({"images_per_s": images_per_s, "precision": precision, "device": str(device), "layout": layout}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnext29_2x16d")
    parser.add_argument("--image-size", type=int, default=32, help="px")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run, after 3 warm-up steps")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternating")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--compare", default="overhead", choices=["overhead", "defaults"],
        help="overhead: both loops with the same settings; defaults: the hand loop in fp32 NCHW",
    )  # fmt: skip
    parser.add_argument("--run", choices=["gtrain", "hand"], help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args()
    if args.run:
        child(args)
        return

    forwarded = sys.argv[1:]
    print(
        f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.steps} steps per run, "
        f"{args.repeats} runs of each loop; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    rates: dict[str, list[float]] = {"gtrain": [], "hand": []}
    for repeat in range(args.repeats):
        order = ["gtrain", "hand"] if repeat % 2 == 0 else ["hand", "gtrain"]  # alternate who goes first
        for loop in order:
            done = subprocess.run(
                [sys.executable, __file__, *forwarded, "--run", loop], capture_output=True, text=True
            )
            if done.returncode != 0:
                sys.exit(f"the {loop} run failed:\n{done.stderr}")
            report = json.loads(done.stdout.strip().splitlines()[-1])
            rates[loop].append(report["images_per_s"])
            print(f"run {repeat + 1}/{args.repeats} {loop:<7} {report['images_per_s']:10.1f} img/s "
                  f"({report['device']}, {report['precision']}, {report['layout']})", flush=True)  # fmt: skip

    print(f"load average after the runs: {os.getloadavg()[0]:.1f} (1 min)")
    print(f"\n{'loop':<8}{'median img/s':>14}{'min':>10}{'max':>10}")
    for loop, values in rates.items():
        print(f"{loop:<8}{statistics.median(values):>14.1f}{min(values):>10.1f}{max(values):>10.1f}")
    ratio = statistics.median(rates["gtrain"]) / statistics.median(rates["hand"])
    target = 0.98 if args.compare == "overhead" else 1.4
    verdict = "meets" if ratio >= target else "below"
    print(f"\ngtrain / hand: {ratio:.3f} ({verdict} the {target} target)")


if __name__ == "__main__":
    main()
