"""Precision on every machine: what `train.precision = "auto"` resolves to, the switch that
makes a CPU without bf16 resolve it as one with bf16 does, and `gtrain eval` scoring a run in
the precision and memory format the run validated in.

The bf16 runs here are tiny: on a CPU without native bf16 they are emulated, about 10x slower.
"""

import json
import shutil

import pytest
import torch

from gtrain.errors import UserError
from gtrain.runtime import CPU_BF16_ENV, resolve_precision

from tests.conftest import invoke

CPU = torch.device("cpu")
# Precision left at "auto"; on the CPU whatever the machine has, so that the switch decides.
TINY = ["--set", "model.name=resnext29_2x16d", "--set", "data.dataset=MNIST", "--set", "data.workers=0",
        "--set", "data.image_size=8", "--set", "data.batch_size=50", "--set", "train.epochs=1", "--device", "cpu"]


def test_the_switch_decides_what_auto_resolves_to_on_a_cpu(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # an explicit choice is kept
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(UserError, match=f"{CPU_BF16_ENV}='yes': set it to 1"):
        resolve_precision("auto", CPU)


def test_a_precision_that_does_not_exist_is_one_line_naming_the_setting():
    with pytest.raises(UserError, match="--precision = 'fp8': use one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU, "--precision")
    with pytest.raises(UserError, match="train.precision = 'fp16' needs a CUDA GPU"):
        resolve_precision("fp16", CPU, "train.precision")


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def eval_json(*args):
    result = invoke("eval", *args, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("switch, precision", [("0", "fp32"), ("1", "bf16")], ids=["as-without-bf16", "as-with-bf16"])
def test_eval_scores_a_run_in_the_precision_it_validated_in(tmp_path, mnist_root, monkeypatch, switch, precision):
    monkeypatch.setenv(CPU_BF16_ENV, switch)
    run = tmp_path / "run"
    result = invoke("fit", "quickstart", *TINY, "--set", f"data.root={mnist_root}", "--out", run)
    assert result.exit_code == 0, result.output
    assert f"cpu ({precision}, channels_last" in result.output  # the start panel
    logged = metrics(run)[-1]

    report = eval_json(run)
    assert (report["precision"], report["channels_last"]) == (precision, True)
    if precision == "fp32":
        assert (report["top1"], report["top5"]) == (logged["val_top1"], logged["val_top5"])
    else:
        # bf16 kernels may round another batch size differently: at most an image of the 100 moves.
        assert abs(report["top1"] - logged["val_top1"]) <= 0.01 and report["loss"] == pytest.approx(logged["val_loss"], rel=1e-2)

    # The options override the run's settings.
    other = "bf16" if precision == "fp32" else "fp32"
    report = eval_json(run, "--precision", other, "--no-channels-last")
    assert (report["precision"], report["channels_last"]) == (other, False)


def test_weights_outside_a_run_folder_are_scored_with_auto(tmp_path, mnist_root, monkeypatch):
    run = tmp_path / "run"
    result = invoke("fit", "quickstart", *TINY, "--set", f"data.root={mnist_root}", "--set", "train.precision=fp32",
                    "--out", run)
    assert result.exit_code == 0, result.output
    bare = shutil.copy(run / "final.safetensors", tmp_path / "shared.safetensors")
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert eval_json(run / "final.safetensors")["precision"] == "fp32"  # in its run folder: the run's own
    assert eval_json(bare, "--set", f"data.root={mnist_root}")["precision"] == "bf16"  # alone: auto


def test_an_unknown_eval_precision_is_one_line(tmp_path, mnist_root):
    run = tmp_path / "run"
    assert invoke("fit", "quickstart", *TINY, "--set", f"data.root={mnist_root}", "--set", "train.precision=fp32",
                  "--out", run).exit_code == 0
    result = invoke("eval", run, "--precision", "half")
    assert result.exit_code == 2 and "--precision = 'half'" in result.output and "Traceback" not in result.output
