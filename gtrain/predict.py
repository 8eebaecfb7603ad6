"""`gtrain predict` and `Classifier`: what is in these images, by a trained model.

A weights file gtrain wrote carries what it takes to classify a new image: the model,
its class names, image size, channels, mean and std, and the dataset it was trained on,
whose row of the dataset table gives the geometry of its evaluation transform. Images go
through exactly what `gtrain eval` does to them, in batches from a DataLoader: photos
(ImageFolder and the "imagenet" style rows) are decoded by torchvision.io, resized and
centre-cropped as uint8 and normalised on the device; small images (the "cifar" style
rows) are read by PIL in the model's mode "L" or "RGB", resized, and normalised there too. The model
runs in the precision and memory format the run validated with.

    from gtrain import Classifier
    classifier = Classifier.load("runs/exp1")                   # a run folder or a .safetensors
    classifier.predict(["cat.jpg", pil_image], topk=3)
    # [[{"class": "cat", "probability": 0.93}, ...], [...]]
"""

import csv
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms.functional import to_pil_image

from gtrain.checkpoint import WeightsMeta, load_model
from gtrain.errors import UserError, error_line
from gtrain.recipe import DataSection
from gtrain.run_folder import weights_file

# What a folder is searched for: the image types torchvision's ImageFolder reads with PIL.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
OUTPUT_FORMATS = (".jsonl", ".csv")


class ConvertMode:
    """PIL image -> the mode the model reads ("L" for 1 channel, "RGB" for 3). A class, not a
    lambda, so that DataLoader workers can be started by any method."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)


def image_transform(meta: WeightsMeta):
    """`gtrain eval`'s transform for the weights' dataset, for any image: to a uint8 crop in
    the model's mode, which the device normalises as eval's batches."""
    return _evaluation(meta)[0]


def _evaluation(meta: WeightsMeta) -> tuple[Any, bool]:
    """`image_transform`, and whether it takes photos as uint8 RGB tensors (else PIL images,
    converted to the model's mode first: small images, grayscale or not)."""
    from gtrain.data import DATASETS, IMAGE_FOLDER_SPEC
    from gtrain.data.datasets import evaluation_pipeline

    if meta.in_chans not in (1, 3):
        raise UserError(
            f"these weights take images of {meta.in_chans} channels, and gtrain predict reads images as grayscale "
            "(1 channel) or RGB (3): classify preprocessed tensors with gtrain.Classifier instead"
        )
    spec = DATASETS.get(meta.dataset, IMAGE_FOLDER_SPEC)
    transform, _ = evaluation_pipeline(spec, meta.image_size, meta.interpolation, meta.resize_size, meta.full_decode)
    if spec.style != "cifar" and meta.in_chans == 3:
        return transform, True
    # Small images, or a grayscale model on photos: PIL converts to the model's mode first.
    return transforms.Compose([ConvertMode("L" if meta.in_chans == 1 else "RGB"), transform]), False


class ImageReader:
    """An image file -> what `image_transform` makes of it, decoded as `gtrain eval` decodes
    the weights' dataset. A class, so that DataLoader workers can be started by any method."""

    def __init__(self, transform, photo: bool):
        self.transform, self.photo = transform, photo

    def __call__(self, item: "Path | ShardSample") -> torch.Tensor:
        from gtrain.data.images import read_encoded

        if isinstance(item, ShardSample):
            encoded = item.read()
            return self.transform(encoded if self.photo else read_image(io.BytesIO(encoded.data.tobytes())))
        return self.transform(read_encoded(str(item)) if self.photo else read_image(item))


class ShardSample(NamedTuple):
    """Image `index` of a shard set, as an input to classify; named "SHARD:KEY.jpg"."""

    shards: Any  # gtrain.data.shards.ShardDataset
    index: int

    def read(self):
        return self.shards.read(self.index)

    def __str__(self) -> str:
        return ":".join(self.shards.location(self.index))


class Classifier:
    """Trained weights, loaded once, that classify images: PIL images, paths, uint8 image
    tensors (C, H, W), or float tensors already preprocessed (C, H, W) or (N, C, H, W)."""

    def __init__(self, model: torch.nn.Module, meta: WeightsMeta, *, device: torch.device, precision: str,
                 channels_last: bool, weights: Path | None = None, batch_size: int = 64):  # fmt: skip
        # batch_size: the default batch; a run's own validation batch, so that images listed in
        # the order of its split are scored in the batches `gtrain eval` scores them in.
        self.batch_size = batch_size
        self.model = model.to(device).eval()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.meta, self.device, self.precision, self.channels_last = meta, device, precision, channels_last
        self.weights = weights
        self.transform, self.photo = _evaluation(meta)
        self.read_file = ImageReader(self.transform, self.photo)

    @classmethod
    def load(
        cls, weights: str | Path, *, device: str = "auto", precision: str | None = None, channels_last: bool | None = None
    ) -> "Classifier":
        """A run folder (its best weights, as `gtrain eval` picks them) or a .safetensors file.
        precision / channels_last: the run's own (its recipe.toml) unless given; "auto" for a
        file outside a run folder."""
        from gtrain.evaluate import recipe_of, scoring_settings

        path = weights_file(Path(weights))
        model, meta = load_model(path)
        recipe = recipe_of(path, meta, [])
        device_, precision, channels_last = scoring_settings(recipe, device, precision, channels_last)
        return cls(model, meta, device=device_, precision=precision, channels_last=channels_last, weights=path,
                   batch_size=recipe.data.batch_size)  # fmt: skip

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.class_names

    def preprocess(self, image: Any) -> torch.Tensor:
        """One image -> the normalised (C, H, W) float tensor the model reads."""
        if isinstance(image, torch.Tensor) and image.dtype != torch.uint8:
            return image
        if isinstance(image, torch.Tensor):
            # On the CPU, as eval resizes; through PIL unless it is already (3, H, W) for a photo model.
            image = image.cpu()
            if not (self.photo and image.dim() == 3 and image.shape[0] == 3):
                image = to_pil_image(image)
        if isinstance(image, str | Path):
            image = self.read_file(Path(image))
        elif isinstance(image, Image.Image) and self.photo:
            image = ImageOps.exif_transpose(image)  # upright, as files are read
            image = self.transform(image if image.mode == "RGB" else image.convert("RGB"))
        elif isinstance(image, torch.Tensor | Image.Image):
            image = self.transform(image)  # the PIL path converts to the model's mode itself
        else:
            raise TypeError(f"cannot classify a {type(image).__name__}: give PIL images, paths or tensors")
        return self.normalize(image[None])[0] if image.dtype == torch.uint8 else image

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 crops (N, 3, H, W) -> normalised float, as `gtrain eval` normalises them."""
        from gtrain.data.loaders import normalize_uint8, uint8_normalization

        return normalize_uint8(batch, *uint8_normalization(self.meta.mean, self.meta.std, batch.device))

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor, *, tta: str = "none") -> torch.Tensor:
        """(N, C, H, W) preprocessed images, or uint8 crops from `image_transform`, -> (N,
        classes) float32 probabilities on the CPU."""
        from gtrain.evaluate import check_tta, class_scores

        check_tta(tta)
        batch = batch.to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = self.normalize(batch)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        scores = class_scores(self.model, batch, tta=tta, device=self.device, precision=self.precision)
        return scores.softmax(dim=1).cpu()

    def predict(
        self, images: Any, *, topk: int = 5, batch_size: int | None = None, tta: str = "none"
    ) -> list[list[dict[str, Any]]]:
        """For each image, its `topk` classes, best first: [{"class": ..., "probability": ...}]."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, list | tuple):
            images = [images]
        results = []
        batch_size = batch_size or self.batch_size
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(image) for image in images[start : start + batch_size]])
            results += self.top_classes(self.probabilities(batch, tta=tta), topk)
        return results

    def top_classes(self, probabilities: torch.Tensor, topk: int) -> list[list[dict[str, Any]]]:
        values, indices = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
        names = self.class_names
        return [
            [{"class": names[i], "probability": p} for p, i in zip(row_values.tolist(), row_indices.tolist())]
            for row_values, row_indices in zip(values, indices)
        ]


