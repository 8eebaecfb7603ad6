"""The README keeps its promises: its recipe reference is the schema's own, its table of
bundled recipes lists exactly the bundled recipes with their own models and numbers, and
the recipe of its tutorial trains on an image folder laid out as the tutorial says.
docs/recipes.md's tables hold each reproduction recipe's own values, setting by setting.

`make docs` (`python -m tests.test_docs`) rewrites the generated recipe reference in README.md.
"""

import re
import tomllib
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from typer.testing import CliRunner

from gtrain.cli import app
from gtrain.hub import resolve
from gtrain.models import create_model
from gtrain.recipe import (
    SAFE_TO_CHANGE_ON_RESUME, Recipe, bundled_recipes, flatten, load_recipe, recipe_reference, validate_recipe,
)  # fmt: skip
from tests.conftest import write_image_folder

README = Path(__file__).resolve().parent.parent / "README.md"
RECIPES_DOC = README.parent / "docs" / "recipes.md"
# Measured on a CPU, no published training to follow: their headers state the evidence.
OWN_RECIPES = {"quickstart", "quickstart_hornet", "finetune_resnext50_32x4d"}
REFERENCE_START = "<!-- recipe-reference:start -->\n"
REFERENCE_END = "<!-- recipe-reference:end -->"
TUTORIAL_RECIPE = re.compile(r"<!-- tutorial-recipe -->\n```toml\n(.*?)```", re.DOTALL)
BUNDLED_TABLE_HEADER = "| recipe | model | dataset | epochs | evidence |"

runner = CliRunner()


def reference_block(text: str) -> str:
    """What README.md holds between the recipe-reference markers."""
    match = re.search(re.escape(REFERENCE_START) + "(.*?)" + re.escape(REFERENCE_END), text, re.DOTALL)
    assert match, f"README.md has no {REFERENCE_START.strip()} ... {REFERENCE_END} block"
    return match.group(1)


def rewrite_reference(readme: Path = README) -> None:
    """Replace the block between the markers with the current `recipe_reference()`."""
    text = readme.read_text()
    old = REFERENCE_START + reference_block(text) + REFERENCE_END
    readme.write_text(text.replace(old, REFERENCE_START + recipe_reference() + REFERENCE_END))


def section(text: str, heading: str) -> str:
    """The text of the `## heading` section, up to the next `## `."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def bundled_table(text: str) -> dict[str, list[str]]:
    """README's table of bundled recipes: name -> [model, dataset, epochs, evidence]."""
    lines = text.splitlines()
    assert BUNDLED_TABLE_HEADER in lines, f"README.md has no table headed {BUNDLED_TABLE_HEADER}"
    rows = {}
    for line in lines[lines.index(BUNDLED_TABLE_HEADER) + 2 :]:
        if not line.startswith("|"):
            break
        name, *cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[name.strip("`")] = cells
    return rows


def header_comment(path: Path) -> str:
    """A recipe's opening comment lines, joined into one line."""
    comment = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("# "))
    return " ".join(comment)


# --------------------------------------------------------------------- the recipe reference


def test_readme_recipe_reference_is_the_one_generated_from_the_schema():
    assert reference_block(README.read_text()) == recipe_reference(), (
        "README.md's recipe reference differs from the schema in gtrain/recipe.py: "
        "run `make docs` (or `python -m tests.test_docs`) to rewrite it"
    )


def schema_keys():
    """(section heading in the reference, key, pydantic field) of every recipe key."""
    for name, field in Recipe.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            for key, inner in field.annotation.model_fields.items():
                yield f"`[{name}]`", key, inner
        else:
            yield "Top level", name, field


def test_every_recipe_key_is_in_the_reference_with_a_meaning():
    tables = {part.split("\n", 1)[0]: part for part in recipe_reference().split("### ")[1:]}
    for heading, key, field in schema_keys():
        assert field.description, f"{heading} {key} has no description= in gtrain/recipe.py"
        assert f"| `{key}` |" in tables[heading], f"{heading} {key} is missing from recipe_reference()"


def test_recipes_reference_prints_plain_markdown():
    result = runner.invoke(app, ["recipes", "--reference"])
    assert result.exit_code == 0, result.output
    assert result.output == recipe_reference()
    assert "\x1b" not in result.output


# --------------------------------------------------------------------- the bundled recipes


def test_readme_table_lists_every_bundled_recipe_with_its_model_dataset_and_epochs():
    rows = bundled_table(README.read_text())
    assert sorted(rows) == sorted(bundled_recipes()), "the README's table of bundled recipes and recipes/*.toml differ"
    for name, (model, dataset, epochs, evidence) in rows.items():
        recipe, _ = load_recipe(name)
        assert model == recipe.model.name, name
        assert dataset.split(" (")[0] == recipe.data.dataset, name
        assert int(epochs) == recipe.train.epochs, name


def test_readme_quotes_only_figures_the_recipe_headers_state():
    for name, (*_, evidence) in bundled_table(README.read_text()).items():
        header = header_comment(bundled_recipes()[name])
        for figure in re.findall(r"\d+(?:\.\d+)?(?:%| s\b| px\b)", evidence):
            assert figure in header, f"README.md quotes {figure} for {name}, but its header comment does not"


def test_readme_names_no_recipe_that_does_not_exist():
    named = set(re.findall(r"gtrain fit ([a-z0-9_]+)\b(?!\.)", README.read_text()))
    assert named, "README.md shows no `gtrain fit NAME` at all"
    assert named <= set(bundled_recipes()), f"README.md runs recipes that do not exist: {named - set(bundled_recipes())}"


