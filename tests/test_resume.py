"""Runs survive interruption: a stopped run resumes bit-exact, a kill in the middle of a
save leaves the previous checkpoint loadable, and a hostile or broken checkpoint is
refused with one line. Every interrupted run is a real `python -m gtrain` process, so that
its signals and SIGKILL are real; the runs it is compared with, and the resumed ones, may
run in this process."""

import json
import os
import resource
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    assert_same_weights, invoke, run_gtrain, tiny_hornet, write_image_folder, write_mnist, write_shards,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """A small HorNet on 256 MNIST-format images at 8 px: 4 optimizer steps per epoch."""
    root = write_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=64)
    return tiny_hornet(root, {"data.batch_size": 64, "train.epochs": 2, "train.deterministic": True, "model.drop_path_rate": 0.1})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fast):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = invoke("fit", *fast, "--out", run)
    assert result.exit_code == 0, result.output
    return load_file(run / "final.safetensors")


def test_sigterm_between_epochs_resumes_bit_exact(tmp_path, fast, uninterrupted):
    # SIGUSR1, what SLURM sends before it preempts a job: tests/test_restarts.py, under srun.
    run = tmp_path / "run"
    stopped = run_gtrain("fit", *fast, "--out", run, fault="signal-at-step:4:SIGTERM")
    assert stopped.returncode == 75, stopped.stderr
    assert f"gtrain fit --resume {run}" in stopped.stderr
    resumed = invoke("fit", "--resume", run)
    assert resumed.exit_code == 0, resumed.output
    assert_same_weights(load_file(run / "final.safetensors"), uninterrupted)


def test_ctrl_c_mid_epoch_resumes_bit_exact_even_after_a_kill_during_the_next_save(tmp_path, fast, uninterrupted):
    run = tmp_path / "run"
    first = run_gtrain("fit", *fast, "--out", run, fault="signal-at-step:3:SIGINT")
    assert first.returncode == 130, first.stderr
    assert f"gtrain fit --resume {run}" in first.stderr
    before = (run / "checkpoints" / "last.pt").read_bytes()
    killed = run_gtrain("fit", "--resume", run, fault="kill-during-save:last.pt")
    assert killed.returncode == -9
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["step_in_epoch"] == 3

    resumed = invoke("fit", "--resume", run)
    assert resumed.exit_code == 0, resumed.output
    assert_same_weights(load_file(run / "final.safetensors"), uninterrupted)


