"""What fine-tuning from published weights promises: torchvision's ResNeXt and the HorNet
release's checkpoints load as they are, the classifier and the stem adapt to the task,
and nothing else is guessed: a foreign or unsafe file is refused with one line."""

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from gtrain.checkpoint import WeightsMeta, save_weights
from gtrain.errors import UserError
from gtrain.models import create_model
from gtrain.pretrained import load_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
SMALL_RESNEXT = "resnext29_2x16d"  # 1.9M parameters: fast to build, save and load
SMALL_HORNET = "hornet_cifar_nano_7x7"


def _randomize_batchnorm(model: nn.Module) -> None:
    # Fresh BNs are the identity in eval mode; random statistics make the comparisons bite.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.1)
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def torchvision_resnext50(tmp_path_factory) -> tuple[nn.Module, Path]:
    """torchvision's resnext50_32x4d (seeded random weights) and its state_dict saved as .pth."""
    torch.manual_seed(0)
    reference = torchvision.models.resnext50_32x4d(weights=None).eval()
    _randomize_batchnorm(reference)
    path = tmp_path_factory.mktemp("torchvision") / "resnext50_32x4d.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def _small_state_dict(name: str, **settings) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = create_model(name, num_classes=10, **settings)
    _randomize_batchnorm(model)
    return model.state_dict()


def _assert_equal_except(model: nn.Module, expected: dict[str, torch.Tensor], skipped: set[str]) -> None:
    for key, value in model.state_dict().items():
        if key not in skipped:
            assert torch.equal(value, expected[key]), key


# ------------------------------------------------------------------------------ torchvision


def test_torchvision_resnext_weights_load_completely_and_give_torchvision_outputs(torchvision_resnext50):
    reference, path = torchvision_resnext50
    model = create_model("resnext50_32x4d", num_classes=1000).eval()
    report = load_pretrained(model, path)
    assert report.loaded == len(reference.state_dict())
    assert (report.reinitialized, report.adapted, report.unused) == ((), {}, ())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_another_class_count_keeps_a_fresh_classifier_and_loads_everything_else(torchvision_resnext50):
    reference, path = torchvision_resnext50
    model = create_model("resnext50_32x4d", num_classes=10)
    fresh_fc = model.fc.weight.clone()
    report = load_pretrained(model, path)
    assert report.reinitialized == ("fc.weight", "fc.bias")
    assert torch.equal(model.fc.weight, fresh_fc)
    _assert_equal_except(model, reference.state_dict(), {"fc.weight", "fc.bias"})
    assert report.describe() == (
        f"loaded {len(reference.state_dict()) - 2} tensors from {path}; "
        "re-initialized fc.weight, fc.bias (1000 → 10 classes)"
    )


def test_rgb_stem_summed_for_grayscale_gives_the_rgb_outputs_of_a_grey_image(torchvision_resnext50):
    reference, path = torchvision_resnext50
    model = create_model("resnext50_32x4d", num_classes=1000, in_chans=1).eval()
    report = load_pretrained(model, path)
    assert torch.equal(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert report.adapted == {"conv1.weight": "3 → 1 input channels, filters summed"}
    grey = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(grey), reference(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_rgb_stem_tiled_for_six_channels_keeps_the_response_to_equal_channels(tmp_path):
    weights = _small_state_dict(SMALL_RESNEXT)
    torch.save(weights, tmp_path / "rgb.pth")
    model = create_model(SMALL_RESNEXT, num_classes=10, in_chans=6)
    report = load_pretrained(model, tmp_path / "rgb.pth")
    rgb = weights["conv1.weight"]
    assert torch.equal(model.conv1.weight, torch.cat([rgb, rgb], dim=1) / 2)
    assert report.adapted == {"conv1.weight": "3 → 6 input channels, filters tiled, scaled by 3/6"}


# ------------------------------------------------------------------------------ HorNet release


def test_hornet_release_training_checkpoint_loads_with_a_new_head(tmp_path):
    weights = _small_state_dict(SMALL_HORNET)
    # The nano variant has the release's key pattern: its keys are a subset of HorNet-T's.
    official = json.loads((FIXTURES / "hornet_tiny_keys.json").read_text())["hornet_tiny_7x7"]
    assert set(weights) <= set(official)
    # As the release's utils.save_model writes it.
    release = {
        "model": weights,
        "model_ema": {key: value + 1 for key, value in weights.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3, "params": [0, 1]}]},
        "epoch": 3,
        "scaler": {},
        "args": argparse.Namespace(model="hornet_tiny_7x7", lr=4e-3, drop_path=0.2),
    }
    torch.save(release, tmp_path / "checkpoint-best.pth")
    model = create_model(SMALL_HORNET, num_classes=5)
    report = load_pretrained(model, tmp_path / "checkpoint-best.pth")
    assert report.reinitialized == ("head.weight", "head.bias")
    assert (report.checkpoint_classes, report.num_classes) == (10, 5)
    assert report.loaded == len(weights) - 2
    _assert_equal_except(model, weights, {"head.weight", "head.bias"})


