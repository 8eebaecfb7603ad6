"""What `gtrain runs` and `gtrain plot` promise: each run's status, epochs and best top-1 read
from the files `gtrain fit` writes, killed runs told apart from running ones, corrupt files
that never stop the listing, and one PNG whose curves are the metrics. The run folders are
written by hand: no training is needed to read them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gtrain.cli import app, console

from tests.conftest import invoke


TOP1 = [0.50, 0.80, 0.70]


def metrics_rows(top1: list[float]) -> list[dict]:
    return [
        {"epoch": epoch, "train_loss": 2.0 / epoch, "val_loss": 2.5 / epoch, "val_top1": acc, "val_top5": 1.0,
         "lr": 0.1 / epoch, "images_per_s": 900.0, "data_wait_fraction": 0.01, "seconds": 10.0}
        for epoch, acc in enumerate(top1, start=1)
    ]  # fmt: skip


def write_run(folder: Path, *, planned: int = 3, top1: list[float] = TOP1, state: dict | None = None,
              final: bool = False) -> Path:  # fmt: skip
    """A run folder as `gtrain fit` leaves it; `state` becomes run.json when given."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "recipe.toml").write_text(
        f'description = "test"\n[model]\nname = "resnext29_2x16d"\n[data]\ndataset = "digits"\n[train]\nepochs = {planned}\n'
    )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics_rows(top1)))
    (folder / "checkpoints" / "last.pt").write_bytes(b"state")
    (folder / "best.safetensors").write_bytes(b"weights")
    if final:
        (folder / "final.safetensors").write_bytes(b"weights")
    if state is not None:
        (folder / "run.json").write_text(json.dumps(state))
    return folder


def run_state(status: str, *, done: int, planned: int, best: float | None, best_epoch: int | None, **extra) -> dict:
    return {
        "status": status, "recipe": "quickstart", "model": "resnext29_2x16d", "dataset": "digits", "epochs": planned,
        "epochs_done": done, "best_top1": best, "best_epoch": best_epoch, "elapsed_s": 31.5,
        "started": "2025-03-01T10:00:00", "updated": "2025-03-01T10:00:31", "pid": os.getpid(),
        "host": socket.gethostname(), "error": None, "stopped_early": False, **extra,
    }  # fmt: skip


@pytest.fixture
def wide_terminal():
    """The test runner's terminal is 80 columns wide: too narrow for the whole table on one line per run."""
    console.width = 160
    yield
    console.width = None  # back to rich's own measure


def listing(folder: Path) -> dict[str, dict]:
    result = invoke("runs", folder, "--json")
    assert result.exit_code == 0, result.output
    return {run["run"]: run for run in json.loads(result.stdout)}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid no longer names a process
    return child.pid


def one_error_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# ---------------------------------------------------------------------------------------
# gtrain runs


def test_finished_run_reports_its_epochs_best_top1_and_time(tmp_path):
    write_run(tmp_path / "a", final=True, state=run_state("finished", done=3, planned=3, best=0.8, best_epoch=2))
    run = listing(tmp_path)["a"]
    assert (run["status"], run["epochs_done"], run["epochs"]) == ("finished", 3, 3)
    assert (run["best_top1"], run["best_epoch"], run["elapsed_s"]) == (0.8, 2, 31.5)
    assert (run["recipe"], run["model"], run["dataset"]) == ("quickstart", "resnext29_2x16d", "digits")
    assert run["started"] == "2025-03-01T10:00:00" and run["detail"] is None


def test_early_stopped_run_is_finished_and_says_so(tmp_path):
    state = run_state("finished", done=3, planned=10, best=0.8, best_epoch=2, stopped_early=True)
    write_run(tmp_path / "a", planned=10, final=True, state=state)
    run = listing(tmp_path)["a"]
    assert (run["status"], run["epochs_done"], run["epochs"], run["detail"]) == ("finished", 3, 10, "stopped early")


def test_interrupted_run_reports_the_epochs_it_finished(tmp_path):
    write_run(tmp_path / "a", planned=5, state=run_state("interrupted", done=3, planned=5, best=0.8, best_epoch=2))
    run = listing(tmp_path)["a"]
    assert (run["status"], run["epochs_done"], run["epochs"], run["best_top1"]) == ("interrupted", 3, 5, 0.8)


