"""The training loader alone, on folders of JPEGs: gtrain's path (each JPEG decoded at the
scale its crop needs) against the same path decoding every image whole (what gtrain did
before: the same pixels as torchvision.io) and against timm's `create_loader`, in one run.

The script writes its own ImageFolders (no download) of photograph-like JPEGs (smooth
colour fields, edges and sensor-like noise) at two sizes: 500x375 (ImageNet's typical
size, quality 90) and 4032x3024 (what a phone camera writes, quality 92). Each loader
then runs through whole epochs: RandomResizedCrop to 224 px and horizontal flip, batch
32, `--workers`. A row is the best epoch of `--epochs` (the first includes starting the
workers).

    gtrain          gtrain's training loader as `fit` builds it (its sampler, each image
                    augmented from its own random stream), up to the uint8 batches the
                    workers deliver (on a GPU host, the device's work starts here)
    gtrain whole    the same with data.decode = "cpu-full": every JPEG decoded whole
    device decode   (CUDA only) data.decode = "device": the workers read the files, the
                    GPU decodes (nvJPEG), crops, flips and normalises each batch
    timm            timm.data.create_loader(is_training=True, use_prefetcher=False,
                    color_jitter=None): PIL decode and transforms, float32 batches

    python benchmarks/loader.py [--sizes 500x375 4032x3024] [--epochs 2] [--workers 2] [--device cpu] [--json]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gtrain.data.datasets import build_data
from gtrain.recipe import DataSection
from gtrain.data.loaders import build_loaders
from gtrain.distributed import World

SIZE, BATCH = 224, 32


SIZES = {"500x375": (500, 375, 90, 512), "4032x3024": (4032, 3024, 92, 64)}  # width, height, quality, images


def write_jpegs(root: Path, size: str, classes: int = 8) -> None:
    width, height, quality, count = SIZES[size]
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / height
    for index in range(count):
        folder = root / "train" / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        field = sum(rng.uniform(0, 255, 3).astype(np.float32)
                    * np.sin(rng.uniform(1, 8) * (x * np.cos(a) + y * np.sin(a)) + rng.uniform(0, 6))[..., None]
                    for a in rng.uniform(0, np.pi, 3)) / 3 + 128  # fmt: skip
        image = np.clip(field + rng.normal(0, 8, field.shape).astype(np.float32), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{index:05d}.jpg", quality=quality)
    shutil.copytree(root / "train", root / "val")


def best_epoch(batches, epochs: int, device: torch.device) -> float:
    """Images per second of the fastest whole pass over `batches` (a loader, or a loader and
    the sampler whose epoch it follows)."""
    batches, sampler = batches if isinstance(batches, tuple) else (batches, None)
    best = 0.0
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for inputs, _ in batches:
            images += len(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, images / (time.perf_counter() - start))
    return best


def gtrain_training_loader(root: Path, workers: int, device: torch.device, **settings):
    """The loader `gtrain fit` trains from (its sampler, each image's own random stream, the
    device's finish), and its sampler."""
    data = build_data(DataSection(dataset="ImageFolder", root=str(root), image_size=SIZE, **settings))
    train, sampler, _ = build_loaders(data, global_batch=BATCH, seed=0, workers=workers, device=device, world=World())
    return train, sampler


def gtrain_batches(root: Path, workers: int, device: torch.device, **settings):
    train, sampler = gtrain_training_loader(root, workers, device, **settings)
    return train.loader, sampler  # the workers' batches, before the device's finish


def gtrain_whole(root: Path, workers: int, device: torch.device):
    return gtrain_batches(root, workers, device, decode="cpu-full")


def gtrain_device_decode(root: Path, workers: int, device: torch.device):
    if device.type != "cuda":
        raise ImportError("a CUDA device decodes; on a CPU it would decode in the training process")
    return gtrain_training_loader(root, workers, device, decode="device")


def timm_loader(root: Path, workers: int, device: torch.device):
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(root / "train"), split="train", is_training=True)
    return create_loader(dataset, input_size=(3, SIZE, SIZE), batch_size=BATCH, is_training=True,
                         use_prefetcher=False, no_aug=False, color_jitter=None, num_workers=workers,
                         persistent_workers=workers > 0, pin_memory=device.type == "cuda")  # fmt: skip


LOADERS = {"gtrain": gtrain_batches, "gtrain whole": gtrain_whole, "device decode": gtrain_device_decode,
           "timm": timm_loader}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {}
    for size in args.sizes:
        work = Path(tempfile.mkdtemp(prefix="gtrain-loader-"))
        try:
            write_jpegs(work, size)
            for name, build in LOADERS.items():
                for workers in args.workers:
                    key = f"{size} {name} workers={workers}"
                    try:
                        results[key] = best_epoch(build(work, workers, device), args.epochs, device)
                    except ImportError as error:
                        results[key] = f"skipped: {error}"
                    value = results[key]
                    print(f"{key:40s} {value:8.1f} img/s" if isinstance(value, float) else f"{key:40s} {value}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
        return
    for size in args.sizes:
        for workers in args.workers:
            new, whole, timm = (results[f"{size} {name} workers={workers}"] for name in ("gtrain", "gtrain whole", "timm"))
            print(f"{size} workers={workers}: gtrain / timm {new / timm:.2f}x, gtrain / whole decode {new / whole:.2f}x")


if __name__ == "__main__":
    main()