class Payload:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fast):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert invoke("fit", *fast, "--set", "train.epochs=1", "--out", run).exit_code == 0
    return run


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, finished_run):
    marker = tmp_path / "pwned"
    last = finished_run / "checkpoints" / "last.pt"
    original = last.read_bytes()
    try:
        torch.save({"model": Payload(marker)}, last)
        result = invoke("fit", "--resume", finished_run, "--set", "train.epochs=2")
    finally:
        last.write_bytes(original)
    assert result.exit_code == 2
    assert "not a valid gtrain checkpoint" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_a_checkpoint_the_disk_cannot_take_is_one_line_and_the_previous_one_stays(tmp_path):
    """A full disk, as a file size limit: torch.save's own error would not say what happened."""
    from gtrain.checkpoint import load_state, save_state
    from gtrain.errors import UserError

    last = tmp_path / "checkpoints" / "last.pt"
    save_state(last, {"step": torch.tensor(1)})
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        with pytest.raises(UserError) as error:
            save_state(last, {"step": torch.tensor(2), "weights": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(error.value) == f"cannot write {last}: File too large; the previous file is unchanged"
    assert load_state(last)["step"] == 1
    assert [path.name for path in last.parent.iterdir()] == ["last.pt"]  # no half-written file left


def test_a_file_written_while_training_goes_on_holds_the_run_as_it_was_when_saved(tmp_path):
    """Checkpoints and weights are written on another thread while the next steps change the
    live tensors in place: each file must hold the values of the step that saved it."""
    import threading

    from gtrain.checkpoint import BackgroundSaver, WeightsMeta, load_state

    saver = BackgroundSaver()
    writing = threading.Event()
    saver.after_writes(writing.wait)  # the saving thread is busy until the test lets it go on
    model = torch.nn.Linear(3, 2)
    momentum = torch.ones(4)
    history = [{"epoch": 1}]
    meta = WeightsMeta(model="resnext50_32x4d", num_classes=2, in_chans=3, image_size=8, mean=(0.5,) * 3,
                       std=(0.5,) * 3, class_names=("a", "b"), dataset="test", model_settings={})  # fmt: skip
    saved_weights = {key: value.clone() for key, value in model.state_dict().items()}
    saver.save_state(tmp_path / "last.pt", {"momentum": momentum, "history": history, "model": model.state_dict()})
    saver.save_weights(tmp_path / "best.safetensors", model, meta)
    with torch.no_grad():  # the steps that follow
        momentum.mul_(7)
        model.weight.add_(1)
    history.append({"epoch": 2})
    writing.set()
    saver.close()

    state = load_state(tmp_path / "last.pt")
    assert torch.equal(state["momentum"], torch.ones(4)) and state["history"] == [{"epoch": 1}]
    assert_same_weights(state["model"], saved_weights)
    assert_same_weights(load_file(tmp_path / "best.safetensors"), saved_weights)


def test_a_full_disk_during_a_run_is_one_line_and_run_json_says_no_more_than_the_checkpoint(tmp_path, fast):
    """The checkpoint is written in the background: its error must still end the run with
    one line, and nothing written after it (run.json's epochs_done) may claim the epoch."""
    run = tmp_path / "run"
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Larger than the weights file (best.safetensors), smaller than last.pt, which holds the optimizer's state too.
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000_000, limits[1]))  # 5.8 MB and 17.5 MB
    try:
        result = invoke("fit", *fast, "--set", "train.epochs=1", "--set", "data.batch_size=256", "--out", run)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write {run / 'checkpoints' / 'last.pt'}: File too large; the previous file is unchanged"]
    assert "Traceback" not in result.output
    assert (run / "best.safetensors").is_file() and not (run / "checkpoints" / "last.pt").exists()
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and status["epochs_done"] == 0


def test_truncated_checkpoint_is_one_line(tmp_path, finished_run):
    last = finished_run / "checkpoints" / "last.pt"
    original = last.read_bytes()
    try:
        last.write_bytes(original[: len(original) // 3])
        result = invoke("fit", "--resume", finished_run, "--set", "train.epochs=2")
    finally:
        last.write_bytes(original)
    assert result.exit_code == 2
    assert "not a valid gtrain checkpoint" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.strip().splitlines() if line.startswith("error:")]) == 1


def test_resume_with_a_changed_recipe_lists_the_changed_keys(finished_run):
    result = invoke("fit", "--resume", finished_run, "--set", "train.epochs=2", "--set", "optim.lr=0.5",
                    "--set", "train.seed=3")
    assert result.exit_code == 2
    assert "differs from the one it was trained with in optim.lr, train.seed" in result.output


