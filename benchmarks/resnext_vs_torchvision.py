"""gtrain's resnext50_32x4d against torchvision's: the same weights, the same training step.

Both models get torchvision's initial weights (gtrain uses torchvision's state_dict keys),
the script checks their logits agree, then times a training step (forward, cross-entropy,
backward, SGD step) of each, alternating the two in blocks within one process, so a slow
phase of a shared machine hits both alike. Target: gtrain no slower.

    python benchmarks/resnext_vs_torchvision.py                        # CPU: about 2 min on 2 cores
    python benchmarks/resnext_vs_torchvision.py --device cuda --batch-size 128 --image-size 224
"""

import argparse
import os
import statistics
import time

import torch
import torchvision
from torch.nn import functional as F

from gtrain import runtime
from gtrain.models import create_model


def time_steps(model, optimizer, images, labels, steps: int, device: torch.device) -> float:
    """Seconds per training step, over `steps` steps."""
    model.train()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64, help="px")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=5, help="blocks of each model, alternating")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args()

    device = runtime.resolve_device(args.device)
    torch.manual_seed(0)
    reference = torchvision.models.resnext50_32x4d(weights=None)
    ours = create_model("resnext50_32x4d", num_classes=1000)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    models = {"torchvision": reference.to(device).eval(), "gtrain": ours.to(device).eval()}
    with torch.no_grad():
        difference = (models["torchvision"](images) - models["gtrain"](images)).abs().max().item()

    print(
        f"resnext50_32x4d at {args.image_size} px, batch {args.batch_size}, fp32, {args.steps} steps x "
        f"{args.repeats} blocks each; torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; max logit difference {difference:.1e}",
        flush=True,
    )
    print(f"{'format':<15}{'torchvision ms/step':>21}{'gtrain ms/step':>16}{'gtrain speed':>14}")
    for channels_last in (False, True):
        form = torch.channels_last if channels_last else torch.contiguous_format
        batch = images.contiguous(memory_format=form)
        optimizers = {}
        for name, model in models.items():
            model.to(memory_format=form)
            optimizers[name] = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            time_steps(model, optimizers[name], batch, labels, 1, device)  # warm-up: kernels, allocations
        seconds = {name: [] for name in models}
        for repeat in range(args.repeats):
            order = list(models) if repeat % 2 == 0 else list(reversed(models))
            for name in order:
                seconds[name].append(time_steps(models[name], optimizers[name], batch, labels, args.steps, device))
        reference_s, ours_s = (statistics.median(seconds[name]) for name in ("torchvision", "gtrain"))
        print(
            f"{'channels_last' if channels_last else 'NCHW':<15}{reference_s * 1e3:>21.1f}{ours_s * 1e3:>16.1f}"
            f"{reference_s / ours_s:>13.3f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