def read_image(path: "Path | io.BytesIO") -> Image.Image:
    with Image.open(path) as image:
        image.load()  # decode now, inside the caller's error handling, not lazily later
        return ImageOps.exif_transpose(image)


# ---------------------------------------------------------------------------------------
# The command: inputs, a loader over them, the records written


def find_images(inputs: Iterable[str]) -> "list[Path | ShardSample]":
    """Image files named, found in folders (recursively, by suffix, sorted), or listed one per
    line in @LIST files (blank lines and # comments skipped; paths relative to the current
    folder); a file named outright is tried whatever its suffix. Tar shards (a .tar file, a
    brace pattern or URL of them, or those in a folder) give every image they hold."""
    from gtrain.data.shards import expand_braces, is_remote

    found: list[Path | ShardSample] = []
    for item in inputs:
        if item.endswith(".tar") or "{" in item or is_remote(item):
            found += shard_samples(expand_braces(item) if "{" in item else [item])
            continue
        if item.startswith("@"):
            listing = Path(item[1:])
            try:
                lines = listing.read_text().splitlines()
            except OSError as error:
                raise UserError(f"cannot read the list {listing}: {error.strerror}") from None
            found += [Path(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
        elif Path(item).is_dir():
            found += sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found += shard_samples(sorted(str(p) for p in Path(item).rglob("*.tar")))
        elif Path(item).exists():
            found.append(Path(item))
        else:
            raise UserError(f"{item} does not exist: give image files, folders of images or @list.txt")
    if not found:
        raise UserError(
            f"no images found in {', '.join(inputs)}: folders are searched for {', '.join(IMAGE_SUFFIXES)} files"
        )
    return found


def shard_samples(shards: list[str]) -> list[ShardSample]:
    if not shards:
        return []
    from gtrain.data.shards import ShardDataset

    dataset = ShardDataset(shards, cache_limit_bytes=int(DataSection().shard_cache_gb * 1e9))
    return [ShardSample(dataset, index) for index in range(len(dataset))]


class ImageFiles(Dataset):
    """Image i of `paths`, read by `read_file`, or a zero image and the reason it could not be
    read: one unreadable file must not stop the others."""

    def __init__(self, paths: "list[Path | ShardSample]", read_file: ImageReader, shape: tuple[int, int, int]):
        self.paths, self.read_file, self.shape = paths, read_file, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return self.read_file(self.paths[index]), ""
        except Exception as error:  # PIL raises many types for a bad file; each becomes its record's error
            blank = torch.zeros(self.shape, dtype=torch.uint8)
            return blank, error_line(error, with_type=True)


@dataclass
class PredictSummary:
    images: int
    failed: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def check_output(out: Path | None, to_stream: bool = False) -> None:
    if out is not None and to_stream:
        raise UserError(f"--json prints the predictions and --out {out} writes them to a file: give one of the two")
    if out is not None and out.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {out}: write .jsonl (one JSON object per image) or .csv (one row per image)")


@dataclass(frozen=True)
class PredictSettings:
    """How `gtrain predict` classifies: how many classes per image, how images are batched
    and read, and how the weights run (None: as the run validated them, see `Classifier.load`)."""

    topk: int = 5
    batch_size: int | None = None  # None: the run's data.batch_size, so images are scored as `gtrain eval` scores them
    workers: int = 2  # DataLoader processes that read and resize images
    device: str = "auto"
    precision: str | None = None
    channels_last: bool | None = None
    tta: str = "none"


def predictions(classifier: Classifier, paths: list[Path], settings: PredictSettings) -> Iterator[dict[str, Any]]:
    """One record per path, in input order: {"path", "predictions"} or {"path", "error"}."""
    meta = classifier.meta
    dataset = ImageFiles(paths, classifier.read_file, (meta.in_chans, meta.image_size, meta.image_size))
    loader = DataLoader(dataset, batch_size=settings.batch_size or classifier.batch_size, shuffle=False,
                        num_workers=settings.workers, pin_memory=classifier.device.type == "cuda")  # fmt: skip
    index = 0
    for batch, errors in loader:
        ranked = classifier.top_classes(classifier.probabilities(batch, tta=settings.tta), settings.topk)
        for top, error in zip(ranked, errors):
            path = str(paths[index])
            index += 1
            yield {"path": path, "error": error} if error else {"path": path, "predictions": top}


def csv_header(topk: int) -> list[str]:
    columns = ["path", "class", "probability"]
    for k in range(2, topk + 1):
        columns += [f"class_{k}", f"probability_{k}"]
    return [*columns, "error"]


def csv_row(record: dict[str, Any], topk: int) -> list[Any]:
    cells: list[Any] = [record["path"]]
    top = record.get("predictions", [])
    for k in range(topk):
        cells += [top[k]["class"], top[k]["probability"]] if k < len(top) else ["", ""]
    return [*cells, record.get("error", "")]


class RecordWriter:
    """Records to a .jsonl or .csv file as they come, or as JSON Lines to a text stream."""

    def __init__(self, out: Path | None, topk: int, stream: io.TextIOBase | None = None):
        self.topk = topk
        self.csv = out is not None and out.suffix.lower() == ".csv"
        if out is not None:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                self.file = out.open("w", newline="")
            except OSError as error:
                raise UserError(f"cannot write {out}: {error.strerror}; choose a writable --out") from None
        else:
            self.file = stream
        self.rows = csv.writer(self.file) if self.csv and self.file is not None else None
        if self.rows is not None:
            self.rows.writerow(csv_header(topk))

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        if self.rows is not None:
            self.rows.writerow(csv_row(record, self.topk))
        else:
            self.file.write(json.dumps(record) + "\n")


def run_predict(
    weights: Path, inputs: list[str], settings: PredictSettings = PredictSettings(), *, out: Path | None = None,
    stream: io.TextIOBase | None = None, on_record: Callable[[dict[str, Any], int], None] | None = None,
) -> PredictSummary:  # fmt: skip
    """`gtrain predict`: classify every input; write each record to `out` (or to `stream`)
    and give it, with the number of images, to `on_record` (the command's table or progress bar)."""
    from gtrain.data import check_flip_keeps_the_class
    from gtrain.evaluate import check_tta

    check_tta(settings.tta)
    check_output(out, to_stream=stream is not None)
    classifier = Classifier.load(weights, device=settings.device, precision=settings.precision,
                                 channels_last=settings.channels_last)  # fmt: skip
    if settings.tta == "flip":
        check_flip_keeps_the_class(classifier.meta.dataset)
    paths = find_images(inputs)
    writer = RecordWriter(out, settings.topk, stream)
    start = time.perf_counter()
    failed = 0
    try:
        for record in predictions(classifier, paths, settings):
            failed += "error" in record
            writer.write(record)
            if on_record is not None:
                on_record(record, len(paths))
    finally:
        if out is not None:
            writer.file.close()
    return PredictSummary(images=len(paths), failed=failed, seconds=time.perf_counter() - start)
