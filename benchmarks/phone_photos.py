"""Training on phone-size photos: the scaled decode (data.decode = "cpu") against decoding
every image whole ("cpu-full"), same recipe and seeds: validation top-1 and wall time.

The script writes its own ImageFolder of 4032x3024 JPEGs (quality 92, what a phone camera
writes; no download) in 4 classes that differ in fine structure, not in colour: stripes
across, stripes down, diagonal stripes (either way, so that a flip keeps the class) and
none, each on random colours, with a period of 120-400 px at full size, low contrast and
sensor-like noise (4.6 MB a file). Then, for each seed,

    gtrain fit quickstart --set data.dataset=ImageFolder --set data.root=FOLDER
        --set model.stage_depths=[1,1,1] --set data.image_size=32 --set data.batch_size=16
        --set data.workers=2 --set optim.lr=0.05 --set train.epochs=EPOCHS
        --set data.decode=cpu|cpu-full --set train.seed=SEED

and prints the best validation top-1 (run.json) and the wall time of each.

    python benchmarks/phone_photos.py [--train 240] [--val 80] [--epochs 10] [--seeds 0 1] [--photos DIR]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT, QUALITY = 4032, 3024, 92
CLASSES = ("across", "down", "diagonal", "none")


def write_photos(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    # Drawn at a quarter of the size and enlarged, then noise at full size: about 1 s an image.
    y, x = np.mgrid[0:HEIGHT // 4, 0:WIDTH // 4].astype(np.float32) * 4
    noise = rng.normal(0, 10, (512, 512, 3)).astype(np.float32)
    for index in range(count):
        label = CLASSES[index % len(CLASSES)]
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        angle = {"across": 0.0, "down": np.pi / 2, "diagonal": rng.choice([np.pi / 4, 3 * np.pi / 4]), "none": 0.0}[label]
        period = rng.uniform(120, 400)
        stripes = np.sin(2 * np.pi * (x * np.sin(angle) + y * np.cos(angle)) / period + rng.uniform(0, 6))
        if label == "none":
            stripes = np.zeros_like(stripes)
        colours = rng.uniform(60, 200, 3).astype(np.float32)
        small = colours + rng.uniform(15, 35) * stripes[..., None]
        image = np.asarray(Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC))
        offset = rng.integers(0, 512, 2)
        tiled = np.roll(np.tile(noise, (HEIGHT // 512 + 1, WIDTH // 512 + 1, 1)), tuple(offset), axis=(0, 1))[:HEIGHT, :WIDTH]
        photo = np.clip(image + tiled, 0, 255).astype(np.uint8)
        Image.fromarray(photo).save(folder / f"{index:04d}.jpg", quality=QUALITY)


def fit(root: Path, out: Path, *, decode: str, seed: int, epochs: int) -> tuple[float, float]:
    settings = {"data.dataset": "ImageFolder", "data.root": root, "model.stage_depths": "[1,1,1]", "data.image_size": 32,
                "data.batch_size": 16, "data.workers": 2, "data.val_split": "val", "optim.lr": 0.05,
                "train.epochs": epochs, "data.decode": decode, "train.seed": seed}  # fmt: skip
    command = [sys.executable, "-m", "gtrain", "fit", "quickstart", "--out", str(out), "-q"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return json.loads((out / "run.json").read_text())["best_top1"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--val", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--photos", type=Path, help="the folder of photos: written there if missing, else reused")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gtrain-phone-"))
    photos = args.photos or work / "photos"
    try:
        if not (photos / "val").is_dir():
            rng = np.random.default_rng(0)
            write_photos(photos, "train", args.train, rng)
            write_photos(photos, "val", args.val, rng)
        files = list(photos.rglob("*.jpg"))
        print(f"{len(files)} JPEGs of {WIDTH}x{HEIGHT}, {sum(f.stat().st_size for f in files) / len(files) / 1e6:.2f} MB each",
              flush=True)  # fmt: skip
        for seed in args.seeds:
            for decode in ("cpu", "cpu-full"):
                top1, wall = fit(photos, work / f"{decode}-{seed}", decode=decode, seed=seed, epochs=args.epochs)
                print(f"seed {seed} data.decode={decode:<9} best val top-1 {top1:.2%}  wall {wall:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
