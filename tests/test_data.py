"""Datasets through the real torchvision loaders, on data the fixtures write, and the one-line
errors a user gets when data is missing or misnamed."""

import inspect
from pathlib import Path

import numpy as np

import pytest
import torch
import torchvision
from torchvision import transforms

from gtrain.data import (
    DATASETS,
    IMAGE_FOLDER_SPEC,
    Digits,
    build_eval_data,
    eval_transform,
    list_datasets,
    train_transform,
)
from gtrain.errors import UserError
from tests.conftest import data_from, write_image_folder

# digits ------------------------------------------------------------------------------------------


def test_digits_split_is_1433_train_364_test_covering_all_1797_without_overlap():
    train, test = Digits(None, train=True), Digits(None, train=False)
    assert (len(train), len(test)) == (1433, 364)
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted(train.indices + test.indices) == list(range(1797))


def test_digits_split_is_every_fifth_image_of_each_class_and_never_changes():
    first, again = Digits(None, train=False), Digits(None, train=False)
    assert first.indices == again.indices
    # Pinned, so accuracies measured on it stay comparable across versions of gtrain and scikit-learn.
    assert first.indices[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 35, 39]
    assert sum(first.indices) == 323_723
    assert [first.targets.count(digit) for digit in range(10)] == [36, 37, 36, 37, 37, 37, 37, 36, 35, 36]


def test_digits_items_are_8x8_grayscale_images_scaled_to_0_255_with_digit_labels():
    digits = Digits(None, train=True)
    image, label = digits[0]
    assert (image.mode, image.size) == ("L", (8, 8))
    assert max(digits[i][0].getextrema()[1] for i in range(20)) == 255  # 16 dark cells -> 255
    assert label in range(10) and digits.classes == [str(d) for d in range(10)]


def test_digits_val_is_one_channel_native_8px_uint8_that_the_device_normalizes(tmp_path):
    from gtrain.data.loaders import normalize_uint8, uint8_normalization

    data = data_from("digits", tmp_path)
    assert data.info.in_chans == 1 and data.info.image_size == 8 and data.info.num_classes == 10
    assert data.info.class_names == tuple("0123456789")
    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    assert images.shape == (364, 1, 8, 8) and images.dtype == torch.uint8
    finish = data.val_finish
    images = normalize_uint8(images, *uint8_normalization(finish.mean, finish.std, torch.device("cpu")))
    # Normalized with the training set's statistics, so close to zero mean and unit std.
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1


def test_digits_augmentation_never_flips(tmp_path):
    data = data_from("digits", tmp_path)
    steps = data.train.transform.transforms
    assert not any(isinstance(step, transforms.RandomHorizontalFlip) for step in steps)
    assert any(isinstance(step, transforms.RandomCrop) for step in steps)


# torchvision datasets on fixture data -----------------------------------------------------------


def test_mnist_files_load_through_torchvision_as_one_channel_28px(mnist_root):
    data = data_from("MNIST", mnist_root)
    assert (len(data.train), len(data.val)) == (200, 100)
    assert data.info.in_chans == 1 and data.info.image_size == 28 and data.info.num_classes == 10
    assert data.info.class_names == tuple(torchvision.datasets.MNIST.classes)
    image, label = data.train[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)


def test_dataset_names_match_in_any_case(mnist_root):
    data = data_from("mnist", mnist_root, augment=False)
    assert data.info.name == "MNIST"


def test_image_size_override_resizes_small_images(mnist_root):
    data = data_from("MNIST", mnist_root, image_size=32)
    assert data.train[0][0].shape == data.val[0][0].shape == (1, 32, 32)
    assert data.info.image_size == 32


def test_without_augmentation_train_items_are_deterministic(mnist_root):
    plain = data_from("MNIST", mnist_root, augment=False)
    assert all(torch.equal(plain.train[i][0], plain.train[i][0]) for i in range(10))
    augmented = data_from("MNIST", mnist_root, augment=True)
    torch.manual_seed(0)
    assert not all(torch.equal(augmented.train[i][0], augmented.train[i][0]) for i in range(10))


