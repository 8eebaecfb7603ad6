"""Batches for training and evaluation.

The training order is a pure function of (seed, epoch), and a loader can start in the
middle of an epoch, so a resumed run sees exactly the batches it would have seen.
"""

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset


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
    dataset: Dataset, *, global_batch: int, seed: int, workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1
):
    sampler = EpochSampler(len(dataset), seed, global_batch=global_batch, rank=rank, world_size=world_size)
    loader = DataLoader(
        dataset,
        batch_size=global_batch // world_size,
        sampler=sampler,  # whole batches only: the sampler drops the epoch's remainder
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: otherwise every new epoch iterator draws a worker seed from
        # the global RNG and shifts the augmentation of a resumed run.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def make_eval_loader(
    dataset: Dataset, *, batch_size: int, workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Under torch.distributed, process r evaluates images r, r + N, r + 2N, ...: every image
    exactly once, with no padding, so the reduced metrics equal a single process's."""
    if world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
