"""How long a preempted `gtrain fit` takes from the scheduler's signal to a checkpoint on disk.

Starts `gtrain fit` in a process of its own, waits until it trains in its second epoch,
sends SIGTERM (or --signal USR1), then watches checkpoints/last.pt: the time until the
file is replaced (the checkpoint written, fsynced and renamed) and until the process has
exited, with its exit code (75: resumable). Repeats with a fresh run folder each time, and
reports the median and the maximum. Each signal lands at a random point of a step: the
checkpoint waits for the step to end (on a GPU, for up to train.AGREE_EVERY_GPU_STEPS
steps), then for the save.

    python benchmarks/signal_to_checkpoint.py                      # quickstart, 5 times
    python benchmarks/signal_to_checkpoint.py --model resnext50_32x4d --image-size 64 --batch-size 32
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def fit_command(args, out: Path) -> list[str]:
    command = [sys.executable, "-m", "gtrain", "fit", args.recipe, "--out", str(out), "--quiet",
               "--set", "train.epochs=100"]  # fmt: skip
    if args.model:  # the recipe's data and schedule, another model on FakeData
        command += ["--set", f"model.name={args.model}", "--set", "data.dataset=FakeData",
                    "--set", f"data.image_size={args.image_size}", "--set", f"data.batch_size={args.batch_size}",
                    "--set", "data.workers=2", "--set", "data.in_memory=off"]  # fmt: skip
    for override in args.set:
        command += ["--set", override]
    return command


def one_preemption(args, work: Path, attempt: int) -> dict:
    out = work / f"run{attempt}"
    process = subprocess.Popen(fit_command(args, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + args.timeout
    while not (out / "metrics.jsonl").exists():  # the first epoch has ended
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gtrain fit did not finish an epoch: {process.stderr.read()[-2000:]}")
        time.sleep(0.01)
    time.sleep(random.uniform(args.wait_s, 2 * args.wait_s))  # somewhere within the second epoch's steps
    before = last.stat().st_mtime_ns
    sent = time.perf_counter()
    process.send_signal(getattr(signal, f"SIG{args.signal}"))
    checkpointed = None
    while process.poll() is None or checkpointed is None:
        if checkpointed is None and last.exists() and last.stat().st_mtime_ns != before:
            checkpointed = time.perf_counter() - sent
        if process.poll() is not None and checkpointed is None:
            checkpointed = float("nan")  # exited without a new checkpoint
        time.sleep(0.002)
    exited = time.perf_counter() - sent
    state = torch.load(last, weights_only=True, map_location="cpu")["progress"]
    return {"checkpoint_s": checkpointed, "exit_s": exited, "exit_code": process.returncode,
            "epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--model", help="train this model on FakeData instead of the recipe's own")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--signal", default="TERM", choices=["TERM", "USR1", "INT"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wait-s", type=float, default=0.5, help="signal 1-2x this long after the first epoch ends")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    random.seed(0)
    work = Path(tempfile.mkdtemp(prefix="gtrain-preempt-"))
    results = [one_preemption(args, work, attempt) for attempt in range(args.repeats)]
    for result in results:
        print(json.dumps(result))
    checkpoint_s = [r["checkpoint_s"] for r in results]
    exit_s = [r["exit_s"] for r in results]
    print(json.dumps({
        "recipe": args.recipe, "model": args.model, "signal": args.signal, "repeats": args.repeats,
        "checkpoint_s_median": statistics.median(checkpoint_s), "checkpoint_s_max": max(checkpoint_s),
        "exit_s_median": statistics.median(exit_s), "exit_s_max": max(exit_s),
        "exit_codes": sorted({r["exit_code"] for r in results}), "cpu": os.cpu_count(), "torch": torch.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
