"""Fine-tuning your own classes, on data made here and kept out of the tests' tuning.

scikit-learn's 8x8 digits become two ImageFolders: the "published" model is a gtrain
ResNeXt trained on digits 0-5; the user's task is digits 6-9 with 20 training images per
class, except digit 9 with 5 (unbalanced), validated and tested on every other image of 6-9.
Then, for each seed, on the same split:

    scratch         the student (a one-block-per-stage ResNeXt) from random weights
    all-layers      the published model, every layer at one lr from the first step
    freeze+decay    the same, with train.freeze_epochs and optim.layer_decay
    +balanced       freeze+decay with data.class_weights = "balanced"
    distilled       the scratch student with freeze+decay's model as its teacher

and prints top-1 and balanced top-1 on the test split (`gtrain eval`), one row per run.

With --search N, each run's settings are first chosen by `gtrain tune` (N trials, on the
val split, seed 0 of the sampler): the lr for every run, and also freeze_epochs,
layer_decay and head_lr_scale for freeze+decay, temperature and alpha for distilled. The
teacher is then the best model the searches found, the same for every seed; the test split
is read only after the choice.

    python benchmarks/finetune.py --seeds 0 1                # about 5 min on 2 CPU cores
    python benchmarks/finetune.py --seeds 0 1 --search 12    # about 40 min
    python benchmarks/finetune.py --search 12 --runs all-layers freeze+decay   # those two only
    python benchmarks/finetune.py --shots 5 --runs all-layers freeze+decay     # 5, 5, 5 and 1 images
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SOURCE_CLASSES = range(0, 6)
TARGET_CLASSES = range(6, 10)
TRAIN_PER_CLASS = {6: 20, 7: 20, 8: 20, 9: 5}
# No augmentation: a random-resized crop of an 8x8 digit leaves too little of it to learn from.
COMMON = ["--set", "data.dataset=ImageFolder", "--set", "data.image_size=16", "--set", "data.workers=0",
          "--set", "train.precision=fp32", "--set", "data.val_split=val", "--set", "data.augment=false"]  # fmt: skip


def write_folders(root: Path, shots: int = 20) -> tuple[Path, Path]:
    """(source ImageFolder, target ImageFolder) from the digits, as 8-bit grey PNGs. With
    `shots` below 20, digits 6-8 get that many training images and digit 9 a quarter of it,
    from the same draw; validation and test images stay the same."""
    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)
    rng = np.random.default_rng(0)
    source, target = root / "source", root / "target"
    for label in SOURCE_CLASSES:
        members = np.flatnonzero(digits.target == label)
        for split, chosen in (("train", members[::2]), ("val", members[1::2])):
            _write(source / split / str(label), images[chosen])
    for label in TARGET_CLASSES:
        members = rng.permutation(np.flatnonzero(digits.target == label))
        held = TRAIN_PER_CLASS[label]
        train, rest = members[: min(held, max(1, shots * held // 20))], members[held:]
        for split, chosen in (("train", train), ("val", rest[::2]), ("test", rest[1::2])):
            _write(target / split / str(label), images[chosen])
    return source, target


def _write(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image, mode="L").convert("RGB").save(folder / f"{index:04d}.png")


def gtrain(*args) -> None:
    subprocess.run([sys.executable, "-m", "gtrain", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


# What --search lets `gtrain tune` choose, per run (a tune --space file each).
SPACES = {
    "scratch": '"optim.lr" = {low = 0.01, high = 0.4, log = true}\n',
    "all-layers": '"optim.lr" = {low = 0.005, high = 0.2, log = true}\n',
    "freeze+decay": '"optim.lr" = {low = 0.005, high = 0.2, log = true}\n"train.freeze_epochs" = [2, 5, 10]\n'
                    '"optim.layer_decay" = {low = 0.6, high = 0.95}\n"optim.head_lr_scale" = [1.0, 3.0, 10.0]\n',
    "distilled": '"optim.lr" = {low = 0.01, high = 0.4, log = true}\n"distill.temperature" = [1.0, 2.0, 4.0, 8.0]\n'
                 '"distill.alpha" = {low = 0.3, high = 0.95}\n',
}  # fmt: skip


RUNS = ("scratch", "all-layers", "freeze+decay", "+balanced", "distilled")


def search(root: Path, name: str, settings: list, trials: int) -> tuple[Path, dict]:
    """`gtrain tune` over SPACES[name] on the val split: (best.toml, the JSON summary)."""
    space = root / f"space-{name}.toml"
    space.write_text(SPACES[name])
    done = subprocess.run([sys.executable, "-m", "gtrain", "tune", "quickstart", *map(str, settings), "--space", space,
                           "--out", root / f"search-{name}", "--trials", str(trials), "--seed", "0", "--json"],
                          check=True, capture_output=True, text=True)  # fmt: skip
    summary = json.loads(done.stdout)
    print(f"search {name:<14} val top-1 {summary['best_value']:.2%}  {summary['best_params']}", flush=True)
    return Path(summary["best_recipe"]), summary


def best_trial_run(root: Path, name: str, summary: dict) -> Path:
    return root / f"search-{name}" / "trials" / f"{summary['best_trial']:04d}"


def test_scores(run: Path, target: Path) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-m", "gtrain", "eval", run, "--split", "test", "--set", f"data.root={target}",
                           "--json"], check=True, capture_output=True, text=True)  # fmt: skip
    report = json.loads(done.stdout)
    return report["top1"], report["balanced_top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--search", type=int, default=0, metavar="TRIALS",
                        help="choose each run's settings with gtrain tune on the val split first")  # fmt: skip
    parser.add_argument("--shots", type=int, default=20, choices=range(1, 21), metavar="1-20",
                        help="training images of digits 6-8 (digit 9: a quarter); the val and test images stay the same")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which runs (distilled needs a tuned run)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gtrain-finetune-"))
    source, target = write_folders(root, args.shots)
    published = root / "published"
    gtrain("fit", "quickstart", *COMMON, "--set", f"data.root={source}", "--set", "train.epochs=30",
           "--set", "data.batch_size=64", "--out", published, "-q")  # fmt: skip
    weights = published / "final.safetensors"
    task = [*COMMON, "--set", f"data.root={target}", "--set", f"train.epochs={args.epochs}", "--set", "data.batch_size=16",
            "--set", "optim.lr=0.05", "--set", "optim.warmup_epochs=1"]  # fmt: skip
    student = ["--set", "model.stage_depths=[1, 1, 1]"]
    tuned = ["--set", f"model.pretrained={weights}"]
    staged = [*tuned, "--set", "train.freeze_epochs=5", "--set", "optim.layer_decay=0.7", "--set", "optim.head_lr_scale=2"]
    if args.search:
        searched(root, target, task, student, tuned, args)
        return
    results: dict[str, list[tuple[float, float]]] = {}
    for seed in args.seeds:
        runs = {
            "scratch": student,
            "all-layers": tuned,
            "freeze+decay": staged,
            "+balanced": [*staged, "--set", "data.class_weights=balanced"],
        }
        for name, settings in runs.items():
            if name not in args.runs:
                continue
            out = root / f"{name}-{seed}"
            gtrain("fit", "quickstart", *task, *settings, "--set", f"train.seed={seed}", "--out", out, "-q")
            results.setdefault(name, []).append(test_scores(out, target))
            print(f"seed {seed} {name:<14} top-1 {results[name][-1][0]:.2%}  balanced {results[name][-1][1]:.2%}", flush=True)
        if "distilled" not in args.runs or "freeze+decay" not in args.runs:
            continue
        out = root / f"distilled-{seed}"
        gtrain("fit", "quickstart", *task, *student, "--set", f"distill.teacher={root / f'freeze+decay-{seed}'}",
               "--set", "distill.temperature=2.0", "--set", f"train.seed={seed}", "--out", out, "-q")  # fmt: skip
        results.setdefault("distilled", []).append(test_scores(out, target))
        print(f"seed {seed} {'distilled':<14} top-1 {results['distilled'][-1][0]:.2%}  balanced {results['distilled'][-1][1]:.2%}",
              flush=True)  # fmt: skip
    print_means(results)


def searched(root: Path, target: Path, task: list, student: list, tuned: list, args) -> None:
    """Each run's settings chosen on the val split, then every seed tested with them."""
    recipes, summaries = {}, {}
    for name, settings in (("scratch", student), ("all-layers", tuned), ("freeze+decay", tuned)):
        if name in args.runs or (name == "freeze+decay" and "+balanced" in args.runs):
            recipes[name], summaries[name] = search(root, name, [*task, *settings], args.search)
    teachers = [name for name in ("all-layers", "freeze+decay") if name in summaries]
    if "distilled" in args.runs and teachers:
        teacher_of = max(teachers, key=lambda name: summaries[name]["best_value"])
        teacher = best_trial_run(root, teacher_of, summaries[teacher_of])
        print(f"teacher: the best {teacher_of} trial, {teacher}", flush=True)
        recipes["distilled"], _ = search(root, "distilled", [*task, *student, "--set", f"distill.teacher={teacher}"], args.search)
    if "+balanced" in args.runs:
        recipes["+balanced"] = recipes["freeze+decay"]
    recipes = {name: recipe for name, recipe in recipes.items() if name in args.runs}
    results: dict[str, list[tuple[float, float]]] = {}
    for seed in args.seeds:
        for name, recipe in recipes.items():
            out = root / f"{name}-{seed}"
            extra = ["--set", "data.class_weights=balanced"] if name == "+balanced" else []
            gtrain("fit", recipe, *extra, "--set", f"train.seed={seed}", "--out", out, "-q")
            results.setdefault(name, []).append(test_scores(out, target))
            print(f"seed {seed} {name:<14} top-1 {results[name][-1][0]:.2%}  balanced {results[name][-1][1]:.2%}", flush=True)
    print_means(results)


def print_means(results: dict[str, list[tuple[float, float]]]) -> None:
    print(f"\n{'run':<14}{'mean top-1':>12}{'mean balanced':>15}")
    for name, scores in results.items():
        print(f"{name:<14}{statistics.mean(s[0] for s in scores):>12.2%}{statistics.mean(s[1] for s in scores):>15.2%}")


if __name__ == "__main__":
    main()
