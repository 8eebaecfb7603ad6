"""Batches for training and evaluation, as the data's pipeline (`DataBundle.pipeline`) says.

Two ways give the same batches of (normalized float images, labels):
- on the device ("in-memory"): small fixed-size datasets (digits, the MNIST family, CIFAR,
  SVHN, ...) are decoded once into a (N, C, H, W) uint8 tensor there, and every batch is
  cropped, flipped and normalized in one go, with no worker processes: per-image PIL
  transforms would cost more than the model step;
- DataLoaders with workers for everything else, whose uint8 batches the device finishes.

The training order is a pure function of (seed, epoch), and a loader can start in the
middle of an epoch, so a resumed run sees exactly the batches it would have seen. Every
random draw of an image's augmentation is a pure function of (seed, epoch, image)
(gtrain.data.randomness), whichever worker or process makes it, so a resumed run also
draws exactly the augmentation it would have drawn, with any number of workers.

Evaluation batches depend on the split and the batch size only: batch i holds images
[i * B, (i + 1) * B), and under torch.distributed process r scores batches r, r + N, ...,
so every image is scored in the same batch as in one process, and by `gtrain eval`.
"""

import copy

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from gtrain.data.datasets import BatchAugmentation, DataBundle, DeviceFinish, Pipeline, train_labels
from gtrain.data.images import EncodedImage, decode_whole, jpeg_orientation
from gtrain.data.randomness import ERASING_STREAM, SAMPLE_STREAM, SampleKey, SeededBySample, drawn_from, seed_of
from gtrain.distributed import World, per_process_batch
from gtrain.errors import UserError