def test_failed_run_shows_its_error(tmp_path):
    state = run_state("failed", done=1, planned=3, best=0.5, best_epoch=1, error="loss is NaN at step 40")
    write_run(tmp_path / "a", top1=[0.5], state=state)
    run = listing(tmp_path)["a"]
    assert run["status"] == "failed" and run["detail"] == "loss is NaN at step 40"


def test_run_without_run_json_is_read_from_its_files(tmp_path):
    write_run(tmp_path / "quickstart-20240101-120000", planned=5)
    write_run(tmp_path / "custom", final=True)
    runs = listing(tmp_path)

    old = runs["quickstart-20240101-120000"]
    assert (old["status"], old["epochs_done"], old["epochs"]) == ("interrupted", 3, 5)  # no final.safetensors
    assert (old["best_top1"], old["best_epoch"]) == (0.8, 2)
    assert (old["recipe"], old["model"], old["dataset"]) == ("quickstart", "resnext29_2x16d", "digits")
    assert old["started"] == "2024-01-01T12:00:00" and old["elapsed_s"] == 30.0  # the sum of the epochs' seconds

    custom = runs["custom"]
    assert custom["status"] == "finished" and custom["recipe"] is None and custom["started"] is not None


def test_running_run_whose_process_is_gone_is_reported_killed(tmp_path):
    state = run_state("running", done=2, planned=3, best=0.8, best_epoch=2, pid=dead_pid())
    write_run(tmp_path / "a", top1=TOP1[:2], state=state)
    run = listing(tmp_path)["a"]
    assert run["status"] == "failed" and run["detail"].startswith("killed")
    assert (run["epochs_done"], run["epochs"]) == (2, 3)


def test_running_run_whose_process_is_alive_stays_running(tmp_path):
    write_run(tmp_path / "a", top1=TOP1[:2], state=run_state("running", done=2, planned=3, best=0.8, best_epoch=2))
    assert listing(tmp_path)["a"]["status"] == "running"


def test_running_run_on_another_host_is_not_judged_from_here(tmp_path):
    state = run_state("running", done=2, planned=3, best=0.8, best_epoch=2, pid=dead_pid(), host="elsewhere")
    write_run(tmp_path / "a", top1=TOP1[:2], state=state)
    run = listing(tmp_path)["a"]
    assert run["status"] == "running" and "elsewhere" in run["detail"]


def test_corrupt_metrics_line_is_skipped_and_reported(tmp_path):
    run_dir = write_run(tmp_path / "a", planned=3)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, '{"epoch": 2, "val_to')  # a torn line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = listing(tmp_path)["a"]
    assert (run["epochs_done"], run["best_top1"], run["best_epoch"]) == (3, 0.8, 2)
    assert "metrics.jsonl: 1 unreadable line" in run["detail"]


def test_corrupt_run_json_and_recipe_leave_the_rest_readable(tmp_path, wide_terminal):
    run_dir = write_run(tmp_path / "a", final=True, state={})
    (run_dir / "run.json").write_text('{"status": "runn')
    (run_dir / "recipe.toml").write_text("[model\nname =")
    run = listing(tmp_path)["a"]
    assert (run["status"], run["epochs_done"], run["best_top1"]) == ("finished", 3, 0.8)
    assert run["model"] is None and run["epochs"] is None
    assert "run.json unreadable" in run["detail"] and "recipe.toml unreadable" in run["detail"]

    table = invoke("runs", tmp_path)
    assert table.exit_code == 0 and "3/?" in table.output


def test_runs_are_found_in_nested_folders_and_listed_oldest_first(tmp_path):
    # "mid" carries an offset: in any local time zone (UTC-12 to UTC+14) it falls between the other two.
    for name, started in [("sweep/late", "2025-03-02T23:00:00"), ("sweep/early", "2025-02-28T09:00:00"),
                          ("mid", "2025-03-01T12:00:00+00:00")]:  # fmt: skip
        state = run_state("finished", done=3, planned=3, best=0.8, best_epoch=2, started=started)
        write_run(tmp_path / name, final=True, state=state)
    (tmp_path / "notes").mkdir()  # a folder without a run is not listed
    result = invoke("runs", tmp_path, "--json")
    assert [run["run"] for run in json.loads(result.stdout)] == ["sweep/early", "mid", "sweep/late"]


def test_a_run_folder_itself_can_be_listed(tmp_path):
    write_run(tmp_path / "only", final=True)
    assert list(listing(tmp_path / "only")) == ["only"]