def test_build_eval_data_gives_the_requested_split_without_augmentation(mnist_root):
    info, data, _ = build_eval_data("MNIST", root=mnist_root, download=False, split="train")
    assert len(data) == 200 and info.in_chans == 1
    # No random transform: every image is the same each time it is read.
    assert all(torch.equal(data[i][0], data[i][0]) for i in range(len(data)))


def test_every_table_row_names_a_real_constructor_and_consistent_statistics():
    for name, spec in DATASETS.items():
        constructor = Digits if name == "digits" else getattr(torchvision.datasets, name)
        parameters = inspect.signature(constructor).parameters
        assert "train" in spec.splits, name
        for kwargs in spec.splits.values():
            assert set(kwargs) <= set(parameters) or "kwargs" in parameters, name
        channels = 1 if spec.grayscale else 3
        assert len(spec.stats.mean) == len(spec.stats.std) == channels, name
        assert spec.style in ("cifar", "imagenet"), name


def test_digit_and_sign_datasets_never_flip_but_photos_do():
    for name in ("digits", "MNIST", "KMNIST", "EMNIST", "SVHN", "GTSRB"):
        flips = [s for s in train_transform(DATASETS[name], 32).transforms if isinstance(s, transforms.RandomHorizontalFlip)]
        assert not flips, name
    assert DATASETS["CIFAR10"].flip and DATASETS["Flowers102"].flip


@pytest.mark.parametrize("spec", [DATASETS["GTSRB"], IMAGE_FOLDER_SPEC], ids=["cifar-style", "imagenet-style"])
def test_images_of_any_shape_come_out_square_at_the_requested_size(spec):
    # GTSRB and photo datasets hold images of every size and aspect ratio.
    for shape in [(3, 50, 70), (3, 90, 20), (3, 12, 12)]:
        images = torchvision.datasets.FakeData(size=2, image_size=shape, num_classes=3)
        for transform in (train_transform(spec, 24), eval_transform(spec, 24)):
            assert transform(images[0][0]).shape == (3, 24, 24), shape


def test_list_datasets_has_the_table_plus_image_folder_and_shards():
    names = list_datasets()
    assert names[-2:] == ["ImageFolder", "shards"] and {"digits", "MNIST", "CIFAR10", "SVHN", "Flowers102"} <= set(names)


# ImageFolder -------------------------------------------------------------------------------------


def test_image_folder_class_names_come_from_the_folders(imagefolder_root):
    data = data_from("ImageFolder", imagefolder_root, image_size=32)
    assert data.info.class_names == ("cat", "dog", "frog") and data.info.num_classes == 3
    assert (len(data.train), len(data.val)) == (60, 24)
    assert data.train[0][0].shape == data.val[0][0].shape == (3, 32, 32)
    assert data.info.in_chans == 3 and data.info.image_size == 32


def test_image_folder_test_split_falls_back_to_val_then_prefers_test(tmp_path):
    root = write_image_folder(tmp_path, images_per_class={"train": 2, "val": 1})
    assert len(data_from("ImageFolder", root, val_split="test").val) == 3
    write_image_folder(tmp_path, images_per_class={"test": 4})
    info, test, _ = build_eval_data("ImageFolder", root=root, download=False, split="test")
    assert len(test) == 12 and info.class_names == ("cat", "dog", "frog")


def test_image_folder_without_val_folder_names_the_missing_path(tmp_path):
    root = write_image_folder(tmp_path, images_per_class={"train": 2})
    with pytest.raises(UserError, match="val") as error:
        data_from("ImageFolder", root, val_split="val")
    assert str(root / "val") in str(error.value) and "\n" not in str(error.value)


def test_empty_image_folder_error_names_the_path(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="no class folders") as error:
        data_from("ImageFolder", tmp_path)
    assert str(tmp_path / "train") in str(error.value)

    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(UserError, match="no images") as error:
        data_from("ImageFolder", tmp_path)
    assert str(tmp_path / "train") in str(error.value) and "\n" not in str(error.value)


