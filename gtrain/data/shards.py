"""WebDataset tar shards read by sample index, so that a shard set behaves as an image folder.

A shard is a tar file whose members are grouped into samples by key: `KEY.jpg` (or .png,
.webp, ...) with the image's bytes and `KEY.cls` with its class index as text. This is the
layout webdataset writes, timm reads, and the Hugging Face hub serves image datasets in.

Streaming readers of that layout (webdataset's pipeline, timm's reader) cannot resume an
epoch in the middle, and uneven shards give the processes unequal sample counts. Here a
shard set is a map-style dataset instead: each shard's index (every sample's key, the
offset and size of its image, its label) is built once by reading the tar headers and
cached, and sample i is read with one seek. gtrain's sampler, sharding over processes,
resume, validation and evaluation then work on shards exactly as on folders.

Where the shards are (`data.root`):
- a local folder: the splits that `_info.json` lists (timm's layout), else the shards in
  sub-folders train/, val/ and test/, else the folder's shards split by their names;
- a brace pattern, e.g. `/data/in1k-{train-{0000..1023},validation-{00..63}}.tar`: those
  shards, split by their names (a name holding "train", "val"/"validation" or "test");
- an http(s) URL of a folder with an `_info.json`, or a URL pattern: each shard is
  downloaded once into the cache (`$GTRAIN_CACHE`, default ~/.cache/gtrain) while it is under
  `data.shard_cache_gb`; past it, samples are read with HTTP range requests. Other schemes
  (s3://, gs://) go through fsspec where it is installed.
Class names come from `classes.txt` beside the shards (one per line, as `gtrain shards`
writes it); without it, the classes are "0", "1", ... up to the largest training label.
"""

import hashlib
import json
import os
import re
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from gtrain.data.images import EncodedImage
from gtrain.errors import UserError, error_line

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LABEL_EXTENSION = "cls"
INFO_FILE = "_info.json"  # timm's layout: {"splits": {"train": {"filenames": [...], "shard_lengths": [...]}}}
CLASSES_FILE = "classes.txt"
# The words of a shard's name that say its split, as the hub's sets name them
# (imagenet1k-train-0000.tar, imagenet1k-validation-00.tar).
SPLIT_WORDS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
INDEX_VERSION = 2  # bumped when the cached index's contents change
NO_LABEL = np.iinfo(np.int64).min  # a sample without a .cls: refused in training, fine to predict


