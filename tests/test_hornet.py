"""What the HorNet family promises: the official release's parameters and outputs, the
paper's gnConv recurrence, and small variants that run on images from 8 to 32 px."""

import functools
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gtrain.errors import UserError
from gtrain.models import create_model
from gtrain.models.hornet import VARIANTS, GlobalLocalFilter, GnConv, HorNet
from gtrain.models.layers import DropPath, LayerNorm2d

FIXTURES = Path(__file__).parent / "fixtures"

# name -> (num_classes, parameters). ImageNet variants: what the official hornet.py builds
# (and the paper's Table 1 rounds); CIFAR variants: gtrain's own, at 10 classes.
PARAMETERS = {
    "hornet_tiny_7x7": (1000, 22_409_512),
    "hornet_tiny_gf": (1000, 22_991_848),
    "hornet_small_7x7": (1000, 49_528_264),
    "hornet_small_gf": (1000, 50_401_768),
    "hornet_base_7x7": (1000, 87_256_680),
    "hornet_base_gf": (1000, 88_421_352),
    "hornet_large_7x7": (1000, 194_542_504),
    "hornet_large_gf": (1000, 196_289_512),
    "hornet_cifar_nano_7x7": (10, 1_449_098),
    "hornet_cifar_nano_gf": (10, 1_433_746),
    "hornet_cifar_tiny_7x7": (10, 12_397_066),
    "hornet_cifar_tiny_gf": (10, 12_334_218),
}

# Logits (5 classes) of the official hornet.py for the weights and images of
# `_deterministic_weights` and `_deterministic_images`. At 64 px the Global-Local Filters
# see 4x4 and 2x2 maps, so their weights are resized; at 224 px they are used as stored.
OFFICIAL_LOGITS = {
    ("hornet_tiny_7x7", 64): [
        [-1.442757, 1.056787, -0.192129, -2.554119, 0.898516],
        [0.657391, 3.85139, -0.31104, 0.125974, 1.426482],
    ],
    ("hornet_tiny_gf", 64): [
        [0.000168, 1.51148, -1.280822, -0.6738, 1.707216],
        [0.443975, 2.962296, 0.897386, -1.231999, 1.458174],
    ],
    ("hornet_tiny_gf", 224): [
        [-1.104372, 2.0948, 0.098645, -0.146408, 1.974301],
        [-0.681372, 2.925188, 0.497615, -0.183963, 2.036527],
    ],
}


def _build_on_meta(name: str, num_classes: int) -> HorNet:
    # Shapes without memory or init time: the 200M-parameter variants build instantly.
    with torch.device("meta"):
        return HorNet(VARIANTS[name], num_classes=num_classes, in_chans=3)


def _hashed_uniform(n: int, *, seed: int) -> torch.Tensor:
    """n pseudo-random numbers in [-1, 1) from an integer hash: exact, so the same on every platform."""
    x = (torch.arange(n, dtype=torch.int64) + seed * 7919) & 0xFFFFFFFF
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (x >> 16) ^ x
    return x.double() / 2**31 - 1


