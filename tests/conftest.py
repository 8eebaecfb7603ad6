"""Shared fixtures: small, real-format datasets written to disk, so tests run the real loaders offline.

The builders are plain functions as well, for tests that need other sizes:

    from tests.conftest import write_image_folder, write_mnist
    root = write_mnist(tmp_path, n_train=500, n_test=100)
    data = data_from("MNIST", root)
"""

import colorsys
import gc
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gtrain.cli import app

MNIST_SIZE = 28


def pytest_collection_finish(session):
    """Every test module is imported now, and torch and torchvision with them: their millions
    of objects live as long as the suite, and each full garbage collection walked them all
    again (about 0.2 s each, 12 in a minute of tests). Frozen, collections walk only what the
    tests make."""
    gc.freeze()


def invoke(*args):
    """Run the `gtrain` command line in this process, as typed (every argument made a string)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def gtrain_command(*args, torchrun: int = 0, restarts: int = 0, monitor_interval_s: float | None = None) -> list[str]:
    """`python -m gtrain ARGS`, or with `torchrun` > 0 the same under `torchrun --standalone`
    with that many processes (and `restarts` restarts after a failure; `monitor_interval_s`:
    how often torchrun looks for a dead process, its default where None)."""
    launcher = []
    if torchrun:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
                    f"--max-restarts={restarts}"]  # fmt: skip
        if monitor_interval_s is not None:
            launcher.append(f"--monitor-interval={monitor_interval_s}")
    return [sys.executable, *launcher, "-m", "gtrain", *map(str, args)]


def clean_environment(fault: str = "", *, threads: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without a launcher's variables (the suite itself may run
    under SLURM or torchrun), with GTRAIN_FAULT (gtrain/faults.py) and, where `threads` is
    given, OMP_NUM_THREADS: processes that share the 2 cores run one thread each."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "TORCHELASTIC_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["GTRAIN_FAULT"] = fault
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return {**env, **extra}


def run_gtrain(*args, fault: str = "", torchrun: int = 0, restarts: int = 0, threads: int | None = None,
               timeout: float = 300, monitor_interval_s: float | None = None) -> SimpleNamespace:  # fmt: skip
    """`gtrain ARGS` as a real process (see `gtrain_command`), so that signals, SIGKILL and
    process groups are real: its returncode, stdout and stderr. The output goes to files,
    not pipes: DataLoader workers that outlive a killed process hold a pipe open for up to
    5 s, until they notice their parent is gone, and reading it would wait for them."""
    command = gtrain_command(*args, torchrun=torchrun, restarts=restarts, monitor_interval_s=monitor_interval_s)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        done = subprocess.run(command, stdout=stdout, stderr=stderr, text=True, timeout=timeout,
                              env=clean_environment(fault, threads=threads))  # fmt: skip
        stdout.seek(0), stderr.seek(0)
        return SimpleNamespace(returncode=done.returncode, stdout=stdout.read(), stderr=stderr.read())


def assert_same_weights(actual: dict, expected: dict) -> None:
    """Two state dicts (as `safetensors.torch.load_file` reads them) equal tensor for tensor."""
    import torch

    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def data_from(dataset: str, root: Path, **settings):
    """`build_data` of the recipe's data section with these settings (nothing downloaded)."""
    from gtrain.data import build_data
    from gtrain.recipe import DataSection

    return build_data(DataSection(dataset=dataset, root=str(root), **settings))


