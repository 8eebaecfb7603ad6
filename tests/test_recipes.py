"""Recipes: every bundled one validates; mistakes are named by key, value and fix."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtrain.errors import UserError
from gtrain.recipe import Recipe, apply_overrides, bundled_recipes, load_recipe, parse_toml, validate_recipe


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_every_bundled_recipe_validates_and_states_its_evidence(name):
    recipe, stem = load_recipe(name)
    assert stem == name
    assert recipe.description
    text = bundled_recipes()[name].read_text()
    assert text.startswith("#"), "a recipe opens with a header comment stating its evidence"


def test_required_key_names_exist():
    recipe = Recipe()
    for path in ["model.name", "data.dataset", "data.root", "data.download", "data.batch_size", "optim.lr",
                 "train.epochs", "train.seed", "train.precision", "train.deterministic"]:
        section, key = path.split(".")
        assert hasattr(getattr(recipe, section), key), path


def test_unknown_recipe_key_names_the_key_and_suggests_the_closest():
    with pytest.raises(UserError) as error:
        validate_recipe({"optim": {"lrr": 0.1}}, source="r.toml")
    assert str(error.value) == "r.toml: unknown key optim.lrr: did you mean lr?"


def test_out_of_range_value_names_full_key_value_and_limit():
    with pytest.raises(UserError) as error:
        validate_recipe({"optim": {"lr": -1}}, source="r.toml")
    assert str(error.value) == "r.toml: optim.lr = -1: input should be greater than 0"


def test_wrong_type_and_bad_choice_are_reported_together():
    with pytest.raises(UserError) as error:
        validate_recipe({"data": {"batch_size": "big"}, "train": {"precision": "fp8", "epochs": 0}}, source="r.toml")
    message = str(error.value)
    assert message.startswith("r.toml: 3 problems")
    assert "data.batch_size = 'big': input should be a valid integer" in message
    assert "train.precision = 'fp8': allowed: 'auto', 'fp32', 'bf16' or 'fp16'" in message
    assert "train.epochs = 0: input should be greater than or equal to 1" in message


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UserError, match=r"model.name: unknown model 'resnext29_4x61d': did you mean resnext29_4x16d"):
        validate_recipe({"model": {"name": "resnext29_4x61d"}})


def test_model_settings_are_checked_against_the_chosen_variant():
    with pytest.raises(UserError, match=r"unknown key model.zero_init_last: did you mean zero_init_last_bn\?"):
        validate_recipe({"model": {"name": "resnext29_2x16d", "zero_init_last": True}})
    with pytest.raises(UserError, match=r"model.zero_init_last_bn = 3: expected a bool"):
        validate_recipe({"model": {"name": "resnext29_2x16d", "zero_init_last_bn": 3}})
    recipe = validate_recipe({"model": {"name": "resnext29_2x16d", "zero_init_last_bn": True}})
    assert recipe.model_overrides() == {"zero_init_last_bn": True}


def test_milestones_must_fall_inside_the_run():
    with pytest.raises(UserError, match=r"optim.milestones \[20\] must be below train.epochs = 10"):
        validate_recipe({"optim": {"schedule": "multistep", "milestones": [20]}, "train": {"epochs": 10}})


def test_set_overrides_are_typed_like_the_file():
    document = {}
    apply_overrides(document, ["optim.lr=0.05", "train.deterministic=true", "optim.milestones=[2, 4]", "data.root=/tmp/x"])
    assert document == {"optim": {"lr": 0.05, "milestones": [2, 4]}, "train": {"deterministic": True}, "data": {"root": "/tmp/x"}}
    recipe = validate_recipe(document)
    assert recipe.optim.lr == 0.05 and recipe.train.deterministic is True


def test_set_override_without_equals_sign_explains_the_form():
    with pytest.raises(UserError, match=r"expected key.sub=value"):
        apply_overrides({}, ["optim.lr"])


def test_malformed_toml_names_the_line():
    with pytest.raises(UserError, match=r"bad.toml: not valid TOML: .*line 2"):
        parse_toml('[optim]\nlr = = 1\n', "bad.toml")


def test_missing_recipe_file_and_unknown_recipe_name(tmp_path):
    with pytest.raises(UserError, match=r"recipe file .*nope.toml does not exist"):
        load_recipe(str(tmp_path / "nope.toml"))
    with pytest.raises(UserError, match=r"no recipe named 'quickstrt': did you mean quickstart"):
        load_recipe("quickstrt")


def test_resolved_recipe_round_trips_through_toml():
    recipe, _ = load_recipe("quickstart", ["optim.lr=0.02"])
    again = validate_recipe(parse_toml(recipe.to_toml(), "resolved"))
    assert again == recipe


toml_scalars = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(), st.text(max_size=8))
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))
keys = st.sampled_from(["name", "lr", "epochs", "batch_size", "dataset", "precision", "seed", "bogus", "momentum",
                        "milestones", "schedule", "root", "image_size", "warmup_epochs", "drop_path_rate"])
sections = st.dictionaries(keys, toml_values, max_size=4)
documents = st.dictionaries(
    st.sampled_from(["model", "data", "optim", "train", "extra", "description"]),
    st.one_of(sections, toml_scalars),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(documents)
def test_any_recipe_document_is_accepted_or_rejected_with_gtrains_own_error(document):
    try:
        validate_recipe(document)
    except UserError as error:
        # One line per problem, each naming the section or key of the document it is about.
        lines = str(error).splitlines()
        problems = [line.strip(" -") for line in lines[1:]] if "problems" in lines[0] else lines
        named = set(document) | {f"{section}.{key}" for section, keys in document.items() if isinstance(keys, dict) for key in keys}
        assert problems and all(any(name in line for name in named) for line in problems), str(error)


def test_model_settings_that_make_no_network_are_one_line():
    with pytest.raises(UserError, match=r"model.cardinality = 0: resnext29_2x16d cannot be built with that"):
        validate_recipe({"model": {"name": "resnext29_2x16d", "cardinality": 0}})


def test_model_settings_are_reported_with_the_other_problems():
    with pytest.raises(UserError) as error:
        validate_recipe({"model": {"name": "resnext29_2x16d", "cardinalty": 3}, "optim": {"lrr": 0.1}})
    message = str(error.value)
    assert "2 problems" in message
    assert "unknown key optim.lrr: did you mean lr?" in message
    assert "unknown key model.cardinalty: did you mean cardinality?" in message


def test_per_image_augmentation_without_augment_is_a_conflict():
    with pytest.raises(UserError, match=r"data.augment = false turns off"):
        validate_recipe({"data": {"augment": False, "auto_augment": "randaugment"}})


def test_a_variant_that_refuses_its_settings_is_reported_with_the_other_problems():
    with pytest.raises(UserError) as error:
        validate_recipe({"model": {"name": "hornet_cifar_nano_7x7", "orders": [2, 3]}, "optim": {"lr": -1}})
    assert "2 problems" in str(error.value) and "optim.lr = -1" in str(error.value)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd0.5", "rand-m9-mstd101-inc1", "trivialaugment"])
def test_auto_augment_takes_timm_randaugment_strings(policy):
    assert validate_recipe({"data": {"auto_augment": policy}}).data.auto_augment == policy


@pytest.mark.parametrize("policy", ["rand-x9", "randaugment-m9", "rand-m9-mstd", "autoaugment"])
def test_an_auto_augment_neither_torchvision_nor_timm_has_is_one_line(policy):
    with pytest.raises(UserError, match=r"data.auto_augment = .*: none, randaugment, trivialaugment, or timm's"):
        validate_recipe({"data": {"auto_augment": policy}})