def test_image_folder_splits_with_different_classes_are_refused(tmp_path):
    root = write_image_folder(tmp_path, images_per_class={"train": 2})
    write_image_folder(tmp_path, class_names=("cat", "dog"), images_per_class={"val": 1})
    with pytest.raises(UserError, match="missing: frog"):
        data_from("ImageFolder", root, val_split="val")


# errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["MNIST", "CIFAR10", "SVHN", "Flowers102"])
def test_missing_dataset_error_names_the_dataset_the_path_and_the_fix(tmp_path, name):
    with pytest.raises(UserError) as error:
        data_from(name, tmp_path)
    message = str(error.value)
    assert name in message and str(tmp_path) in message and "data.download = true" in message
    assert "\n" not in message


def test_unknown_dataset_suggests_the_closest_name(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'CIFAR-10': did you mean CIFAR10"):
        data_from("CIFAR-10", tmp_path)


def test_torchvision_dataset_missing_from_the_table_says_how_to_add_it(tmp_path):
    with pytest.raises(UserError, match="Caltech101 is not in gtrain's dataset table"):
        data_from("Caltech101", tmp_path)


def test_split_a_dataset_lacks_lists_the_splits_it_has(tmp_path):
    with pytest.raises(UserError, match="MNIST has no 'val' split: choose one of train, test"):
        data_from("MNIST", tmp_path, val_split="val")


@pytest.mark.parametrize(("fill", "noisy"), [("mean", False), ("noise", True)])
def test_random_erasing_fills_with_the_mean_or_with_noise(fill, noisy):
    from gtrain.data import train_transform
    from gtrain.data.datasets import IMAGE_FOLDER_SPEC

    from PIL import Image

    augment = train_transform(IMAGE_FOLDER_SPEC, 32, random_erasing=1.0, random_erasing_fill=fill)
    torch.manual_seed(0)
    mean_colour = tuple(round(255 * m) for m in IMAGE_FOLDER_SPEC.stats.mean)
    erased = augment(Image.new("RGB", (40, 40), mean_colour))  # normalized: about 0 everywhere but in the rectangle
    changed = erased.abs() > 0.05
    assert changed.any() == noisy
    if noisy:
        assert 0.7 < erased[changed].std() < 1.3  # N(0, 1) per pixel, in normalized units


def test_interpolation_reaches_the_train_crop_and_the_eval_resize():
    from gtrain.data import eval_transform, train_transform
    from gtrain.data.datasets import IMAGE_FOLDER_SPEC

    def modes(pipeline):
        return {step.interpolation for step in pipeline.transforms if hasattr(step, "interpolation")}

    bicubic = {transforms.InterpolationMode.BICUBIC}
    assert modes(train_transform(IMAGE_FOLDER_SPEC, 32, interpolation="bicubic")) == bicubic
    assert modes(eval_transform(IMAGE_FOLDER_SPEC, 32, "bicubic")) == bicubic
    assert modes(eval_transform(IMAGE_FOLDER_SPEC, 32)) == {transforms.InterpolationMode.BILINEAR}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_timm_randaugment_is_the_one_timm_create_transform_builds(interpolation):
    """The HorNet release's augmentation: timm's create_transform with rand-m9-mstd0.5-inc1.
    Its RandAugment and gtrain's give the same image on the same random draws."""
    import random

    import numpy as np
    from PIL import Image

    timm_transforms = pytest.importorskip("timm.data.transforms_factory")
    from timm.data.auto_augment import RandAugment

    from gtrain.data import train_transform
    from gtrain.data.datasets import IMAGE_FOLDER_SPEC

    config, size = "rand-m9-mstd0.5-inc1", 32
    mean, std = IMAGE_FOLDER_SPEC.stats.mean, IMAGE_FOLDER_SPEC.stats.std
    theirs = timm_transforms.create_transform(size, is_training=True, auto_augment=config, interpolation=interpolation,
                                              mean=mean, std=std)  # fmt: skip
    ours = train_transform(IMAGE_FOLDER_SPEC, size, auto_augment=config, interpolation=interpolation)

    def rand_augment(pipeline):
        return next(step for step in pipeline.transforms if isinstance(step, RandAugment))

    theirs, ours = rand_augment(theirs), rand_augment(ours)
    assert [op.name for op in ours.ops] == [op.name for op in theirs.ops]
    assert all(a.kwargs == b.kwargs and a.prob == b.prob and a.magnitude_std == b.magnitude_std
               for a, b in zip(ours.ops, theirs.ops))  # fmt: skip
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(8)]
    zero_bits = 0
    for seed in range(200):
        image = images[seed % len(images)]
        random.seed(seed), np.random.seed(seed)
        try:
            expected = np.asarray(theirs(image))
        except ValueError as error:  # Posterize to 0 bits, which Pillow >= 11 refuses
            assert "bits must be between" in str(error)
            zero_bits += 1
            continue
        random.seed(seed), np.random.seed(seed)
        assert np.array_equal(np.asarray(ours(image)), expected), seed
    assert zero_bits < 10  # the rest were compared