def test_table_names_every_run_with_its_status(tmp_path, wide_terminal):
    write_run(tmp_path / "alpha", final=True, state=run_state("finished", done=3, planned=3, best=0.8, best_epoch=2))
    write_run(tmp_path / "beta", planned=5)
    result = invoke("runs", tmp_path)
    assert result.exit_code == 0, result.output
    for text in ("alpha", "beta", "finished", "interrupted", "80.00%", "3/5"):
        assert text in result.output


def test_folder_without_runs_says_so_and_exits_0(tmp_path):
    result = invoke("runs", tmp_path)
    assert result.exit_code == 0 and "no runs" in result.output
    assert json.loads(invoke("runs", tmp_path, "--json").stdout) == []


def test_missing_folder_is_a_one_line_error(tmp_path):
    assert "does not exist" in one_error_line(invoke("runs", tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------
# gtrain plot


def test_plot_of_one_run_writes_a_png_into_the_run_folder(tmp_path):
    run_dir = write_run(tmp_path / "a", final=True)
    result = invoke("plot", run_dir)
    assert result.exit_code == 0, result.output
    assert (run_dir / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_plot_of_two_runs_writes_one_comparison_png(tmp_path, monkeypatch):
    write_run(tmp_path / "a", final=True)
    write_run(tmp_path / "b", top1=[0.6, 0.9])
    monkeypatch.chdir(tmp_path)
    result = invoke("plot", "a", "b")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs-comparison.png").read_bytes().startswith(b"\x89PNG")

    result = invoke("plot", "a", "b", "--out", tmp_path / "figures" / "ab.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "figures" / "ab.png").read_bytes().startswith(b"\x89PNG")


def test_figure_curves_are_the_metrics(tmp_path):
    from gtrain.plot import load_curves, metrics_figure

    curves = {"a": load_curves(write_run(tmp_path / "a")), "b": load_curves(write_run(tmp_path / "b", top1=[0.6, 0.9]))}
    loss_ax, top1_ax, lr_ax = metrics_figure(curves).axes
    train_a, val_a, train_b, val_b = loss_ax.lines
    assert list(train_a.get_xdata()) == [1, 2, 3] and list(train_a.get_ydata()) == [2.0, 1.0, 2.0 / 3]
    assert val_a.get_linestyle() == "--" and list(val_b.get_ydata()) == [2.5, 1.25]
    assert train_a.get_color() == val_a.get_color() != train_b.get_color()
    assert [list(line.get_ydata()) for line in top1_ax.lines] == [[50.0, 80.0, 70.0], [60.0, 90.0]]
    assert [line.get_label() for line in top1_ax.lines] == ["a", "b"]
    assert list(lr_ax.lines[0].get_ydata()) == [0.1, 0.05, 0.1 / 3]


def test_figure_shows_the_weight_average_dotted(tmp_path):
    from gtrain.plot import load_curves, metrics_figure

    run = write_run(tmp_path / "a")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["val_top1_ema"] = row["val_top1"] - 0.1
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, top1_ax, _ = metrics_figure({"a": load_curves(run)}).axes
    model, average = top1_ax.lines
    assert average.get_linestyle() == ":" and average.get_color() == model.get_color()
    assert list(average.get_ydata()) == pytest.approx([40.0, 70.0, 60.0])


def test_plot_of_a_folder_without_metrics_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "empty has no metrics.jsonl" in one_error_line(invoke("plot", tmp_path / "empty"))


def test_plot_of_a_run_without_a_finished_epoch_names_it(tmp_path):
    run_dir = write_run(tmp_path / "fresh", top1=[])
    assert "fresh has no finished epoch" in one_error_line(invoke("plot", run_dir))


def test_plot_to_an_unwritable_place_is_a_one_line_error(tmp_path):
    run_dir = write_run(tmp_path / "a")
    (tmp_path / "file").write_text("not a folder")
    assert "cannot write" in one_error_line(invoke("plot", run_dir, "--out", tmp_path / "file" / "x.png"))


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.lines", "matplotlib.ticker", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import` raise ImportError
    line = one_error_line(invoke("plot", write_run(tmp_path / "a")))
    assert line == "error: gtrain plot needs matplotlib: pip install 'gtrain[plot]'"


def test_runs_reads_the_runs_folder_by_default(tmp_path, monkeypatch):
    write_run(tmp_path / "runs" / "a", final=True)
    monkeypatch.chdir(tmp_path)
    result = invoke("runs", "--json")
    assert result.exit_code == 0 and [run["run"] for run in json.loads(result.stdout)] == ["a"]
