"""gtrain against timm's train.py: the same data, model and schedule, trained by both in one run.

The script draws an ImageFolder of its own (ten textures under clutter and noise, 100 train and
50 val images each; no download), then trains resnext50_32x4d from scratch on it with
`gtrain fit` and with timm's `train.py`: 64 px, batch 32, SGD lr 0.05, cosine schedule, no
warmup, 10 epochs, 2 workers, on the CPU. Everything else stays at each tool's default, so the
accuracies compare the tools as a user gets them, not two identical recipes. Both crop with
RandomResizedCrop (8-100% of the area), flip, smooth labels by 0.1, zero-initialize the last BN
of each block, use Nesterov momentum 0.9 and no weight decay on norms and biases. They differ in:

    timm 1.0.28                              gtrain
    weight decay 2e-5                        1e-4
    colour jitter 0.4                        none
    bilinear or bicubic crop, at random      bilinear
    lr stepped per epoch (last epoch 1.2e-3) per step, down to 0
    eval: resize 67 bicubic, crop 64 (0.95)  resize 73 bilinear, crop 64 (0.875)
    NCHW, fp32 (bf16 with --timm-amp)        channels-last, bf16 where the CPU has avx512_bf16
    seed 42                                  seed 0

images/s, for both tools: training images per second of training time in an epoch (from asking
the loader for the first batch to the last optimizer step; validation and checkpoints
excluded), the median over epochs 2..N so that the first epoch's warm-up does not count. gtrain
writes it per epoch in metrics.jsonl; for timm it is the running average that train.py logs on
the epoch's last batch. wall s: the whole command, start-up and validation included.

train.py is not in the timm package: take it from timm's repository at the tag of the
installed version (v1.0.28 is commit 8ef73809f622e0031bd7f4940265734aef8b9978):

    pip install timm==1.0.28
    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm-repo
    git -C /tmp/timm-repo show v1.0.28:train.py > /tmp/timm/train.py
    python benchmarks/vs_timm.py --timm-train /tmp/timm/train.py --timm-amp   # both bf16; about 9 min

Measured on a 2-vCPU AMD EPYC with avx512_bf16, torch 2.14.1, timm 1.0.28, 2026-12-02
(docs/benchmarks.md has the machine, earlier figures and the context), alone on the machine:

    | tool   | precision | val top-1 final | best (epoch) | train images/s | wall s |
    |--------|-----------|-----------------|--------------|----------------|--------|
    | gtrain | bf16      | 49.8%           | 49.8% (8)    | 49.0           | 244    |
    | timm   | fp32      | 48.4%           | 48.6% (9)    | 32.4           | 371    |

With their fixed seeds both tools repeat these top-1 figures run after run on the same
machine; images/s moves with the load of the machine.
"""

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import tomli_w
import torch
from PIL import Image

import gtrain
from gtrain import runtime

# What both tools are told; everything else is left at their defaults.
MODEL = "resnext50_32x4d"
IMAGE_SIZE = 64  # px
BATCH_SIZE = 32
LR = 0.05
WORKERS = 2
DEVICE = "cpu"