class EpochSampler(Sampler[SampleKey]):
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

    def draws(self) -> torch.Tensor:
        """Beside `indices()`: which draw of its image in the epoch each is (0: every image is drawn once)."""
        return torch.zeros(len(self), dtype=torch.int64)

    def keys(self) -> list[SampleKey]:
        """`indices()` with the epoch and the draw: what the dataset is indexed with, so that
        each image's augmentation is drawn from its own stream (`SeededBySample`)."""
        return [SampleKey(self.epoch, index, draw) for index, draw in zip(self.indices().tolist(), self.draws().tolist())]

    def __iter__(self):
        # The keys one at a time: built all at once they took 0.47 s for 100,000 images
        # (measured), at every epoch's start, before the first batch.
        epoch, indices, draws = self.epoch, self.indices().tolist(), self.draws().tolist()
        return (SampleKey(epoch, index, draw) for index, draw in zip(indices, draws))

    def __len__(self) -> int:
        return (self.steps - self.start_step) * (self.global_batch // self.world_size)


class BalancedSampler(EpochSampler):
    """As many images of each class every epoch (the epoch's size rounded down to a
    multiple of the class count), then shuffled: a class with fewer images has them drawn
    again, in a fresh order each time. Drawn from (seed, epoch) alone, so it resumes and
    shards as `EpochSampler` does."""

    def __init__(self, labels: torch.Tensor, num_classes: int, seed: int, **shard):
        counts = torch.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            empty = int((counts == 0).nonzero()[0])
            raise UserError(
                f"data.sampler = 'balanced' draws every class equally often, but class {empty} has no training "
                "images: add some, or use data.sampler = 'shuffle'"
            )
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
        super().__init__(len(labels) // num_classes * num_classes, seed, **shard)

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        per_class = self.size // len(self.by_class)
        drawn = []
        for members in self.by_class:
            rounds = -(-per_class // len(members))
            orders = [members[torch.randperm(len(members), generator=generator)] for _ in range(rounds)]
            drawn.append(torch.cat(orders)[:per_class])
        chosen = torch.cat(drawn)
        return chosen[torch.randperm(len(chosen), generator=generator)]

    def draws(self) -> torch.Tensor:
        # Counted over the whole epoch's order, so that every process and a resume agree.
        seen: dict[int, int] = {}
        counts = []
        for index in self.order(self.epoch)[: self.steps * self.global_batch].tolist():
            counts.append(seen.get(index, 0))
            seen[index] = counts[-1] + 1
        counts = torch.tensor(counts).view(self.steps, self.world_size, -1)  # (step, process, image)
        return counts[self.start_step :, self.rank].flatten()


def epoch_sampler(data: DataBundle, seed: int, *, global_batch: int, balanced: bool, **shard) -> EpochSampler:
    if balanced:
        return BalancedSampler(train_labels(data.train), data.info.num_classes, seed, global_batch=global_batch, **shard)
    return EpochSampler(len(data.train), seed, global_batch=global_batch, **shard)


def make_train_loader(
    dataset: Dataset, *, global_batch: int, seed: int, workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1,
    collate_fn=None, sampler: EpochSampler | None = None,
):  # fmt: skip
    if sampler is None:
        sampler = EpochSampler(len(dataset), seed, global_batch=global_batch, rank=rank, world_size=world_size)
    loader = DataLoader(
        SeededBySample(dataset, seed),
        batch_size=global_batch // world_size,
        sampler=sampler,  # whole batches only: the sampler drops the epoch's remainder
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: a new iterator draws its workers' seeds from it, and would
        # otherwise draw from the global RNG. Nothing is augmented from those seeds.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def evaluation_batches(size: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> list[range]:
    """The batches process `rank` of `world_size` scores: batch i is images [i * B, (i + 1) * B)
    of the split (the last one partial), and process r takes batches r, r + N, r + 2N, ...:
    every image exactly once, in the batch one process would score it in."""
    starts = range(0, size, batch_size)
    return [range(start, min(start + batch_size, size)) for start in starts[rank::world_size]]


def make_eval_loader(
    dataset: Dataset, *, batch_size: int, workers: int, pin_memory: bool, finish: DeviceFinish, device: torch.device,
    rank: int = 0, world_size: int = 1,
):  # fmt: skip
    """Batches of `dataset` (uint8 items), normalised on `device` by `finish`; under
    torch.distributed this process's share of them (`evaluation_batches`)."""
    loader = DataLoader(
        dataset,
        batch_sampler=evaluation_batches(len(dataset), batch_size, rank=rank, world_size=world_size),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # Its own generator: the first iterator of a DataLoader draws its workers' seed, and
        # a resumed run would draw it from the global RNG where the run it resumes did not.
        generator=torch.Generator(),
    )
    return DeviceBatches(loader, finish, device)


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
    (nvJPEG on CUDA, in one call) and augments each image before the rest.

    In training, `sampler` says which images each batch holds, so that the augmentation
    done here is drawn from each image's own stream, as the workers' is."""

    def __init__(self, loader: DataLoader, finish: DeviceFinish, device: torch.device, *,
                 sampler: "EpochSampler | None" = None, seed: int = 0):  # fmt: skip
        self.loader, self.finish, self.device = loader, finish, device
        self.sampler, self.seed = sampler, seed
        self.scale, self.shift = uint8_normalization(finish.mean, finish.std, device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # The DataLoader takes its batches from the same sampler, in order.
        keys = self.sampler.keys() if self.sampler is not None else []
        batch_size = self.loader.batch_size or 0
        for step, (images, labels) in enumerate(self.loader):
            batch_keys = keys[step * batch_size : (step + 1) * batch_size]
            if self.finish.decodes_files:
                images = torch.stack([self._augment(image, key) for image, key in
                                      zip(decode_on(images, self.device), batch_keys, strict=True)])  # fmt: skip
            images = normalize_uint8(images.to(self.device, non_blocking=True), self.scale, self.shift)
            if self.finish.random_erasing > 0:
                erase_rectangles(images, self.finish.random_erasing, noise=self.finish.random_erasing_fill == "noise",
                                 keys=batch_keys, seed=self.seed)  # fmt: skip
            yield images, labels.to(self.device, non_blocking=True)

    def _augment(self, image: torch.Tensor, key: SampleKey) -> torch.Tensor:
        """The workers' transform, on the device: the same draws from the image's stream."""
        with drawn_from(*key.stream(self.seed, SAMPLE_STREAM)):
            return self.finish.decode_then(image)


def collate_encoded(items: list[tuple[EncodedImage, int]]) -> tuple[list[EncodedImage], torch.Tensor]:
    """A batch of undecoded files: their sizes differ, so they stay a list."""
    return [image for image, _ in items], torch.tensor([label for _, label in items])


def decode_on(encoded: list[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """uint8 (3, H, W) images on `device`, upright: the JPEGs stored upright in one TorchCodec
    `decode_jpeg` call there (nvJPEG on CUDA); on the CPU, the other formats, JPEGs with an
    EXIF orientation (which the CPU decoder applies), and any JPEG the batch call refuses, to
    name a damaged file."""
    from torchcodec.decoders import decode_jpeg

    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, image in enumerate(encoded)
             if image.data[:2].tobytes() == b"\xff\xd8" and jpeg_orientation(image.data) == 1]  # fmt: skip
    if jpegs:
        try:
            decoded = decode_jpeg([torch.from_numpy(encoded[i].data) for i in jpegs], mode="RGB", device=device)
            for i, image in zip(jpegs, decoded, strict=True):
                images[i] = image
        except (RuntimeError, ValueError):
            pass  # a damaged or unusual JPEG: the loop below decodes each, and names a bad one
    for i, image in enumerate(images):
        if image is None:
            images[i] = decode_whole(encoded[i]).to(device)
    return images


def erase_rectangles(images: torch.Tensor, p: float, *, noise: bool, keys: list[SampleKey], seed: int) -> None:
    """torchvision's RandomErasing (probability p, area 0.02-0.33 of the image, aspect
    0.3-3.3) on each image of a normalised batch, in place: its own draws of the rectangle
    (`RandomErasing.get_params`), from the image's erasing stream of (seed, epoch, index),
    which then holds 0 (the mean colour) or, with `noise`, normal noise drawn on the device
    from a stream of its own."""
    for image, key in zip(images, keys, strict=True):
        stream = key.stream(seed, ERASING_STREAM)
        with drawn_from(*stream):
            if torch.rand(1).item() >= p:
                continue
            top, left, h, w, fill = transforms.RandomErasing.get_params(image, scale=(0.02, 0.33), ratio=(0.3, 3.3),
                                                                        value=[0.0])  # fmt: skip
        if fill is image:
            continue  # no rectangle fitted in 10 tries: torchvision leaves the image as it is
        patch = image[:, top : top + h, left : left + w]
        if noise:
            patch.normal_(generator=torch.Generator(image.device).manual_seed(seed_of(*stream, 1)))
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
    without one it evaluates `batches` (`evaluation_batches`) in order.
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
        batches: list[range] | None = None,
    ):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.batches = batches if batches is not None else evaluation_batches(len(labels), batch_size)
        self.sampler = sampler
        self.augmentation = augmentation if sampler is not None else None
        self.seed = seed
        self._draws, self._draws_epoch = None, None
        device = images.device
        # Normalize in one multiply-add: (x / 255 - mean) / std.
        self.scale, self.shift = uint8_normalization(mean, std, device)

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.sampler) // self.batch_size  # the sampler yields whole batches
        return len(self.batches)

    def __iter__(self):
        if self.sampler is None:
            for batch in self.batches:
                images = self.images[batch.start : batch.stop]
                yield normalize_uint8(images, self.scale, self.shift), self.labels[batch.start : batch.stop]
            return
        order = self.sampler.indices().to(self.images.device)
        draws = self.sampler.draws()
        if self.augmentation is not None:
            table = self._draws_of(self.sampler.epoch, int(draws.max()) if len(draws) else 0)
            draws = draws.to(self.images.device)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[index]
            if self.augmentation is not None:
                images = self._augment(images, table[draws[i * self.batch_size : (i + 1) * self.batch_size], index])
            yield normalize_uint8(images, self.scale, self.shift), self.labels[index]

    def _draws_of(self, epoch: int, last_draw: int = 0) -> torch.Tensor:
        """(draws, N, 3) int64 on the device: every training image's crop offsets (dy, dx) and
        flip (0 or 1) in `epoch`, for its first `last_draw` + 1 draws, each drawn at once from
        (seed, epoch, draw): a pure function of (seed, epoch, image, draw), whatever the step or
        the process that trains on it."""
        if self._draws_epoch != epoch or len(self._draws) <= last_draw:
            tables = []
            for draw in range(last_draw + 1):
                key = (self.seed, epoch, SAMPLE_STREAM) + ((draw,) if draw else ())
                generator = torch.Generator().manual_seed(seed_of(*key))
                n, pad = len(self.labels), self.augmentation.pad
                offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
                flips = torch.randint(0, 2, (n, 1), generator=generator)
                tables.append(torch.cat([offsets, flips], dim=1))
            self._draws, self._draws_epoch = torch.stack(tables).to(self.images.device), epoch
        return self._draws

    def _augment(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Random crop after zero padding, and random horizontal flip, per image, as `draws`
        (rows of `_draws_of`) say."""
        n, _, h, w = images.shape
        pad = self.augmentation.pad
        if pad:
            padded = F.pad(images, (pad, pad, pad, pad))  # (N, C, H + 2p, W + 2p), zeros outside
            dy, dx = draws[:, 0], draws[:, 1]
            rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
            batch = torch.arange(n, device=images.device)[:, None, None, None]
            channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
            images = padded[batch, channel, rows, cols]  # (N, C, H, W)
        if self.augmentation.flip:
            flip = draws[:, 2].bool()
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images


def stop_workers(*loaders) -> None:
    """Stop the worker processes of these loaders (DataLoaders, or gtrain's around them) now,
    not when the garbage collector frees them: a failed run's loaders are held by the
    exception's reference cycle, and persistent workers freed from one can wait 5 s to be
    joined (`gtrain tune` runs its trials, failed ones too, in one process)."""
    for loader in loaders:
        loader = getattr(loader, "loader", loader)  # DeviceBatches wraps a DataLoader
        iterator = getattr(loader, "_iterator", None)  # where a DataLoader keeps its persistent workers
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None


def build_loaders(data: DataBundle, *, global_batch: int, seed: int, workers: int, device: torch.device,
                  world: World, balanced: bool = False):  # fmt: skip
    """(train loader, its sampler, val loader) for `data.pipeline`: training batches of
    global_batch / world.size images per process; validation batches of as many
    (`evaluation_batches`), a size that fits the device since training's does; on the
    device or from DataLoaders with `workers` processes.
    `balanced`: each class drawn equally often (`BalancedSampler`)."""
    batch_size = per_process_batch(global_batch, world)
    shard = dict(rank=world.rank, world_size=world.size)
    sampler = epoch_sampler(data, seed, global_batch=global_batch, balanced=balanced, **shard)
    if data.pipeline != Pipeline.IN_MEMORY:
        pin_memory = device.type == "cuda"
        finish = data.train_finish
        train_loader, sampler = make_train_loader(
            data.train, global_batch=global_batch, seed=seed, workers=workers, pin_memory=pin_memory, **shard,
            collate_fn=collate_encoded if data.pipeline == Pipeline.DEVICE_DECODE else None, sampler=sampler,
        )  # fmt: skip
        if finish is not None:  # uint8 batches, finished on the device
            train_loader = DeviceBatches(train_loader, finish, device, sampler=sampler, seed=seed)
        val_loader = make_eval_loader(data.val, batch_size=batch_size, workers=workers, pin_memory=pin_memory,
                                      finish=data.val_finish, device=device, **shard)  # fmt: skip
        return train_loader, sampler, val_loader
    info = data.info
    train_images, train_labels = load_uint8(data.train, info.image_size, device, data.interpolation)
    val_images, val_labels = load_uint8(data.val, info.image_size, device, data.interpolation)
    normalize = dict(mean=info.mean, std=info.std)
    train_loader = InMemoryLoader(
        train_images, train_labels, batch_size=batch_size, sampler=sampler, augmentation=data.augmentation,
        seed=seed, **normalize,
    )  # fmt: skip
    val_loader = InMemoryLoader(val_images, val_labels, batch_size=batch_size, **normalize,
                                batches=evaluation_batches(len(val_labels), batch_size, **shard))  # fmt: skip
    return train_loader, sampler, val_loader
