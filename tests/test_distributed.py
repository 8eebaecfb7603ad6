"""torch.distributed under torchrun on CPU (gloo): the same training as one process, exact
validation, two nodes. A worker that dies, and resuming on another number of processes:
tests/test_restarts.py."""

import json
import socket
import subprocess
import sys

import pytest
import torch

from gtrain.checkpoint import read_weights
from tests.conftest import clean_environment, invoke, run_gtrain, write_image_folder, write_shards

pytestmark = pytest.mark.slow


@pytest.fixture
def recipe(two_process_recipe):
    """The shared small HorNet (tests/conftest.py): 4 steps per epoch, 66 validation images."""
    return two_process_recipe


def torchrun(*args, fault="", timeout=180):
    """`gtrain ARGS` as 2 processes under torchrun, one thread each."""
    return run_gtrain(*args, torchrun=2, fault=fault, threads=1, timeout=timeout)


def eval_json(*args) -> dict:
    """`gtrain eval ARGS --json`, here, on one thread as each training process had."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke("eval", *args, "--json")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(tmp_path, recipe, two_process_run):
    out2, result = two_process_run
    assert "2 processes x 32" in result.stdout  # the global batch, split
    out1 = tmp_path / "one"
    single = invoke("fit", *recipe, "--out", out1)
    assert single.exit_code == 0, single.output
    two, one = metrics(out2), metrics(out1)
    assert len(two) == len(one) == 2
    steps = lambda d: torch.load(d / "checkpoints" / "last.pt", weights_only=True)["scheduler"]["last_epoch"]
    assert steps(out2) == steps(out1) == 8
    # Same images in every global batch; only BatchNorm-free HorNet's float sums differ in order.
    assert abs(two[-1]["val_top1"] - one[-1]["val_top1"]) <= 0.05


def test_distributed_validation_equals_single_process_eval(two_process_run):
    """The run is fp32: one process scoring the whole split equals the two shards' reduced sums."""
    out, _ = two_process_run
    rows = metrics(out)
    best = next(r for r in rows if r["val_top1"] == max(r["val_top1"] for r in rows))
    for weights, logged in [(out, best), (out / "final.safetensors", rows[-1])]:
        report = eval_json(weights)
        assert report["images"] == 66 and report["precision"] == "fp32"
        assert (report["top1"], report["top5"]) == (logged["val_top1"], logged["val_top5"])
        assert report["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


@pytest.mark.parametrize("dataset", ["ImageFolder", "shards"])
def test_two_processes_on_a_jpeg_folder_log_the_validation_gtrain_eval_gives(tmp_path, dataset):
    """A user's folder of JPEGs read by 2 workers per process, a ResNeXt with BatchNorm, in
    fp32: each process scores whole batches of its share of the batch (21 images in batches
    of 4, the last of 1) with the main process's BatchNorm statistics, and `gtrain eval`
    scores the same batches in one process, so the logged validation is eval's, image for
    image, to the loss's last digits. The same JPEGs as uneven tar shards (2 or 3 images
    each) likewise."""
    root = write_image_folder(tmp_path / "jpegs", size=40, suffix=".jpg", images_per_class={"train": 8, "val": 7})
    if dataset == "shards":
        root = write_shards(root, tmp_path / "shards", "--shard-size", "3KB")
    out = tmp_path / "run"
    result = torchrun("fit", "quickstart", "--set", f"data.dataset={dataset}", "--set", f"data.root={root}",
                      "--set", "data.image_size=16", "--set", "data.batch_size=8", "--set", "data.workers=2",
                      "--set", "data.auto_augment=trivialaugment", "--set", "model.stage_depths=[1, 1, 1]",
                      "--set", "train.precision=fp32", "--set", "train.epochs=2", "--set", "train.device=cpu",
                      "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    best = next(r for r in rows if r["val_top1"] == max(r["val_top1"] for r in rows))
    report = eval_json(out, "--split", "val", "--device", "cpu")  # the run's best weights
    assert report["images"] == 21 and report["precision"] == "fp32"
    assert read_weights(out / "best.safetensors")[1].eval_batch_size == 4  # each process's share of 8
    assert (report["top1"], report["top5"]) == (best["val_top1"], best["val_top5"])
    assert report["loss"] == pytest.approx(best["val_loss"], rel=1e-12)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_rendezvous_on_localhost(tmp_path, recipe):
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
             "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "gtrain", "fit", *recipe,
             "--set", "train.epochs=1", "--out", str(tmp_path / "run")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_environment(threads=1),
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=180)
        assert node.returncode == 0, err[-3000:]
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [1]
