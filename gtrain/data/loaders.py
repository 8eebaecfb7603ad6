"""Batches for training and evaluation: one builder decides once where the data lives.

Two paths give the same batches of (normalized float images, labels):
- on the device: small fixed-size datasets (digits, the MNIST family, CIFAR, SVHN, ...) are
  decoded once into a (N, C, H, W) uint8 tensor there, and every batch is cropped, flipped
  and normalized in one go, with no worker processes: per-image PIL transforms would cost
  more than the model step;
- DataLoaders with workers for everything else.

The training order is a pure function of (seed, epoch), and a loader can start in the
middle of an epoch, so a resumed run sees exactly the batches it would have seen. On the
device, the random crop and flip of step s come from a generator seeded by (seed, epoch,
s, rank), so a resumed run also draws exactly the augmentation it would have drawn.
"""

import copy

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms

from gtrain.data.datasets import BatchAugmentation, DataBundle, DeviceFinish, EncodedImage, decode_image_data
from gtrain.distributed import World
from gtrain.errors import UserError


class EpochSampler(Sampler[int]):
    """A fresh random permutation every epoch, drawn from its own generator so that
    nothing else that consumes random numbers can change the data order.

    Under torch.distributed each process takes its share of every global batch: step s
    of the epoch trains on the same images whatever the number of processes, which is
    why a checkpoint resumes on any number of them.
    """

    def __init__(self, size: int, seed: int, *, global_batch: int, rank: int = 0, world_size: int = 1):
        self.size = size
        self.seed = seed
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.steps = size // global_batch  # the last partial batch is dropped
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """`start_step`: how many optimizer steps of this epoch were already taken."""
        self.epoch = epoch
        self.start_step = start_step

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def indices(self) -> torch.Tensor:
        """This process's images for the rest of the epoch, in training order."""
        batches = self.order(self.epoch)[: self.steps * self.global_batch]
        batches = batches.view(self.steps, self.world_size, -1)  # (step, process, image)
        return batches[self.start_step :, self.rank].flatten()

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return (self.steps - self.start_step) * (self.global_batch // self.world_size)


def make_train_loader(
    dataset: Dataset, *, global_batch: int, seed: int, workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1,
    collate_fn=None,
):  # fmt: skip
    sampler = EpochSampler(len(dataset), seed, global_batch=global_batch, rank=rank, world_size=world_size)
    loader = DataLoader(
        dataset,
        batch_size=global_batch // world_size,
        sampler=sampler,  # whole batches only: the sampler drops the epoch's remainder
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: otherwise every new epoch iterator draws a worker seed from
        # the global RNG and shifts the augmentation of a resumed run.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def make_eval_loader(
    dataset: Dataset, *, batch_size: int, workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1,
    finish: DeviceFinish | None = None, device: torch.device | None = None,
):  # fmt: skip
    """Under torch.distributed, process r evaluates images r, r + N, r + 2N, ...: every image
    exactly once, with no padding, so the reduced metrics equal a single process's. With
    `finish` (uint8 items), the batches are normalised on `device`."""
    if world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # Its own generator: the first iterator of a DataLoader draws its workers' seed, and
        # a resumed run would draw it from the global RNG where the run it resumes did not.
        generator=torch.Generator(),
    )
    return loader if finish is None else DeviceBatches(loader, finish, device)