def test_weights_of_another_model_are_refused_by_eval(tmp_path, finished_run):
    from gtrain.checkpoint import read_weights, save_weights
    from gtrain.models import create_model

    _, meta = read_weights(finished_run / "final.safetensors")
    wider = create_model(meta.model, num_classes=10, in_chans=1, base_width=48)
    save_weights(tmp_path / "other.safetensors", wider, meta)  # the metadata still says the original width
    result = invoke("eval", tmp_path / "other.safetensors")
    assert result.exit_code == 2
    assert "its tensors are not those of" in result.output and "of another shape" in result.output


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, fast):
    result = invoke("fit", *fast, "--set", "optim.lr=1e30", "--set", "optim.warmup_epochs=0", "--out", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "the training loss became NaN or infinite at step" in result.output
    assert "optim.clip_grad_norm" in result.output
    status = json.loads((tmp_path / "r" / "run.json").read_text())
    assert status["status"] == "failed" and "NaN or infinite" in status["error"]


def test_unwritable_output_folder_is_one_line(tmp_path, fast):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = invoke("fit", *fast, "--out", blocker / "run")
    assert result.exit_code == 2
    assert "cannot write" in result.output and "--out" in result.output and "Traceback" not in result.output


# Each pipeline (gtrain.data.Pipeline) as a user's recipe reaches it: (recipe arguments, steps per epoch).
PIPELINES = {
    # With the fine-tuning features: killed after the frozen epoch, in the one that trains every layer.
    "in-memory-digits": ["--set", "data.dataset=digits", "--set", "data.batch_size=256", "--set", "train.epochs=2",
                         "--set", "train.freeze_epochs=1", "--set", "optim.layer_decay=0.8", "--set", "optim.head_lr_scale=2",
                         "--set", "data.class_weights=balanced", "--set", "data.sampler=balanced",
                         "--set", "distill.temperature=2.0"],
    "uint8-jpeg-trivialaugment-erasing": ["--set", "data.auto_augment=trivialaugment", "--set", "data.random_erasing=0.5",
                                          "--set", "data.random_erasing_fill=noise"],
    # With every other feature that has randomness or state of its own, at once.
    "float-pil-timm-randaugment": ["--set", "data.auto_augment=rand-m9-mstd0.5-inc1", "--set", "data.random_erasing=0.5",
                                   "--set", "data.random_erasing_fill=noise", "--set", "data.mixup_alpha=0.2",
                                   "--set", "data.cutmix_alpha=1.0", "--set", "train.ema_decay=0.9",
                                   "--set", "train.accumulate_steps=2", "--set", "train.freeze_epochs=2",  # killed frozen
                                   "--set", "data.sampler=balanced"],
    "device-decode": ["--set", "data.decode=device", "--set", "data.auto_augment=trivialaugment",
                      "--set", "data.random_erasing=0.5"],
}  # fmt: skip
# The same JPEGs as tar shards (uneven: 2 to 3 images each), trained as the folder is: the
# killed and resumed run on shards must end with the folder's uninterrupted weights.
PIPELINES["uint8-shards"] = PIPELINES["uint8-jpeg-trivialaugment-erasing"]
SAME_AS = {"uint8-shards": "uint8-jpeg-trivialaugment-erasing"}
# A checkpoint every 2 steps; the kill comes after a mid-epoch one, in epoch 2 (of 3, with 3
# steps per epoch, on the JPEGs; of 2, with 5, on the digits).
KILL_AT = {"in-memory-digits": 7, "default": 5}


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """24 training and 12 validation JPEGs of 3 classes at 40 px: 3 steps of 8 per epoch. At
    16 px, crops of 32 px or more and the evaluation's resize to 18 take the half-scale decode."""
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), size=40, suffix=".jpg",
                              images_per_class={"train": 8, "val": 4})  # fmt: skip


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Weights to fine-tune from and teachers, for the digits (10 classes, grey) and the JPEGs (3, RGB)."""
    from gtrain.checkpoint import WeightsMeta, save_weights
    from gtrain.models import create_model

    folder = tmp_path_factory.mktemp("published")
    for data, classes, channels in (("digits", 10, 1), ("jpegs", 3, 3)):
        model = create_model("resnext29_2x16d", num_classes=classes, in_chans=channels, stage_depths=(1, 1, 1))
        meta = WeightsMeta(model="resnext29_2x16d", num_classes=classes, in_chans=channels, image_size=16,
                           resize_size=None, mean=(0.5,) * channels, std=(0.25,) * channels,
                           class_names=tuple(map(str, range(classes))), dataset=data,
                           model_settings={"stage_depths": [1, 1, 1]}, interpolation="bilinear")  # fmt: skip
        save_weights(folder / f"{data}.safetensors", model, meta)
    return folder


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory, jpeg_folder):
    return write_shards(jpeg_folder, tmp_path_factory.mktemp("shards") / "set", "--shard-size", "3KB")


@pytest.fixture(scope="module")
def data_roots(jpeg_folder, jpeg_shards):
    return {"ImageFolder": jpeg_folder, "shards": jpeg_shards}


def pipeline_recipe(name, data_roots, published):
    common = ["quickstart", "--set", "model.stage_depths=[1, 1, 1]", "--set", "train.precision=fp32",
              "--set", "train.deterministic=true", "--set", "train.device=cpu", "--set", "train.epochs=3",
              "--set", "train.checkpoint_steps=2"]  # fmt: skip
    weights = published / ("digits.safetensors" if name == "in-memory-digits" else "jpegs.safetensors")
    if "train.freeze_epochs" in " ".join(PIPELINES[name]):
        common += ["--set", f"model.pretrained={weights}", "--set", f"distill.teacher={weights}"]
    if name != "in-memory-digits":
        dataset = "shards" if name == "uint8-shards" else "ImageFolder"
        common += ["--set", f"data.dataset={dataset}", "--set", f"data.root={data_roots[dataset]}",
                   "--set", "data.image_size=16", "--set", "data.batch_size=8"]  # fmt: skip
    return common + PIPELINES[name]


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory, data_roots, published):
    """Each pipeline's uninterrupted run, with data.workers = 0: its run folder."""
    folders = {}

    def reference(name):
        name = SAME_AS.get(name, name)
        if name not in folders:
            out = tmp_path_factory.mktemp(name) / "run"
            result = invoke("fit", *pipeline_recipe(name, data_roots, published), "--set", "data.workers=0", "--out", out)
            assert result.exit_code == 0, result.output
            folders[name] = out
        return folders[name]

    return reference


