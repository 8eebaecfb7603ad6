"""`gtrain predict` against timm's inference.py: the same weights, the same folder of JPEGs.

The script writes a folder of JPEGs of its own (photograph-like 320x240 images: smooth
colour fields, edges and noise; no download), one set of resnext50_32x4d weights (random,
seed 0, 1000 classes; torchvision's layout, which timm's model shares key for key) as a
gtrain .safetensors and as a timm checkpoint, then classifies the folder with both tools,
top-5 to a CSV file, batch 32, 2 workers, on the CPU, and compares:

    images/s  images / wall seconds of the whole command, start-up included
    top-1 agreement  the share of images both tools give the same top class (the resize
                     differs: gtrain bilinear, as it trains; timm bicubic, its default)

Each tool runs in fp32, and gtrain also in its default precision (auto: bf16 on a CPU with
avx512_bf16) against timm with --amp --amp-dtype bfloat16.

inference.py is not in the timm package: take it from timm's repository at the tag of the
installed version (v1.0.28 is commit 8ef73809f622e0031bd7f4940265734aef8b9978):

    git -C /tmp/timm-repo show v1.0.28:inference.py > /tmp/timm/inference.py
    python benchmarks/predict_vs_timm.py --timm-inference /tmp/timm/inference.py
"""

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gtrain.checkpoint import WeightsMeta, save_weights
from gtrain.models import create_model

MODEL = "resnext50_32x4d"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320] / 240
    for index in range(count):
        field = sum(rng.uniform(0, 255, 3) * np.sin(rng.uniform(1, 8) * (x * np.cos(a) + y * np.sin(a)) + rng.uniform(0, 6))[..., None]
                    for a in rng.uniform(0, np.pi, 3)) / 3 + 128  # fmt: skip
        field[rng.uniform(0, 1, field.shape[:2]) < 0.02] = 255
        image = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{index:05d}.jpg", quality=90)


def write_weights(work: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=1000, in_chans=3)
    meta = WeightsMeta(model=MODEL, num_classes=1000, in_chans=3, image_size=224, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, class_names=tuple(str(k) for k in range(1000)), dataset="ImageFolder",
                       model_settings={})  # fmt: skip
    gtrain_weights, timm_weights = work / "weights.safetensors", work / "timm_checkpoint.pth"
    save_weights(gtrain_weights, model, meta)
    torch.save(model.state_dict(), timm_weights)
    return gtrain_weights, timm_weights


def timed(command: list[str], log: Path) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"exit code {done.returncode}; the end of {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def gtrain_top1(path: Path) -> dict[str, str]:
    with path.open(newline="") as file:
        return {Path(row["path"]).name: row["class"] for row in csv.DictReader(file)}


def timm_top1(path: Path) -> dict[str, str]:
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    # inference.py's columns with --include-index: filename, index "[i1 i2 ...]" (the top-k class
    # indices, here equal to the class names), prob "[p1 p2 ...]".
    return {Path(row["filename"]).name: row["index"].strip("[]").split()[0] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm-inference", type=Path, required=True)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gtrain-predict-vs-timm")
    args = parser.parse_args()

    work = args.out.resolve()
    images = work / "jpegs"
    if not images.is_dir() or len(list(images.glob("*.jpg"))) != args.images:
        shutil.rmtree(images, ignore_errors=True)
        write_jpegs(images, args.images)
    gtrain_weights, timm_weights = write_weights(work)

    runs = []
    for gtrain_precision, timm_amp in (("fp32", False), ("auto", True)):
        preds = work / f"gtrain_{gtrain_precision}.csv"
        gtrain_s = timed([sys.executable, "-m", "gtrain", "predict", str(gtrain_weights), str(images), "--out", str(preds),
                          "--topk", "5", "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                          "--device", "cpu", "--precision", gtrain_precision], work / f"gtrain_{gtrain_precision}.log")  # fmt: skip
        timm_dir = work / f"timm_{'bf16' if timm_amp else 'fp32'}"
        timm_command = [sys.executable, str(args.timm_inference), "--data-dir", str(images), "--model", MODEL,
                        "--checkpoint", str(timm_weights), "--num-classes", "1000", "-b", str(args.batch_size),
                        "-j", str(args.workers), "--topk", "5", "--device", "cpu", "--results-dir", str(timm_dir),
                        "--results-format", "csv", "--include-index", "--no-console-results"]  # fmt: skip
        if timm_amp:
            timm_command += ["--amp", "--amp-dtype", "bfloat16"]
        timm_s = timed(timm_command, work / f"{timm_dir.name}.log")
        ours, theirs = gtrain_top1(preds), timm_top1(next(timm_dir.glob("*.csv")))
        agreement = sum(ours[name] == theirs.get(name) for name in ours) / len(ours)
        runs.append({"gtrain_precision": gtrain_precision, "timm": "bf16 amp" if timm_amp else "fp32",
                     "gtrain_images_per_s": args.images / gtrain_s, "timm_images_per_s": args.images / timm_s,
                     "gtrain_s": gtrain_s, "timm_s": timm_s, "top1_agreement": agreement})  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
    print("\n| gtrain precision | timm | gtrain images/s | timm images/s | ratio | top-1 agreement |\n|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['gtrain_precision']} | {run['timm']} | {run['gtrain_images_per_s']:.1f} | {run['timm_images_per_s']:.1f} "
              f"| {run['gtrain_images_per_s'] / run['timm_images_per_s']:.2f} | {run['top1_agreement']:.1%} |")


if __name__ == "__main__":
    main()