def test_timm_randaugment_posterizes_to_black_where_pillow_would_raise():
    from PIL import Image

    from gtrain.data.datasets import _posterize

    image = Image.new("RGB", (4, 4), (200, 100, 50))
    assert _posterize(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))  # what Pillow < 11 gave
    assert _posterize(image, 4).getpixel((0, 0)) == (192, 96, 48)
    assert _posterize(image, 8) is image


def photo_like(seed: int, size=(375, 500)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[0], 0 : size[1]] / size[0]
    field = sum(rng.uniform(0, 255, 3) * np.sin(rng.uniform(1, 8) * (x * np.cos(a) + y * np.sin(a)))[..., None]
                for a in rng.uniform(0, np.pi, 3)) / 3 + 128  # fmt: skip
    return Image.fromarray(np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8))


def test_uint8_batches_finished_on_the_device_match_the_float_path_within_one_level():
    """The same crop and flip draws; the tensor resize differs from PIL's by at most one
    uint8 level (measured: mean 0.0004, max 0.0175 in normalised units, 1 / 255 / std)."""
    from torchvision.transforms.functional import pil_to_tensor

    from gtrain.data.datasets import IMAGE_FOLDER_SPEC, DeviceFinish, train_transform, uint8_train_transform
    from gtrain.data.loaders import DeviceBatches

    spec = IMAGE_FOLDER_SPEC
    finish = DeviceBatches([], DeviceFinish(spec.stats.mean, spec.stats.std), torch.device("cpu"))
    one_level = 1 / 255 / min(spec.stats.std)
    old, new = train_transform(spec, 64), uint8_train_transform(spec, 64)
    for seed in range(10):
        image = photo_like(seed)
        torch.manual_seed(seed)
        expected = old(image)
        torch.manual_seed(seed)
        batch = new(pil_to_tensor(image))[None]
        assert batch.dtype == torch.uint8
        got = (batch.float() * finish.scale + finish.shift)[0]
        assert (got - expected).abs().max() <= one_level * 1.01 and (got - expected).abs().mean() < 0.1 * one_level
    # The normalisation alone: the float path's ToTensor + Normalize, to float rounding.
    pixels = pil_to_tensor(photo_like(0))
    reference = transforms.Normalize(spec.stats.mean, spec.stats.std)(pixels.float() / 255)
    assert torch.allclose((pixels[None].float() * finish.scale + finish.shift)[0], reference, atol=1e-6)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_uint8_evaluation_crops_match_the_pil_path_exactly_without_resampling_and_within_one_level_with(interpolation):
    """Validation, eval and predict: tensor resize and centre crop of uint8, normalised on the
    device, against PIL's Resize, CenterCrop, ToTensor and Normalize. Where the short side is
    already the resize size nothing is resampled and the pixels are PIL's; elsewhere the tensor
    resize differs by at most one uint8 level on a few pixels (measured: under 0.5% of them)."""
    from torchvision.transforms.functional import pil_to_tensor

    from gtrain.data.datasets import IMAGE_FOLDER_SPEC, uint8_eval_transform
    from gtrain.data.loaders import normalize_uint8, uint8_normalization

    spec = IMAGE_FOLDER_SPEC
    scale_shift = uint8_normalization(spec.stats.mean, spec.stats.std, torch.device("cpu"))
    one_level = 1 / 255 / min(spec.stats.std)
    old, new = eval_transform(spec, 56, interpolation), uint8_eval_transform(spec, 56, interpolation)
    for seed, size in enumerate([(64, 80), (94, 125), (75, 75), (150, 200)]):
        image = photo_like(seed, size)
        crop = new(pil_to_tensor(image))
        assert crop.dtype == torch.uint8 and crop.shape == (3, 56, 56)
        difference = (normalize_uint8(crop[None], *scale_shift)[0] - old(image)).abs()
        if min(size) == 64:  # = int(56 / 0.875): no resampling
            assert difference.max() < 1e-5
        else:
            assert difference.max() <= one_level * 1.01 and (difference > one_level / 2).float().mean() < 0.01


