"""`gtrain tune`: an Optuna study over recipe settings, shared by the processes that run it,
whose best trial's recipe trains to the same top-1 again."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import clean_environment, gtrain_command, invoke, run_gtrain

optuna = pytest.importorskip("optuna")

# Two epochs of the quickstart, with one block per stage, in batches of 256 (5 steps an epoch), in fp32 with deterministic
# kernels: a trial is then a function of its settings, so `gtrain fit best.toml` must give the
# best trial's top-1.
QUICK = ["quickstart", "--set", "train.epochs=2", "--set", "model.stage_depths=[1, 1, 1]", "--set", "data.batch_size=256",
         "--set", "train.precision=fp32", "--set", "train.deterministic=true"]  # fmt: skip
SPACE = '"optim.lr" = {low = 1e-4, high = 0.3, log = true}\n"optim.weight_decay" = [1e-4, 5e-4]\n'


def journal(out: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(out / "study.journal")))


def study_trials(out: Path):
    return optuna.load_study(study_name=out.name, storage=journal(out)).trials


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(SPACE)
    return path


# Each process says it is ready, waits for the test's start time, then joins the study of
# each round's folder at the same instants as the others.
JOIN_AT_THE_SAME_INSTANT = """
import os, sys, time
from pathlib import Path
from gtrain.recipe import load_recipe
from gtrain.tune import TuneSettings, join_study, load_space

root = Path(sys.argv[1])
base, _ = load_recipe("quickstart", [])
space = load_space(root / "space.toml", base)
(root / f"ready-{os.getpid()}").touch()
while not (root / "start").exists():
    time.sleep(0.01)
start = float((root / "start").read_text())
for round in range(5):
    time.sleep(max(0.0, start + 0.6 * round - time.time()))
    join_study(root / f"study{round}", base, space, TuneSettings(trials=1))
