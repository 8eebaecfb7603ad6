"""In-memory data on the device: the same images the DataLoader path gives, augmented by
random shifts and flips that depend only on (seed, epoch, image)."""

import torch
import torch.nn.functional as F

from tests.conftest import data_from
from gtrain.data.loaders import EpochSampler, InMemoryLoader, load_uint8


def digits(tmp_path, augment):
    data = data_from("digits", tmp_path, augment=augment)
    return data, data.info


def test_evaluation_batches_equal_the_dataloader_path_to_the_bit(tmp_path):
    from gtrain.data.loaders import make_eval_loader

    data, info = digits(tmp_path, augment=False)
    cpu = torch.device("cpu")
    expected = list(make_eval_loader(data.val, batch_size=100, workers=0, pin_memory=False, finish=data.val_finish,
                                     device=cpu))  # fmt: skip
    images, labels = load_uint8(data.val, info.image_size, cpu)
    loader = InMemoryLoader(images, labels, batch_size=100, mean=info.mean, std=info.std)
    assert len(loader) == len(expected) == 4
    for (got, got_labels), (want, want_labels) in zip(loader, expected, strict=True):
        assert torch.equal(got, want) and torch.equal(got_labels, want_labels)
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


def test_an_image_is_augmented_the_same_whatever_the_number_of_processes(tmp_path):
    data, info = digits(tmp_path, augment=True)
    images, labels = load_uint8(data.train, info.image_size, torch.device("cpu"))

    def augmented(world_size):
        """image index -> its augmented pixels in epoch 2, over every process's batches."""
        seen = {}
        for rank in range(world_size):
            sampler = EpochSampler(len(labels), seed=0, global_batch=64, rank=rank, world_size=world_size)
            sampler.set_epoch(2)
            loader = InMemoryLoader(images, labels, batch_size=64 // world_size, mean=(0.0,), std=(1 / 255,),
                                    sampler=sampler, augmentation=data.augmentation, seed=0)  # fmt: skip
            order = sampler.indices().tolist()
            batches = torch.cat([x for x, _ in loader])
            seen.update(zip(order, batches))
        return seen

    one, two = augmented(1), augmented(2)
    assert one.keys() == two.keys() and len(one) == 22 * 64
    assert all(torch.equal(one[i], two[i]) for i in one)
    assert sum(not torch.equal(one[i], images[i].float()) for i in one) > len(one) // 2  # they are augmented
