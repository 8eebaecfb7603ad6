"""`gtrain shards`: a dataset written as WebDataset tar shards, one series per split.

    out/NAME-train-0000.tar ...   samples KEY.jpg (or .png, .webp, ...) and KEY.cls
    out/NAME-val-0000.tar ...
    out/classes.txt               the class names, one per line, in label order
    out/_info.json                timm's layout: each split's filenames, shard_lengths, num_samples

The tar files are written with webdataset's TarWriter, so any WebDataset reader takes them.
By default each image's source bytes are kept, so shards train exactly as the folder they
came from; `max_side` re-encodes the images larger than it as JPEGs. Keys are the source
index and file stem (`00000042-IMG_1234`), so an error names the image it came from.

A shard is written under a temporary name and renamed when complete, and `_info.json` is
written last: a killed run leaves no shard that looks complete, and the same command
continues after the last complete shard of each split.
"""

import functools
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from gtrain.data.images import EncodedImage, decode_stored, decode_upright, decode_whole, probe
from gtrain.data.shards import CLASSES_FILE, INFO_FILE, ShardIndex, load_index
from gtrain.errors import UserError, error_line
from gtrain.run_lock import FileLock, describe_holder

LOCK_FILE = ".lock"  # held by the writer (a lock the kernel drops when it dies)

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from "500MB", "1GB", "64MiB" or a plain number."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--shard-size {text!r} is not a size: write it as e.g. 500MB, 1GB or 64MiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


@dataclass(frozen=True)
class ShardSource:
    """What to write: each split's dataset, whose items are (EncodedImage or PIL image, label),
    the name of each item for keys and messages, and the class names."""

    name: str  # the shards' file-name prefix
    splits: dict[str, Any]  # split -> dataset
    item_names: dict[str, Callable[[int], str]]  # split -> index -> the source file or item
    class_names: tuple[str, ...]


@dataclass
class WriteReport:
    written: dict[str, int] = field(default_factory=dict)  # split -> samples in its shards
    shards: dict[str, int] = field(default_factory=dict)  # split -> shard count
    resumed: dict[str, int] = field(default_factory=dict)  # split -> samples found already written
    unreadable: list[str] = field(default_factory=list)  # "name: why", every image left out


class ShardWriterSettings:
    def __init__(self, *, max_side: int | None = None, quality: int = 90, shard_bytes: int = 500 * 10**6):
        if max_side is not None and max_side < 8:
            raise UserError(f"--max-side {max_side} is too small for an image: give at least 8 pixels, e.g. 512")
        if not 1 <= quality <= 100:
            raise UserError(f"--quality {quality} is not a JPEG quality: give 1 to 100 (90 keeps photos close)")
        self.max_side, self.quality, self.shard_bytes = max_side, quality, shard_bytes


def write_shards(
    source: ShardSource, out: Path, settings: ShardWriterSettings, *, advance: Callable[[int], None] = lambda n: None
) -> WriteReport:
    """Every split of `source` as shards in `out`; `advance(n)` after each n items read. One
    writer at a time: a second one into the same folder is refused."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write shards into {out}: {error.strerror}; choose a writable folder") from None
    lock = FileLock(out / LOCK_FILE)
    if not lock.acquire():
        raise UserError(
            f"{out} is being written by {describe_holder(out / LOCK_FILE)}: wait for it to end, or write into another folder"
        )
    try:
        return _write_splits(source, out, settings, advance)
    finally:
        lock.release()


def _write_splits(source: ShardSource, out: Path, settings: ShardWriterSettings, advance: Callable[[int], None]) -> WriteReport:
    from webdataset import TarWriter

    for stale in out.glob(".part-*"):  # a shard a killed run left unfinished
        stale.unlink()
    report = WriteReport()
    info: dict[str, Any] = {"name": source.name, "splits": {}}
    for split, dataset in source.splits.items():
        done = _complete_shards(out, source.name, split)
        start = _next_index(done)
        report.resumed[split] = sum(len(index) for _, index in done)
        advance(start)
        shard_names, lengths = [path.name for path, _ in done], [len(index) for _, index in done]
        writer, part, shard_size, count = None, None, 0, 0

        def close() -> None:
            nonlocal writer, count
            if writer is None:
                return
            writer.close()
            final = out / _shard_name(source.name, split, len(shard_names))
            os.replace(part, final)
            shard_names.append(final.name), lengths.append(count)
            writer, count = None, 0

        for index in range(start, len(dataset)):
            name = source.item_names[split](index)
            try:
                image, label = dataset[index]
                data, extension = _encoded(image, name, settings)
            except OSError as error:
                report.unreadable.append(f"{name}: {error_line(error)}")
                advance(1)
                continue
            if writer is not None and shard_size + len(data) > settings.shard_bytes:
                close()
            if writer is None:
                part = out / f".part-{_shard_name(source.name, split, len(shard_names))}"
                writer, shard_size = TarWriter(str(part), mtime=0), 0  # an int: a float time adds a PAX header to every member
            key = f"{index:08d}-{_key_safe(Path(name).stem)}"
            writer.write({"__key__": key, extension: data, "cls": str(int(label))})
            shard_size += len(data) + 1536  # the image, its label and their tar headers
            count += 1
            advance(1)
        close()
        report.written[split] = sum(lengths)
        report.shards[split] = len(shard_names)
        info["splits"][split] = {"name": split, "filenames": shard_names, "shard_lengths": lengths,
                                 "num_samples": sum(lengths)}  # fmt: skip
    (out / CLASSES_FILE).write_text("".join(f"{name}\n" for name in source.class_names), encoding="utf-8")
    _write_atomically(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
    return report


def _shard_name(prefix: str, split: str, number: int) -> str:
    return f"{prefix}-{split}-{number:04d}.tar"


def _key_safe(stem: str) -> str:
    """A file stem as a key: webdataset splits a key from its extension at the first dot."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:80]