def uint8_normalization(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (1, C, 1, 1): uint8 images * scale + shift = (x / 255 - mean) / std."""
    std, mean = torch.tensor(std, device=device), torch.tensor(mean, device=device)
    return (1 / (255 * std)).view(1, -1, 1, 1), (-mean / std).view(1, -1, 1, 1)


def normalize_uint8(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float32, in one new tensor: every path that
    normalises uint8 images (training, evaluation, prediction) computes it this way, so
    their numbers agree to the bit."""
    return images.float().mul_(scale).add_(shift)


class DeviceBatches:
    """The batches of a DataLoader whose workers send uint8 images: each batch is copied to
    the device (pinned and non-blocking on CUDA, so the copy overlaps the step before it),
    made float and normalised there, and erased per image where the recipe asks. With
    `finish.decode_then` the workers send the files' bytes: the device decodes the batch
    (nvJPEG on CUDA, in one call) and augments each image before the rest."""

    def __init__(self, loader: DataLoader, finish: DeviceFinish, device: torch.device):
        self.loader, self.finish, self.device = loader, finish, device
        self.scale, self.shift = uint8_normalization(finish.mean, finish.std, device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            if self.finish.decodes_files:
                images = torch.stack([self.finish.decode_then(image) for image in decode_on(images, self.device)])
            images = normalize_uint8(images.to(self.device, non_blocking=True), self.scale, self.shift)
            if self.finish.random_erasing > 0:
                erase_rectangles(images, self.finish.random_erasing, noise=self.finish.random_erasing_fill == "noise")
            yield images, labels.to(self.device, non_blocking=True)


def collate_encoded(items: list[tuple[EncodedImage, int]]) -> tuple[list[EncodedImage], torch.Tensor]:
    """A batch of undecoded files: their sizes differ, so they stay a list."""
    return [image for image, _ in items], torch.tensor([label for _, label in items])


def decode_on(encoded: list[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """uint8 (3, H, W) images on `device`: the JPEGs in one `decode_jpeg` call there, the
    other formats (and any JPEG it cannot decode, to name the file) on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.from_numpy(image.data) for image in encoded]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, bytes_ in enumerate(data) if bytes_[:2].tolist() == [0xFF, 0xD8]]
    if jpegs:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded):
                images[i] = image
        except RuntimeError:
            pass  # a damaged or unusual JPEG: the loop below decodes each, and names a bad one
    for i, image in enumerate(images):
        if image is None:
            images[i] = decode_image_data(data[i], encoded[i].path).to(device)
    return images


def erase_rectangles(images: torch.Tensor, p: float, *, noise: bool) -> None:
    """torchvision's RandomErasing (probability p, area 0.02-0.33 of the image, aspect
    0.3-3.3) on each image of a normalised batch, in place: its own draws of the rectangle
    (`RandomErasing.get_params`, from torch's global generator), which then holds 0 (the
    mean colour) or, with `noise`, normal noise drawn on the device."""
    for image in images:
        if torch.rand(1).item() >= p:
            continue
        top, left, h, w, fill = transforms.RandomErasing.get_params(image, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=[0.0])
        if fill is image:
            continue  # no rectangle fitted in 10 tries: torchvision leaves the image as it is
        patch = image[:, top : top + h, left : left + w]
        if noise:
            patch.normal_()
        else:
            patch.zero_()


# ---------------------------------------------------------------------------------------
# On the device


def load_uint8(
    dataset: Dataset, image_size: int, device: torch.device, interpolation: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split once: images (N, C, H, W) uint8 and labels (N,) int64, on `device`."""
    # A copy that yields resized uint8 (C, H, W) tensors: the caller's dataset keeps its transform.
    raw = copy.copy(dataset)
    resize = transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode(interpolation))
    raw.transform = transforms.Compose([resize, transforms.PILToTensor()])
    loader = DataLoader(raw, batch_size=1024, num_workers=0)
    images, labels = zip(*loader)
    return torch.cat(images).to(device), torch.cat(labels).to(device)


class InMemoryLoader:
    """Batches of (normalized float images, labels) from uint8 tensors on the device.

    With a `sampler` it trains (shuffled order, shards under torchrun, augmentation);
    without one it evaluates the images in order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        sampler: EpochSampler | None = None,
        augmentation: BatchAugmentation | None = None,
        seed: int = 0,
    ):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.sampler = sampler
        self.augmentation = augmentation if sampler is not None else None
        self.seed = seed
        device = images.device
        # Normalize in one multiply-add: (x / 255 - mean) / std.
        self.scale, self.shift = uint8_normalization(mean, std, device)

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.sampler) // self.batch_size  # the sampler yields whole batches
        return -(-len(self.labels) // self.batch_size)  # evaluation keeps the last partial batch

    def __iter__(self):
        if self.sampler is None:
            order, first_step = torch.arange(len(self.labels)), 0
        else:
            order, first_step = self.sampler.indices(), self.sampler.start_step
        order = order.to(self.images.device)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[index]
            if self.augmentation is not None:
                images = self._augment(images, step=first_step + i)
            yield normalize_uint8(images, self.scale, self.shift), self.labels[index]

    def _augment(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """Random crop after zero padding, and random horizontal flip, per image."""
        sampler = self.sampler
        generator = torch.Generator().manual_seed(
            hash((self.seed, sampler.epoch, step, sampler.rank)) % (2**63)
        )
        n, _, h, w = images.shape
        pad = self.augmentation.pad
        if pad:
            padded = F.pad(images, (pad, pad, pad, pad))  # (N, C, H + 2p, W + 2p), zeros outside
            dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(images.device)
            rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
            batch = torch.arange(n, device=images.device)[:, None, None, None]
            channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
            images = padded[batch, channel, rows, cols]  # (N, C, H, W)
        if self.augmentation.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images


def build_loaders(data: DataBundle, *, in_memory: str, global_batch: int, seed: int, workers: int,
                  device: torch.device, world: World):  # fmt: skip
    """(train loader, its sampler, val loader) yielding global_batch / world.size images per
    process: on the device when `in_memory` is "on", or "auto" and the data is small and
    fixed-size (`data.augmentation` says so), else DataLoaders with `workers` processes."""
    batch_size = global_batch // world.size
    shard = dict(rank=world.rank, world_size=world.size)
    if in_memory == "off" or (in_memory == "auto" and data.augmentation is None):
        pin_memory = device.type == "cuda"
        finish = data.train_finish
        train_loader, sampler = make_train_loader(
            data.train, global_batch=global_batch, seed=seed, workers=workers, pin_memory=pin_memory, **shard,
            collate_fn=collate_encoded if finish is not None and finish.decodes_files else None,
        )  # fmt: skip
        if finish is not None:  # uint8 batches, finished on the device
            train_loader = DeviceBatches(train_loader, finish, device)
        val_loader = make_eval_loader(data.val, batch_size=batch_size, workers=workers, pin_memory=pin_memory, **shard,
                                      finish=data.val_finish, device=device)  # fmt: skip
        return train_loader, sampler, val_loader
    if data.augmentation is None:
        raise UserError(
            f"data.in_memory = 'on' cannot be used: {data.not_in_memory_because}; set data.in_memory = 'auto' or 'off'"
        )
    info = data.info
    sampler = EpochSampler(len(data.train), seed, global_batch=global_batch, **shard)
    train_images, train_labels = load_uint8(data.train, info.image_size, device, data.interpolation)
    val_images, val_labels = load_uint8(data.val, info.image_size, device, data.interpolation)
    normalize = dict(mean=info.mean, std=info.std)
    train_loader = InMemoryLoader(
        train_images, train_labels, batch_size=batch_size, sampler=sampler, augmentation=data.augmentation,
        seed=seed, **normalize,
    )  # fmt: skip
    # Process r evaluates images r, r + N, ...: each once, as with the DataLoader path.
    val_loader = InMemoryLoader(
        val_images[world.rank :: world.size], val_labels[world.rank :: world.size], batch_size=batch_size, **normalize
    )
    return train_loader, sampler, val_loader