def cache_dir() -> Path:
    """Where remote shards and every shard's index are cached: $GTRAIN_CACHE, else
    $XDG_CACHE_HOME/gtrain, else ~/.cache/gtrain."""
    if os.environ.get("GTRAIN_CACHE"):
        return Path(os.environ["GTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gtrain"


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


# ---------------------------------------------------------------------------------------------
# Finding the shards of a split
# ---------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """A brace pattern's names in order: `a-{000..002}.tar` and `{train,val}` as a shell
    expands them (webdataset's braceexpand)."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise UserError(f"data.root = {pattern!r} is a brace pattern: pip install 'gtrain[shards]'") from None
    return list(braceexpand(pattern))


def split_of(shard: str) -> str | None:
    """The split a shard's file name says, or None."""
    words = set(re.split(r"[^a-z0-9]+", Path(urllib.parse.urlparse(shard).path).name.lower()))
    found = [split for split, names in SPLIT_WORDS.items() if words & set(names)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class ShardSetLayout:
    """The shards of every split of a set, and its class names where it has them."""

    splits: dict[str, list[str]]  # "train", "val", "test" -> shard paths or URLs, in order
    class_names: tuple[str, ...] | None
    where: str  # data.root, for messages


def find_shards(root: str) -> ShardSetLayout:
    """Where the shards of each split of `root` (data.root) are, by the rules above."""
    if "{" in root:
        shards = expand_braces(root)
        base = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
        return ShardSetLayout(_split_by_name(shards, root), _read_class_names(base), root)
    if is_remote(root):
        base = root.rstrip("/")
        if base.endswith(".tar"):
            return ShardSetLayout(_split_by_name([base], root), _read_class_names(base.rsplit("/", 1)[0]), root)
        info = _read_text(f"{base}/{INFO_FILE}")
        if info is None:
            raise UserError(
                f"shards: {base}/{INFO_FILE} not found, and a URL's folder cannot be listed: set data.root to a "
                "brace pattern of the shards' URLs, e.g. https://host/set-train-{0000..0099}.tar"
            )
        return ShardSetLayout(_splits_from_info(info, base), _read_class_names(base), root)
    folder = Path(root.removeprefix("file://"))
    if folder.is_file():
        return ShardSetLayout(_split_by_name([str(folder)], root), _read_class_names(str(folder.parent)), root)
    if not folder.is_dir():
        raise UserError(f"shards: {root} does not exist: set data.root to a folder of .tar shards, a brace pattern or a URL")
    info_path = folder / INFO_FILE
    if info_path.is_file():
        splits = _splits_from_info(info_path.read_text(), str(folder))
    elif any((folder / split).is_dir() for split in SPLIT_WORDS):
        splits = {split: sorted(str(p) for p in (folder / split).glob("*.tar")) for split in SPLIT_WORDS}
        splits = {split: shards for split, shards in splits.items() if shards}
    else:
        splits = _split_by_name(sorted(str(p) for p in folder.glob("*.tar")), root)
    if not splits:
        raise UserError(f"shards: no .tar shards in {folder}: write some with `gtrain shards SOURCE {folder}`")
    return ShardSetLayout(splits, _read_class_names(str(folder)), root)


def _split_by_name(shards: list[str], root: str) -> dict[str, list[str]]:
    """Shards grouped by the split their names say; a set whose names say none is all train."""
    named = {shard: split_of(shard) for shard in shards}
    if not any(named.values()):
        return {"train": shards} if shards else {}
    unnamed = [shard for shard, split in named.items() if split is None]
    if unnamed:
        raise UserError(
            f"shards: {unnamed[0]} in {root} has no split in its name while others do: name every shard with "
            "train, val or test, or keep the splits in sub-folders train/, val/ and test/"
        )
    splits: dict[str, list[str]] = {}
    for shard, split in named.items():
        splits.setdefault(split, []).append(shard)
    return splits


def _splits_from_info(text: str, base: str) -> dict[str, list[str]]:
    """timm's `_info.json`: each split's `filenames`, relative to the folder that holds it
    (each may itself be a brace pattern)."""
    try:
        info = json.loads(text)
        entries = info["splits"]
        splits = {}
        for name, entry in entries.items():
            ours = next((split for split, words in SPLIT_WORDS.items() if name.lower() in words), name)
            names = [n for pattern in entry["filenames"] for n in (expand_braces(pattern) if "{" in pattern else [pattern])]
            splits[ours] = [n if "://" in n or n.startswith("/") else f"{base}/{n}" for n in names]
        return splits
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"shards: {base}/{INFO_FILE} is not in timm's layout ({error_line(error)}): it needs "
            '{"splits": {"train": {"filenames": [...]}}}; fix it or remove it'
        ) from None


def _read_class_names(base: str) -> tuple[str, ...] | None:
    text = _read_text(f"{base}/{CLASSES_FILE}")
    return None if text is None else tuple(line for line in text.splitlines() if line)


def _read_text(location: str) -> str | None:
    """A small file beside the shards, or None where it does not exist."""
    if not is_remote(location):
        path = Path(location.removeprefix("file://"))
        return path.read_text(encoding="utf-8") if path.is_file() else None
    try:
        return _remote_bytes(location).decode("utf-8")
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Remote shards: a local copy while the cache has room, range requests past it
# ---------------------------------------------------------------------------------------------


def _remote_bytes(url: str, start: int | None = None, size: int | None = None) -> bytes:
    """A remote file's bytes, or `size` of them from `start`. FileNotFoundError where it is missing."""
    if url.startswith(("http://", "https://")):
        request = urllib.request.Request(url)
        if start is not None:
            request.add_header("Range", f"bytes={start}-{start + size - 1}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                ranged = response.status == 206
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise FileNotFoundError(url) from None
            raise _unreadable(url, error) from None
        except (urllib.error.URLError, OSError) as error:
            raise _unreadable(url, error) from None
        if start is not None and not ranged:  # a server without range requests sends it all
            body = body[start : start + size]
        return body
    filesystem, path = _filesystem(url)
    try:
        if start is None:
            return filesystem.cat_file(path)
        return filesystem.cat_file(path, start, start + size)
    except FileNotFoundError:
        raise
    except Exception as error:  # fsspec's back ends raise their own types
        raise _unreadable(url, error) from None


def _remote_size(url: str) -> int:
    """A remote file's size in bytes (-1 where the server does not say)."""
    if not url.startswith(("http://", "https://")):
        filesystem, path = _filesystem(url)
        try:
            return int(filesystem.size(path))
        except FileNotFoundError:
            raise UserError(f"shards: {url} not found: check data.root") from None
        except Exception as error:  # fsspec's back ends raise their own types
            raise _unreadable(url, error) from None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as response:
            return int(response.headers.get("Content-Length", -1))
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise UserError(f"shards: {url} not found: check data.root") from None
        raise _unreadable(url, error) from None
    except (urllib.error.URLError, OSError) as error:
        raise _unreadable(url, error) from None


def _unreadable(url: str, error: Exception) -> UserError:
    if isinstance(error, urllib.error.HTTPError):
        return UserError(f"shards: {url}: HTTP {error.code} {error.reason}: check the URL and its access")
    return UserError(f"shards: {url} cannot be read ({error_line(error)}): check the network, the URL and its credentials")


def _filesystem(url: str):
    """fsspec's file system for a URL of another scheme than http(s) (s3://, gs://, ...), and the path in it."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError:
        raise UserError(f"shards: {url} needs fsspec for its scheme: pip install fsspec and its s3fs or gcsfs") from None
    except ValueError as error:  # a scheme fsspec does not know, or its back end is missing
        raise UserError(f"shards: {url}: {error_line(error)}: install the fsspec back end for its scheme") from None


class RemoteShardCache:
    """Local copies of remote shards under `cache_dir()/shards`, at most `limit_bytes` of them.
    A copy is written to a temporary file and renamed, so processes that fetch the same shard
    at once each end with a whole file; the oldest copies go first when the cache is full."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.folder = cache_dir() / "shards"

    def path(self, url: str) -> Path:
        name = Path(urllib.parse.urlparse(url).path).name
        return self.folder / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"

    def fetch(self, url: str) -> tuple[Path, bool]:
        """A local copy of `url`, downloaded now if it is missing, and whether the cache keeps
        it: older copies make room for it; where it does not fit, the caller indexes it and
        removes it."""
        local = self.path(url)
        if local.is_file():
            return local, True
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            body = _remote_bytes(url)
        except FileNotFoundError:
            raise UserError(f"shards: {url} not found: check data.root") from None
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".part-", delete=False) as part:
            part.write(body)
        os.replace(part.name, local)
        return local, self._make_room(local)

    def _make_room(self, new: Path) -> bool:
        """Remove the oldest other copies until `new` fits; False where it cannot."""
        if _size(new) > self.limit_bytes:
            return False
        others = sorted((p for p in self.folder.iterdir() if not p.name.startswith(".") and p != new), key=_mtime)
        total = _size(new) + sum(_size(p) for p in others)
        for copy in others:
            if total <= self.limit_bytes:
                break
            total -= _size(copy)
            copy.unlink(missing_ok=True)
        return True

    def read(self, url: str, start: int, size: int) -> bytes:
        local = self.path(url)
        try:
            with open(local, "rb") as file:
                file.seek(start)
                return file.read(size)
        except FileNotFoundError:  # evicted, or never kept: read the sample's bytes alone
            return _remote_bytes(url, start, size)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------------------------
# One shard's index
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    """Every sample of one shard, in the order the tar holds them."""

    # The image members' names (KEY.jpg), one per line: split only for a message or a
    # prediction's name, so that a set of a million images opens in milliseconds.
    names_text: str
    offsets: np.ndarray  # int64: where the image's bytes start in the tar
    sizes: np.ndarray  # int64: how many bytes it has
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def image_names(self) -> list[str]:
        return self.names_text.split("\n") if len(self) else []

    @property
    def keys(self) -> list[str]:
        return [_key_and_extension(name)[0] for name in self.image_names]


def build_index(tar_path: Path, shard: str) -> ShardIndex:
    """Read a shard's tar headers (and its tiny .cls members) into its index. A truncated
    shard is one line naming the shard and the last key read."""
    samples: dict[str, dict[str, Any]] = {}
    file_size = tar_path.stat().st_size
    last_key = "its first sample"
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _key_and_extension(member.name)
                if key.startswith("__") or Path(key).name.startswith("_"):
                    continue  # webdataset's own metadata members
                sample = samples.setdefault(key, {})
                last_key = key
                if member.offset_data + member.size > file_size:
                    raise _truncated(shard, key)
                if extension == LABEL_EXTENSION:
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    try:
                        sample["label"] = int(text)
                    except ValueError:
                        raise UserError(
                            f"shards: {shard}: {key}.{LABEL_EXTENSION} holds {text[:40]!r}, not a class index: write "
                            "the label as an integer"
                        ) from None
                elif extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                    sample["image"] = (f"{key}.{extension}", member.offset_data, member.size)
    except tarfile.ReadError as error:
        raise _truncated(shard, last_key, error) from None
    names, offsets, sizes, labels = [], [], [], []
    for sample in samples.values():
        if "image" not in sample:
            continue  # a sample of other members (text, metadata) only
        name, offset, size = sample["image"]
        names.append(name), offsets.append(offset), sizes.append(size), labels.append(sample.get("label", NO_LABEL))
    as_int = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return ShardIndex("\n".join(names), as_int(offsets), as_int(sizes), as_int(labels))


def _key_and_extension(member: str) -> tuple[str, str]:
    """webdataset's grouping: the key is the name up to the first dot of its last part."""
    folder, _, name = member.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _truncated(shard: str, key: str, error: Exception | None = None) -> UserError:
    reason = f" ({error_line(error)})" if error else ""
    return UserError(f"shards: {shard} is truncated or damaged after sample {key}{reason}: write or download it again")


def load_index(tar_path: Path, shard: str) -> ShardIndex:
    """A local shard's index from the cache, built and cached when the shard is new or
    changed (the cache entry is named by the shard's path, size and modification time)."""
    stat = tar_path.stat()
    identity = f"{tar_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return _cached_index(identity) or _store_index(identity, build_index(tar_path, shard))


def _index_path(identity: str) -> Path:
    return cache_dir() / "index" / f"{hashlib.sha256(f'{INDEX_VERSION}|{identity}'.encode()).hexdigest()[:24]}.npz"


def _cached_index(identity: str) -> ShardIndex | None:
    try:
        with np.load(_index_path(identity)) as stored:
            return ShardIndex(str(stored["names"]), stored["offsets"], stored["sizes"], stored["labels"])
    except (OSError, KeyError, ValueError):
        return None


def _store_index(identity: str, index: ShardIndex) -> ShardIndex:
    cached = _index_path(identity)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, prefix=".part-", suffix=".npz", delete=False) as part:
            np.savez(part, names=np.asarray(index.names_text), offsets=index.offsets, sizes=index.sizes,
                     labels=index.labels)  # fmt: skip
        os.replace(part.name, cached)
    except OSError:
        pass  # a read-only cache: the index is built again next time
    return index


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class ShardDataset(Dataset):
    """The samples of some shards as a map-style dataset: item i is (transform(EncodedImage),
    label), as an ImageFolder's with `read_encoded`, and `targets` lists every label."""

    def __init__(self, shards: list[str], *, transform: Any = None, cache_limit_bytes: int = 0, split: str = "train"):
        self.shards = shards
        self.transform = transform
        self.split = split
        self.remote = RemoteShardCache(cache_limit_bytes)
        self.indexes = indexes = [self._index(shard) for shard in shards]
        self.lengths = [len(index) for index in indexes]
        self.starts = np.cumsum([0, *self.lengths])
        self.offsets = np.concatenate([index.offsets for index in indexes]) if indexes else np.zeros(0, np.int64)
        self.sizes = np.concatenate([index.sizes for index in indexes]) if indexes else np.zeros(0, np.int64)
        self.labels = np.concatenate([index.labels for index in indexes]) if indexes else np.zeros(0, np.int64)
        self._names: dict[int, list[str]] = {}  # shard -> its image names, split when first asked for

    def _index(self, shard: str) -> ShardIndex:
        if is_remote(shard):
            # Named by URL and size (one HEAD request): a set's index is built once, not at every start.
            identity = f"{shard}|{_remote_size(shard)}"
            index = _cached_index(identity)
            if index is None:
                local, kept = self.remote.fetch(shard)
                try:
                    index = _store_index(identity, build_index(local, shard))
                finally:
                    if not kept:
                        local.unlink(missing_ok=True)
            return index
        path = Path(shard.removeprefix("file://"))
        if not path.is_file():
            raise UserError(f"shards: {shard} does not exist: check data.root")
        return load_index(path, shard)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def location(self, index: int) -> tuple[str, str]:
        """(shard, image member name) of sample `index`."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        if shard not in self._names:
            self._names[shard] = self.indexes[shard].image_names
        return self.shards[shard], self._names[shard][index - int(self.starts[shard])]

    def read(self, index: int) -> EncodedImage:
        shard, name = self.location(index)
        start, size = int(self.offsets[index]), int(self.sizes[index])
        if is_remote(shard):
            data = np.frombuffer(bytearray(self.remote.read(shard, start, size)), dtype=np.uint8)
        else:
            data = np.empty(size, dtype=np.uint8)
            with open(shard.removeprefix("file://"), "rb") as file:
                file.seek(start)
                if file.readinto(data) != size:
                    raise OSError(f"{shard}: {name} ends early: the shard changed since it was indexed")
        return EncodedImage(f"{shard}:{name}", data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.read(index)
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])

    def check_labels(self, num_classes: int | None = None) -> None:
        """Every sample has a label and (given `num_classes`) it is a class index: one line
        naming the shard and the key where one is not."""
        missing = np.flatnonzero(self.labels == NO_LABEL)
        if missing.size:
            shard, name = self.location(int(missing[0]))
            key = name.partition(".")[0]
            raise UserError(
                f"shards: {shard}: sample {key} has no label ({key}.{LABEL_EXTENSION}): add one, or leave the sample out"
            )
        outside = self.labels < 0 if num_classes is None else (self.labels < 0) | (self.labels >= num_classes)
        bad = np.flatnonzero(outside)
        if bad.size:
            shard, name = self.location(int(bad[0]))
            valid = "a class index (0 or more)" if num_classes is None else f"{num_classes} classes (0 to {num_classes - 1})"
            raise UserError(
                f"shards: {shard}: {name.partition('.')[0]} has label {int(self.labels[bad[0]])}, out of range for "
                f"{valid}: fix its .cls, or list every class in {CLASSES_FILE}"
            )