def _deterministic_weights(model: torch.nn.Module) -> None:
    """Set every tensor from a hash of its name, the same way for any module with the release's keys."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            # Seeded by the name, not the registration order, which differs from the release's.
            wave = _hashed_uniform(value.numel(), seed=zlib.crc32(key.encode())).reshape(value.shape)
            if key.endswith("weight") and value.ndim == 1:  # LayerNorm scales
                value.copy_(1 + 0.1 * wave)
            elif "gamma" in key:  # layer scales large enough for every branch to count
                value.copy_(wave)
            elif value.ndim > 1:  # conv, linear and filter weights: gain ~1.7 offsets gnConv's s = 1/3
                value.copy_(3 * wave / math.sqrt(value[0].numel()))
            else:  # biases
                value.copy_(0.01 * wave)


def _deterministic_images(n: int, size: int) -> torch.Tensor:
    waves = torch.cos(torch.arange(n * 3 * size * size, dtype=torch.float64) * 0.1)
    return waves.reshape(n, 3, size, size).float()


# ------------------------------------------------------------------ the official release


def test_every_hornet_variant_has_a_pinned_parameter_count():
    assert set(PARAMETERS) == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_count_is_the_pinned_one(name):
    num_classes, expected = PARAMETERS[name]
    model = _build_on_meta(name, num_classes)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", ["hornet_tiny_7x7", "hornet_tiny_gf"])
def test_hornet_tiny_state_dict_matches_official_release(name):
    # Same keys and shapes, so checkpoints load with strict=True; in the same order too, so
    # parameters() lists them as the release does.
    official = json.loads((FIXTURES / "hornet_tiny_keys.json").read_text())[name]
    ours = {key: list(value.shape) for key, value in _build_on_meta(name, 1000).state_dict().items()}
    assert list(ours.items()) == list(official.items())


@functools.cache
def _tiny_with_deterministic_weights(name: str) -> HorNet:
    model = _build_on_meta(name, num_classes=5).to_empty(device="cpu").eval()
    _deterministic_weights(model)
    return model


@pytest.mark.parametrize(("name", "size"), sorted(OFFICIAL_LOGITS))
def test_hornet_tiny_gives_the_official_release_outputs_for_the_same_weights(name, size):
    model = _tiny_with_deterministic_weights(name)
    with torch.no_grad():
        logits = model(_deterministic_images(2, size))
    torch.testing.assert_close(logits, torch.tensor(OFFICIAL_LOGITS[name, size]), atol=1e-4, rtol=1e-4)


def test_weights_start_as_in_the_release():
    torch.manual_seed(0)
    model = create_model("hornet_cifar_nano_gf", num_classes=10)
    block = model.stages[2][0]
    # Truncated normal, std 0.02, for conv and linear weights; zero biases; layer scale 1e-6.
    assert block.pwconv1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.gnconv.dwconv.complex_weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(block.pwconv1.bias) == 0
    assert torch.all(block.gamma1 == 1e-6)


# ------------------------------------------------------------------------------- gnConv


def test_gnconv_matches_the_papers_recurrence_computed_by_hand():
    torch.manual_seed(0)
    gnconv = GnConv(16, order=3)
    for p in gnconv.parameters():  # non-zero biases, so that every term is checked
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 5, 6)

    # [p_0, q_0, q_1, q_2] = proj_in(x), widths C_k = 4, 8, 16.
    widths = [4, 8, 16]
    fused = F.conv2d(x, gnconv.proj_in.weight, gnconv.proj_in.bias)
    p, q = fused[:, :4], fused[:, 4:]
    offsets = [0, 4, 12, 28]

    def f(k: int) -> torch.Tensor:  # depthwise 7x7 on q_k alone, scaled by s = 1/3
        channels = slice(offsets[k], offsets[k + 1])
        weight, bias = gnconv.dwconv.weight[channels], gnconv.dwconv.bias[channels]
        return F.conv2d(q[:, channels], weight, bias, padding=3, groups=widths[k]) / 3

    p = f(0) * p  # p_1 = f(q_0) * p_0
    for k in (1, 2):  # p_{k+1} = f(q_k) * g_k(p_k)
        g = gnconv.pws[k - 1]
        p = f(k) * F.conv2d(p, g.weight, g.bias)
    expected = F.conv2d(p, gnconv.proj_out.weight, gnconv.proj_out.bias)

    torch.testing.assert_close(gnconv(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dim", "order"), [(8, 1), (64, 3), (96, 5)])
def test_gnconv_works_standalone_on_any_map_size(dim, order):
    gnconv = GnConv(dim, order=order)
    x = torch.randn(2, dim, 9, 13, requires_grad=True)
    y = gnconv(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gnconv_width_not_divisible_by_two_to_the_order_is_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        GnConv(6, order=3)


def test_global_local_filter_runs_on_maps_other_than_its_weight_size():
    gf = GlobalLocalFilter(32, h=14, w=8)  # weights for a 14x14 map
    for size in [(14, 14), (9, 11), (2, 2), (1, 1)]:
        x = torch.randn(2, 32, *size, requires_grad=True)
        y = gf(x)
        assert y.shape == x.shape
        y.square().sum().backward()
        assert torch.isfinite(gf.complex_weight.grad).all() and gf.complex_weight.grad.abs().sum() > 0
        gf.zero_grad()


def test_layer_norm_2d_matches_the_hand_written_channels_first_formula():
    norm = LayerNorm2d(24, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 24, 5, 7) * 4 + 2
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    expected = norm.weight[:, None, None] * (x - mean) / torch.sqrt(var + 1e-6) + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(1000, 4, 2, 2)
    torch.manual_seed(0)
    y = drop(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # kept samples scaled by 1/0.5
    assert y.mean().item() == pytest.approx(1.0, abs=0.1)
    assert torch.equal(drop.eval()(x), x)


# ------------------------------------------------------------------------- small variants


@pytest.mark.parametrize("name", ["hornet_cifar_nano_7x7", "hornet_cifar_nano_gf"])
@pytest.mark.parametrize("size", [8, 16, 32])
def test_cifar_nano_trains_on_8_to_32_px_grayscale_images(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1)
    logits = model(torch.randn(4, 1, size, size))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(4)).backward()
    no_gradient = [key for key, p in model.named_parameters() if p.grad is None]
    assert no_gradient == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["hornet_cifar_tiny_7x7", "hornet_cifar_tiny_gf"])
def test_cifar_tiny_keeps_every_stage_at_least_4x4_at_32_px(name):
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, model.num_features, 4, 4)
    assert torch.isfinite(features).all()


def test_input_smaller_than_the_downsampling_is_a_user_error_naming_the_minimum():
    model = create_model("hornet_cifar_nano_7x7", num_classes=10)
    with pytest.raises(UserError, match="at least 8x8"):
        model(torch.randn(1, 3, 4, 4))


# ------------------------------------------------------------------ registry and head


def test_create_model_builds_hornet_tiny_7x7_through_the_registry():
    model = create_model("hornet_tiny_7x7", num_classes=1000)
    assert isinstance(model, HorNet)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS["hornet_tiny_7x7"][1]


def test_overrides_set_drop_path_and_layer_scale():
    model = create_model("hornet_cifar_nano_7x7", num_classes=10, drop_path_rate=0.3, layer_scale_init=0.5)
    last = model.stages[-1][-1]
    assert last.drop_path.drop_prob == pytest.approx(0.3)  # linear from 0 to the rate
    assert model.stages[0][0].drop_path.drop_prob == 0.0
    assert torch.all(last.gamma2 == 0.5)


def test_layer_scale_init_zero_drops_the_gammas_as_in_the_release():
    model = create_model("hornet_cifar_nano_7x7", num_classes=10, layer_scale_init=0.0)
    assert not any("gamma" in key for key in model.state_dict())
    assert torch.isfinite(model(torch.randn(1, 3, 16, 16))).all()


def test_reset_classifier_gives_a_new_head_and_keeps_the_body():
    model = create_model("hornet_cifar_nano_gf", num_classes=10)
    body = {key: value.clone() for key, value in model.state_dict().items() if not key.startswith("head")}
    model.reset_classifier(3)
    assert model.head.out_features == 3 and model.head.in_features == model.num_features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    for key, value in body.items():
        assert torch.equal(model.state_dict()[key], value)
