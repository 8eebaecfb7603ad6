"""Datasets, splits, normalization and augmentation: a dataset name becomes train and val sets.

    from gtrain.data import build_data
    data = build_data(DataSection(dataset="digits", root="data"))
    model = create_model(name, num_classes=data.info.num_classes, in_chans=data.info.in_chans)

Every dataset gtrain knows is one row of `DATASETS`: how its constructor names splits, its
default image size, normalization statistics, channels and augmentation style. A torchvision
dataset is added by adding a row. Besides the table there are `ImageFolder` (a folder with
train/ and val/, one sub-folder per class) and `digits`, scikit-learn's bundled 8x8 digits:
real data that needs no download, so it is the offline default.

Read top to bottom: the table, the digits dataset, the transforms, the builders.
"""

import enum
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder, VisionDataset
from torchvision.datasets.folder import default_loader, find_classes

from gtrain.data.images import DecodeCrop, DecodeResizeCrop, read_encoded
from gtrain.data.shards import ShardDataset, ShardSetLayout, find_shards
from gtrain.errors import UserError, did_you_mean, error_line
from gtrain.recipe import DataSection

# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

Style = Literal["cifar", "imagenet"]  # "cifar": pad and crop at a fixed size; "imagenet": random-resized crop


class Stats(NamedTuple):
    """Per-channel mean and std of pixels scaled to [0, 1], as `Normalize` takes them."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


# The usual published figures, measured on each training set.
IMAGENET = Stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = Stats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = Stats((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN = Stats((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
GTSRB = Stats((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669))
STL10 = Stats((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))
MNIST = Stats((0.1307,), (0.3081,))
FASHION = Stats((0.2860,), (0.3530,))
KMNIST = Stats((0.1918,), (0.3483,))
EMNIST = Stats((0.1751,), (0.3332,))
# Measured here on the 1,433 training images at their native 8 px.
DIGITS = Stats((0.3055,), (0.3761,))


@dataclass(frozen=True)
class DatasetSpec:
    """One row of the table: what gtrain needs to know about a dataset before loading it."""

    splits: dict[str, dict[str, Any]]  # gtrain's split name ("train", "val", "test") -> constructor keywords
    num_classes: int | None  # None: one class per sub-folder (ImageFolder)
    image_size: int  # default side in pixels: the native size of small-image data
    stats: Stats
    grayscale: bool  # one input channel; the model is built with in_chans=1
    style: Style
    flip: bool  # random horizontal flip in training; False where a mirror image is another class


def _train_flag(**fixed: Any) -> dict[str, dict[str, Any]]:
    """Split convention `train=True/False` (CIFAR, MNIST family, digits)."""
    return {"train": {"train": True, **fixed}, "test": {"train": False, **fixed}}


def _split(*same: str, **renamed: str) -> dict[str, dict[str, Any]]:
    """Split convention `split="..."`: names the constructor shares with gtrain, then renamed ones."""
    names = {**{name: name for name in same}, **renamed}
    return {ours: {"split": theirs} for ours, theirs in names.items()}


# torchvision's FakeData draws image i from seed i + random_offset: distinct offsets, distinct splits.
FAKE_SPLITS = {"train": {"size": 2560, "random_offset": 0}, "test": {"size": 512, "random_offset": 1_000_000}}

# fmt: off
DATASETS: dict[str, DatasetSpec] = {
    #                            splits                             classes size  stats     gray   style       flip
    # Digits, letters, house numbers and signs change meaning when mirrored: no flip. Clothes do not.
    "digits":        DatasetSpec(_train_flag(),                          10,   8, DIGITS,   True,  "cifar",    False),
    "MNIST":         DatasetSpec(_train_flag(),                          10,  28, MNIST,    True,  "cifar",    False),
    "FashionMNIST":  DatasetSpec(_train_flag(),                          10,  28, FASHION,  True,  "cifar",    True),
    "KMNIST":        DatasetSpec(_train_flag(),                          10,  28, KMNIST,   True,  "cifar",    False),
    # torchvision's EMNIST images are transposed; a model learns them all the same.
    "EMNIST":        DatasetSpec(_train_flag(split="balanced"),          47,  28, EMNIST,   True,  "cifar",    False),
    "CIFAR10":       DatasetSpec(_train_flag(),                          10,  32, CIFAR10,  False, "cifar",    True),
    "CIFAR100":      DatasetSpec(_train_flag(),                         100,  32, CIFAR100, False, "cifar",    True),
    "SVHN":          DatasetSpec(_split("train", "test"),                10,  32, SVHN,     False, "cifar",    False),
    # GTSRB images are 15 to 250 px: the cifar style's resize makes them 32x32.
    "GTSRB":         DatasetSpec(_split("train", "test"),                43,  32, GTSRB,    False, "cifar",    False),
    "STL10":         DatasetSpec(_split("train", "test"),                10,  96, STL10,    False, "cifar",    True),
    "Flowers102":    DatasetSpec(_split("train", "val", "test"),        102, 224, IMAGENET, False, "imagenet", True),
    "Food101":       DatasetSpec(_split("train", "test"),               101, 224, IMAGENET, False, "imagenet", True),
    "OxfordIIITPet": DatasetSpec(_split("test", train="trainval"),       37, 224, IMAGENET, False, "imagenet", True),
    "DTD":           DatasetSpec(_split("train", "val", "test"),         47, 224, IMAGENET, False, "imagenet", True),
    "FGVCAircraft":  DatasetSpec(_split("test", train="trainval"),      100, 224, IMAGENET, False, "imagenet", True),
    "StanfordCars":  DatasetSpec(_split("train", "test"),               196, 224, IMAGENET, False, "imagenet", True),
    "Country211":    DatasetSpec(_split("train", "test", val="valid"),  211, 224, IMAGENET, False, "imagenet", True),
    "Imagenette":    DatasetSpec(_split("train", "val"),                 10, 224, IMAGENET, False, "imagenet", True),
    # Random images made on the fly (the same ones every time): for smoke tests and measuring
    # throughput through the DataLoader path without a dataset on disk.
    "FakeData":      DatasetSpec(FAKE_SPLITS,                            10, 224, IMAGENET, False, "imagenet", True),
}
# fmt: on

# The user's own images: root/train, root/val and root/test (optional), one sub-folder per class,
# treated like the ImageNet-style rows above.
IMAGE_FOLDER = "ImageFolder"
IMAGE_FOLDER_SPEC = DatasetSpec(_split("train", "val", "test"), None, 224, IMAGENET, False, "imagenet", True)
# The same images as WebDataset tar shards (gtrain/data/shards.py), read by sample index.
SHARDS = "shards"
# The datasets whose items are image files' bytes, decoded as their crop needs.
IMAGE_FILES = (IMAGE_FOLDER, SHARDS)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the saved weights need to know about the data."""

    name: str  # gtrain's spelling of the dataset name, e.g. "CIFAR10", "digits", "ImageFolder"
    num_classes: int
    in_chans: int  # 1 for grayscale data (MNIST family, digits)
    image_size: int  # side of the square image the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