# Every pattern looks the same in a mirror (up to its random phase), so the random horizontal
# flip both tools apply by default keeps the class. Each fills the whole image, so the small
# random-resized crops both tools train on (down to 8% of the area) still show the class.
PATTERNS = ("h_stripes", "v_stripes", "waves", "zigzag", "checker", "grid", "hatch", "dots", "spots", "rings")
SUPERSAMPLE = 2  # drawn at 2x and averaged down: anti-aliased edges


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where the foreground colour goes, in the pattern's coordinates: one period is 1."""
    fu, fv = u % 1 - 0.5, v % 1 - 0.5  # position within the period, -0.5..0.5
    match pattern:
        case "h_stripes":
            return fv < 0
        case "v_stripes":
            return fu < 0
        case "waves":  # horizontal stripes bent by a sine two periods long
            return (v + 0.35 * np.sin(np.pi * u)) % 1 < 0.5
        case "zigzag":  # the same with a triangle wave
            return (v + 0.7 * abs(u / 2 % 1 - 0.5)) % 1 < 0.5
        case "checker":
            return (np.floor(u) + np.floor(v)) % 2 == 0
        case "grid":
            return (abs(fu) > 0.38) | (abs(fv) > 0.38)
        case "hatch":  # the grid turned by 45 degrees
            return pattern_mask("grid", (u + v) / np.sqrt(2), (v - u) / np.sqrt(2), rng)
        case "dots":
            return np.hypot(fu, fv) < 0.3
        case "spots":  # the dots' discs, scattered at random
            centres = rng.uniform([u.min(), v.min()], [u.max(), v.max()], (int(np.ptp(u) * np.ptp(v) * 0.8), 2))
            return np.any([np.hypot(u - cu, v - cv) < 0.3 for cu, cv in centres], axis=0)
        case "rings":
            cu, cv = rng.uniform([u.min(), v.min()], [u.max(), v.max()])
            return np.hypot(u - cu, v - cv) % 1 < 0.5
    raise ValueError(f"unknown pattern {pattern!r}")