def test_ddp_and_compile_prefixes_are_removed(tmp_path):
    weights = _small_state_dict(SMALL_HORNET)
    wrapped = {f"module._orig_mod.{key}": value for key, value in weights.items()}
    torch.save({"state_dict": wrapped}, tmp_path / "ddp.pt")
    model = create_model(SMALL_HORNET, num_classes=10)
    assert load_pretrained(model, tmp_path / "ddp.pt").loaded == len(weights)
    _assert_equal_except(model, weights, set())


def test_a_backbone_without_classifier_loads_and_says_so(tmp_path):
    weights = _small_state_dict(SMALL_HORNET)
    backbone = {key: value for key, value in weights.items() if not key.startswith("head.")}
    torch.save(backbone, tmp_path / "backbone.pth")
    report = load_pretrained(create_model(SMALL_HORNET, num_classes=10), tmp_path / "backbone.pth")
    assert report.loaded == len(backbone)
    assert report.describe().endswith("re-initialized head.weight, head.bias (the checkpoint has no classifier)")


# ------------------------------------------------------------------------------ safetensors


def test_gtrain_and_plain_safetensors_load(tmp_path):
    torch.manual_seed(2)
    trained = create_model(SMALL_RESNEXT, num_classes=10)
    meta = WeightsMeta(SMALL_RESNEXT, 10, 3, 32, (0.5,) * 3, (0.25,) * 3, tuple("abcdefghij"), "CIFAR10", {})
    save_weights(tmp_path / "gtrain.safetensors", trained, meta)
    save_file(trained.state_dict(), tmp_path / "plain.safetensors")
    for name in ("gtrain.safetensors", "plain.safetensors"):
        model = create_model(SMALL_RESNEXT, num_classes=10)
        assert load_pretrained(model, tmp_path / name).loaded == len(trained.state_dict())
        _assert_equal_except(model, trained.state_dict(), set())


# ------------------------------------------------------------------------------ refusals


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# A protocol-4 pickle makes torch warn that it expected protocol 2 before it refuses the file.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("write", ["torch.save", "pickle.dump"])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, write):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pth"
    if write == "torch.save":
        torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCommand(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_RunsCommand(marker)))
    with pytest.raises(UserError, match="refusing to load .*not only tensors") as error:
        load_pretrained(create_model(SMALL_RESNEXT, num_classes=10), path)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_resnext_weights_into_a_hornet_name_the_misfits_and_the_matching_model(tmp_path):
    torch.save(_small_state_dict(SMALL_RESNEXT), tmp_path / "resnext.pth")
    with pytest.raises(UserError) as error:
        load_pretrained(create_model(SMALL_HORNET, num_classes=10), tmp_path / "resnext.pth")
    message = str(error.value)
    assert f"does not fit {SMALL_HORNET}" in message
    assert "downsample_layers.0.0.weight: missing" in message
    assert f"set model.name = '{SMALL_RESNEXT}'" in message


def test_a_body_tensor_of_another_shape_is_an_error_not_a_random_init(tmp_path):
    weights = _small_state_dict(SMALL_RESNEXT)
    weights["layer2.0.conv2.weight"] = weights["layer2.0.conv2.weight"][:, :1]
    torch.save(weights, tmp_path / "edited.pth")
    expected = r"1 of its \d+ tensors .* layer2\.0\.conv2\.weight: \(64, 1, 3, 3\) in the checkpoint"
    with pytest.raises(UserError, match=expected):
        load_pretrained(create_model(SMALL_RESNEXT, num_classes=10), tmp_path / "edited.pth")


def test_missing_file_is_a_user_error_naming_the_path(tmp_path):
    with pytest.raises(UserError, match=f"no checkpoint at {tmp_path / 'nope.pth'}"):
        load_pretrained(create_model(SMALL_RESNEXT, num_classes=10), tmp_path / "nope.pth")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("junk.pth", b"hello world", "not a PyTorch checkpoint"),
        ("empty.pth", b"", "not a PyTorch checkpoint"),
        ("junk.safetensors", b"hello world", "not a valid safetensors file"),
        ("weights.h5", b"", "unknown checkpoint suffix '.h5'"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_a_user_error(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=expected):
        load_pretrained(create_model(SMALL_RESNEXT, num_classes=10), tmp_path / name)


def test_a_checkpoint_without_weights_lists_what_it_holds(tmp_path):
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "no_weights.pth")
    with pytest.raises(UserError, match="holds no model weights.*found a dict with keys 'epoch', 'optimizer'"):
        load_pretrained(create_model(SMALL_RESNEXT, num_classes=10), tmp_path / "no_weights.pth")