@dataclass
class DataBundle:
    info: DatasetInfo
    train: Dataset  # items (float tensor C,H,W normalized, int label); augmented when augment=True
    val: Dataset  # the evaluation transform, never augmented
    pipeline: "Pipeline"  # how the training images are read, augmented, batched and finished
    # The "in-memory" pipeline's crop and flip, as numbers its batched implementation needs.
    augmentation: "BatchAugmentation | None" = None
    interpolation: str = "bilinear"  # how the in-memory pipeline resizes, as the transforms do
    # Where the DataLoader's batches are uint8 (C, H, W) images: what the device does to each
    # batch before the step or the evaluation (gtrain.data.loaders.DeviceBatches). Evaluation
    # batches are always uint8, so validation, `gtrain eval` and `gtrain predict` compute the
    # same inputs.
    train_finish: "DeviceFinish | None" = None
    val_finish: "DeviceFinish | None" = None


@dataclass(frozen=True)
class DeviceFinish:
    """The end of a uint8 pipeline, run on the device in batches: to float, normalise, and in
    training erase a random rectangle per image (torchvision's RandomErasing, with the same
    draws). With `decode_then`, the workers only read the files (`read_encoded`): the device
    decodes each batch's JPEGs and runs `decode_then`, the per-image uint8 augmentation, there."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    random_erasing: float = 0.0
    random_erasing_fill: str = "mean"
    decode_then: Any = None

    @property
    def decodes_files(self) -> bool:
        """The batches hold the files' bytes (`EncodedImage`s), for the device to decode."""
        return self.decode_then is not None


@dataclass(frozen=True)
class BatchAugmentation:
    """The "cifar" style augmentation, as numbers a batched implementation needs."""

    pad: int  # pixels of zero padding before the random crop back to image_size; 0: no crop
    flip: bool