"""


def test_processes_that_start_a_study_at_the_same_instant_all_join_it(tmp_path, space):
    command = [sys.executable, "-c", JOIN_AT_THE_SAME_INSTANT, str(tmp_path)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=clean_environment(threads=1)) for _ in range(3)]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "start.tmp").write_text(str(time.time() + 0.2))
    (tmp_path / "start.tmp").rename(tmp_path / "start")
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr  # none refused
    for round in range(5):
        storage = journal(tmp_path / f"study{round}")
        assert optuna.get_all_study_names(storage) == [f"study{round}"]  # one study
        study = optuna.load_study(study_name=f"study{round}", storage=storage)
        assert len([key for key in study.user_attrs if key.startswith("gtrain_search_")]) == 1  # one search, whole


@pytest.mark.slow
def test_two_processes_with_trials_4_finish_exactly_4_trials(tmp_path, space):
    out = tmp_path / "study"
    command = gtrain_command("tune", *QUICK, "--set", "train.epochs=1", "--space", space,
                             "--out", out, "--trials", 4, "--json")  # fmt: skip
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=clean_environment(threads=1)) for _ in range(2)]  # one core each
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout))
    ran = [set(result["ran_here"]) for result in results]
    assert not ran[0] & ran[1]  # each took its own trials
    trials = study_trials(out)
    assert sorted(t.number for t in trials) == sorted(ran[0] | ran[1]) == [0, 1, 2, 3]  # the count adds up
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    per_process = results[-1]["trials_per_process"]
    assert sum(per_process.values()) == 4 and len(per_process) == len([r for r in ran if r])
    folders = {str(out / t.user_attrs["run_dir"]) for t in trials}  # recorded relative to DIR
    assert folders == {str(out / "trials" / f"{n:04d}") for n in range(4)}
    for folder in folders:
        assert json.loads((Path(folder) / "run.json").read_text())["status"] == "finished"
    listed = invoke("runs", out / "trials")
    assert listed.exit_code == 0 and all(f"{n:04d}" in listed.output for n in range(4)), listed.output


@pytest.mark.slow
def test_a_trial_whose_process_was_killed_is_continued_from_its_checkpoint(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('"optim.lr" = [0.05]\n')
    out = tmp_path / "study"
    fast = ["--set", "train.checkpoint_steps=2"]
    args = ["tune", *QUICK, *fast, "--space", space, "--out", out, "--trials", 1, "--pruner", "none"]
    killed = run_gtrain(*args, fault="kill-at-step:7")  # in epoch 2 of 2, a step after a checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [t.state for t in study_trials(out)] == [optuna.trial.TrialState.RUNNING]
    first_epoch = (out / "trials" / "0000" / "metrics.jsonl").read_text().splitlines()[0]  # with its timings

    status = invoke("tune", "--status", out, "--json")
    assert status.exit_code == 0, status.output
    (running,) = json.loads(status.output)["trials"]
    assert running["state"] == "running" and "process is gone" in running["note"]

    again = invoke(*args, "--json")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output.splitlines()[-1])
    states = {t["number"]: t["state"] for t in summary["trials"]}
    assert states == {0: "interrupted", 1: "complete"} and summary["ran_here"] == [1]
    continued = summary["trials"][1]
    assert continued["run_dir"] == summary["trials"][0]["run_dir"]
    record = json.loads((Path(continued["run_dir"]) / "run.json").read_text())
    assert record["status"] == "finished" and record["epochs_done"] == 2
    # Continued, not restarted: epoch 1, trained before the kill, was not trained again.
    assert (Path(continued["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0] == first_epoch
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in study_trials(out)]

    reference = invoke("fit", *QUICK, *fast, "--set", "optim.lr=0.05", "--out", tmp_path / "reference", "-q")
    assert reference.exit_code == 0, reference.output
    assert json.loads((tmp_path / "reference" / "run.json").read_text())["best_top1"] == continued["value"]


@pytest.mark.slow
def test_interrupted_study_continues_prunes_and_its_best_recipe_trains_the_same(tmp_path, space):
    out = tmp_path / "study"
    command = gtrain_command("tune", *QUICK, "--space", space, "--out", out, "--startup-trials", 1, "--seed", 0)
    # Ctrl-C in the second trial: the first stays in the study, the second is marked.
    process = subprocess.Popen([*command, "--trials", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("trial 0 "):
            break
    while not (out / "trials" / "0001" / "run.json").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "trial 1 was interrupted" in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    states = {t.number: (t.state, t.user_attrs.get("interrupted")) for t in study_trials(out)}
    assert states == {0: (optuna.trial.TrialState.COMPLETE, None), 1: (optuna.trial.TrialState.FAIL, True)}

    # The same command again: trial 1's settings first, continuing its folder.
    again = invoke(*command[3:], "--trials", 3, "--json")  # trial 1 continued, and one more
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output.splitlines()[-1])
    by_number = {t["number"]: t for t in summary["trials"]}
    assert summary["ran_here"] == [2, 3] and by_number[2]["params"] == by_number[1]["params"]
    assert by_number[2]["run_dir"] == by_number[1]["run_dir"]
    pruned = [t for t in summary["trials"] if t["state"] == "pruned"]
    assert pruned, summary["trials"]
    for trial in pruned:  # a normal run folder that says why it stopped after epoch 1 of 2
        record = json.loads((Path(trial["run_dir"]) / "run.json").read_text())
        assert record["status"] == "finished" and record["epochs_done"] == 1 and "pruned" in record["stopped"]

    best = max((t for t in summary["trials"] if t["state"] == "complete"), key=lambda t: t["value"])
    assert summary["best_value"] == best["value"] and summary["best_params"] == best["params"]
    refit = invoke("fit", out / "best.toml", "--out", tmp_path / "refit", "-q")
    assert refit.exit_code == 0, refit.output
    assert json.loads((tmp_path / "refit" / "run.json").read_text())["best_top1"] == best["value"]


@pytest.mark.parametrize(
    ("space_text", "message"),
    [
        ('"optim.lrr" = {low = 1e-3, high = 1.0}', "unknown key optim.lrr: did you mean lr"),
        ('"optim.lr" = {low = 1.0, high = 1e-3, log = true}', "low = 1.0 must be below high = 0.001"),
        ('"optim.momentum" = {low = 0.5, high = 1.5}', "optim.momentum: high = 1.5 does not make a valid recipe"),
        ('"data.auto_augment" = ["randaugment", "autoaugment"]', "the choice 'autoaugment' does not make a valid recipe"),
        ('"data.batch_size" = {low = 16.0, high = 64.0}', "data.batch_size is an integer setting"),
        ('"optim.lr" = {low = 0.0, high = 1.0, log = true}', "a log range needs low > 0"),
        ('"optim.lr" = 0.1', "give a range {low = ..., high = ...} or a list of choices"),
        ("[model]\nwidth = [1, 2]", "unknown key model.width"),
    ],
)
def test_a_bad_space_is_one_line_and_runs_no_trial(tmp_path, space_text, message):
    space = tmp_path / "space.toml"
    space.write_text(space_text + "\n")
    result = invoke("tune", "quickstart", "--space", space, "--out", tmp_path / "study", "--trials", 1)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "study").exists()


def test_a_study_is_continued_only_with_its_own_recipe_and_space(tmp_path, space):
    out = tmp_path / "study"
    base = ["tune", "quickstart", "--space", space, "--out", out]
    from gtrain.recipe import load_recipe
    from gtrain.tune import TuneSettings, load_space, open_study

    recipe, _ = load_recipe("quickstart", [])
    (out).mkdir()
    open_study(out, recipe, load_space(space, recipe), TuneSettings(trials=1))
    result = invoke(*base, "--set", "optim.momentum=0.8", "--trials", 1)
    assert result.exit_code == 2 and "searched another recipe or space" in result.output, result.output
    assert "recipe optim.momentum" in result.output
    assert study_trials(out) == []


def test_a_trial_whose_settings_do_not_fit_together_fails_alone(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('"data.batch_size" = [48]\n')  # valid alone; not in groups of 32
    result = invoke("tune", "quickstart", "--set", "train.bn_group_size=32", "--space", space, "--out", tmp_path / "study",
                    "--trials", 1, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    (trial,) = json.loads(result.output.splitlines()[-1])["trials"]
    assert trial["state"] == "failed" and "train.bn_group_size = 32 must divide the 48 images" in trial["note"]