def _complete_shards(out: Path, prefix: str, split: str) -> list[tuple[Path, ShardIndex]]:
    """The shards of `split` a previous run finished, numbered 0, 1, ... without a gap, with
    their indexes."""
    done = []
    while (path := out / _shard_name(prefix, split, len(done))).is_file():
        done.append((path, load_index(path, str(path))))
    return done


def _next_index(done: list[tuple[Path, ShardIndex]]) -> int:
    """The source index after the last one a previous run wrote (keys start with it)."""
    for _, index in reversed(done):
        if len(index):
            return int(index.keys[-1].split("-", 1)[0]) + 1
    return 0


def _encoded(image: Any, name: str, settings: ShardWriterSettings) -> tuple[bytes, str]:
    """The bytes to store and their extension. Source files are kept as they are unless
    larger than `max_side`; decoded images (torchvision datasets) are stored as PNG, lossless."""
    if isinstance(image, Image.Image):
        if settings.max_side is not None and max(image.size) > settings.max_side:
            return _jpeg(_shrunk(image, settings.max_side), settings.quality), "jpg"
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue(), "png"
    encoded = EncodedImage(name, image.data)
    found = probe(encoded)
    if settings.max_side is not None and max(found.height, found.width) > settings.max_side:
        upright = decode_upright(encoded, found, 8) if found.scalable else None
        if upright is None:
            upright = Image.fromarray(decode_whole(encoded).permute(1, 2, 0).numpy())
        return _jpeg(_shrunk(upright, settings.max_side), settings.quality), "jpg"
    # Kept: checked here, so a damaged file is reported now rather than in training.
    if not found.scalable or decode_stored(encoded, found, 1) is None:
        decode_whole(encoded)  # raises OSError naming the file where it does not decode
    return image.data.tobytes(), _extension(name)


def _extension(name: str) -> str:
    extension = Path(name).suffix.lower().lstrip(".")
    return "jpg" if extension in ("jpg", "jpeg", "jpe", "jfif") else extension or "jpg"


def _shrunk(image: Image.Image, max_side: int) -> Image.Image:
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: Pillow first shrinks by whole factors, then filters: as good, faster.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _write_atomically(path: Path, text: str) -> None:
    part = path.with_name(f".part-{path.name}")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def source_of(data) -> ShardSource:
    """The splits of a recipe's data section (`DataSection`), unaugmented: an ImageFolder's or
    a shard set's files as bytes, a torchvision dataset's items as PIL images."""
    from gtrain.data.datasets import item_name, raw_splits

    splits, class_names = raw_splits(data)
    names = {split: functools.partial(item_name, dataset, split=split) for split, dataset in splits.items()}
    root = data.root.rstrip("/")
    prefix = _key_safe(Path(root).name if data.dataset.lower() in ("imagefolder", "shards") else data.dataset)
    return ShardSource(prefix or "shards", splits, names, class_names)