def batch_mix(*, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """MixUp and/or CutMix of a batch on the device: (images, labels) -> (mixed images, soft
    labels (N, num_classes)); None when both are off. With both, each batch gets one of them,
    chosen with equal odds (as in the DeiT and timm recipes). Their random draws come from
    torch's global generator, which checkpoints save and restore."""
    from torchvision.transforms import v2

    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def list_datasets() -> list[str]:
    """The names gtrain knows: the table, then ImageFolder and shards."""
    return [*DATASETS, *IMAGE_FILES]


# ---------------------------------------------------------------------------------------------
# The digits dataset
# ---------------------------------------------------------------------------------------------


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 images (N, 8, 8) in 0..255, and their labels (N,)."""
    # `load_digits` reads one CSV file that scikit-learn ships; reading it here spares every
    # process importing scikit-learn (1.4 s, more than the quickstart's first epoch).
    package = importlib.util.find_spec("sklearn")
    csv = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if package else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.int64)  # 64 pixels, then the label
        cells, labels = table[:, :64].reshape(-1, 8, 8), table[:, 64]
    else:  # a scikit-learn that keeps the file elsewhere
        from sklearn.datasets import load_digits

        bunch = load_digits()
        cells, labels = bunch.images, bunch.target.astype(np.int64)
    images = np.round(cells * (255 / 16)).astype(np.uint8)  # the scans count 0..16 dark cells
    return images, labels


class Digits(VisionDataset):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale scans of 0-9.

    The data ships with scikit-learn (`sklearn.datasets.load_digits`), so nothing is downloaded
    and `root` is not read; it is accepted so that Digits is built like any torchvision dataset.

    Split: the test set is every fifth image of each class, counting in `load_digits()` order
    from the class's first image (364 test, 1,433 train, 35-37 test images per class). The rule
    uses no random numbers, so the split is the same on every machine and with every
    scikit-learn version, and accuracies stay comparable. `indices` holds the positions of this
    split's images in `load_digits()` order.

    Items are (PIL image of mode "L", 8x8, pixel values 0..16 scaled to 0..255; int label).
    """

    classes = [str(digit) for digit in range(10)]

    def __init__(
        self,
        root: str | Path | None,
        train: bool = True,
        transform: Any = None,
        target_transform: Any = None,
    ) -> None:
        super().__init__(root, transform=transform, target_transform=target_transform)
        self.train = train
        images, labels = _load_digits()
        in_test = np.zeros(len(labels), dtype=bool)
        for digit in range(10):
            in_test[np.flatnonzero(labels == digit)[::5]] = True
        self.indices = np.flatnonzero(~in_test if train else in_test).tolist()
        self.data = images[self.indices]
        self.targets = labels[self.indices].tolist()

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = Image.fromarray(self.data[index], mode="L"), self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __len__(self) -> int:
        return len(self.targets)

    def extra_repr(self) -> str:
        return f"Split: {'train' if self.train else 'test'}"


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


# The classic transforms rather than transforms.v2: on 8-32 px PIL images they take half the
# time per item (measured here, 0.5 against 1.1 ms for the digits pipeline on a loaded CPU).


AutoAugment = str  # none, randaugment, trivialaugment, or timm's "rand-..." (checked by the recipe schema)


Interpolation = Literal["bilinear", "bicubic"]
ErasingFill = Literal["mean", "noise"]


def train_transform(
    spec: DatasetSpec, image_size: int, *, auto_augment: AutoAugment = "none", random_erasing: float = 0.0,
    random_erasing_fill: ErasingFill = "mean", interpolation: Interpolation = "bilinear", full_decode: bool = False,
) -> transforms.Compose:  # fmt: skip
    """The training augmentation of a table row: PIL image in, normalized float tensor (C, H, W) out.

    `auto_augment` adds a policy after the crop and flip (RandAugment with torchvision's
    defaults, 2 ops of magnitude 9; TrivialAugment draws one op and magnitude per image;
    timm's RandAugment from its config string);
    `random_erasing` is the probability of erasing a rectangle of the normalized tensor,
    filled with 0 (the dataset mean) or, with `random_erasing_fill = "noise"`, with normal
    noise per pixel (timm's "pixel" mode, which the HorNet release uses). `interpolation`
    resamples the crop (and the resize to another size than the native one).
    """
    resample = transforms.InterpolationMode(interpolation)
    if spec.style == "cifar":
        # Resize first, so data can be fed at another size than its native one (at the native
        # size it costs nothing: PIL returns a copy). Then pad by 1/8 of the side and crop back:
        # the 4 px at 32 px of the ResNet paper's CIFAR recipe, 1 native px for 8x8 digits at 16.
        steps = [
            transforms.Resize((image_size, image_size), interpolation=resample),
            transforms.RandomCrop(image_size, padding=max(1, image_size // 8)),
        ]
    else:
        # An image file decoded at the scale the crop needs, as the uint8 path does; PIL
        # again for the flip and the policies, which work on PIL images here.
        steps = [DecodeCrop(image_size, resample, full=full_decode), transforms.ToPILImage()]
    steps += _flip_and_policy(transforms, spec, auto_augment, resample)
    if auto_augment not in TORCHVISION_POLICIES:
        steps.append(timm_rand_augment(auto_augment, image_size, spec.stats.mean, interpolation))
    steps += _to_normalized_tensor(spec)
    if random_erasing > 0:
        steps.append(transforms.RandomErasing(p=random_erasing, value="random" if random_erasing_fill == "noise" else 0))
    return transforms.Compose(steps)


TORCHVISION_POLICIES = ("none", "randaugment", "trivialaugment")  # the others are timm's "rand-..." strings


def _flip_and_policy(ops: Any, spec: DatasetSpec, auto_augment: AutoAugment, resample) -> list[Any]:
    """The flip and torchvision's policy after the crop, from `ops`: transforms for PIL
    images, transforms.v2 for uint8 tensors (the same classes and draws). The policies'
    rotations and shears resample with the crop's interpolation, as torchvision's reference
    train.py has them (their default is nearest)."""
    steps = [ops.RandomHorizontalFlip()] if spec.flip else []
    if auto_augment == "randaugment":
        steps.append(ops.RandAugment(interpolation=resample))
    elif auto_augment == "trivialaugment":
        steps.append(ops.TrivialAugmentWide(interpolation=resample))
    return steps


def timm_rand_augment(config: str, image_size: int, mean: tuple[float, ...], interpolation: Interpolation):
    """timm's RandAugment from its config string, with the parameters timm's `create_transform`
    gives it: translations up to 45% of the side, the dataset's mean colour where a rotation
    or shear uncovers the border, the crop's interpolation. rand-m9-mstd0.5-inc1 (the HorNet,
    ConvNeXt and DeiT recipes) is 2 ops, each applied with probability 0.5, at magnitude 9 of
    10 with N(0, 0.5) noise, from the ops whose strength grows with the magnitude."""
    try:
        from timm.data.auto_augment import rand_augment_transform
    except ImportError:
        raise UserError(f"data.auto_augment = {config!r} is timm's RandAugment: pip install 'gtrain[timm]'") from None
    fill = tuple(min(255, round(255 * m)) for m in mean)
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[interpolation]
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": fill, "interpolation": resample}
    try:
        augment = rand_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError) as error:
        raise UserError(f"data.auto_augment = {config!r}: timm does not take it ({error or 'unknown section'})") from None
    for op in augment.ops:
        if op.aug_fn.__name__ == "posterize":
            op.aug_fn = _posterize
    return augment


def _posterize(image: Image.Image, bits: int, **_: Any) -> Image.Image:
    """timm's posterize, with what Pillow before 11 did for 0 bits (a black image): at a
    magnitude near 10, which mstd noise reaches, timm asks for 0 bits and Pillow 11 and
    later raise instead, ending the run."""
    if bits >= 8:
        return image
    if bits <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits)


def uint8_train_transform(
    spec: DatasetSpec, image_size: int, *, auto_augment: AutoAugment = "none", interpolation: Interpolation = "bilinear",
    full_decode: bool = False,
):  # fmt: skip
    """The training augmentation of a "imagenet" style row to uint8 (C, H, W) tensors
    (transforms.v2): an image file (`EncodedImage`) is decoded at the scale its random crop
    needs (`DecodeCrop`; whole with `full_decode`), a decoded tensor or PIL item is cropped
    as it is. What `train_transform` does after its crop, flip and policy, the device does
    to the batch (`DeviceFinish`): workers send a quarter of float32's bytes. The crop
    resamples the tensor with antialiasing, close to PIL's resize but not equal."""
    resample = transforms.InterpolationMode(interpolation)
    from torchvision.transforms import v2

    steps = [DecodeCrop(image_size, resample, full=full_decode)]
    return v2.Compose(steps + _flip_and_policy(v2, spec, auto_augment, resample))


def uint8_eval_transform(
    spec: DatasetSpec, image_size: int, interpolation: Interpolation = "bilinear", resize_size: int | None = None,
    full_decode: bool = False,
) -> DecodeResizeCrop:  # fmt: skip
    """`eval_transform`'s resize and centre crop of a "imagenet" style row to uint8 (C, H, W)
    tensors, from an image file (decoded at a smaller scale where the image is at least
    twice the resize; whole with `full_decode`), a tensor or a PIL image; the device
    normalises the batch. The same for validation, `gtrain eval` and `gtrain predict`, so
    the three agree exactly."""
    resize = resize_size or int(image_size / 0.875)
    return DecodeResizeCrop(image_size, resize, transforms.InterpolationMode(interpolation), full=full_decode)


Decode = Literal["cpu", "cpu-full", "device"]


class Pipeline(enum.StrEnum):
    """How training images reach the model. `choose_pipeline` decides it, once per run, and
    everything else (the datasets' transforms, the loaders, the start panel, `gtrain bench
    --data`) reads it from the `DataBundle`."""

    IN_MEMORY = "in-memory"
    FLOAT = "float"
    UINT8 = "uint8"
    DEVICE_DECODE = "device-decode"

    @property
    def description(self) -> str:
        return {
            "in-memory": "uint8 images held on the device, augmented and normalised there in batches",
            "float": "PIL images augmented to normalised float in the DataLoader's workers",
            "uint8": "uint8 crops from the DataLoader's workers, normalised and erased on the device",
            "device-decode": "file bytes from the DataLoader's workers, decoded and augmented on the device",
        }[self.value]

    def label(self, workers: int) -> str:
        """The pipeline in one line, as the start panel and `gtrain bench --data` show it."""
        return f"{self} ({self.description}" + (")" if self == Pipeline.IN_MEMORY else f", {workers} workers)")


def choose_pipeline(
    dataset: str, *, in_memory: str = "auto", augment: bool = True, auto_augment: AutoAugment = "none",
    random_erasing: float = 0.0, decode: Decode = "cpu",
) -> Pipeline:  # fmt: skip
    """The pipeline for a recipe's data section:
    - small fixed-size images ("cifar" style rows) live on the device as uint8 and are
      augmented there in batches, unless a per-image policy or erasing asks for PIL
      transforms in the workers (or data.in_memory = "off");
    - photos (ImageFolder, "imagenet" style rows) come as uint8 crops from the workers and
      are finished on the device; timm's RandAugment, which works on PIL images, keeps the
      float path; data.decode = "device" sends the files' bytes for the device to decode.
    A setting that cannot be honoured is one line saying which and why."""
    name = _canonical_name(dataset)
    spec = DATASETS.get(name, IMAGE_FOLDER_SPEC)
    timm_policy = augment and auto_augment not in TORCHVISION_POLICIES
    if decode == "device":
        if name not in IMAGE_FILES:
            raise UserError(
                f"data.decode = 'device' decodes image files, and {name} gives decoded images: "
                "set data.decode = 'cpu', or export the images to an ImageFolder"
            )
        if timm_policy:
            raise UserError(
                f"data.decode = 'device' runs torchvision's augmentation on the device, and data.auto_augment = "
                f"{auto_augment!r} is timm's, which runs on PIL images: set data.decode = 'cpu'"
            )
    if spec.style == "cifar":
        per_image = augment and (auto_augment != "none" or random_erasing > 0)
        if in_memory == "on" and per_image:
            raise UserError(
                "data.in_memory = 'on' cannot be used: data.auto_augment and data.random_erasing run per image; "
                "set data.in_memory = 'auto' or 'off'"
            )
        return Pipeline.FLOAT if per_image or in_memory == "off" else Pipeline.IN_MEMORY
    if in_memory == "on":
        raise UserError(
            f"data.in_memory = 'on' cannot be used: it is for small fixed-size datasets, which {name} is not; "
            "set data.in_memory = 'auto' or 'off'"
        )
    if decode == "device":
        return Pipeline.DEVICE_DECODE
    return Pipeline.FLOAT if timm_policy else Pipeline.UINT8


def training_pipeline(
    spec: DatasetSpec, size: int, pipeline: Pipeline, *, augment: bool, interpolation: Interpolation,
    auto_augment: AutoAugment, random_erasing: float, random_erasing_fill: ErasingFill, full_decode: bool = False,
) -> tuple[Any, "DeviceFinish | None"]:  # fmt: skip
    """The training transform of `pipeline`, and what the device finishes where its batches
    are uint8 (else None). Unaugmented, training images keep the training size, whatever the
    evaluation's. On the device-decode pipeline the transform is None: the items are
    `EncodedImage`s and the device decodes and augments them (`DeviceFinish.decode_then`)."""
    if pipeline in (Pipeline.UINT8, Pipeline.DEVICE_DECODE):
        if augment:
            transform = uint8_train_transform(spec, size, auto_augment=auto_augment, interpolation=interpolation,
                                              full_decode=full_decode)  # fmt: skip
        else:
            transform = uint8_eval_transform(spec, size, interpolation, full_decode=full_decode)
        erasing = (random_erasing, random_erasing_fill) if augment else (0.0, "mean")
        if pipeline == Pipeline.DEVICE_DECODE:
            return None, DeviceFinish(spec.stats.mean, spec.stats.std, *erasing, decode_then=transform)
        return transform, DeviceFinish(spec.stats.mean, spec.stats.std, *erasing)
    if not augment:
        return eval_transform(spec, size, interpolation), None
    per_image = dict(auto_augment=auto_augment, random_erasing=random_erasing, random_erasing_fill=random_erasing_fill)
    return train_transform(spec, size, interpolation=interpolation, full_decode=full_decode, **per_image), None


def evaluation_pipeline(
    spec: DatasetSpec, size: int, interpolation: Interpolation, resize_size: int | None = None, full_decode: bool = False
) -> tuple[Any, "DeviceFinish"]:
    """The evaluation transform, to uint8 (C, H, W), and the device's normalisation of its
    batches: one computation for validation (in memory or through a DataLoader), `gtrain
    eval` and `gtrain predict`, so that their inputs agree to the bit. `full_decode`: image
    files decoded whole (data.decode = "cpu-full"), as the weights' own validation was."""
    finish = DeviceFinish(spec.stats.mean, spec.stats.std)
    if spec.style == "cifar":
        resample = transforms.InterpolationMode(interpolation)
        # As `load_uint8` holds them in memory: PIL's resize, then the pixels as they are.
        return transforms.Compose([transforms.Resize((size, size), interpolation=resample), transforms.PILToTensor()]), finish
    return uint8_eval_transform(spec, size, interpolation, resize_size, full_decode), finish


def eval_transform(
    spec: DatasetSpec, image_size: int, interpolation: Interpolation = "bilinear", resize_size: int | None = None
) -> transforms.Compose:
    """The evaluation transform of a table row: deterministic, the geometry the model trained on."""
    resample = transforms.InterpolationMode(interpolation)
    if spec.style == "cifar":
        steps = [transforms.Resize((image_size, image_size), interpolation=resample)]
    else:
        # Resize the short side to size/0.875 (unless `resize_size` says otherwise) and take
        # the centre: the standard ImageNet evaluation (256 -> 224), close to the average
        # scale of random-resized crops.
        resize = resize_size or int(image_size / 0.875)
        steps = [transforms.Resize(resize, interpolation=resample), transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, *_to_normalized_tensor(spec)])


