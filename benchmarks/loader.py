"""The training loader alone, on a folder of JPEGs: gtrain's uint8 path against its
float path (PIL decode, float32 normalised in the worker, as gtrain did before) and
against timm's `create_loader`, in one run on one machine.

The script writes its own ImageFolder of photograph-like 500x375 JPEGs (smooth colour
fields, edges and noise; no download), then iterates each loader through whole epochs:
RandomResizedCrop to 224 px and horizontal flip, batch 32, `--workers` 0 and 2. A row is
the best epoch of `--epochs` (the first includes starting the workers).

    uint8 batches   gtrain's training loader as `fit` builds it (its sampler, each image
                    augmented from its own random stream): torchvision.io decode,
                    transforms.v2 on uint8, uint8 batches as the workers deliver them (on a
                    GPU host, the device's work starts here)
    uint8 finished  the same, then float and normalised on `--device` (DeviceBatches); on
                    a CPU device that runs in the training process, beside the workers
    device decode   (CUDA only) data.decode = "device": the workers read the files, the
                    GPU decodes (nvJPEG), crops, flips and normalises each batch
    float           gtrain's previous path: PIL decode and transforms, float32 batches
                    normalised in the workers
    timm            timm.data.create_loader(is_training=True, use_prefetcher=False,
                    color_jitter=None): PIL decode and transforms, float32 batches

    python benchmarks/loader.py [--images 512] [--epochs 2] [--workers 0 2] [--device cpu] [--json]
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
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from gtrain.data.datasets import IMAGE_FOLDER_SPEC, build_data, train_transform
from gtrain.recipe import DataSection
from gtrain.data.loaders import build_loaders
from gtrain.distributed import World

SIZE, BATCH = 224, 32


def write_jpegs(root: Path, count: int, classes: int = 8) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500] / 375
    for index in range(count):
        folder = root / "train" / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        field = sum(rng.uniform(0, 255, 3) * np.sin(rng.uniform(1, 8) * (x * np.cos(a) + y * np.sin(a)) + rng.uniform(0, 6))[..., None]
                    for a in rng.uniform(0, np.pi, 3)) / 3 + 128  # fmt: skip
        image = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{index:05d}.jpg", quality=90)
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


def loader(dataset, workers: int, device: torch.device, collate_fn=None) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                      pin_memory=device.type == "cuda", collate_fn=collate_fn)  # fmt: skip


def gtrain_training_loader(root: Path, workers: int, device: torch.device, **settings):
    """The loader `gtrain fit` trains from (its sampler, each image's own random stream, the
    device's finish), and its sampler."""
    data = build_data(DataSection(dataset="ImageFolder", root=str(root), image_size=SIZE, **settings))
    train, sampler, _ = build_loaders(data, global_batch=BATCH, seed=0, workers=workers, device=device, world=World())
    return train, sampler


def gtrain_uint8_batches(root: Path, workers: int, device: torch.device):
    train, sampler = gtrain_training_loader(root, workers, device)
    return train.loader, sampler  # the workers' batches, before the device's finish


def gtrain_uint8_finished(root: Path, workers: int, device: torch.device):
    return gtrain_training_loader(root, workers, device)


def gtrain_device_decode(root: Path, workers: int, device: torch.device):
    if device.type != "cuda":
        raise ImportError("a CUDA device decodes; on a CPU it would decode in the training process")
    return gtrain_training_loader(root, workers, device, decode="device")


def gtrain_float(root: Path, workers: int, device: torch.device):
    return loader(ImageFolder(root / "train", transform=train_transform(IMAGE_FOLDER_SPEC, SIZE)), workers, device)


def timm_loader(root: Path, workers: int, device: torch.device):
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(root / "train"), split="train", is_training=True)
    return create_loader(dataset, input_size=(3, SIZE, SIZE), batch_size=BATCH, is_training=True,
                         use_prefetcher=False, no_aug=False, color_jitter=None, num_workers=workers,
                         persistent_workers=workers > 0, pin_memory=device.type == "cuda")  # fmt: skip


LOADERS = {"uint8 batches": gtrain_uint8_batches, "uint8 finished": gtrain_uint8_finished,
           "device decode": gtrain_device_decode, "float": gtrain_float, "timm": timm_loader}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="gtrain-loader-"))
    try:
        write_jpegs(work, args.images)
        results = {}
        for name, build in LOADERS.items():
            for workers in args.workers:
                try:
                    results[f"{name} workers={workers}"] = best_epoch(build(work, workers, device), args.epochs, device)
                except ImportError as error:
                    results[f"{name} workers={workers}"] = f"skipped: {error}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
        return
    for name, value in results.items():
        print(f"{name:26s} {value:8.0f} img/s" if isinstance(value, float) else f"{name:26s} {value}")
    for workers in args.workers:
        old, timm = results[f"float workers={workers}"], results[f"timm workers={workers}"]
        for name in ("uint8 batches", "uint8 finished", "device decode"):
            new = results[f"{name} workers={workers}"]
            if all(isinstance(v, float) for v in (new, old, timm)):
                print(f"workers={workers}: {name} / float {new / old:.2f}x, / timm {new / timm:.2f}x")


if __name__ == "__main__":
    main()
