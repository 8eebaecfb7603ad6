"""`gtrain predict` and `Classifier`: new images classified as `gtrain eval` scores them,
unreadable files reported without stopping the rest, and outputs that parse back."""

import csv
import json
import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from gtrain import Classifier
from gtrain.data import Digits
from tests.conftest import invoke


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The quickstart ResNeXt trained for one epoch on the digits, in fp32."""
    out = tmp_path_factory.mktemp("predict") / "run"
    result = invoke("fit", "quickstart", "--set", "train.epochs=1", "--set", "train.precision=fp32", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """The 364 images of the digits test split as PNGs, in a folder per label."""
    root = tmp_path_factory.mktemp("digits_png")
    test = Digits(None, train=False)
    for index in range(len(test)):
        image, label = test[index]
        (root / str(label)).mkdir(exist_ok=True)
        image.save(root / str(label) / f"{index:03d}.png")
    return root


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_agrees_with_the_labels_as_often_as_eval_says(tmp_path, digits_run, digits_folder):
    out = tmp_path / "preds.jsonl"
    result = invoke("predict", digits_run, digits_folder, "--out", out, "--topk", "3", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "364 images, 0 failed" in result.output
    records = read_jsonl(out)
    assert [r["path"] for r in records] == [str(p) for p in sorted(digits_folder.rglob("*.png"))]  # input order
    assert all(len(r["predictions"]) == 3 for r in records)
    probabilities = [[c["probability"] for c in r["predictions"]] for r in records]
    assert all(p == sorted(p, reverse=True) for p in probabilities)  # best first
    agree = sum(r["predictions"][0]["class"] == r["path"].split("/")[-2] for r in records)

    evaluated = invoke("eval", digits_run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output)
    assert report["images"] == len(records) == 364
    assert agree / 364 == report["top1"]


def test_unreadable_files_are_reported_and_the_others_classified(tmp_path, digits_run, digits_folder):
    folder = tmp_path / "mixed"
    shutil.copytree(digits_folder / "3", folder)
    (folder / "truncated.png").write_bytes((folder / sorted(p.name for p in folder.iterdir())[0]).read_bytes()[:40])
    (folder / "not_an_image.jpg").write_text("a text file with an image's name")
    (folder / "notes.txt").write_text("not searched: not an image type")
    images = len(list(folder.glob("*.png"))) + 1  # the truncated one included

    for out in (tmp_path / "p.jsonl", tmp_path / "p.csv"):
        result = invoke("predict", digits_run, folder, "--out", out, "--topk", "2", "--workers", "0")
        assert result.exit_code == 1, result.output
        assert f"{images} images, 2 failed" in result.output
    records = read_jsonl(tmp_path / "p.jsonl")
    assert len(records) == images and not any(r["path"].endswith("notes.txt") for r in records)
    errors = {r["path"].split("/")[-1]: r["error"] for r in records if "error" in r}
    assert set(errors) == {"truncated.png", "not_an_image.jpg"} and all(errors.values())
    assert all(len(r["predictions"]) == 2 for r in records if "error" not in r)

    # The CSV holds the same, a row per image: top-1 in class/probability, then class_2...
    with (tmp_path / "p.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "class", "probability", "class_2", "probability_2", "error"]
    for row, record in zip(rows, records, strict=True):
        assert row["path"] == record["path"]
        if "error" in record:
            assert row["error"] == record["error"] and row["class"] == ""
        else:
            assert (row["class"], float(row["probability"])) == (record["predictions"][0]["class"], record["predictions"][0]["probability"])
            assert (row["class_2"], float(row["probability_2"])) == (record["predictions"][1]["class"], record["predictions"][1]["probability"])
            assert row["error"] == ""


def test_classifier_gives_the_probabilities_of_the_command_line(tmp_path, digits_run, digits_folder):
    paths = sorted((digits_folder / "7").glob("*.png"))[:10]
    listing = tmp_path / "list.txt"
    listing.write_text("# ten sevens\n" + "".join(f"{p}\n" for p in paths) + "\n")
    result = invoke("predict", digits_run, f"@{listing}", "--json", "--topk", "4", "--workers", "0")
    assert result.exit_code == 0, result.output
    from_cli = [json.loads(line)["predictions"] for line in result.stdout.splitlines() if line.startswith("{")]

    classifier = Classifier.load(digits_run)
    assert classifier.precision == "fp32"  # the run's own
    assert classifier.predict(paths, topk=4) == from_cli
    images = [Image.open(p) for p in paths]
    assert classifier.predict(images, topk=4) == from_cli
    assert classifier.predict([pil_to_tensor(image) for image in images], topk=4) == from_cli
    batch = torch.stack([classifier.preprocess(image) for image in images])
    assert classifier.predict(batch, topk=4) == from_cli
    # Other batch sizes sum in another order: equal to float32 rounding.
    in_threes = classifier.predict(images, topk=4, batch_size=3)
    assert [[c["class"] for c in top] for top in in_threes] == [[c["class"] for c in top] for top in from_cli]
    torch.testing.assert_close(
        torch.tensor([[c["probability"] for c in top] for top in in_threes]),
        torch.tensor([[c["probability"] for c in top] for top in from_cli]), rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_no_images_and_bad_options_are_one_line_with_exit_code_2(tmp_path, digits_run, digits_folder):
    (tmp_path / "empty").mkdir()
    cases = [
        (["predict", digits_run, tmp_path / "empty"], "no images found in"),
        (["predict", tmp_path / "nothing", digits_folder], "does not exist"),
        (["predict", digits_run, digits_folder, "--out", tmp_path / "p.parquet"], "write .jsonl"),
        (["predict", digits_run, digits_folder, "--out", tmp_path / "p.csv", "--json"], "give one of the two"),
        (["predict", digits_run, digits_folder, "--tta", "flip"], "--tta flip: digits is trained without"),
        (["predict", digits_run, "@" + str(tmp_path / "missing.txt")], "cannot read the list"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)


def test_photo_models_predict_as_eval_scores_from_paths_images_and_tensors_of_any_mode(tmp_path):
    """ImageFolder weights: predict, eval and Classifier read JPEGs through one uint8 path
    (torchvision.io, tensor resize and crop, normalised on the device); grayscale and RGBA
    inputs become RGB; an animated GIF is its first frame; an empty file is a record."""
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "jpegs", size=40, suffix=".jpg")
    run = tmp_path / "run"
    result = invoke("fit", "quickstart", "--set", "data.dataset=ImageFolder", "--set", f"data.root={root}",
                    "--set", "data.image_size=24", "--set", "data.batch_size=15", "--set", "train.epochs=2",
                    "--set", "train.precision=fp32", "--set", "model.stage_depths=[1, 1, 1]", "--out", run, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "preds.jsonl"
    result = invoke("predict", run, root / "val", "--out", out, "--workers", "2")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    agree = sum(r["predictions"][0]["class"] == r["path"].split("/")[-2] for r in records)
    report = json.loads(invoke("eval", run, "--split", "val", "--json").output)
    assert len(records) == report["images"] == 24 and agree / 24 == report["top1"]

    classifier = Classifier.load(run)
    paths = sorted((root / "val").rglob("*.jpg"))[:6]
    from_cli = [r["predictions"] for r in records if r["path"] in map(str, paths)]
    assert classifier.predict(paths, batch_size=64) == from_cli
    images = [Image.open(p) for p in paths]
    assert classifier.predict(images, batch_size=64) == from_cli
    assert classifier.predict([pil_to_tensor(image) for image in images], batch_size=64) == from_cli
    gray, rgba = images[0].convert("L"), images[0].convert("RGBA")
    as_rgb = classifier.predict([gray.convert("RGB"), rgba.convert("RGB")])
    assert classifier.predict([gray, rgba]) == as_rgb
    assert classifier.predict([pil_to_tensor(gray), pil_to_tensor(rgba)]) == as_rgb

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "empty.jpg").write_bytes(b"")
    frames = [images[0], images[1]]
    frames[0].save(odd / "animated.gif", save_all=True, append_images=frames[1:])
    result = invoke("predict", run, odd / "empty.jpg", odd / "animated.gif", "--out", tmp_path / "odd.jsonl", "--workers", "0")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = {r["path"].split("/")[-1]: r.get("error") for r in read_jsonl(tmp_path / "odd.jsonl")}
    assert errors["animated.gif"] is None and "empty.jpg" in errors["empty.jpg"] and "is empty" in errors["empty.jpg"]
