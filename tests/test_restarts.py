"""Runs survive the launchers' restarts: torchrun restarting its workers, the same command
run again with --auto-resume (on two processes or on one), srun's processes stopped by
SIGUSR1, and a second process that would train into a folder a live one holds. Real
processes, 2 CPU processes, gloo."""

import json
import shutil
import socket
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from gtrain.distributed import World, first_host, slurm_rendezvous
from tests.conftest import assert_same_weights, clean_environment, gtrain_command, invoke, run_gtrain

pytestmark = pytest.mark.slow


@pytest.fixture
def recipe(two_process_recipe):
    """The shared small HorNet (tests/conftest.py): 4 steps per epoch, 2 epochs, deterministic
    fp32, each process drawing its own augmentation, a checkpoint every 2 steps."""
    return two_process_recipe


def torchrun(*args, restarts=0, fault="", timeout=240, monitor_interval_s=None):
    """`gtrain ARGS` as 2 processes under torchrun, one thread each, restarted `restarts` times."""
    return run_gtrain(*args, torchrun=2, restarts=restarts, fault=fault, threads=1, timeout=timeout,
                      monitor_interval_s=monitor_interval_s)  # fmt: skip


@pytest.fixture
def left_alone(two_process_run):
    """The final weights of the 2-process run that nothing interrupted."""
    out, _ = two_process_run
    return load_file(out / "final.safetensors")


