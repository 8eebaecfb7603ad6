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
`drawn_from` seeds all three for one sample and puts torch's back afterwards, so the
training process's own stream (dropout, drop path) goes on as if nothing had run.
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
    """What the training sampler hands the dataset: the image, the epoch it is drawn in, and
    which of its draws in that epoch this is (a balanced sampler draws a small class's images
    again: each draw gets its own augmentation)."""

    epoch: int
    index: int
    draw: int = 0

    def stream(self, seed: int, stream: int) -> tuple[int, ...]:
        """The key of this draw's `stream`; a first draw's is (seed, epoch, index, stream)."""
        return (seed, self.epoch, self.index, stream) + ((self.draw,) if self.draw else ())


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """SplitMix64's finaliser: every input bit flips about half of the output bits."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seed_of(*key: int) -> int:
    """A 64-bit seed for `key`, well mixed, so that neighbouring keys (image i and i + 1)
    give unrelated streams. Plain integer arithmetic: 2 us, where numpy's SeedSequence
    takes 23 us, once per image."""
    seed = 0
    for part in key:
        seed = _splitmix64(seed ^ int(part))
    return seed


@contextlib.contextmanager
def drawn_from(*key: int):
    """Inside, torch's CPU generator, Python's `random` and numpy's global generator draw
    from a stream that depends on `key` alone. Afterwards torch's is as it was: the training
    process's own draws (dropout, drop path) come from it. Python's and numpy's are left
    seeded: nothing in the training process draws from them, and saving and restoring
    their states would cost 20 and 160 us per image (measured), a fifth of decoding one."""
    saved = torch.get_rng_state()
    seed = seed_of(*key)
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)  # numpy's global generator takes 32 bits
    try:
        yield
    finally:
        torch.set_rng_state(saved)


class SeededBySample(torch.utils.data.Dataset):
    """A training set whose items are augmented from their own stream: indexed by
    `SampleKey`s (as `EpochSampler` yields them), it returns `dataset[key.index]` drawn from
    (seed, epoch, index)."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        with drawn_from(*key.stream(self.seed, SAMPLE_STREAM)):
            return self.dataset[key.index]