@pytest.mark.parametrize(
    ("pipeline", "workers", "resumed_workers"),
    [("in-memory-digits", 0, 0),
     ("uint8-jpeg-trivialaugment-erasing", 2, 0), ("uint8-shards", 2, 2),  # and workers that change on resume
     ("float-pil-timm-randaugment", 2, 2),
     ("device-decode", 0, 2)],
)  # fmt: skip
def test_a_killed_run_resumes_bit_exact_on_every_pipeline_with_any_workers(
    tmp_path, data_roots, published, left_alone, pipeline, workers, resumed_workers
):
    """SIGKILL in the middle of an epoch, after a mid-epoch checkpoint; `gtrain fit --resume`
    ends with the weights of the run left alone, tensor for tensor, whatever the number of
    workers before and after: every draw of the augmentation belongs to its image. The digits
    and the PIL pipeline also carry the fine-tuning features (published weights, frozen
    epochs, layer decay, a teacher, balanced classes), killed after and within the frozen ones.
    The JPEGs as uneven tar shards end with the folder's weights."""
    kill_at = KILL_AT.get(pipeline, KILL_AT["default"])
    run = tmp_path / "run"
    killed = run_gtrain("fit", *pipeline_recipe(pipeline, data_roots, published), "--set", f"data.workers={workers}",
                        "--out", run,
                    fault=f"kill-at-step:{kill_at}")  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    if pipeline != "in-memory-digits":
        assert f"{workers} workers" in killed.stdout  # the start panel names the pipeline
    resumed = invoke("fit", "--resume", run, "--set", f"data.workers={resumed_workers}")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    reference = left_alone(pipeline)
    for weights in ("final.safetensors", "final_ema.safetensors"):
        assert (run / weights).exists() == (reference / weights).exists()
        if (reference / weights).exists():  # the weight average, where the recipe keeps one
            assert_same_weights(load_file(run / weights), load_file(reference / weights))


def test_a_teacher_for_other_classes_is_one_line(tmp_path, fast):
    from gtrain.checkpoint import WeightsMeta, save_weights
    from gtrain.models import create_model

    meta = WeightsMeta(model="hornet_cifar_nano_7x7", num_classes=5, in_chans=1, image_size=8, resize_size=None,
                       mean=(0.5,), std=(0.5,), class_names=tuple("abcde"), dataset="other", model_settings={},
                       interpolation="bilinear")  # fmt: skip
    save_weights(tmp_path / "teacher.safetensors", create_model("hornet_cifar_nano_7x7", num_classes=5, in_chans=1), meta)
    result = invoke("fit", *fast, "--set", f"distill.teacher={tmp_path / 'teacher.safetensors'}", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "5 classes" in result.output and len(result.output.strip().splitlines()) == 1