def epochs_logged(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_dead_worker_is_one_line_and_torchrun_s_restart_continues_as_if_left_alone(tmp_path, recipe, left_alone):
    out = tmp_path / "run"
    # Rank 1 dies after step 7 (epoch 2, step 3); the last checkpoint is that of step 6.
    # torchrun stops the survivor as soon as it sees the dead process (every 0.1 s by
    # default); looking every 2 s lets the survivor say what it saw first, on a loaded machine too.
    result = torchrun("fit", *recipe, "--out", out, restarts=1, fault="kill-rank-at-step:1:7", monitor_interval_s=2)
    assert result.returncode == 0, result.stderr[-3000:]  # and within the timeout: no hang
    # The survivor's own word: one line, no traceback, neither its nor torchrun's.
    survivor = [line for line in result.stderr.splitlines() if "by peer" in line]
    assert len(survivor) == 1 and survivor[0].startswith("error: rank 1 of 2 was lost ("), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "resuming after epoch 1, step 2" in result.stdout
    assert epochs_logged(out) == [1, 2]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert_same_weights(load_file(out / "final.safetensors"), left_alone)


def test_the_same_command_with_auto_resume_continues_after_every_process_was_killed(tmp_path, recipe, left_alone):
    out = tmp_path / "run"
    command = ["fit", *recipe, "--out", out, "--auto-resume"]
    killed = torchrun(*command, fault="kill-at-step:7")  # after the checkpoint of step 6, within epoch 2
    assert killed.returncode != 0
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["progress"]["step_in_epoch"] == 2
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    again = torchrun(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch 1, step 2" in again.stdout
    assert epochs_logged(out) == [1, 2]
    assert_same_weights(load_file(out / "final.safetensors"), left_alone)

    # The copy on one process: each image's crop is drawn from its own stream, so one process
    # on the same global batches augments them as two did; only the order of the gradient
    # sums differs (SGD: a step linear in the gradient).
    on_one = invoke("fit", "--resume", copy)
    assert on_one.exit_code == 0, on_one.output
    assert epochs_logged(copy) == [1, 2]
    resumed_on_one = load_file(copy / "final.safetensors")
    assert resumed_on_one.keys() == left_alone.keys()
    for key, value in left_alone.items():
        torch.testing.assert_close(resumed_on_one[key], value, rtol=1e-4, atol=1e-5, msg=key)

    # Once more (here in one process): the run has finished, so there is nothing to do, and
    # nothing is rewritten.
    before = (out / "final.safetensors").stat().st_mtime_ns
    done = invoke(*command)
    assert done.exit_code == 0, done.output[-3000:]
    assert "has finished its 2 epochs" in done.output
    assert (out / "final.safetensors").stat().st_mtime_ns == before


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_like(args, fault="", timeout=240):
    """Two processes started as `srun --ntasks 2 gtrain ...` starts them: SLURM's variables,
    no torchrun. MASTER_ADDR is the first host of the node list."""
    port = free_port()
    processes = [
        subprocess.Popen(
            gtrain_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=clean_environment(fault, threads=1, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2",
                            SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1", MASTER_PORT=str(port)),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=timeout) for process in processes]
    return [(process.returncode, out, err) for process, (out, err) in zip(processes, outputs)]


def test_srun_processes_train_as_torchrun_and_sigusr1_leaves_a_checkpoint_that_resumes(tmp_path, recipe, left_alone):
    out = tmp_path / "run"
    command = ["fit", *recipe, "--out", out, "--auto-resume"]
    # SIGUSR1 reaches both processes after step 5, as `sbatch --signal=USR1@T` sends it to every task.
    (code0, out0, err0), (code1, out1, err1) = srun_like(command, fault="signal-at-step:5:SIGUSR1")
    assert (code0, code1) == (75, 75), err0[-2000:] + err1[-2000:]
    assert "2 processes x 32" in out0 and out1 == ""  # one global batch split in two; rank 0 alone reports
    assert "stopped by SIGUSR1; checkpoint saved" in err0
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["progress"]["step_in_epoch"] == 1
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    (code0, out0, err0), (code1, _, err1) = srun_like(command)
    assert (code0, code1) == (0, 0), err0[-2000:] + err1[-2000:]
    assert epochs_logged(out) == [1, 2]  # one writer: each epoch once
    assert_same_weights(load_file(out / "final.safetensors"), left_alone)


def test_a_second_process_cannot_train_into_a_folder_a_live_one_holds(tmp_path, recipe):
    out = tmp_path / "run"
    single = recipe[:-2]  # without the checkpoints every 2 steps
    assert recipe[-2:] == ["--set", "train.checkpoint_steps=2"]
    # The holder stops itself (SIGSTOP) after step 6: alive, holding the folder, writing nothing.
    holder = subprocess.Popen(gtrain_command("fit", *single, "--out", out),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=clean_environment("signal-at-step:6:SIGSTOP", threads=1))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while open(f"/proc/{holder.pid}/stat").read().split(")")[-1].split()[0] != "T":
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not stop itself"
            time.sleep(0.1)
        before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

        # The second process is this one: the lock is a POSIX record lock, held per process.
        second = invoke("fit", "--resume", out)
        assert second.exit_code == 2
        lines = second.output.strip().splitlines()
        assert len(lines) == 1 and f"is being trained by pid {holder.pid} on {socket.gethostname()} since" in lines[0]
        assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()

    resumed = invoke("fit", "--resume", out)  # the kernel dropped the dead holder's lock
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert epochs_logged(out) == [1, 2]


def test_auto_resume_needs_a_folder_to_continue(recipe):
    result = invoke("fit", *recipe, "--auto-resume")
    assert result.exit_code == 2
    assert "--auto-resume continues the folder given by --out" in result.output


def test_auto_resume_refuses_a_folder_trained_with_another_recipe(tmp_path, recipe):
    out = tmp_path / "run"
    assert invoke("fit", *recipe, "--set", "train.epochs=1", "--out", out).exit_code == 0
    result = invoke("fit", *recipe, "--set", "optim.lr=0.5", "--out", out, "--auto-resume")
    assert result.exit_code == 2
    assert f"cannot resume {out}: the recipe differs from the one it was trained with in optim.lr" in result.output


def test_a_folder_that_holds_a_run_is_not_overwritten_without_resume(tmp_path, recipe):
    out = tmp_path / "run"
    assert invoke("fit", *recipe, "--set", "train.epochs=1", "--out", out).exit_code == 0
    result = invoke("fit", *recipe, "--set", "train.epochs=1", "--out", out)
    assert result.exit_code == 2
    assert f"{out} already holds a run: continue it with --resume {out}" in result.output


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("gpu[07-09,12],cpu1", "gpu07"), ("rack[1-2]-n[3,5]", "rack1-n3"), ("node1,node2", "node1"), ("n[001]", "n001")],
)
def test_the_rendezvous_host_is_the_first_of_the_job(nodelist, host):
    assert first_host(nodelist) == host
    assert slurm_rendezvous({"SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "123456"}) == f"{host}:{20000 + 3456}"
    assert slurm_rendezvous({"SLURM_JOB_NODELIST": nodelist, "MASTER_ADDR": "h", "MASTER_PORT": "9"}) == "h:9"


def test_srun_variables_make_the_world_and_torchrun_s_win(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    # A batch script sees the job's task count but is one process.
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert World.from_env() == World()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert World.from_env() == World(rank=5, size=8, local_rank=1)
    # `srun torchrun ...`: the workers follow torchrun, one srun task per node.
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert World.from_env() == World(rank=3, size=16, local_rank=3)
