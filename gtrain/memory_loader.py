"""Datasets that fit in memory, on the training device as one uint8 tensor.

For small fixed-size images (digits, the MNIST family, CIFAR, SVHN, ...) the per-image
PIL transforms of a DataLoader cost more than the model step. Here a split is decoded
once into a (N, C, H, W) uint8 tensor on the device, and every batch is cropped, flipped
and normalized there in one go, with no worker processes. The random crop and flip of
step s come from a generator seeded by (seed, epoch, s, rank), so a resumed run draws
exactly the augmentation it would have drawn.
"""

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from gtrain.data import BatchAugmentation, raw_uint8
from gtrain.loaders import EpochSampler


def load_uint8(dataset: Dataset, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split once: images (N, C, H, W) uint8 and labels (N,) int64, on `device`."""
    loader = DataLoader(raw_uint8(dataset, image_size), batch_size=1024, num_workers=0)
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
        self.scale = (1 / (255 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)

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
            yield images.float() * self.scale + self.shift, self.labels[index]

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
