"""The command line end to end: fit then eval on data the tests write, through the real
torchvision loaders, and the one-line errors users get for their mistakes."""

import json
import multiprocessing

import pytest
import torch
from torchvision import transforms
from safetensors import safe_open

from tests.conftest import invoke

TINY = ["--set", "model.name=resnext29_2x16d", "--set", "data.workers=0", "--set", "train.precision=fp32",
        "--set", "data.image_size=12"]


def test_fit_then_eval_on_mnist_format_data(tmp_path, mnist_root):
    run = tmp_path / "run"
    result = invoke("fit", "quickstart", *TINY, "--set", "data.dataset=MNIST", "--set", f"data.root={mnist_root}",
                    "--set", "train.epochs=2", "--set", "data.batch_size=32", "--out", run)
    assert result.exit_code == 0, result.output

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) >= {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "seconds",
                            "data_wait_fraction"}
    assert all(0 <= r["data_wait_fraction"] < 1 for r in rows)
    assert "MNIST" in (run / "recipe.toml").read_text()

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 2
    with safe_open(run / "best.safetensors", "pt") as weights:
        meta = weights.metadata()
    assert meta["model"] == "resnext29_2x16d" and meta["num_classes"] == "10" and meta["in_chans"] == "1"
    assert json.loads(meta["class_names"])[0].startswith("0")
    assert {"image_size", "mean", "std", "gtrain_version"} <= set(meta)

    # The run folder's best weights, scored as the run validated them (fp32): the logged figures exactly.
    result = invoke("eval", run, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["precision"] == "fp32" and report["images"] == 100 and len(report["per_class"]) == 10
    best = next(r for r in rows if r["val_top1"] == max(r["val_top1"] for r in rows))
    assert (report["top1"], report["top5"]) == (best["val_top1"], best["val_top5"])
    assert report["balanced_top1"] == best["val_balanced_top1"]  # the mean of the per-class recalls, in both
    assert report["loss"] == pytest.approx(best["val_loss"], rel=1e-6)

    # The final weights of the same folder: the last epoch's figures, with the run's own data root.
    result = invoke("eval", run / "final.safetensors", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["top1"], report["top5"]) == (rows[-1]["val_top1"], rows[-1]["val_top5"])

    result = invoke("eval", run / "final.safetensors", "--set", f"data.root={mnist_root}")
    assert result.exit_code == 0, result.output
    assert "per-class accuracy" in result.output


def test_fit_then_eval_on_an_image_folder(tmp_path, imagefolder_root):
    run = tmp_path / "run"
    result = invoke("fit", *TINY, "--set", "data.dataset=ImageFolder", "--set", f"data.root={imagefolder_root}",
                    "--set", "data.image_size=32", "--set", "data.batch_size=16", "--set", "train.epochs=1", "--out", run)
    assert result.exit_code == 0, result.output
    result = invoke("eval", run, "--split", "val", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dataset"] == "ImageFolder"
    assert [row["class"] for row in report["per_class"]] == sorted(p.name for p in (imagefolder_root / "train").iterdir())


def test_resume_continues_a_finished_run_with_more_epochs(tmp_path, mnist_root):
    run = tmp_path / "run"
    common = [*TINY, "--set", "data.dataset=MNIST", "--set", f"data.root={mnist_root}", "--set", "data.batch_size=50"]
    assert invoke("fit", *common, "--set", "train.epochs=1", "--out", run).exit_code == 0
    result = invoke("fit", "--resume", run, "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_unknown_key_is_one_line_with_exit_code_2():
    result = invoke("fit", "quickstart", "--set", "optim.lrr=0.1")
    assert result.exit_code == 2
    assert "unknown key optim.lrr: did you mean lr?" in result.output
    assert "Traceback" not in result.output


def test_missing_dataset_says_where_it_looked_and_how_to_fix(tmp_path):
    result = invoke("fit", "quickstart", "--set", "data.dataset=MNIST", "--set", f"data.root={tmp_path}", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "MNIST" in result.output and str(tmp_path) in result.output and "data.download" in result.output
    assert "Traceback" not in result.output


def test_eval_of_something_that_is_not_a_run_is_one_line(tmp_path):
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"not a safetensors file")
    result = invoke("eval", junk)
    assert result.exit_code == 2 and "not a valid safetensors file" in result.output
    result = invoke("eval", tmp_path)
    assert result.exit_code == 2 and "is it a gtrain run folder?" in result.output


def test_fit_refuses_to_overwrite_a_run(tmp_path, mnist_root):
    run = tmp_path / "run"
    common = [*TINY, "--set", "data.dataset=MNIST", "--set", f"data.root={mnist_root}", "--set", "train.epochs=1", "--out", run]
    assert invoke("fit", *common).exit_code == 0
    result = invoke("fit", *common)
    assert result.exit_code == 2 and f"--resume {run}" in result.output


def test_recipes_lists_the_bundled_recipes():
    result = invoke("recipes")
    assert result.exit_code == 0 and "quickstart" in result.output


def test_models_json_lists_every_model_with_its_size():
    from gtrain.models import list_models

    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list_models()
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnext50_32x4d"]["params"] == 25_028_904
    # The papers' "FLOPs" are multiply-adds: ResNeXt-50 4.2G (torchvision: 4.23), HorNet-T 7x7 4.0G.
    assert by_name["resnext50_32x4d"]["gmacs"] == pytest.approx(4.23, rel=0.01)
    assert by_name["hornet_tiny_7x7"]["gmacs"] == pytest.approx(4.0, rel=0.03)
    # Counted with the head of the dataset the variant is for: the paper's 34.4M for CIFAR-10.
    assert (by_name["resnext29_8x64d"]["params"], by_name["resnext29_8x64d"]["num_classes"]) == (34_426_698, 10)
    assert all(set(r) == {"name", "family", "params", "num_classes", "gmacs", "input_size"} for r in rows)


@pytest.mark.slow
def test_quickstart_learns_the_digits_in_a_shortened_run(tmp_path):
    run = tmp_path / "run"
    result = invoke("fit", "quickstart", "--set", "train.epochs=2", "--set", "train.precision=fp32", "--out", run, "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Chance is 10%; two epochs reach about 75%, the full 15-epoch recipe 97% or more (docs/benchmarks.md).
    assert rows[-1]["val_top1"] > 0.5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_quiet_prints_only_the_summary(tmp_path, mnist_root):
    result = invoke("fit", *TINY, "--set", "data.dataset=MNIST", "--set", f"data.root={mnist_root}",
                    "--set", "train.epochs=1", "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "epoch   1/1" not in result.output and "model:" not in result.output and "best top-1" in result.output


def test_plain_output_has_no_control_codes(tmp_path, mnist_root):
    result = invoke("fit", *TINY, "--set", "data.dataset=MNIST", "--set", f"data.root={mnist_root}",
                    "--set", "train.epochs=1", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output
    device = "cuda" if torch.cuda.is_available() else "cpu"  # train.device = "auto"
    for fact in ["model: resnext29_2x16d", "dataset: MNIST", f"device: {device}", "fp32", "epoch   1/1", "best top-1"]:
        assert fact in result.output


def test_bench_json_reports_throughput_flops_and_mfu():
    result = invoke("bench", "resnext29_2x16d", "--batch-size", 4, "--image-size", 16, "--steps", 1, "--warmup", 1,
                    "--repeats", 1, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["train_images_per_s"] > 0 and report["infer_images_per_s"] > 0
    assert report["tflops"] > 0 and report["mfu"] is None  # no known peak for a CPU


@pytest.mark.parametrize(
    "workers, decode, name, content",
    [(0, "cpu", "broken.png", b"\x89PNG not really"), (1, "cpu", "broken.png", b"\x89PNG not really"),
     (1, "device", "broken.jpg", b"\xff\xd8\xff\xe0 not really"), (0, "cpu", "empty.jpg", b""),
     (1, "device", "empty.jpg", b""), (1, "cpu", "truncated.jpg", "half a photo")],
)  # fmt: skip
def test_a_corrupt_image_is_one_line_naming_the_file(tmp_path, imagefolder_root, workers, decode, name, content):
    broken = next((imagefolder_root / "train").iterdir()) / name
    if content == "half a photo":  # a real JPEG cut short, as an interrupted copy leaves it
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (96, 64), (200, 90, 40)).save(buffer, "JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    broken.write_bytes(content)
    workers_before = set(multiprocessing.active_children())
    result = invoke("fit", *TINY, "--set", "data.dataset=ImageFolder", "--set", f"data.root={imagefolder_root}",
                    "--set", f"data.workers={workers}", "--set", "data.batch_size=8", "--set", "train.epochs=1",
                    "--set", f"data.decode={decode}", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0]
    # The failed run stopped its loaders' workers: `gtrain tune` goes on to its next trial.
    assert set(multiprocessing.active_children()) <= workers_before


def test_an_empty_image_folder_is_one_line(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    result = invoke("fit", *TINY, "--set", "data.dataset=ImageFolder", "--set", f"data.root={tmp_path}", "--out", tmp_path / "r")
    assert result.exit_code == 2 and str(tmp_path / "train") in result.output and "Traceback" not in result.output


def test_bad_cli_arguments_exit_with_code_2():
    result = invoke("fit", "--nproc", "zero")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_eval_refuses_a_corrupt_image_and_an_image_folder_with_other_classes(tmp_path, imagefolder_root):
    run = tmp_path / "run"
    result = invoke("fit", *TINY, "--set", "data.dataset=ImageFolder", "--set", f"data.root={imagefolder_root}",
                    "--set", "data.batch_size=16", "--set", "train.epochs=1", "--out", run)
    assert result.exit_code == 0, result.output
    broken = imagefolder_root / "val" / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    result = invoke("eval", run, "--split", "val")
    assert result.exit_code == 2 and "broken.png" in result.output and "Traceback" not in result.output
    broken.unlink()
    other = tmp_path / "other"
    other.mkdir()
    (imagefolder_root / "val").rename(other / "val")
    (other / "val" / "cat").rename(other / "val" / "lion")
    result = invoke("eval", run / "final.safetensors", "--set", f"data.root={other}", "--split", "val")
    assert result.exit_code == 2 and "lion" in result.output and "Traceback" not in result.output


def test_recipes_name_prints_the_recipe_fit_would_train_as_toml(tmp_path):
    import tomllib

    from gtrain.recipe import load_recipe

    result = invoke("recipes", "quickstart", "--set", "optim.lr=0.05")
    assert result.exit_code == 0, result.output
    printed = tomllib.loads(result.output)
    expected, _ = load_recipe("quickstart", ["optim.lr=0.05"])
    assert printed == expected.to_dict() and printed["optim"]["lr"] == 0.05
    assert printed["train"]["label_smoothing"] == 0.1  # a default, spelt out
    assert "# unset (no value): " in result.output and "train.ema_decay" in result.output
    saved = tmp_path / "resolved.toml"
    saved.write_text(result.output)
    assert load_recipe(str(saved), [])[0] == expected  # it is a recipe that trains the same
    assert invoke("recipes", "no_such_recipe").exit_code == 2


def test_the_evaluation_geometry_trains_and_is_what_eval_and_predict_resize_with(tmp_path, imagefolder_root):
    """Bicubic resampling, a train crop of 20 and an evaluation of 24 after a resize to 30."""
    from safetensors import safe_open

    run = tmp_path / "run"
    result = invoke("fit", *TINY, "--set", "data.dataset=ImageFolder", "--set", f"data.root={imagefolder_root}",
                    "--set", "data.image_size=20", "--set", "data.batch_size=16", "--set", "train.epochs=1",
                    "--set", "data.interpolation=bicubic", "--set", "data.eval_image_size=24",
                    "--set", "data.eval_resize_size=30", "--set", "model.stage_depths=[1, 1, 1]", "--out", run)  # fmt: skip
    assert result.exit_code == 0, result.output
    with safe_open(run / "best.safetensors", "pt") as weights:
        meta = weights.metadata()
        assert (meta["interpolation"], meta["image_size"], meta["resize_size"]) == ("bicubic", "24", "30")
    trained = json.loads((run / "run.json").read_text())["best_top1"]
    scored = invoke("eval", run, "--split", "val", "--json")
    assert scored.exit_code == 0 and json.loads(scored.output)["top1"] == trained, scored.output

    from gtrain.checkpoint import load_model
    from gtrain.predict import image_transform

    _, meta = load_model(run / "best.safetensors")
    geometry = image_transform(meta)  # uint8 crops, as eval reads an ImageFolder
    assert (geometry.interpolation, geometry.resize, geometry.size) == (transforms.InterpolationMode.BICUBIC, 30, 24)
