"""What `gtrain bench` promises: sane throughput, FLOP/s consistent with the FLOP count,
JSON with fixed keys, MFU only where a peak is known, and user mistakes as UserError."""

import json
import math

import pytest

from gtrain.bench import BenchResult, BenchSettings, format_rows, forward_flops, peak_tflops, run_bench
from gtrain.errors import UserError
from tests.conftest import invoke, write_shards

TINY = dict(batch_size=4, image_size=16, steps=2, warmup=1, repeats=2, device="cpu")


@pytest.fixture(scope="module")
def tiny_result() -> BenchResult:
    return run_bench("resnext29_2x16d", BenchSettings(precision="fp32", **TINY))


def test_bench_reports_positive_finite_throughput(tiny_result):
    for rate in (tiny_result.train_images_per_s, tiny_result.infer_images_per_s):
        assert math.isfinite(rate) and rate > 0
    assert tiny_result.train_spread_pct >= 0 and tiny_result.infer_spread_pct >= 0
    assert (tiny_result.batch_size, tiny_result.image_size, tiny_result.precision) == (4, 16, "fp32")


def test_tflops_is_three_forward_passes_per_trained_image(tiny_result):
    expected = 3 * tiny_result.flops_per_image * tiny_result.train_images_per_s / 1e12
    assert tiny_result.tflops == pytest.approx(expected, rel=1e-9)
    assert tiny_result.flops_per_image == forward_flops("resnext29_2x16d", 16)


def test_mfu_is_null_on_cpu(tiny_result):
    assert tiny_result.mfu is None and tiny_result.peak_tflops is None


def test_json_is_one_object_with_the_documented_keys(tiny_result):
    line = tiny_result.to_json()
    assert "\n" not in line
    report = json.loads(line)
    assert {"train_images_per_s", "infer_images_per_s", "tflops", "mfu"} <= set(report)
    assert report["mfu"] is None
    assert report["model"] == "resnext29_2x16d" and report["device"] == "cpu"


def test_rows_for_humans_are_label_value_strings(tiny_result):
    rows = format_rows(tiny_result)
    assert all(isinstance(label, str) and isinstance(value, str) for label, value in rows)
    assert "img/s" in dict(rows)["train"]


def test_resnext50_forward_flops_match_torchvision():
    # torchvision documents 4.23 GMACs for resnext50_32x4d at 224 px: 8.46 GFLOPs.
    assert forward_flops("resnext50_32x4d", 224) == pytest.approx(8.46e9, rel=0.01)


def test_fp16_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="fp16"):
        run_bench("resnext29_2x16d", BenchSettings(precision="fp16", **TINY))


@pytest.mark.parametrize("setting", [{"batch_size": 0}, {"steps": 0}, {"repeats": 0}, {"precision": "half"}])
def test_impossible_settings_are_user_errors(setting):
    with pytest.raises(UserError):
        run_bench("resnext29_2x16d", BenchSettings(**{**TINY, **setting}))


def test_unknown_model_is_a_user_error_that_suggests_a_name():
    with pytest.raises(UserError, match="resnext29_2x16d"):
        run_bench("resnext29_2x16", BenchSettings(**TINY))


@pytest.mark.parametrize(
    "device_name, precision, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.7),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H200", "fp16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "fp32", 156.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA GeForce GTX 1080", "fp32", None),
    ],
)
def test_peak_table_tells_close_gpu_names_apart(device_name, precision, peak):
    assert peak_tflops(device_name, precision) == peak


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ([], "in-memory (uint8 images held on the device"),
        (["data.dataset=ImageFolder", "data.image_size=16", "data.batch_size=8", "data.workers=0"], "uint8 (uint8 crops"),
        (["data.dataset=shards", "data.image_size=16", "data.batch_size=8", "data.workers=0"], "uint8 (uint8 crops"),
    ],
)
def test_bench_data_says_whether_the_loader_or_the_model_limits_the_recipe(settings, path, imagefolder_root, tmp_path):
    args = [arg for setting in settings for arg in ("--set", setting)]
    if settings:
        shards = "data.dataset=shards" in settings
        root = write_shards(imagefolder_root, tmp_path / "shards") if shards else imagefolder_root
        args += ["--set", f"data.root={root}"]
    result = invoke("bench", "--data", "quickstart", *args, "--batches", 5, "--warmup", 1, "--steps", 1, "--repeats", 1,
                    "--device", "cpu", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["loader_images_per_s"] > 0 and report["train_images_per_s"] > 0 and path in report["loader"]
    slower = "data" if report["loader_images_per_s"] < report["train_images_per_s"] else "model"
    assert report["limited_by"] == slower and 0 <= report["data_wait_fraction"] < 1
    costs = report["image_costs"]  # per image and stage, where the workers decode files
    if settings:
        stages = ("read", "decode", "crop_resize", "augment", "collate", "transfer")
        assert all(costs[stage] > 0 for stage in stages) and costs["samples"] == 60, costs
        assert costs["pre_resized_side"] == 32 and costs["pre_resized_decode_crop"] > 0
    else:
        assert costs is None  # images held in memory: nothing to decode


def test_bench_needs_a_model_or_a_recipe_not_both():
    for args in ([], ["resnext29_2x16d", "--data", "quickstart"]):
        result = invoke("bench", *args)
        assert result.exit_code == 2 and "--data RECIPE" in result.output, result.output
