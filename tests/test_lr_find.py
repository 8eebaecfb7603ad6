"""`gtrain lr-find`: a learning rate that trains the quickstart, found without touching
anything a later `gtrain fit` depends on."""

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import invoke

# `gtrain fit quickstart --set optim.lr=LR` (its 15 epochs) reached >= 97% final test top-1 at
# 0.072 (97.5%), 0.1 and 0.3 (98.6%), not at 0.042 (95.6%) or below (2-vCPU AMD EPYC, bf16).
TRAINS_WELL = (0.07, 0.3)


def test_lr_find_suggests_an_lr_that_trains_the_quickstart(tmp_path):
    result = invoke("lr-find", "quickstart", "--json", "--plot", tmp_path / "lr.png")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output.splitlines()[-1])
    assert TRAINS_WELL[0] <= found["suggested_lr"] <= TRAINS_WELL[1], found["suggested_lr"]
    lrs, losses = found["lrs"], found["losses"]
    assert len(lrs) == len(losses) <= 22  # never past the recipe's first epoch (1,433 images / 64)
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-4)  # the recipe's lr 0.1 / 1000
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_find_changes_nothing_a_later_fit_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lr-find must write nothing here (no runs/)
    quick = ["quickstart", "--set", "train.epochs=1", "--set", "model.stage_depths=[1, 1, 1]", "--set", "train.precision=fp32",
             "--set", "train.deterministic=true"]  # fmt: skip
    assert invoke("fit", *quick, "--out", tmp_path / "alone", "-q").exit_code == 0
    found = invoke("lr-find", *quick)
    assert found.exit_code == 0, found.output
    assert "--set optim.lr=" in found.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone"]
    assert invoke("fit", *quick, "--out", tmp_path / "after", "-q").exit_code == 0
    alone, after = load_file(tmp_path / "alone" / "final.safetensors"), load_file(tmp_path / "after" / "final.safetensors")
    assert all((alone[key] == after[key]).all() for key in alone)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--start-lr", "1", "--end-lr", "0.1"], {}, "need 0 < start-lr < end-lr"),
        (["--steps", "2"], {}, "at least 5 steps"),
        ([], {"WORLD_SIZE": "2", "RANK": "0"}, "runs in one process"),
    ],
)
def test_lr_find_mistakes_are_one_line(monkeypatch, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = invoke("lr-find", "quickstart", *args)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
