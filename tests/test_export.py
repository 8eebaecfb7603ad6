"""What `gtrain export` promises: each format writes one file next to the weights that,
loaded on its own, gives the PyTorch model's logits at any batch size and carries the
weights' metadata; a file that fails the check is never written; user mistakes are one
line with exit code 2."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gtrain.export
from gtrain.checkpoint import WeightsMeta, save_weights
from gtrain.models import create_model

from tests.conftest import invoke

# The tests load TorchScript files as users do, and PyTorch warns each time that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

IMAGE_SIZE = 16  # px: the smallest that both families take with room to spare, to keep exports fast
CLASS_NAMES = tuple(str(digit) for digit in range(10))
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2", "torchscript": ".torchscript.pt"}

def save_run(folder: Path, name: str) -> nn.Module:
    """Write folder/best.safetensors as `gtrain fit` would, for an untrained model; return the model."""
    model = create_model(name, num_classes=10, in_chans=1).eval()
    give_every_layer_weight(model)
    meta = WeightsMeta(
        model=name, num_classes=10, in_chans=1, image_size=IMAGE_SIZE, mean=(0.1307,), std=(0.3081,),
        class_names=CLASS_NAMES, dataset="MNIST", model_settings={},
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "best.safetensors", model, meta)
    return model


@torch.no_grad()
def give_every_layer_weight(model: nn.Module) -> None:
    """Redraw the weights so that every layer moves the logits well above the tolerance.

    At its own init HorNet hides its blocks (layer scales 1e-6, weights of std .02): a
    wrongly exported gnConv or FFT would change the logits by less than 1e-5. Here scales
    are 1, matrices and kernels have std 1/sqrt(fan-in) and the Global-Local Filters'
    spectra std 1; then 10% more on one stage-3 filter moves the logits by 1e-3 to 1e-2 (measured).
    """
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if name.endswith("complex_weight"):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        elif parameter.dim() > 1:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5)
        elif name.endswith(("gamma1", "gamma2")):
            parameter.fill_(1.0)


def load_exported(path: Path, export_format: str):
    """Load a file as its users would, without gtrain: -> (logits function, metadata strings)."""
    if export_format == "onnx":
        onnx = pytest.importorskip("onnx")
        onnxruntime = pytest.importorskip("onnxruntime")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
        return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), meta
    extra_files = {"gtrain.json": ""}
    if export_format == "exported-program":
        module = torch.export.load(path, extra_files=extra_files).module()
    else:
        module = torch.jit.load(path, _extra_files=extra_files)
    return module, json.loads(extra_files["gtrain.json"])


# Every format on HorNet-GF, the hardest graph (its Global-Local Filter runs an FFT); ResNeXt
# goes through the tests further down, which exercise one format each, to keep the file fast.
CASES = ["onnx", "exported-program", "torchscript"]


@pytest.fixture(scope="module", params=CASES)
def exported(request, tmp_path_factory):
    """One `gtrain export RUN --format F` of HorNet-GF per format, shared by the tests below."""
    export_format, name = request.param, "hornet_cifar_nano_gf"
    if export_format == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    run = tmp_path_factory.mktemp(f"{export_format}-{name}")
    model = save_run(run, name)
    result = invoke("export", run, "--format", export_format)
    assert result.exit_code == 0, result.output
    return export_format, run, model, result


def test_export_writes_one_file_next_to_the_weights(exported):
    export_format, run, _, result = exported
    written = run / f"best{SUFFIXES[export_format]}"
    assert sorted(p.name for p in run.iterdir()) == sorted(["best.safetensors", written.name])  # no temp file left
    assert "checked" in result.stdout and "not checked" not in result.stdout
    assert result.stderr == ""  # no exporter warnings reach the user


def test_exported_file_gives_pytorch_logits_at_other_batch_sizes(exported):
    export_format, run, model, _ = exported
    logits, _ = load_exported(run / f"best{SUFFIXES[export_format]}", export_format)
    for batch_size in (1, 5):  # the export used 2, its check 2 and 3
        images = torch.randn(batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = model(images)
            actual = logits(images)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_exported_file_carries_class_names_and_preprocessing(exported):
    export_format, run, _, _ = exported
    _, meta = load_exported(run / f"best{SUFFIXES[export_format]}", export_format)
    assert tuple(json.loads(meta["class_names"])) == CLASS_NAMES
    assert json.loads(meta["mean"]) == [0.1307] and json.loads(meta["std"]) == [0.3081]
    assert int(meta["image_size"]) == IMAGE_SIZE


def test_json_is_one_object_and_out_can_be_any_file(tmp_path):
    save_run(tmp_path / "run", "resnext29_2x16d")
    out = tmp_path / "deploy" / "digits.pt2"
    # Batch 1: torch.export would turn a batch dimension first seen as 1 into a constant.
    result = invoke("export", tmp_path / "run" / "best.safetensors", "--format", "exported-program", "--out", out,
                    "--batch-size", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"] == str(out) and out.stat().st_size == report["size_bytes"]
    assert report["checked"] is True and report["check_batch_sizes"] == [1, 2]
    assert 0 <= report["max_abs_diff"] <= report["tolerance"]
    assert report["model"] == "resnext29_2x16d" and report["image_size"] == IMAGE_SIZE


def test_a_file_that_fails_the_check_is_not_written(tmp_path, monkeypatch):
    save_run(tmp_path, "hornet_cifar_nano_7x7")
    previous = tmp_path / "best.torchscript.pt"
    previous.write_bytes(b"an earlier export")

    def off_by_one(data):  # a runtime whose logits are all 1 too high
        module = torch.jit.load(io.BytesIO(data))
        return lambda images: module(images) + 1

    monkeypatch.setitem(gtrain.export.RUNNERS, "torchscript", off_by_one)
    result = invoke("export", tmp_path, "--format", "torchscript")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "differ from PyTorch's by 1" in result.stderr
    assert previous.read_bytes() == b"an earlier export"  # neither replaced nor left half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", previous.name]


def test_onnx_without_onnxruntime_is_written_unchecked_and_says_how_to_check(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    model = save_run(tmp_path, "resnext29_2x16d")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    result = invoke("export", tmp_path, "--format", "onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checked"] is False and report["max_abs_diff"] is None
    assert "pip install 'gtrain[onnx]'" in report["note"]
    assert (tmp_path / "best.onnx").stat().st_size == report["size_bytes"]

    monkeypatch.undo()  # unchecked is not wrong: with onnxruntime back, the file gives PyTorch's logits
    logits, _ = load_exported(tmp_path / "best.onnx", "onnx")
    images = torch.randn(3, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(logits(images), model(images), atol=1e-4, rtol=1e-4)


def test_onnx_without_the_exporter_packages_is_one_line(tmp_path, monkeypatch):
    save_run(tmp_path, "resnext29_2x16d")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    result = invoke("export", tmp_path, "--format", "onnx")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --format onnx needs the onnx and onnxscript packages: pip install 'gtrain[onnx]'"
    ]
    assert not (tmp_path / "best.onnx").exists()


def test_missing_path_is_one_line(tmp_path):
    result = invoke("export", tmp_path / "nowhere", "--format", "exported-program")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in result.output


def test_out_never_overwrites_the_weights(tmp_path):
    save_run(tmp_path, "resnext29_2x16d")
    weights = tmp_path / "best.safetensors"
    before = weights.read_bytes()
    result = invoke("export", tmp_path, "--format", "torchscript", "--out", weights)
    assert result.exit_code == 2 and "weights file itself" in result.stderr
    assert weights.read_bytes() == before


def test_unknown_format_names_the_valid_ones(tmp_path):
    save_run(tmp_path, "resnext29_2x16d")
    result = invoke("export", tmp_path, "--format", "tflite")
    assert result.exit_code == 2
    assert "onnx, exported-program, torchscript" in result.stderr and len(result.stderr.strip().splitlines()) == 1