def draw_image(pattern: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One RGB image (size, size, 3) uint8: the pattern at a random period, phase, tilt and in
    two random colours, under a brightness gradient, partly hidden by clutter, with pixel noise."""
    side = size * SUPERSAMPLE
    y, x = np.mgrid[0:side, 0:side] / side  # (side, side) each, in image sides

    period = rng.uniform(5, 12) / size  # 5-12 px
    tilt = np.deg2rad(rng.uniform(-20, 20))
    u = (x * np.cos(tilt) + y * np.sin(tilt)) / period + rng.uniform(0, 2)
    v = (-x * np.sin(tilt) + y * np.cos(tilt)) / period + rng.uniform(0, 2)
    background, foreground = rng.uniform(0, 255, (2, 3))
    while abs((foreground - background).mean()) < 40:  # a visible pattern
        foreground = rng.uniform(0, 255, 3)
    image = np.where(pattern_mask(pattern, u, v, rng)[..., None], foreground, background)  # (side, side, 3)

    angle = rng.uniform(0, 2 * np.pi)
    ramp = x * np.cos(angle) + y * np.sin(angle)
    brightness = rng.uniform(0.5, 1.0) + rng.uniform(0, 0.5) * (ramp - ramp.min()) / np.ptp(ramp)  # (side, side)
    image *= brightness[..., None]

    for _ in range(rng.integers(3, 7)):  # clutter over the pattern: blobs and thin lines
        cx, cy = rng.uniform(0, 1, 2)
        if rng.random() < 0.5:
            mask = np.hypot(x - cx, y - cy) < rng.uniform(0.03, 0.1)
        else:
            turn = rng.uniform(0, np.pi)
            along = (x - cx) * np.cos(turn) + (y - cy) * np.sin(turn)
            across = -(x - cx) * np.sin(turn) + (y - cy) * np.cos(turn)
            mask = (abs(along) < rng.uniform(0.1, 0.3)) & (abs(across) < 0.015)
        image[mask] = rng.uniform(0, 255, 3)

    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean((1, 3))  # (size, size, 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def write_dataset(root: Path, *, images_per_class: int, val_images_per_class: int, seed: int) -> None:
    """root/train and root/val, one folder of PNGs per pattern; image i of a split and pattern
    is drawn from its own seed, so the set is the same on every machine and at every size."""
    settings = {"patterns": list(PATTERNS), "seed": seed, "train": images_per_class, "val": val_images_per_class}
    manifest = root / "dataset.json"
    if manifest.exists() and json.loads(manifest.read_text()) == settings:
        return
    shutil.rmtree(root, ignore_errors=True)
    for split_id, (split, count) in enumerate((("train", images_per_class), ("val", val_images_per_class))):
        for label, pattern in enumerate(PATTERNS):
            folder = root / split / pattern
            folder.mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng([seed, split_id, label, index])
                Image.fromarray(draw_image(pattern, rng)).save(folder / f"{index:05d}.png")
    manifest.write_text(json.dumps(settings))


@dataclass
class Result:
    tool: str
    precision: str
    top1: list[float]  # val top-1 in percent, per epoch
    images_per_s: list[float]  # per epoch, as defined in the docstring
    wall_s: float

    def summary(self) -> dict:
        best = max(self.top1)
        steady = self.images_per_s[1:] or self.images_per_s  # epochs 2..N
        return {
            "tool": self.tool, "precision": self.precision, "final_top1": self.top1[-1], "best_top1": best,
            "best_epoch": self.top1.index(best) + 1, "images_per_s": statistics.median(steady), "wall_s": self.wall_s,
            "top1_per_epoch": self.top1, "images_per_s_per_epoch": self.images_per_s,
        }  # fmt: skip


def run_logged(command: list[str], log: Path, cwd: Path) -> float:
    """Run `command` with its output in `log`; its wall time in seconds. Stops the benchmark,
    showing the end of the log, when the command fails."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        finished = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, check=False)
    if finished.returncode != 0:
        sys.exit(f"failed with exit code {finished.returncode}; the end of {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def run_gtrain(data: Path, work: Path, *, epochs: int, overrides: list[str]) -> Result:
    recipe = {
        "description": f"{MODEL} from scratch on the patterns of benchmarks/vs_timm.py",
        "model": {"name": MODEL},
        "data": {"dataset": "ImageFolder", "root": str(data), "image_size": IMAGE_SIZE, "val_split": "val",
                 "batch_size": BATCH_SIZE, "workers": WORKERS},
        "optim": {"name": "sgd", "lr": LR, "schedule": "cosine", "warmup_epochs": 0},
        "train": {"epochs": epochs, "device": DEVICE},
    }  # fmt: skip
    recipe_path, run_dir = work / "gtrain.toml", work / "gtrain"
    recipe_path.write_text(tomli_w.dumps(recipe))
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "gtrain", "fit", str(recipe_path), "--out", str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    wall_s = run_logged(command, work / "gtrain.log", cwd=work)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The resolved recipe says what was asked for ("auto"); the runtime says what that became.
    asked = tomllib.loads((run_dir / "recipe.toml").read_text())["train"]["precision"]
    precision = runtime.resolve_precision(asked, torch.device(DEVICE))
    top1 = [100 * row["val_top1"] for row in rows]  # a fraction in metrics.jsonl, a percentage in timm's summary
    return Result("gtrain", precision, top1, [row["images_per_s"] for row in rows], wall_s)


# train.py logs, on every 50th and on the last batch of an epoch:
# "Train: 3 [  15/16 (100%)]  Loss: ...  Time: 4.10s,  7.80/s  (4.20s,  7.62/s)  LR: ..."
# the figures in brackets being the epoch's running averages of step time and images/s.
TIMM_TRAIN_LINE = re.compile(r"Train: (\d+) \[\s*\d+/\d+.*?\(\s*[\d.]+s,\s*([\d.]+)/s\)")


def run_timm(train_py: Path, data: Path, work: Path, *, epochs: int, num_classes: int, amp: bool) -> Result:
    run_dir = work / "timm"
    shutil.rmtree(run_dir, ignore_errors=True)  # train.py appends to an existing summary.csv
    command = [
        sys.executable, str(train_py), "--data-dir", str(data), "--train-split", "train", "--val-split", "val",
        "--model", MODEL, "--num-classes", str(num_classes),  # else the head keeps 1000 outputs
        "--img-size", str(IMAGE_SIZE), "-b", str(BATCH_SIZE), "--lr", str(LR),
        "--sched", "cosine", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--epochs", str(epochs),
        "--device", DEVICE, "--no-prefetcher",  # the prefetcher overlaps copies to a GPU; nothing to overlap here
        "--workers", str(WORKERS), "--output", str(work), "--experiment", "timm",
        "--checkpoint-hist", "1",  # keeps one checkpoint on disk instead of ten; training is unchanged
    ]  # fmt: skip
    if amp:
        command += ["--amp", "--amp-dtype", "bfloat16"]
    wall_s = run_logged(command, work / "timm.log", cwd=work)

    with (run_dir / "summary.csv").open() as summary:
        top1 = [float(row["eval_top1"]) for row in csv.DictReader(summary)]
    last_line_rate: dict[int, float] = {}  # the last logged line of an epoch is its last batch
    for epoch, rate in TIMM_TRAIN_LINE.findall((work / "timm.log").read_text()):
        last_line_rate[int(epoch)] = float(rate)
    images_per_s = [last_line_rate[epoch] for epoch in sorted(last_line_rate)]
    return Result("timm", "bf16" if amp else "fp32", top1, images_per_s, wall_s)


def git_commit(folder: Path) -> str | None:
    command = ["git", "-C", str(folder), "describe", "--always", "--dirty"]  # "-dirty": uncommitted changes
    found = subprocess.run(command, capture_output=True, text=True, check=False)
    return found.stdout.strip() or None


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model_name = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return {
        "cpu": model_name.group(1) if model_name else platform.processor(),
        "cores": os.cpu_count(),
        # What gtrain's precision "auto" looks for: bf16 on CPUs that compute it natively.
        "bf16_flags": sorted(set(flags.group(1).split()) & {"avx512_bf16", "amx_bf16"}) if flags else [],
        "torch": torch.__version__,
        "timm": metadata.version("timm") if list(metadata.distributions(name="timm")) else None,
        "gtrain": gtrain.__version__,
        "gtrain_commit": git_commit(Path(gtrain.__file__).parent),
        "python": platform.python_version(),
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def markdown_table(summaries: list[dict]) -> str:
    lines = ["| tool | precision | val top-1 final | best (epoch) | train images/s | wall s |", "|---" * 6 + "|"]
    for s in summaries:
        lines.append(
            f"| {s['tool']} | {s['precision']} | {s['final_top1']:.1f}% | {s['best_top1']:.1f}% ({s['best_epoch']}) "
            f"| {s['images_per_s']:.1f} | {s['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm-train", type=Path, help="path of timm's train.py (needed unless --only gtrain)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images-per-class", type=int, default=100, help="training images of each of the 10 patterns")
    parser.add_argument("--val-per-class", type=int, default=50, help="validation images of each pattern")
    parser.add_argument("--seed", type=int, default=0, help="of the drawn images")
    parser.add_argument("--timm-amp", action="store_true", help="timm with bf16 autocast (--amp --amp-dtype bfloat16)")
    parser.add_argument(
        "--gtrain-set", action="append", default=[], metavar="KEY=VALUE",
        help="a recipe override for gtrain, e.g. train.precision=fp32 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--only", choices=["gtrain", "timm"], help="run one tool only")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gtrain-vs-timm", help="work folder")
    args = parser.parse_args()
    if args.only != "gtrain" and args.timm_train is None:
        parser.error("--timm-train PATH is required to run timm (or pass --only gtrain)")

    machine = machine_info()
    print(json.dumps(machine))
    work = args.out.resolve()
    data = work / "patterns"
    work.mkdir(parents=True, exist_ok=True)
    write_dataset(data, images_per_class=args.images_per_class, val_images_per_class=args.val_per_class, seed=args.seed)

    results = []
    if args.only in (None, "gtrain"):
        results.append(run_gtrain(data, work, epochs=args.epochs, overrides=args.gtrain_set))
    if args.only in (None, "timm"):
        train_py = args.timm_train.resolve()
        results.append(run_timm(train_py, data, work, epochs=args.epochs, num_classes=len(PATTERNS), amp=args.timm_amp))

    summaries = [result.summary() for result in results]
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    report = {"machine": machine, "settings": settings, "results": summaries}
    print()
    print(markdown_table(summaries))
    if len(summaries) == 2:
        gtrain_run, timm_run = summaries
        report["images_per_s_ratio_gtrain_over_timm"] = ratio = gtrain_run["images_per_s"] / timm_run["images_per_s"]
        print(f"\ngtrain / timm train images/s: {ratio:.2f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
