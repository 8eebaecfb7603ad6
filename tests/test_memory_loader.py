"""In-memory data on the device: the same images the DataLoader path gives, augmented by
random shifts and flips that depend only on (seed, epoch, step)."""

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gtrain.data import build_data
from gtrain.data.loaders import EpochSampler, InMemoryLoader, load_uint8


def digits(tmp_path, augment):
    data = build_data("digits", root=tmp_path, download=False, augment=augment)
    return data, data.info


def test_unaugmented_batches_equal_the_dataloader_path(tmp_path):
    data, info = digits(tmp_path, augment=False)
    expected = torch.cat([x for x, _ in DataLoader(data.val, batch_size=100)])
    images, labels = load_uint8(data.val, info.image_size, torch.device("cpu"))
    loader = InMemoryLoader(images, labels, batch_size=100, mean=info.mean, std=info.std)
    got = torch.cat([x for x, _ in loader])
    assert got.shape == expected.shape == (364, 1, 8, 8)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in loader]), torch.tensor(data.val.targets))


def train_loader(tmp_path, epoch, start_step=0):
    data, info = digits(tmp_path, augment=True)
    images, labels = load_uint8(data.train, info.image_size, torch.device("cpu"))
    sampler = EpochSampler(len(labels), seed=0, global_batch=64)
    sampler.set_epoch(epoch, start_step)
    return InMemoryLoader(images, labels, batch_size=64, mean=(0.0,), std=(1 / 255,), sampler=sampler,
                          augmentation=data.augmentation, seed=0), images


def test_augmentation_is_a_shift_within_the_padding_and_never_a_flip_for_digits(tmp_path):
    loader, images = train_loader(tmp_path, epoch=0)
    order = loader.sampler.order(0)[:64]
    batch, _ = next(iter(loader))  # mean 0, std 1/255: pixel values back as 0..255
    pad = loader.augmentation.pad
    padded = F.pad(images[order].float(), (pad, pad, pad, pad))
    for image, source in zip(batch, padded):
        shifts = [source[:, dy : dy + 8, dx : dx + 8] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(image, shifted) for shifted in shifts)


def test_a_resumed_epoch_draws_the_same_augmentation(tmp_path):
    full, _ = train_loader(tmp_path, epoch=3)
    resumed, _ = train_loader(tmp_path, epoch=3, start_step=5)
    batches = list(full)
    assert len(batches) == 22 and len(list(resumed)) == 17
    for (x, y), (rx, ry) in zip(batches[5:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    other_epoch, _ = train_loader(tmp_path, epoch=4)
    assert not torch.equal(next(iter(other_epoch))[0], batches[0][0])
