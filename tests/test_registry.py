"""What every registered model promises, whatever its family, and what the one door
(`create_model`) promises about names and overrides."""

import pytest
import torch

from gtrain.errors import UserError
from gtrain.models import create_model, get_model_entry, list_models

NUM_CLASSES = 7  # not 10 or 1000, so a hard-coded head size cannot pass


def _smallest_input(name: str) -> torch.Tensor:
    # CIFAR-size variants at their own 32 px; ImageNet-size ones at 64 px, the smallest
    # size that still leaves a 2x2 map after 32x downsampling, to keep the suite fast.
    size = min(get_model_entry(name).input_size, 64)
    return torch.randn(2, 3, size, size)


# Backward through 50M-200M parameters takes seconds on a laptop CPU; the big variants are
# built from the same blocks as the smaller ones of their family, which are checked.
MAX_PARAMETERS_FOR_BACKWARD = 30_000_000


@pytest.fixture(scope="module", params=list_models())
def model_and_input(request):
    torch.manual_seed(0)
    return create_model(request.param, num_classes=NUM_CLASSES), _smallest_input(request.param)


@pytest.fixture(scope="module")
def features_and_logits(model_and_input):
    model, x = model_and_input
    model.eval()
    with torch.no_grad():
        return model.forward_features(x), model(x)


def test_registry_holds_both_families():
    families = {get_model_entry(name).family for name in list_models()}
    assert families == {"resnext", "hornet"}


def test_every_model_gives_one_finite_logit_per_class(features_and_logits):
    _, logits = features_and_logits
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()


def test_every_model_forward_is_forward_head_of_forward_features(model_and_input, features_and_logits):
    model, _ = model_and_input
    features, logits = features_and_logits
    assert features.shape[:2] == (2, model.num_features)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(features), logits)


def test_every_parameter_receives_a_gradient(model_and_input):
    model, x = model_and_input
    num_parameters = sum(p.numel() for p in model.parameters())
    if num_parameters > MAX_PARAMETERS_FOR_BACKWARD:
        pytest.skip(f"{num_parameters / 1e6:.0f}M parameters: backward is slow on CPU")
    model.train()
    model.zero_grad(set_to_none=True)
    labels = torch.arange(2) % NUM_CLASSES
    torch.nn.functional.cross_entropy(model(x), labels).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean resnext29_4x16d"):
        create_model("resnext29_4x61d", num_classes=10)


def test_unknown_override_names_the_closest_valid_setting():
    with pytest.raises(UserError, match="'zero_init_last_b'.*did you mean zero_init_last_bn"):
        create_model("resnext29_2x16d", num_classes=10, zero_init_last_b=True)


def test_overrides_replace_config_fields():
    model = create_model("resnext29_2x16d", num_classes=10, cardinality=4, zero_init_last_bn=True)
    assert model.layer1[0].conv2.groups == 4
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0


def test_overrides_leave_the_registered_variant_unchanged():
    create_model("resnext29_2x16d", num_classes=10, cardinality=4)
    assert get_model_entry("resnext29_2x16d").config.cardinality == 2
    assert create_model("resnext29_2x16d", num_classes=10).layer1[0].conv2.groups == 2


def test_every_family_declares_its_classifier_and_stem():
    """Fine-tuning replaces the classifier and adapts the stem by the names the family
    registers: the Linear that gives the logits, and the one conv that sees the channels."""
    from torch import nn

    from gtrain.models import classifier_keys, stem_weight_key

    for name in list_models():
        with torch.device("meta"):
            model = create_model(name, num_classes=7, in_chans=2)
        weight, bias = classifier_keys(model)
        head = model.get_submodule(weight.rsplit(".", 1)[0])
        assert isinstance(head, nn.Linear) and head.out_features == 7 and bias.endswith(".bias"), name
        stem = model.get_submodule(stem_weight_key(model).rsplit(".", 1)[0])
        assert isinstance(stem, nn.Conv2d) and stem.in_channels == 2, name
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert stem is first_conv, name