def write_mnist(root: Path, n_train: int = 200, n_test: int = 100, *, seed: int = 0) -> Path:
    """Write MNIST-format files that torchvision's `MNIST(root)` loads; return `root`.

    torchvision checks only that the four uncompressed idx files exist in root/MNIST/raw (it
    checksums the .gz archives it downloads, not these), so nothing else is written.

    Image i is class i % 10 (balanced classes): a sine grating with a random phase plus noise,
    oriented at (k % 5) * 36 degrees with a period of 4 px for classes 0-4 and 8 px for 5-9.
    Gratings survive crops and shifts, so a tiny CNN reaches 100% in 3 epochs of 200 images
    (measured: 3 conv layers, AdamW 3e-3, batch 32); drawn digit glyphs reached 20-40%.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:MNIST_SIZE, 0:MNIST_SIZE]
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(count) % 10
        images = np.empty((count, MNIST_SIZE, MNIST_SIZE), dtype=np.uint8)
        for i, label in enumerate(labels):
            angle = (label % 5) * np.pi / 5
            period = 4 if label < 5 else 8
            phase = rng.uniform(0, 2 * np.pi)
            grating = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
            pixels = 127.5 + 110 * grating + rng.normal(0, 25, grating.shape)
            images[i] = np.clip(pixels, 0, 255).astype(np.uint8)
        # idx format: big-endian magic (0x08 = uint8, then the number of dimensions), sizes, data.
        header = struct.pack(">IIII", 0x0803, count, MNIST_SIZE, MNIST_SIZE)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = struct.pack(">II", 0x0801, count)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.astype(np.uint8).tobytes())
    return Path(root)


def write_image_folder(
    root: Path,
    *,
    class_names: tuple[str, ...] = ("cat", "dog", "frog"),
    images_per_class: dict[str, int] | None = None,
    size: int = 32,
    seed: int = 0,
    suffix: str = ".png",
) -> Path:
    """Write root/<split>/<class>/<n><suffix> (RGB, `size` px; .png or .jpg) for an ImageFolder;
    return `root`.

    Each class has its own hue, with noise and a darker square at a random place, so the classes
    are easy to learn but no two images are alike. Splits default to 20 train and 8 val images
    per class.
    """
    rng = np.random.default_rng(seed)
    images_per_class = images_per_class or {"train": 20, "val": 8}
    for split, count in images_per_class.items():
        for k, name in enumerate(class_names):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array(colorsys.hsv_to_rgb(k / len(class_names), 0.8, 0.9)) * 255
            for n in range(count):
                pixels = colour + rng.normal(0, 20, (size, size, 3))
                x, y = rng.integers(0, size // 2, size=2)
                pixels[y : y + size // 2, x : x + size // 2] *= 0.5
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(folder / f"{n}{suffix}")
    return Path(root)


def tiny_hornet(root: Path, settings: dict[str, object]) -> list[str]:
    """`gtrain fit` arguments for a small HorNet (LayerNorm only: no batch statistics, so the
    way a batch is split changes nothing) on the MNIST-format data in `root` at 8 px, in fp32
    with no worker processes; `settings` adds or replaces --set KEY=VALUE pairs."""
    base = {"data.dataset": "MNIST", "data.root": root, "data.image_size": 8, "data.workers": 0, "train.precision": "fp32"}
    toml = lambda value: str(value).lower() if isinstance(value, bool) else str(value)  # noqa: E731
    return ["quickstart_hornet", *(arg for key, value in {**base, **settings}.items() for arg in ("--set", f"{key}={toml(value)}"))]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Shard indexes and remote shards go to a cache of the suite's own (the processes it
    starts inherit the variable), never to the user's."""
    os.environ["GTRAIN_CACHE"] = str(tmp_path_factory.mktemp("gtrain-cache"))


def write_shards(folder: Path, out: Path, *options: str) -> Path:
    """`gtrain shards FOLDER OUT OPTIONS`: the shard set's folder."""
    result = invoke("shards", folder, out, *options)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def two_process_recipe(tmp_path_factory) -> list[str]:
    """The distributed tests' run: a small HorNet on 256 MNIST-format images at 8 px; global
    batch 64, so 4 steps per epoch, 2 epochs; 66 validation images, which do not divide evenly
    over 2 x 32. Deterministic fp32 with SGD, whose step is linear in the gradient, so that one
    process lands where two do but for float rounding; a checkpoint every 2 steps, so that a
    restart continues within an epoch."""
    root = write_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=66)
    return tiny_hornet(root, {"data.batch_size": 64, "train.epochs": 2, "optim.name": "sgd", "optim.lr": 0.05,
                              "train.deterministic": True, "train.checkpoint_steps": 2})  # fmt: skip


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory, two_process_recipe) -> tuple[Path, SimpleNamespace]:
    """`two_process_recipe` trained by 2 processes under torchrun, left alone: its folder and its output."""
    out = tmp_path_factory.mktemp("two_processes") / "run"
    result = run_gtrain("fit", *two_process_recipe, "--out", out, torchrun=2, threads=1, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A data root holding a 200 train / 100 test MNIST in torchvision's layout."""
    return write_mnist(tmp_path / "data", n_train=200, n_test=100)


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    """An ImageFolder root with train/ and val/ for classes cat, dog, frog (20 and 8 images each)."""
    return write_image_folder(tmp_path / "images")