def test_image_folder_training_reads_uint8_through_torchvision_io_and_timm_randaugment_keeps_pil(imagefolder_root):

    data = data_from("ImageFolder", imagefolder_root, image_size=16, random_erasing=0.5)
    image, _ = data.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert data.train_finish is not None and data.train_finish.random_erasing == 0.5
    # Validation (as eval and predict) reads uint8 crops too, normalised on the device, never erased.
    assert data.val[0][0].dtype == torch.uint8 and data.val_finish.random_erasing == 0
    timm = data_from("ImageFolder", imagefolder_root, image_size=16, auto_augment="rand-m9-mstd0.5-inc1")
    assert timm.train_finish is None and timm.train[0][0].dtype == torch.float32
    assert timm.val[0][0].dtype == torch.uint8


def test_decoding_on_the_device_gives_the_batches_of_decoding_in_the_workers(tmp_path):
    """data.decode = "device" (nvJPEG on CUDA; here the CPU): the same pixels, crops, flips,
    TrivialAugment and erasing as decoding whole in the loader ("cpu-full"), batch for
    batch, for JPEGs and for the PNG among them, which the device path decodes on the CPU."""
    from gtrain.data.loaders import build_loaders
    from gtrain.distributed import World

    root = write_image_folder(tmp_path / "jpegs", size=40, suffix=".jpg", images_per_class={"train": 6, "val": 2})
    photo_like(0, (40, 48)).save(root / "train" / "cat" / "png.png")
    batches = {}
    for decode in ("cpu-full", "device"):
        data = data_from("ImageFolder", root, image_size=24, auto_augment="trivialaugment",
                          random_erasing=0.5, decode=decode)  # fmt: skip
        train, _, _ = build_loaders(data, global_batch=8, seed=3, workers=0, device=torch.device("cpu"), world=World())
        batches[decode] = [(images.clone(), labels) for images, labels in train]
    assert len(batches["cpu-full"]) == 2
    for (cpu_images, cpu_labels), (device_images, device_labels) in zip(batches["cpu-full"], batches["device"], strict=True):
        assert torch.equal(cpu_labels, device_labels) and torch.equal(cpu_images, device_images)


def test_decoding_on_the_device_is_refused_in_one_line_where_it_cannot_run(imagefolder_root):
    with pytest.raises(UserError, match="gives decoded images") as error:
        data_from("digits", Path("."), decode="device")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="timm's, which runs on PIL images"):
        data_from("ImageFolder", imagefolder_root, auto_augment="rand-m9-mstd0.5-inc1",
                   decode="device")  # fmt: skip


