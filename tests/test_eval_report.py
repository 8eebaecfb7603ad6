"""The evaluation report: a confusion matrix with exact counts, per-class precision and
recall, the worst classes, flip test-time augmentation, and the confusion-matrix plot."""

import json
import math
import sys

import pytest
import torch
import torchvision
from torch import nn

from gtrain.checkpoint import WeightsMeta, save_weights
from gtrain.eval_tables import report_tables
from gtrain.evaluate import EvalResult, evaluate
from gtrain.models import create_model

from tests.conftest import invoke

CPU = torch.device("cpu")


class PredictsItsInput(nn.Module):
    """Logits with 5.0 at the class written in the image's first pixel: predictions chosen by the test."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5.0 * nn.functional.one_hot(x[:, 0, 0, 0].long(), self.num_classes).float()


def batches(predicted: list[int], targets: list[int], batch_size: int):
    """(images, labels) batches of 1x1x1 images that hold the class PredictsItsInput will predict."""
    images = torch.tensor(predicted, dtype=torch.float32).view(-1, 1, 1, 1)
    labels = torch.tensor(targets)
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]


# Nine images of classes 0-2 (class 3 has none and is never predicted), in two batches.
TARGETS = [0, 0, 0, 1, 1, 2, 2, 2, 2]
PREDICTED = [0, 0, 2, 1, 2, 2, 2, 1, 1]
NAMES = ("ant", "bee", "cow", "dog")


@pytest.fixture
def hand_made_result() -> EvalResult:
    return evaluate(PredictsItsInput(4), batches(PREDICTED, TARGETS, 5), num_classes=4, device=CPU, precision="fp32")


def test_confusion_matrix_counts_true_rows_against_predicted_columns(hand_made_result):
    r = hand_made_result
    assert r.confusion == [[2, 0, 1, 0], [0, 1, 1, 0], [0, 2, 2, 0], [0, 0, 0, 0]]
    assert r.class_correct == [2, 1, 2, 0] and r.class_total == [3, 2, 4, 0]
    assert r.images == 9 and r.top1 == pytest.approx(5 / 9) and r.top5 == 1.0
    # Every image has logit 5 at one class and 0 at the three others.
    assert r.loss == pytest.approx((5 * -math.log(math.e**5 / (math.e**5 + 3)) + 4 * -math.log(1 / (math.e**5 + 3))) / 9)


def test_precision_recall_and_f1_follow_the_counts(hand_made_result):
    rows = {row["class"]: row for row in hand_made_result.per_class(NAMES)}
    # Predicted as each class: 2, 3, 4 and 0 images.
    assert rows["ant"] == {"class": "ant", "images": 3, "top1": 2 / 3, "precision": 1.0, "recall": 2 / 3, "f1": 4 / 5}
    assert rows["bee"]["precision"] == pytest.approx(1 / 3) and rows["bee"]["recall"] == 1 / 2
    assert rows["bee"]["f1"] == pytest.approx(2 / 5)
    assert rows["cow"]["precision"] == rows["cow"]["recall"] == rows["cow"]["f1"] == 1 / 2
    assert rows["dog"] == {"class": "dog", "images": 0, "top1": None, "precision": None, "recall": None, "f1": None}


def test_worst_classes_have_the_lowest_recall_and_name_their_usual_mistake(hand_made_result):
    worst = hand_made_result.worst_classes(NAMES, k=2)
    assert worst == [
        {"class": "bee", "images": 2, "recall": 0.5, "mistaken_for": "cow", "mistaken_images": 1},
        {"class": "cow", "images": 4, "recall": 0.5, "mistaken_for": "bee", "mistaken_images": 2},
    ]
    assert [w["class"] for w in hand_made_result.worst_classes(NAMES)] == ["bee", "cow", "ant"]  # dog has no images
    assert hand_made_result.most_confused(NAMES, n=1) == [{"true": "cow", "predicted": "bee", "images": 2}]


class MirrorSensitive(nn.Module):
    """Three logits from a 1x2 image (left, right): (2 * left, right, 0), so a mirror image scores differently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x[:, 0, 0, 0], x[:, 0, 0, 1]
        return torch.stack([2 * left, right, torch.zeros_like(left)], dim=1)


