"""Shards against the image folder they were written from, on this machine, in one run.

1. Recipe to first batch, 100,000 small JPEGs (64x64, 100 classes): a fresh process builds
   the recipe's data and loader (2 workers) and takes one batch; the time from building the
   data to holding the batch (imports excluded: the same for both). The folder lists its
   100,000 files; the shards read their cached index ("warm"; "cold" is the first start,
   which builds the index). Median of `--repeats` starts, alternated. Also the time to the
   datasets alone (before the loader starts its workers).
2. Loader images/s on the same images: `--batches` batches of 64 at 56 px after the first,
   2 workers, RandomResizedCrop and flip, as `gtrain fit` builds the loader.
3. Phone-size photos: 4032x3024 JPEGs in a folder against the same photos written with
   `gtrain shards --max-side 512`: loader images/s at 224 px, batch 32, 2 workers.

    python benchmarks/shards.py [--images 100000] [--photos 64] [--repeats 3] [--work DIR] [--json]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FIRST_BATCH = """
import sys, time
start = time.perf_counter()
from gtrain.data.datasets import build_data
from gtrain.data.loaders import build_loaders
from gtrain.distributed import World
from gtrain.recipe import DataSection
import torch
imported = time.perf_counter()
data = build_data(DataSection(dataset=sys.argv[1], root=sys.argv[2], image_size=56, workers=2, batch_size=64))
built = time.perf_counter()
train, sampler, _ = build_loaders(data, global_batch=64, seed=0, workers=2, device=torch.device("cpu"), world=World())
next(iter(train.loader))
print(built - imported, time.perf_counter() - imported)
"""


def write_small_jpegs(root: Path, count: int, classes: int = 100) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (classes, 8, 8, 3), dtype=np.uint8)
    for index in range(count):
        label = index % classes
        folder = root / "train" / f"class{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(base[label]).resize((64, 64), Image.BILINEAR)
        noisy = np.clip(np.asarray(small, dtype=np.int16) + rng.integers(-20, 21, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{index:06d}.jpg", quality=90)
    val = root / "val" / "class000"
    val.mkdir(parents=True, exist_ok=True)
    for path in sorted((root / "train").glob("class*/000*.jpg"))[:1]:  # validation is not timed
        for label in range(classes):
            (root / "val" / f"class{label:03d}").mkdir(exist_ok=True)
            (root / "val" / f"class{label:03d}" / path.name).write_bytes(path.read_bytes())


def write_shards(folder: Path, out: Path, *options: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gtrain", "shards", str(folder), str(out), *options], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def first_batch_s(dataset: str, root: Path) -> tuple[float, float]:
    """Seconds from the recipe to its datasets, and to the first batch."""
    done = subprocess.run([sys.executable, "-c", FIRST_BATCH, dataset, str(root)], check=True, capture_output=True, text=True)
    built, batch = map(float, done.stdout.strip().splitlines()[-1].split())
    return built, batch


def loader_images_per_s(dataset: str, root: Path, *, size: int, batch: int, batches: int) -> float:
    import torch

    from gtrain.data.datasets import build_data
    from gtrain.data.loaders import build_loaders
    from gtrain.distributed import World
    from gtrain.recipe import DataSection

    data = build_data(DataSection(dataset=dataset, root=str(root), image_size=size, workers=2, batch_size=batch))
    train, _, _ = build_loaders(data, global_batch=batch, seed=0, workers=2, device=torch.device("cpu"), world=World())
    iterator = iter(train.loader)
    next(iterator)  # the workers started
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        try:
            inputs, _ = next(iterator)
        except StopIteration:
            iterator = iter(train.loader)
            inputs, _ = next(iterator)
        images += len(inputs)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--work", type=Path, default=None, help="keep the written data here (and reuse it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gtrain-shards-bench-"))
    results: dict[str, object] = {}

    folder, shards = work / "small", work / "small-shards"
    if not folder.exists():
        start = time.perf_counter()
        write_small_jpegs(folder, args.images)
        results["write_folder_s"] = time.perf_counter() - start
    if not shards.exists():
        results["write_shards_s"] = write_shards(folder, shards, "--shard-size", "16MB")
    results["datasets_shards_cold_s"], results["first_batch_shards_cold_s"] = first_batch_s("shards", shards)
    times: dict[str, list[tuple[float, float]]] = {"folder": [], "shards": []}
    for _ in range(args.repeats):
        times["folder"].append(first_batch_s("ImageFolder", folder))
        times["shards"].append(first_batch_s("shards", shards))
    for name, runs in times.items():
        results[f"datasets_{name}_s"] = statistics.median(built for built, _ in runs)
        results[f"first_batch_{name}_s"] = statistics.median(batch for _, batch in runs)
    results["datasets_speedup"] = results["datasets_folder_s"] / results["datasets_shards_s"]
    results["first_batch_speedup"] = results["first_batch_folder_s"] / results["first_batch_shards_s"]
    for name, dataset, root in (("folder", "ImageFolder", folder), ("shards", "shards", shards)):
        results[f"small_{name}_images_per_s"] = loader_images_per_s(dataset, root, size=56, batch=64, batches=args.batches)

    photos, photo_shards = work / "photos", work / "photos-512"
    if not photos.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from phone_photos import write_photos

        rng = np.random.default_rng(0)
        write_photos(photos, "train", args.photos, rng)
        write_photos(photos, "val", 4, rng)
    if not photo_shards.exists():
        results["write_photo_shards_s"] = write_shards(photos, photo_shards, "--max-side", "512")
    for name, dataset, root in (("folder", "ImageFolder", photos), ("shards_512", "shards", photo_shards)):
        results[f"photos_{name}_images_per_s"] = loader_images_per_s(dataset, root, size=224, batch=32,
                                                                     batches=max(4, args.photos // 32 * 3))  # fmt: skip
    results["photos_speedup"] = results["photos_shards_512_images_per_s"] / results["photos_folder_images_per_s"]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for key, value in results.items():
            print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")


if __name__ == "__main__":
    main()