@pytest.mark.parametrize("noise", [False, True])
def test_device_erasing_erases_one_rectangle_per_image_with_probability_p(noise):
    from gtrain.data.loaders import erase_rectangles
    from gtrain.data.randomness import ERASING_STREAM, SampleKey, drawn_from

    images = torch.full((400, 3, 32, 32), 5.0)
    keys = [SampleKey(1, i) for i in range(400)]
    erase_rectangles(images, 0.5, noise=noise, keys=keys, seed=0)
    erased = (images != 5.0).flatten(1)
    share = erased.any(1).float().mean().item()
    assert 0.4 < share < 0.6  # p = 0.5
    area = erased[erased.any(1)].float().mean(1)
    # torchvision's 2% to 33% of the image, give or take the rounding of the sides to pixels
    assert area.min() >= 0.02 * 0.8 and area.max() <= 0.33 * 1.05
    values = images[images != 5.0]
    if noise:
        assert 0.8 < values.std() < 1.2
    else:
        assert torch.all(values == 0)
        # The draws of torchvision's RandomErasing, each from the image's own erasing stream.
        batch = torch.randn(64, 3, 20, 24)
        expected = []
        for index, image in enumerate(batch):
            with drawn_from(3, 1, index, ERASING_STREAM):
                expected.append(transforms.RandomErasing(p=0.5, value=0)(image.clone()))
        erase_rectangles(batch, 0.5, noise=False, keys=keys[:64], seed=3)
        assert torch.equal(batch, torch.stack(expected))


def test_device_erasing_of_an_image_does_not_depend_on_its_batch():
    from gtrain.data.loaders import erase_rectangles
    from gtrain.data.randomness import SampleKey

    images = torch.randn(8, 3, 16, 16)
    keys = [SampleKey(0, i) for i in range(8)]
    whole = images.clone()
    erase_rectangles(whole, 0.9, noise=True, keys=keys, seed=0)
    reversed_halves = [images[4:].flip(0).clone(), images[:4].clone()]
    erase_rectangles(reversed_halves[0], 0.9, noise=True, keys=keys[4:][::-1], seed=0)
    erase_rectangles(reversed_halves[1], 0.9, noise=True, keys=keys[:4], seed=0)
    assert torch.equal(torch.cat([reversed_halves[1], reversed_halves[0].flip(0)]), whole)
    assert not torch.equal(whole, images)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_every_process_scores_whole_batches_of_the_one_process_partition(world_size):
    from gtrain.data.loaders import evaluation_batches

    alone = evaluation_batches(66, 8)
    assert [len(b) for b in alone] == [8] * 8 + [2]
    shares = [evaluation_batches(66, 8, rank=r, world_size=world_size) for r in range(world_size)]
    assert sorted((b for share in shares for b in share), key=lambda b: b.start) == alone
    assert all(len(share) in (len(alone) // world_size, -(-len(alone) // world_size)) for share in shares)


def test_an_image_folder_image_is_augmented_the_same_by_any_worker_of_any_process(tmp_path):
    """TrivialAugment, the crop and the flip drawn in the workers, erasing on the device: each
    image's pixels in an epoch depend on (seed, epoch, image) alone, not on the worker or the
    process that makes them, nor on how many there are."""
    from gtrain.data.loaders import build_loaders
    from gtrain.distributed import World

    root = write_image_folder(tmp_path / "jpegs", size=40, suffix=".jpg", images_per_class={"train": 8, "val": 1})
    data = data_from("ImageFolder", root, image_size=16, auto_augment="trivialaugment",
                      random_erasing=0.5)  # fmt: skip

    def augmented(workers, world_size):
        seen = {}
        for rank in range(world_size):
            train, sampler, _ = build_loaders(data, global_batch=8, seed=1, workers=workers, device=torch.device("cpu"),
                                              world=World(rank=rank, size=world_size))  # fmt: skip
            sampler.set_epoch(2)
            seen.update(zip(sampler.indices().tolist(), torch.cat([images for images, _ in train])))
        return seen

    alone = augmented(0, 1)
    assert len(alone) == 24
    for workers, world_size in [(2, 1), (1, 2)]:
        other = augmented(workers, world_size)
        assert other.keys() == alone.keys() and all(torch.equal(other[i], alone[i]) for i in alone)
