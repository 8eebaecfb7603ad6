"""Batches for training and evaluation.

The training order is a pure function of (seed, epoch), and a loader can start in the
middle of an epoch, so a resumed run sees exactly the batches it would have seen.
"""

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """A fresh random permutation every epoch, drawn from its own generator so that
    nothing else that consumes random numbers can change the data order."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start`: how many samples of this epoch's order were already consumed."""
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self):
        return iter(self.order(self.epoch)[self.start :].tolist())

    def __len__(self) -> int:
        return self.size - self.start


def make_train_loader(dataset: Dataset, *, batch_size: int, seed: int, workers: int, pin_memory: bool):
    sampler = EpochSampler(len(dataset), seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        # A last partial batch would give BatchNorm a different batch statistic.
        drop_last=True,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: otherwise every new epoch iterator draws a worker seed from
        # the global RNG and shifts the augmentation of a resumed run.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def make_eval_loader(dataset: Dataset, *, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
