"""What one training image costs in the loader, stage by stage, for `gtrain bench --data`:
read, decode, crop and resize, augment, collate, transfer. And what the same crops would
cost from copies of the images stored smaller, to say when pre-resizing would pay.

Each stage is timed on its own over a sample of the training set, in this process with one
thread, as a DataLoader worker runs it; the workers run these stages in parallel, so the
loader's images/s is about workers / (the sum of the worker stages).
"""

import functools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from gtrain.data.randomness import drawn_from
from gtrain.data.images import DecodeCrop, EncodedImage, decode_whole, probe, read_encoded
from gtrain.data.shards import ShardDataset

PRE_RESIZED_QUALITY = 90  # JPEG quality of the smaller copies
STAGES = ("read", "decode", "crop_resize", "augment", "collate", "transfer")


@dataclass
class ImageCosts:
    """Milliseconds per image in each stage, over `samples` images."""

    samples: int
    read: float
    decode: float
    crop_resize: float
    augment: float
    collate: float
    transfer: float
    stored_pixels: float  # the mean width x height of the files, in megapixels
    pre_resized_side: int  # the short side of the smaller copies
    pre_resized_read: float  # reading them
    pre_resized_decode_crop: float  # decode + crop and resize from them

    @property
    def worker_ms(self) -> float:
        """What one image costs a worker: everything but the transfer to the device."""
        return self.read + self.decode + self.crop_resize + self.augment + self.collate

    def stages(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in STAGES}

    def pre_resized_speedup(self) -> float:
        """How many times faster a worker would be on the smaller copies."""
        same = self.augment + self.collate
        return self.worker_ms / (self.pre_resized_read + self.pre_resized_decode_crop + same)


def image_costs(dataset, *, batch_size: int, device: torch.device, samples: int = 64) -> ImageCosts | None:
    """The stages of `dataset`'s items, where it is an image folder or a shard set that
    `DecodeCrop` decodes (None for data held in memory or decoded on the device)."""
    steps = getattr(getattr(dataset, "transform", None), "transforms", None)
    if not isinstance(dataset, (ImageFolder, ShardDataset)) or not steps or not isinstance(steps[0], DecodeCrop):
        return None
    picked = np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).round().astype(int).tolist()
    if isinstance(dataset, ShardDataset):
        chosen = [(functools.partial(dataset.read, i), dataset.targets[i]) for i in picked]
    else:
        chosen = [(functools.partial(read_encoded, dataset.samples[i][0]), dataset.samples[i][1]) for i in picked]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker
    try:
        with tempfile.TemporaryDirectory(prefix="gtrain-smaller-") as folder:
            return _timed_stages(chosen, steps[0], v2.Compose(steps[1:]), batch_size, device, Path(folder))
    finally:
        torch.set_num_threads(threads)


def _timed_stages(samples: list[tuple[Callable[[], EncodedImage], int]], crop: DecodeCrop, augment, batch_size: int, device: torch.device,
                  folder: Path) -> ImageCosts:  # fmt: skip
    """One image at a time through the stages, as a worker takes it (holding every decoded
    photo at once would measure the memory it takes, not the work)."""
    timer, side = _StageTimer(len(samples)), 2 * crop.size
    pairs, copies, pixels = [], [], []
    for index, (read, label) in enumerate(samples):
        file = timer("read", read)
        image, box = timer("decode", _seeded, index, crop.decoded, file)
        cropped = timer("crop_resize", crop.cropped, image, box)
        pairs.append((timer("augment", _seeded, index, augment, cropped), label))
        pixels.append(_image_pixels(file))
        copies.append(_write_smaller_copy(file, side, folder / f"{index}.jpg"))
    batches = [timer("collate", default_collate, pairs[k : k + batch_size]) for k in range(0, len(pairs), batch_size)]
    timer("transfer", _to_device, batches, device)
    for index, copy in enumerate(copies):
        smaller = timer("pre_resized_read", read_encoded, str(copy))
        timer("pre_resized", _seeded, index, crop, smaller)
    return ImageCosts(samples=len(samples), **{name: timer.ms(name) for name in STAGES},
                      stored_pixels=float(np.mean(pixels)) / 1e6, pre_resized_side=side,
                      pre_resized_read=timer.ms("pre_resized_read"), pre_resized_decode_crop=timer.ms("pre_resized"))  # fmt: skip


class _StageTimer:
    """Seconds spent in each stage, summed over calls; `ms`: per image."""

    def __init__(self, images: int):
        self.images, self.seconds = images, {}

    def __call__(self, name: str, work, *args):
        start = time.perf_counter()
        result = work(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return result

    def ms(self, name: str) -> float:
        return self.seconds[name] * 1000 / self.images


def _seeded(index: int, transform, item):
    with drawn_from(index):  # as the loader seeds an image; the same crop for an image and its smaller copy
        return transform(item)


def _to_device(batches: list, device: torch.device) -> None:
    for images, _ in batches:  # pinned first on a GPU host, as the loader pins its batches
        (images.pin_memory() if device.type == "cuda" else images).to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_smaller_copy(file: EncodedImage, short_side: int, path: Path) -> Path:
    """The image with its short side `short_side` (or as it is, if smaller), as a JPEG file."""
    image = Image.fromarray(decode_whole(file).permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    scale = short_side / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    image.save(path, "JPEG", quality=PRE_RESIZED_QUALITY)
    return path


def _image_pixels(file: EncodedImage) -> int:
    found = probe(file)
    return found.height * found.width if found.scalable else decode_whole(file)[0].numel()
