"""Files and names from strangers: a weights file's metadata is checked against its tensors
before anything is built, and class names, folder names and paths reach the terminal with
their control characters shown, not obeyed."""

import contextlib
import json
import resource
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from gtrain.checkpoint import WeightsMeta
from gtrain.data import Digits
from gtrain.models import create_model
from tests.conftest import invoke, write_image_folder, write_mnist

ESC_NAME = "\x1b[31mred\x1b[0m"  # an ANSI colour command
RTL_NAME = "cat\u202egod"  # a right-to-left override: shows as "catdog" reversed


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    """A real weights file as gtrain writes it (an untrained digits model), its metadata and tensors."""
    model = create_model("resnext29_2x16d", num_classes=10, in_chans=1)
    meta = WeightsMeta(model="resnext29_2x16d", num_classes=10, in_chans=1, image_size=8, mean=(0.3,), std=(0.4,),
                       class_names=tuple(str(k) for k in range(10)), dataset="digits", model_settings={})  # fmt: skip
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    images = tmp_path_factory.mktemp("images")
    for index in range(2):
        Digits(None, train=False)[index][0].save(images / f"{index}.png")
    mnist = write_mnist(tmp_path_factory.mktemp("mnist"), n_train=32, n_test=16)  # one step to fine-tune on
    return meta.to_strings(), tensors, images, mnist


@contextlib.contextmanager
def memory_limit(extra_bytes: int):
    """Allocations beyond `extra_bytes` more than this process holds now fail (soft RLIMIT_DATA)."""
    in_use = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmData:"))  # fmt: skip
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (in_use + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


numbers_as_text = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15).map(str), st.sampled_from(["1e9", "", "ten", "3.5", " 7"])
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=12) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
).map(json.dumps)
MUTATIONS = {
    "model": st.sampled_from(["resnext29_2x16d", "hornet_cifar_nano_7x7", "resnet50", "", "resnext29_8x64d"]),
    "num_classes": numbers_as_text, "in_chans": numbers_as_text, "image_size": numbers_as_text,
    "mean": json_values, "std": json_values, "class_names": json_values, "model_settings": json_values,
    "dataset": st.text(max_size=30), "eval_batch_size": numbers_as_text,
}  # fmt: skip


@st.composite
def damaged_files(draw, valid):
    meta, tensors = dict(valid[0]), valid[1]
    for key in draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=3, unique=True)):
        meta[key] = draw(MUTATIONS[key])
    for key in draw(st.lists(st.sampled_from(["gtrain_version", "model", "class_names", "num_classes"]), max_size=1)):
        meta.pop(key, None)
    if draw(st.booleans()):
        meta[draw(st.text(min_size=1, max_size=10))] = draw(st.text(max_size=10))  # an unknown key
    tensors = dict(tensors)
    change = draw(st.sampled_from(["none", "drop", "rename", "reshape"]))
    name = draw(st.sampled_from(sorted(tensors)))
    if change == "drop":
        del tensors[name]
    elif change == "rename":
        tensors[name + draw(st.text(min_size=1, max_size=5))] = tensors.pop(name)
    elif change == "reshape":
        shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
        tensors[name] = tensors[name].new_zeros(shape)
    return meta, tensors


def assert_works_or_one_line(result):
    assert "Traceback" not in result.output, result.output[-3000:]
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), (result.exit_code, result.output[-2000:])
    if result.exit_code == 2:
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: "), result.output


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_weights_files_work_or_are_one_line_within_bounded_memory(tmp_path, valid_file, data):
    meta, tensors = data.draw(damaged_files(valid_file))
    path = tmp_path / "weights.safetensors"
    save_file(tensors, path, metadata=meta)
    images, mnist = valid_file[2], valid_file[3]
    commands = [
        ["eval", path],
        ["predict", path, images, "--workers", "0", "--json"],
        ["export", path, "--format", "exported-program", "--out", tmp_path / "model.pt2"],
        ["fit", "quickstart", "--set", f"model.pretrained={path}", "--set", "data.dataset=MNIST", "--set", f"data.root={mnist}",
         "--set", "data.image_size=8", "--set", "data.batch_size=32", "--set", "train.epochs=1", "--out", tmp_path / "run", "-q"],
    ]  # fmt: skip
    with memory_limit(3 * 2**30):  # a model built from a huge num_classes would need far more
        for command in commands:
            assert_works_or_one_line(invoke(*command))
        shutil.rmtree(tmp_path / "run", ignore_errors=True)  # the next example trains into it again


@pytest.mark.parametrize("dataset", ["", "ImageFolder"])
def test_a_grayscale_model_whose_dataset_is_not_a_small_image_one_predicts_in_its_own_mode(tmp_path, valid_file, dataset):
    """Photo preprocessing reads RGB; a 1-channel model gets the images in mode "L" anyway."""
    meta, tensors, images, _ = valid_file
    save_file(tensors, tmp_path / "gray.safetensors", metadata={**meta, "dataset": dataset})
    result = invoke("predict", tmp_path / "gray.safetensors", images, "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(records) == 2 and all(len(record["predictions"]) == 5 for record in records)


def test_control_characters_in_class_names_reach_the_terminal_escaped(tmp_path):
    root = write_image_folder(tmp_path / "images", class_names=(ESC_NAME, RTL_NAME, "plain"), size=16,
                              images_per_class={"train": 6, "val": 3})  # fmt: skip
    run = tmp_path / "run"
    fit = invoke("fit", "quickstart", "--set", "data.dataset=ImageFolder", "--set", f"data.root={root}",
                 "--set", "data.image_size=16", "--set", "train.epochs=1", "--set", "data.batch_size=6",
                 "--set", "model.name=resnext29_2x16d", "--out", run)  # fmt: skip
    assert fit.exit_code == 0, fit.output
    outputs = [fit.output]
    for command in (["eval", run, "--split", "val"], ["predict", run, root / "val", "--workers", "0", "--topk", "3"],
                    ["runs", tmp_path]):  # fmt: skip
        result = invoke(*command)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    for output in outputs:
        assert "\x1b" not in output and "\u202e" not in output
    assert "\\x1b[31mred\\x1b[0m" in outputs[1] and "cat\\u202egod" in outputs[1]  # visible, in the eval table
    assert "\\x1b[31mred" in outputs[2]  # and in predict's paths and classes

    # Files keep the real names.
    report = json.loads(invoke("eval", run, "--split", "val", "--json").output)
    assert {row["class"] for row in report["per_class"]} == {ESC_NAME, RTL_NAME, "plain"}
    lines = invoke("predict", run, root / "val" / ESC_NAME, "--workers", "0", "--json").output.splitlines()
    assert all(json.loads(line)["path"].startswith(str(root / "val" / ESC_NAME)) for line in lines if line.startswith("{"))


def test_a_metadata_class_name_with_an_escape_is_shown_escaped_in_errors(tmp_path, valid_file):
    meta, tensors = valid_file[0], valid_file[1]
    path = tmp_path / f"{ESC_NAME}.safetensors"
    save_file(tensors, path, metadata={**meta, "num_classes": "3"})
    result = invoke("eval", path)
    assert result.exit_code == 2
    assert "\x1b" not in result.output and "\\x1b[31mred" in result.output  # the file's name, in the error line