def test_readme_names_every_key_a_resumed_run_may_change():
    resuming = section(README.read_text(), "Resuming, and what may change")
    missing = sorted(key for key in SAFE_TO_CHANGE_ON_RESUME if f"`{key}`" not in resuming)
    assert not missing, f"README.md's resuming section does not name {missing}"


# --------------------------------------------------------------------- the tutorial


@pytest.mark.slow
def test_tutorial_recipe_trains_on_an_image_folder_laid_out_as_the_tutorial_says(tmp_path, monkeypatch):
    text = README.read_text()
    match = TUTORIAL_RECIPE.search(text)
    assert match, "README.md: the tutorial's recipe is the ```toml block after <!-- tutorial-recipe -->"
    document = tomllib.loads(match.group(1))
    data, model = document["data"], document["model"]
    assert model["pretrained"].startswith("torchvision:"), "the tutorial names torchvision's weights"
    assert f"gtrain weights fetch {model['pretrained']}" in " ".join(text.split()), "and says how to fetch them"

    # The tutorial's folders, relative to where the user runs gtrain, with tiny images.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    write_image_folder(Path(data["root"]), images_per_class={"train": 16, "val": 4, "test": 4}, size=16)
    # Stands in for the published weights, in the cache: ImageNet's 1000 classes, every BatchNorm scale non-zero.
    cached = resolve(model["pretrained"], model["name"]).cached_file
    cached.parent.mkdir(parents=True)
    published = create_model(model["name"], num_classes=1000, zero_init_last_bn=False)
    torch.save(published.state_dict(), cached)
    validate_recipe(document, source="README.md's tutorial recipe")

    Path("my_recipe.toml").write_text(match.group(1))
    # fp32: bf16 autocast of ResNeXt-50 at 16 px (1x1 maps from stage 3 on) made the loss NaN in
    # some runs and not others on a CPU with AMX; this test is about the tutorial, not that size.
    small = {"train.epochs": 1, "data.image_size": 16, "data.eval_image_size": 16, "data.eval_resize_size": 18,
             "data.batch_size": 8, "data.workers": 0, "train.precision": "fp32"}  # fmt: skip
    overrides = [arg for key, value in small.items() for arg in ("--set", f"{key}={value}")]
    result = runner.invoke(app, ["fit", "my_recipe.toml", *overrides, "--quiet"])
    assert result.exit_code == 0, result.output
    (run,) = Path("runs").glob("my_recipe-*")
    written = ["recipe.toml", "run.json", "metrics.jsonl", "checkpoints/last.pt", "best.safetensors",
               "final.safetensors", "best_ema.safetensors", "final_ema.safetensors"]
    assert [name for name in written if not (run / name).is_file()] == []

    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 0 and "finished" in result.output, result.output


if __name__ == "__main__":
    rewrite_reference()
    print(f"rewrote the recipe reference in {README}")


# --------------------------------------------------------------------- docs/recipes.md


def recipe_tables(text: str) -> dict[str, list[list[str]]]:
    """{recipe name: the rows (setting, published, gtrain, same?) of its table}."""
    parts = re.split(r"^## `([a-z0-9_]+)`$", text, flags=re.MULTILINE)
    tables = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        rows = [[cell.strip() for cell in line.strip()[1:-1].split(" | ")] for line in body.splitlines()
                if line.startswith("| ") and not line.startswith("| setting |")]  # fmt: skip
        assert all(len(row) == 4 for row in rows), f"docs/recipes.md, {name}: a row without 4 cells"
        tables[name] = rows
    return tables


def documented_value(cell: str):
    """The gtrain column's value: a TOML literal in backticks, or "unset ..." for None."""
    if cell.startswith("unset"):
        return None
    match = re.match(r"`([^`]+)`", cell)
    assert match, f"docs/recipes.md: {cell!r} is neither `a TOML value` nor unset"
    return tomllib.loads(f"v = {match.group(1)}")["v"]


def test_docs_recipes_has_a_table_for_every_reproduction_recipe():
    assert set(recipe_tables(RECIPES_DOC.read_text())) == set(bundled_recipes()) - OWN_RECIPES


@pytest.mark.parametrize("name", sorted(set(bundled_recipes()) - OWN_RECIPES))
def test_docs_recipes_table_holds_the_recipes_own_values(name):
    rows = recipe_tables(RECIPES_DOC.read_text())[name]
    resolved = flatten(load_recipe(name)[0].to_dict())
    keyed = {}
    for setting, published, ours, same in rows:
        # "same", or "same: " / "no: " and a reason of a few words
        assert published and (same == "same" or re.fullmatch(r"(same|no): \S+( \S+){2,}", same)), (name, setting, same)
        key = re.fullmatch(r"`([a-z_]+\.[a-z0-9_]+)`", setting)
        if key:
            keyed[key.group(1)] = documented_value(ours)
    for key, value in keyed.items():
        assert resolved.get(key) == value, f"docs/recipes.md says {name} has {key} = {value!r}; it resolves to {resolved.get(key)!r}"
    document = tomllib.loads(bundled_recipes()[name].read_text())
    missing = set(flatten(document)) - {"description"} - set(keyed)
    assert not missing, f"{name} sets {sorted(missing)}, which docs/recipes.md does not list"