def test_flip_tta_scores_the_mean_probability_of_the_image_and_its_mirror():
    image = torch.tensor([[[[0.4, 1.0]]]])  # (N, C, H, W) = (1, 1, 1, 2)
    loader = [(image, torch.tensor([0]))]
    plain = evaluate(MirrorSensitive(), loader, num_classes=3, device=CPU, precision="fp32")
    flipped = evaluate(MirrorSensitive(), loader, num_classes=3, device=CPU, precision="fp32", tta="flip")

    softmax = lambda logits: [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
    as_is, mirrored = softmax([0.8, 1.0, 0.0]), softmax([2.0, 0.4, 0.0])
    mean = [(a + b) / 2 for a, b in zip(as_is, mirrored)]
    assert plain.confusion[0] == [0, 1, 0]  # alone, the image looks like class 1 ...
    assert flipped.confusion[0] == [1, 0, 0]  # ... the mean with its mirror like class 0
    assert plain.loss == pytest.approx(-math.log(as_is[0]))
    assert flipped.loss == pytest.approx(-math.log(mean[0]))


# ---------------------------------------------------------------------------------------
# `gtrain eval` end to end on untrained weights


def write_weights(path, *, dataset: str, class_names: tuple[str, ...], in_chans: int, image_size: int):
    """Untrained ResNeXt weights with one block per stage: the smallest model eval can rebuild."""
    settings = {"stage_depths": [1, 1, 1]}
    model = create_model("resnext29_2x16d", num_classes=len(class_names), in_chans=in_chans, **settings)
    meta = WeightsMeta(
        model="resnext29_2x16d", num_classes=len(class_names), in_chans=in_chans, image_size=image_size,
        mean=(0.5,) * in_chans, std=(0.25,) * in_chans, class_names=class_names, dataset=dataset, model_settings=settings,
    )  # fmt: skip
    save_weights(path, model, meta)
    return path


@pytest.fixture
def mnist_weights(tmp_path):
    return write_weights(tmp_path / "mnist.safetensors", dataset="MNIST", class_names=tuple(torchvision.datasets.MNIST.classes),
                         in_chans=1, image_size=8)  # fmt: skip


def test_eval_json_report_has_a_consistent_confusion_matrix_and_a_png_plot(tmp_path, mnist_root, mnist_weights):
    plot = tmp_path / "plots" / "confusion.png"
    result = invoke("eval", mnist_weights, "--set", f"data.root={mnist_root}", "--set", "data.workers=0", "--json", "--plot", plot)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)

    matrix = torch.tensor(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == report["images"] == 100
    assert matrix.diagonal().sum() == round(report["top1"] * 100)
    for k, row in enumerate(report["per_class"]):
        assert row["images"] == matrix[k].sum() == 10
        assert row["recall"] == row["top1"] == matrix[k, k] / 10
        predicted = matrix[:, k].sum().item()
        assert row["precision"] == (matrix[k, k].item() / predicted if predicted else None)
    assert [w["recall"] for w in report["worst_classes"]] == sorted(w["recall"] for w in report["worst_classes"])
    assert report["tta"] is None and report["plot"] == str(plot)
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in plot.parent.iterdir()] == ["confusion.png"]  # no temporary file left behind


def test_eval_prints_per_class_worst_classes_and_the_matrix(mnist_root, mnist_weights):
    result = invoke("eval", mnist_weights, "--set", f"data.root={mnist_root}", "--set", "data.workers=0", "--worst", "3")
    assert result.exit_code == 0, result.output
    for title in ("per-class accuracy", "precision", "worst classes", "confusion matrix", "9 - nine"):
        assert title in result.output


def test_more_than_20_classes_print_the_most_confused_pairs_instead_of_the_matrix():
    names = tuple(f"c{k}" for k in range(25))
    confusion = [[0] * 25 for _ in names]
    confusion[3][7], confusion[5][5] = 4, 1
    result = EvalResult(0.0, 0.2, 0.2, 5, 1.0, [row[k] for k, row in enumerate(confusion)], [sum(r) for r in confusion],
                        confusion)  # fmt: skip
    report = {"per_class": result.per_class(names), "worst_classes": result.worst_classes(names),
              "most_confused": result.most_confused(names), "confusion_matrix": confusion}  # fmt: skip
    table = report_tables(report)[-1]
    assert table.title == "most confused of 25 classes" and table.rows == [("c3", "c7", "4")]


def test_flip_tta_on_an_image_folder(imagefolder_root, tmp_path):
    weights = write_weights(tmp_path / "w.safetensors", dataset="ImageFolder", class_names=("cat", "dog", "frog"),
                            in_chans=3, image_size=8)  # fmt: skip
    result = invoke("eval", weights, "--set", f"data.root={imagefolder_root}", "--set", "data.workers=0", "--split", "val",
                    "--json", "--tta", "flip")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tta"] == "flip" and sum(map(sum, report["confusion_matrix"])) == report["images"] == 24


def test_flip_tta_is_refused_where_a_mirror_image_is_another_class(mnist_root, mnist_weights):
    result = invoke("eval", mnist_weights, "--set", f"data.root={mnist_root}", "--tta", "flip")
    assert result.exit_code == 2 and "MNIST is trained without horizontal flips" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tta", "rotate"], "valid: none, flip"),
        (["--plot", "confusion.jpg"], "give a path that ends in .png"),
        (["--plot", "{tmp}/a_file/confusion.png"], "cannot write in"),
    ],
)
def test_bad_eval_options_are_one_line_with_exit_code_2(tmp_path, mnist_weights, args, message):
    (tmp_path / "a_file").write_text("not a folder")
    result = invoke("eval", mnist_weights, *(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, mnist_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = invoke("eval", mnist_weights, "--plot", tmp_path / "confusion.png")
    assert result.exit_code == 2 and "pip install 'gtrain[plot]'" in result.output
    assert not (tmp_path / "confusion.png").exists()
