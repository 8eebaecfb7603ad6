"""How fast a model scores images at each batch size, as validation and `gtrain eval` score
them (eval mode, no gradients, the run's memory format), in one process.

Each batch size in turn scores the same random images (`--images`, at `--size` px), for
`--rounds` rounds after one round of warm-up, so a machine whose speed drifts moves every
batch size alike; reported: the median images/s of each and its median ratio, round by
round, to the first batch size.

    python benchmarks/validation_batch.py --model resnext50_32x4d --size 32 --batches 16 32 64
"""

import argparse
import statistics
import time

import torch

from gtrain.models import create_model
from gtrain.runtime import resolve_channels_last


def images_per_s(model: torch.nn.Module, images: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(images), batch):
            model(images[first : first + batch])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--images", type=int, default=326)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes).eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    if resolve_channels_last("auto", torch.device("cpu")):  # as `gtrain fit` validates on the CPU
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    for batch in args.batches:  # warm-up: oneDNN prepares its kernels for each shape
        images_per_s(model, images, batch)
    rates: dict[int, list[float]] = {batch: [] for batch in args.batches}
    for _ in range(args.rounds):
        for batch in args.batches:
            rates[batch].append(images_per_s(model, images, batch))
    first = rates[args.batches[0]]
    print(f"{args.model} at {args.size} px, {args.images} images, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| batch | images/s (median) | over batch " + f"{args.batches[0]} (median of rounds) |\n|---|---|---|")
    for batch, rate in rates.items():
        ratio = statistics.median(a / b for a, b in zip(rate, first))
        print(f"| {batch} | {statistics.median(rate):.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
