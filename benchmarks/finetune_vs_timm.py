"""Fine-tuning the same weights file with gtrain and with timm's train.py: top-1 and time.

The data is benchmarks/finetune.py's (digits 0-5 to make the "published" model, digits 6-9
with 20, 20, 20 and 5 training images as the user's task). The published model is a gtrain
ResNeXt-50 (32x4d) trained on 0-5 at 32 px; its weights file is fine-tuned on 6-9 for the
same epochs, batch and image size by

    gtrain    `gtrain fit` with the fine-tuning settings the README describes (a frozen first
              epochs, layer decay), gtrain's defaults otherwise
    timm      timm's train.py with its own defaults (`--pretrained --pretrained-path FILE
              --num-classes 4`, on the CPU, no workers)

each validating every epoch on the same val split. Reported: the best validation top-1
(gtrain's run.json, timm's summary.csv), the wall time of the whole command and the CPU time
its processes used (user and system: on a shared virtual machine it leaves out the time the
host gave to others, which the wall time includes). With --repeats N each seed runs N times,
gtrain and timm in turn, and the ratios are taken pair by pair, so that a machine whose speed
drifts moves both sides of a ratio alike.

    python benchmarks/finetune_vs_timm.py --timm-train path/to/timm/train.py --seeds 0 1 --repeats 3
"""

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from finetune import write_folders  # noqa: E402  the same data as benchmarks/finetune.py

SIZE, BATCH = 32, 16


def timed(command: list) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the command and the processes it started."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([str(part) for part in command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool per seed, in turn")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gtrain-vs-timm-"))
    source, target = write_folders(root)
    common = ["--set", "model.name=resnext50_32x4d", "--set", "data.dataset=ImageFolder", "--set", f"data.image_size={SIZE}",
              "--set", "data.workers=0", "--set", "train.precision=fp32", "--set", "data.val_split=val"]  # fmt: skip
    published = root / "published"
    subprocess.run([sys.executable, "-m", "gtrain", "fit", "quickstart", *common, "--set", f"data.root={source}",
                    "--set", "data.augment=false", "--set", "train.epochs=15", "--set", "data.batch_size=64",
                    "--out", published, "-q"], check=True)  # fmt: skip
    weights = published / "final.safetensors"
    print(f"published: {json.loads((published / 'run.json').read_text())['best_top1']:.2%} on digits 0-5", flush=True)
    ratios, cpu_ratios = [], []
    for seed in args.seeds:
        for repeat in range(args.repeats):
            out = root / f"gtrain-{seed}-{repeat}"
            gtrain_s, gtrain_cpu = timed([sys.executable, "-m", "gtrain", "fit", "quickstart", *common, "--set", f"data.root={target}",
                              "--set", f"model.pretrained={weights}", "--set", f"train.epochs={args.epochs}",
                              "--set", f"data.batch_size={BATCH}", "--set", "train.freeze_epochs=3",
                              "--set", "optim.layer_decay=0.7", "--set", "optim.lr=0.05", "--set", "optim.warmup_epochs=1",
                              "--set", f"train.seed={seed}", "--out", out, "-q"])  # fmt: skip
            gtrain_top1 = json.loads((out / "run.json").read_text())["best_top1"]
            out = root / f"timm-{seed}-{repeat}"
            timm_s, timm_cpu = timed([sys.executable, args.timm_train, "--data-dir", target, "--train-split", "train",
                            "--val-split", "val", "--model", "resnext50_32x4d", "--pretrained", "--pretrained-path", weights,
                            "--num-classes", 4, "--img-size", SIZE, "--epochs", args.epochs, "-b", BATCH,
                            "--device", "cpu", "--workers", 0, "--seed", seed, "--output", out,
                            "--experiment", "run"])  # fmt: skip
            with open(out / "run" / "summary.csv") as file:
                timm_top1 = max(float(row["eval_top1"]) for row in csv.DictReader(file)) / 100
            ratios.append(gtrain_s / timm_s)
            cpu_ratios.append(gtrain_cpu / timm_cpu)
            print(f"seed {seed} run {repeat}: gtrain {gtrain_top1:.2%} in {gtrain_s:.0f} s ({gtrain_cpu:.0f} CPU s), "
                  f"timm {timm_top1:.2%} in {timm_s:.0f} s ({timm_cpu:.0f} CPU s), time ratio {ratios[-1]:.2f}, "
                  f"CPU time ratio {cpu_ratios[-1]:.2f}", flush=True)  # fmt: skip
    for name, values in (("time", ratios), ("CPU time", cpu_ratios)):
        print(f"gtrain's {name} over timm's, median of {len(values)} pairs: {statistics.median(values):.2f} "
              f"(range {min(values):.2f}-{max(values):.2f})")

if __name__ == "__main__":
    main()
