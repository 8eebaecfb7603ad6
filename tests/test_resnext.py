"""What the ResNeXt family promises: the paper's sizes, torchvision's ImageNet models
key for key and output for output, and the knobs a user can turn."""

import pytest
import torch
import torchvision
from torch import nn

from gtrain.errors import UserError
from gtrain.models import create_model
from gtrain.models.resnext import VARIANTS, Bottleneck

IMAGENET_VARIANTS = ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"]
SMALL_CIFAR_VARIANTS = ["resnext29_2x16d", "resnext29_4x16d"]

# ImageNet counts at 1000 classes equal torchvision's; the paper's CIFAR table gives 34.4M and
# 68.1M for ResNeXt-29 8x64d and 16x64d at 10 classes.
PARAMETER_COUNTS = {
    "resnext50_32x4d": (1000, 25_028_904),
    "resnext101_32x8d": (1000, 88_791_336),
    "resnext101_64x4d": (1000, 83_455_272),
    "resnext29_8x64d": (10, 34_426_698),
    "resnext29_16x64d": (10, 68_155_210),
    "resnext29_2x16d": (10, 1_935_306),
    "resnext29_4x16d": (10, 3_172_426),
}


def test_every_variant_has_a_pinned_parameter_count():
    assert sorted(PARAMETER_COUNTS) == sorted(VARIANTS)


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_count_matches_the_reference(name):
    num_classes, expected = PARAMETER_COUNTS[name]
    model = create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == expected


def _randomize_batchnorm(model: nn.Module) -> None:
    # Fresh BNs are the identity in eval mode; random statistics make the comparison bite.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.1)
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", IMAGENET_VARIANTS)
def test_imagenet_variant_loads_torchvision_weights_and_gives_its_outputs(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    _randomize_batchnorm(reference)
    model = create_model(name, num_classes=1000).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        actual = model(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_the_last_bn_of_every_block_starts_at_zero_by_default():
    model = create_model("resnext29_2x16d", num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 9
    for block in blocks:
        assert torch.count_nonzero(block.bn3.weight) == 0
        assert torch.all(block.bn1.weight == 1) and torch.all(block.bn2.weight == 1)


def test_zero_init_last_bn_false_starts_the_last_bn_at_one_as_in_the_paper():
    model = create_model("resnext29_2x16d", num_classes=10, zero_init_last_bn=False)
    for block in (m for m in model.modules() if isinstance(m, Bottleneck)):
        assert torch.all(block.bn3.weight == 1)


def test_grayscale_images_work_with_in_chans_1():
    model = create_model("resnext29_2x16d", num_classes=10, in_chans=1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "resnext29_2x16d"])
def test_stride_sits_on_the_grouped_3x3_conv(name):
    model = create_model(name, num_classes=10)
    first_block = model.layer2[0]
    assert first_block.conv1.stride == (1, 1)
    assert first_block.conv2.stride == (2, 2)
    assert first_block.conv2.groups == VARIANTS[name].cardinality
    assert first_block.downsample[0].stride == (2, 2)


def test_resnext29_group_width_doubles_per_stage_and_outputs_256_512_1024():
    model = create_model("resnext29_2x16d", num_classes=10)
    stages = [model.layer1, model.layer2, model.layer3]
    # cardinality 2 x group width 16, 32, 64
    assert [stage[0].conv2.out_channels for stage in stages] == [32, 64, 128]
    assert [stage[-1].bn3.num_features for stage in stages] == [256, 512, 1024]
    assert model.num_features == 1024


@pytest.mark.parametrize("name", SMALL_CIFAR_VARIANTS)
@pytest.mark.parametrize("size", [8, 16, 32])
def test_small_cifar_variants_run_on_tiny_images(name, size):
    model = create_model(name, num_classes=10, in_chans=1)
    logits = model(torch.randn(2, 1, size, size))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_forward_features_downsamples_4x_with_the_cifar_stem_and_32x_with_the_imagenet_one():
    model = create_model("resnext29_2x16d", num_classes=10)
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1024, 8, 8)
    # One block per stage keeps this fast; depth does not change the resolution.
    model = create_model("resnext50_32x4d", num_classes=10, stage_depths=(1, 1, 1, 1))
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)


def test_reset_classifier_gives_a_new_head_and_keeps_the_body():
    model = create_model("resnext29_2x16d", num_classes=10)
    body = model.layer3[-1].conv3.weight
    model.reset_classifier(5)
    assert model.fc.out_features == 5
    assert model.layer3[-1].conv3.weight is body
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_unknown_stem_is_a_user_error_that_lists_the_valid_ones():
    with pytest.raises(UserError, match="imagenet, cifar"):
        create_model("resnext29_2x16d", num_classes=10, stem="tiny")