def _to_normalized_tensor(spec: DatasetSpec) -> list[Any]:
    # No mode conversion: every loader in the table already yields "L" images for grayscale rows
    # and "RGB" for the others (ImageFolder's loader converts), which is what in_chans promises.
    return [transforms.ToTensor(), transforms.Normalize(spec.stats.mean, spec.stats.std)]


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def build_data(data: DataSection, *, download: bool = False) -> DataBundle:
    """The train set (augmented when `data.augment`) and the `data.val_split` set (never
    augmented), evaluated at `data.eval_image_size` (default: the training size), resized
    first to `data.eval_resize_size` where the data is cropped (ImageFolder and photo
    datasets), with the pipeline `choose_pipeline` picks for these settings. `download`:
    fetch a torchvision dataset that is missing from `data.root`.

    `val_split="test"` falls back to "val" for data without a test split (Imagenette, an
    ImageFolder without test/).
    """
    dataset, image_size, augment, val_split = data.dataset, data.image_size, data.augment, data.val_split
    auto_augment, random_erasing, interpolation = data.auto_augment, data.random_erasing, data.interpolation
    eval_image_size, eval_resize_size = data.eval_image_size, data.eval_resize_size
    pipeline = choose_pipeline(dataset, in_memory=data.in_memory, augment=augment, auto_augment=auto_augment,
                               random_erasing=random_erasing, decode=data.decode)  # fmt: skip
    name = _canonical_name(dataset)
    root = Path(data.root)
    per_image = dict(auto_augment=auto_augment, random_erasing=random_erasing, random_erasing_fill=data.random_erasing_fill)
    spec = DATASETS.get(name, IMAGE_FOLDER_SPEC)
    size = _image_size(image_size, spec)
    if spec.style == "cifar" and (eval_image_size not in (None, size) or eval_resize_size is not None):
        raise UserError(
            f"data.eval_image_size and data.eval_resize_size are for data that is cropped to be evaluated "
            f"(ImageFolder, photo datasets); {name} is evaluated whole at data.image_size: leave them unset"
        )
    full_decode = data.full_decode
    evaluate, val_finish = evaluation_pipeline(spec, eval_image_size or size, interpolation, eval_resize_size, full_decode)
    train_tf, train_finish = training_pipeline(spec, size, pipeline, augment=augment, interpolation=interpolation,
                                               full_decode=full_decode, **per_image)  # fmt: skip
    if name == IMAGE_FOLDER:
        # Photos are read as files' bytes: the workers decode them as their crop needs
        # (`DecodeCrop`), or the device decodes them.
        train = _load_image_folder(_image_folder_split(root, "train"), train_tf, loader=read_encoded)
        val = _load_image_folder(_image_folder_split(root, val_split), evaluate, expected_classes=train.classes,
                                 loader=read_encoded)  # fmt: skip
        info = _image_folder_info(size, train.classes)
    elif name == SHARDS:
        layout = find_shards(data.root)
        cache_bytes = int(data.shard_cache_gb * 1e9)
        train = _load_shard_split(layout, "train", train_tf, cache_bytes)
        classes = _shard_classes(layout, train)
        val = _load_shard_split(layout, val_split, evaluate, cache_bytes, classes)
        info = _image_folder_info(size, classes, name=SHARDS)
    else:
        val_split = _resolve_split(name, val_split, spec.splits)
        train = _load(name, spec.splits["train"], root=root, download=download, transform=train_tf)
        val = _load(name, spec.splits[val_split], root=root, download=download, transform=evaluate)
        info = _table_info(name, spec, size, train)
    batched = None
    if pipeline == Pipeline.IN_MEMORY:
        batched = BatchAugmentation(pad=max(1, size // 8) if augment else 0, flip=spec.flip and augment)
    return DataBundle(info, train, val, pipeline, batched, interpolation, train_finish=train_finish, val_finish=val_finish)


def build_eval_data(
    dataset: str,
    *,
    root: Path | str,
    download: bool,
    split: str,
    image_size: int | None = None,
    class_names: tuple[str, ...] | None = None,
    interpolation: Interpolation = "bilinear",
    resize_size: int | None = None,
    full_decode: bool = False,
    shard_cache_gb: float = 0.0,
) -> tuple[DatasetInfo, Dataset, "DeviceFinish | None"]:
    """One split of a dataset with the evaluation transform, for scoring a trained model, and
    what the device does to its batches (None: the items are normalised already).

    `class_names`: the classes the model was trained on; an ImageFolder must have exactly
    these, or its labels would silently mean other classes.
    """
    name = _canonical_name(dataset)
    if name == SHARDS:
        size = _image_size(image_size, IMAGE_FOLDER_SPEC)
        transform, finish = evaluation_pipeline(IMAGE_FOLDER_SPEC, size, interpolation, resize_size, full_decode)
        layout = find_shards(str(root))
        classes = class_names or layout.class_names
        data = _load_shard_split(layout, split, transform, int(shard_cache_gb * 1e9), classes)
        return _image_folder_info(size, classes or _shard_classes(layout, data), name=SHARDS), data, finish
    root = Path(root)
    if name == IMAGE_FOLDER:
        size = _image_size(image_size, IMAGE_FOLDER_SPEC)
        # The model's class indices are the train folder's: score another folder only if it agrees.
        expected = list(class_names) if class_names else None
        if expected is None and (root / "train").is_dir():
            expected = _class_folders(root / "train")
        transform, finish = evaluation_pipeline(IMAGE_FOLDER_SPEC, size, interpolation, resize_size, full_decode)
        data = _load_image_folder(_image_folder_split(root, split), transform, expected_classes=expected,
                                  loader=read_encoded)  # fmt: skip
        return _image_folder_info(size, data.classes), data, finish
    spec = DATASETS[name]
    size = _image_size(image_size, spec)
    split = _resolve_split(name, split, spec.splits)
    transform, finish = evaluation_pipeline(spec, size, interpolation, resize_size)
    data = _load(name, spec.splits[split], root=root, download=download, transform=transform)
    return _table_info(name, spec, size, data), data, finish


def _canonical_name(dataset: str) -> str:
    """gtrain's spelling of a dataset name; any capitalization is accepted."""
    known = list_datasets()
    by_lower = {name.lower(): name for name in known}
    if dataset.lower() in by_lower:
        return by_lower[dataset.lower()]
    constructor = getattr(torchvision.datasets, dataset, None)
    if isinstance(constructor, type) and issubclass(constructor, VisionDataset):
        raise UserError(
            f"torchvision's {dataset} is not in gtrain's dataset table: add a row for it to DATASETS "
            "in gtrain/data/datasets.py, or export its images to an ImageFolder"
        )
    raise UserError(f"unknown dataset {dataset!r}: {did_you_mean(dataset, known)}")


def _image_size(requested: int | None, spec: DatasetSpec) -> int:
    if requested is None:
        return spec.image_size
    if requested < 1:
        raise UserError(f"data.image_size = {requested} is not a number of pixels: set it to e.g. {spec.image_size}")
    return requested


def _resolve_split(name: str, split: str, available: dict[str, Any]) -> str:
    if split in available:
        return split
    if split == "test" and "val" in available:
        return "val"
    raise UserError(f"{name} has no {split!r} split: choose one of {', '.join(available)}")


def _load(name: str, split_kwargs: dict[str, Any], *, root: Path, download: bool, transform: Any) -> Dataset:
    """Construct a table dataset; missing data becomes one line that says how to get it."""
    if name == "digits":  # ships with scikit-learn: nothing to download
        return Digits(root, transform=transform, **split_kwargs)
    if name == "FakeData":  # generated: no root, nothing to download
        return torchvision.datasets.FakeData(num_classes=DATASETS[name].num_classes, transform=transform, **split_kwargs)
    constructor = getattr(torchvision.datasets, name)
    try:
        return constructor(root, transform=transform, download=download, **split_kwargs)
    except (RuntimeError, OSError) as err:
        # torchvision says "Dataset not found or corrupted. You can use download=True ..." (a
        # RuntimeError) for most datasets. Only construction is wrapped, and other errors, such
        # as a missing scipy, keep their traceback.
        message = str(err)
        missing = (
            isinstance(err, FileNotFoundError)
            or "Dataset not found" in message
            or "not found or corrupted" in message
        )
        failed_download = isinstance(err, OSError) or message.startswith("Error downloading")
        if download and (missing or failed_download):
            raise UserError(
                f"{name}: download into {root.absolute()} failed ({error_line(err)}): check the "
                "network, or put the files there yourself and set data.download = false"
            ) from err
        if missing:
            raise UserError(
                f"{name} not found in {root.absolute()}: set data.download = true to fetch it, "
                "or data.root to the folder that holds it"
            ) from err
        raise


def _table_info(name: str, spec: DatasetSpec, size: int, data: Dataset) -> DatasetInfo:
    assert spec.num_classes is not None, "every table row counts its classes"
    return DatasetInfo(
        name=name,
        num_classes=spec.num_classes,
        in_chans=1 if spec.grayscale else 3,
        image_size=size,
        mean=spec.stats.mean,
        std=spec.stats.std,
        class_names=_class_names(data, spec.num_classes),
    )


def _class_names(data: Dataset, num_classes: int) -> tuple[str, ...]:
    """The dataset's own class names where torchvision has them, else "0", "1", ..."""
    # SVHN has no `classes`, and its labels are the digits themselves (torchvision maps 10 to 0).
    classes = getattr(data, "classes", None)
    if classes is None or len(classes) != num_classes:
        return tuple(str(i) for i in range(num_classes))
    # Imagenette names each class with a tuple of synonyms: keep the first.
    return tuple(str(c[0]) if isinstance(c, tuple) else str(c) for c in classes)


# ImageFolder ---------------------------------------------------------------------------------


def _image_folder_split(root: Path, split: str) -> Path:
    """root/<split>; "test" falls back to root/val when there is no root/test."""
    if (root / split).is_dir():
        return root / split
    if split == "test" and (root / "val").is_dir():
        return root / "val"
    if split == "test":
        missing = f"neither {root / 'test'} nor {root / 'val'} exists"
    else:
        missing = f"no folder {root / split}"
    raise UserError(
        f"ImageFolder: {missing}: add it with one sub-folder of images per class, "
        "or set data.root to the folder that holds train/ and val/"
    )


def _class_folders(directory: Path) -> list[str]:
    try:
        return find_classes(directory)[0]
    except FileNotFoundError as err:
        raise UserError(
            f"ImageFolder: no class folders in {directory}: add one sub-folder of images per class"
        ) from err


def _load_image_folder(
    directory: Path, transform: Any, *, expected_classes: list[str] | None = None, loader: Any = None
) -> ImageFolder:
    classes = _class_folders(directory)
    if expected_classes is not None and classes != list(expected_classes):
        extra = ", ".join(sorted(set(classes) - set(expected_classes))) or "none"
        missing = ", ".join(sorted(set(expected_classes) - set(classes))) or "none"
        raise UserError(
            f"ImageFolder: the class folders of {directory} differ from the training classes (extra: {extra}; "
            f"missing: {missing}): use the same class folders in every split"
        )
    try:
        return ImageFolder(directory, transform=transform, loader=loader or default_loader)
    except FileNotFoundError as err:  # a class folder without images
        raise UserError(f"ImageFolder: no images in {directory}: {error_line(err)}") from err


def _image_folder_info(size: int, classes: list[str] | tuple[str, ...], name: str = IMAGE_FOLDER) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        num_classes=len(classes),
        in_chans=3,
        image_size=size,
        mean=IMAGE_FOLDER_SPEC.stats.mean,
        std=IMAGE_FOLDER_SPEC.stats.std,
        class_names=tuple(classes),
    )


# Shards ----------------------------------------------------------------------------------------


def raw_splits(data: DataSection) -> tuple[dict[str, Dataset], tuple[str, ...]]:
    """Every split of a recipe's dataset without transforms, and its class names, for writing
    it as shards: image files' bytes (`EncodedImage`) for ImageFolder and shards, PIL images
    for the table's datasets."""
    name = _canonical_name(data.dataset)
    if name == IMAGE_FOLDER:
        root = Path(data.root)
        train = _load_image_folder(_image_folder_split(root, "train"), None, loader=read_encoded)
        splits: dict[str, Dataset] = {"train": train}
        for split in ("val", "test"):
            if (root / split).is_dir():
                splits[split] = _load_image_folder(root / split, None, expected_classes=train.classes, loader=read_encoded)
        return splits, tuple(train.classes)
    if name == SHARDS:
        layout = find_shards(data.root)
        cache_bytes = int(data.shard_cache_gb * 1e9)
        train = _load_shard_split(layout, "train", None, cache_bytes)
        classes = _shard_classes(layout, train)
        splits = {"train": train}
        splits.update({s: _load_shard_split(layout, s, None, cache_bytes, classes) for s in layout.splits if s != "train"})
        return splits, classes
    spec = DATASETS[name]
    splits = {split: _load(name, kwargs, root=Path(data.root), download=data.download, transform=None)
              for split, kwargs in spec.splits.items()}  # fmt: skip
    assert spec.num_classes is not None
    return splits, _class_names(splits["train"], spec.num_classes)



def _load_shard_split(
    layout: ShardSetLayout, split: str, transform: Any, cache_bytes: int, classes: tuple[str, ...] | None = None
) -> ShardDataset:
    """One split of a shard set; "test" falls back to "val" as for folders. With `classes`,
    every label is checked against them."""
    if split not in layout.splits and split == "test" and "val" in layout.splits:
        split = "val"
    if split not in layout.splits:
        raise UserError(
            f"shards: {layout.where} has no {split} shards (it has {', '.join(layout.splits) or 'none'}): write them "
            f"with `gtrain shards`, or name them with {split}"
        )
    data = ShardDataset(layout.splits[split], transform=transform, cache_limit_bytes=cache_bytes, split=split)
    if len(data) == 0:
        raise UserError(f"shards: the {split} shards of {layout.where} hold no images with labels")
    if classes is not None:
        data.check_labels(len(classes))
    return data


def _shard_classes(layout: ShardSetLayout, train: ShardDataset) -> tuple[str, ...]:
    """The set's class names (classes.txt), else "0" ... up to the largest training label."""
    if layout.class_names is not None:
        train.check_labels(len(layout.class_names))
        return layout.class_names
    train.check_labels()  # every sample has a label
    count = int(train.labels.max()) + 1
    train.check_labels(count)
    return tuple(str(i) for i in range(count))


def item_name(dataset: Any, index: int, split: str) -> str:
    """What image `index` of a split is, for a person: its file, its shard and member, or
    "SPLIT #INDEX" for a dataset held in memory."""
    if hasattr(dataset, "samples"):  # ImageFolder
        return str(dataset.samples[index][0])
    if isinstance(dataset, ShardDataset):
        return ":".join(dataset.location(index))
    return f"{split} #{index}"


def check_flip_keeps_the_class(dataset: str) -> None:
    # The dataset table says where training flips images; "ImageFolder" is the one name not in it.
    if not DATASETS.get(dataset, IMAGE_FOLDER_SPEC).flip:
        raise UserError(
            f"--tta flip: {dataset} is trained without horizontal flips because a mirrored image can be "
            "another class (a mirrored digit or sign); use --tta none"
        )


def train_labels(dataset: Any) -> torch.Tensor:
    """The class index of every image of a split, read from the dataset's label list (no
    image is opened): torchvision's `targets` (SVHN: `labels`)."""
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = getattr(dataset, "labels", None)
    if labels is None:
        raise UserError(
            f"{type(dataset).__name__} keeps no list of its labels: data.class_weights and data.sampler = "
            "'balanced' need one; leave them at their defaults for this dataset"
        )
    return torch.as_tensor(labels, dtype=torch.int64)


def class_counts(dataset: Any, num_classes: int) -> torch.Tensor:
    return torch.bincount(train_labels(dataset), minlength=num_classes)


def balanced_class_weights(dataset: Any, num_classes: int) -> torch.Tensor:
    """Loss weights N / (classes x count) (scikit-learn's "balanced"): every class adds as
    much to the loss as the others; a class without training images weighs 0."""
    counts = class_counts(dataset, num_classes).double()
    weights = counts.sum() / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, 0.0).float()
