"""Randomness that belongs to the sample: every random draw of a training image's
augmentation is a pure function of (seed, epoch, sample index), and every draw made for a
whole batch (MixUp, CutMix) of (seed, epoch, step, rank).

So it does not matter which process or DataLoader worker computes a sample, in what
order, or how many workers there are: a run resumed in the middle of an epoch, with
another `data.workers` or on another number of processes, gives each image the crop, flip,
policy and erasing it would have had. Per-worker generators, which is what DataLoader
seeds, cannot promise that: their streams depend on which worker took which batch and
on how long each has been running.

The draws come from the three generators augmentation libraries use: torch's (torchvision
transforms, v2 included), Python's `random` and numpy's (timm's RandAugment uses both).
`drawn_from` seeds all three for one sample and puts the caller's states back afterwards,
so the main process's own stream (dropout, drop path) goes on as if nothing had run.
"""

import contextlib
import random
from typing import NamedTuple

import numpy as np
import torch

# Separate streams for the draws made at different places for the same sample, so that
# they are independent of each other (and of the order they run in).
SAMPLE_STREAM = 0  # the per-image transform: crop, flip, policy (in the worker, or on the device)
ERASING_STREAM = 1  # random erasing on the device, after the batch is normalised
BATCH_STREAM = 2  # MixUp / CutMix of a whole batch


class SampleKey(NamedTuple):
    """What the training sampler hands the dataset: the image and the epoch it is drawn in."""

    epoch: int
    index: int


def seed_of(*key: int) -> int:
    """A 64-bit seed for `key`, well mixed (numpy's SeedSequence), so that neighbouring keys
    give unrelated streams."""
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | int(words[1]) << 32


@contextlib.contextmanager
def drawn_from(*key: int):
    """Inside, torch's CPU generator, Python's `random` and numpy's global generator draw
    from a stream that depends on `key` alone; outside, they are as they were."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    seed = seed_of(*key)
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)  # numpy's legacy seeding takes 32 bits
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class SeededBySample(torch.utils.data.Dataset):
    """A training set whose items are augmented from their own stream: indexed by
    `SampleKey`s (as `EpochSampler` yields them), it returns `dataset[key.index]` drawn from
    (seed, epoch, index)."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        with drawn_from(self.seed, key.epoch, key.index, SAMPLE_STREAM):
            return self.dataset[key.index]
