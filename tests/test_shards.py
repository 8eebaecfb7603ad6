"""A dataset as WebDataset tar shards: written by `gtrain shards` or by webdataset itself, read
from disk or over HTTP, trained exactly as the folder it came from.

Training on shards to the folder's weights, a killed run resumed on shards, and two processes
on shards are in test_resume.py and test_distributed.py with their folder counterparts."""

import functools
import io
import http.server
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import assert_same_weights, invoke, write_image_folder, write_shards

TINY = ["quickstart", "--set", "model.stage_depths=[1, 1, 1]", "--set", "train.precision=fp32",
        "--set", "train.deterministic=true", "--set", "train.device=cpu", "--set", "train.epochs=1",
        "--set", "data.image_size=16", "--set", "data.batch_size=8", "--set", "data.workers=0"]  # fmt: skip


def fit_on(dataset: str, root, out: Path, *settings: str):
    return invoke("fit", *TINY, "--set", f"data.dataset={dataset}", "--set", f"data.root={root}", *settings, "--out", out)


@pytest.fixture
def jpegs(tmp_path):
    return write_image_folder(tmp_path / "jpegs", size=40, suffix=".jpg", images_per_class={"train": 6, "val": 3})


def test_shards_hold_the_folders_files_byte_for_byte_in_its_order(tmp_path, jpegs):
    from gtrain.data import build_data
    from gtrain.recipe import DataSection

    shards = write_shards(jpegs, tmp_path / "shards", "--shard-size", "3KB")
    info = json.loads((shards / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 18 and len(info["splits"]["train"]["filenames"]) > 3
    assert sum(info["splits"]["train"]["shard_lengths"]) == 18
    folder = build_data(DataSection(dataset="ImageFolder", root=str(jpegs), val_split="val"))
    on_shards = build_data(DataSection(dataset="shards", root=str(shards), val_split="val"))
    assert on_shards.info.class_names == folder.info.class_names == ("cat", "dog", "frog")
    for split in ("train", "val"):
        ours, theirs = getattr(on_shards, split), getattr(folder, split)
        assert ours.targets == theirs.targets
        for index, (path, _) in enumerate(theirs.samples):
            assert ours.read(index).data.tobytes() == Path(path).read_bytes()


def test_an_interrupted_write_is_finished_by_the_same_command_into_the_same_shards(tmp_path, jpegs):
    whole = write_shards(jpegs, tmp_path / "whole", "--shard-size", "3KB")
    shards = sorted(p.name for p in whole.glob("*.tar"))
    # What a run killed while writing its 4th train shard leaves: 3 complete shards and a partial one.
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in shards[:3]:
        (cut / name).write_bytes((whole / name).read_bytes())
    (cut / f".part-{shards[3]}").write_bytes((whole / shards[3]).read_bytes()[:700])
    result = invoke("shards", jpegs, cut, "--shard-size", "3KB")
    assert result.exit_code == 0, result.output
    assert "already written" in result.output
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())
    for path in whole.iterdir():
        assert (cut / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_second_writer_into_the_same_folder_is_refused(tmp_path, jpegs):
    import multiprocessing

    from gtrain.run_lock import FileLock

    out = tmp_path / "shards"
    out.mkdir()
    holding, release = multiprocessing.Event(), multiprocessing.Event()

    def hold():
        FileLock(out / ".lock").acquire()
        holding.set()
        release.wait(60)

    holder = multiprocessing.get_context("fork").Process(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        result = invoke("shards", jpegs, out)
        assert result.exit_code == 2 and f"is being written by pid {holder.pid}" in result.output, result.output
        assert not list(out.glob("*.tar"))
    finally:
        release.set()
        holder.join()
    assert invoke("shards", jpegs, out).exit_code == 0  # the holder gone, the folder is free


def test_a_source_that_does_not_exist_is_one_line(tmp_path):
    result = invoke("shards", tmp_path / "nowhere", tmp_path / "out")
    assert result.exit_code == 2 and "does not exist: give an image folder" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_unreadable_images_are_named_counted_and_left_out(tmp_path, jpegs):
    broken = jpegs / "train" / "dog" / "0.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    result = invoke("shards", jpegs, tmp_path / "shards")
    assert result.exit_code == 0, result.output
    assert f"{broken}" in result.output and "1 unreadable images left out" in result.output
    assert json.loads((tmp_path / "shards" / "_info.json").read_text())["splits"]["train"]["num_samples"] == 17


def test_max_side_re_encodes_only_larger_images_upright(tmp_path):
    from gtrain.data.shards import ShardDataset

    root = tmp_path / "photos"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (100, 1)), mode="L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown 100 wide, 300 high
    wide.save(root / "train" / "a" / "big.jpg", exif=exif.tobytes())
    wide.resize((60, 20)).save(root / "train" / "a" / "small.jpg")
    wide.save(root / "val" / "a" / "v.jpg")
    out = write_shards(root, tmp_path / "shards", "--max-side", "64")
    train = ShardDataset(sorted(str(p) for p in out.glob("*-train-*.tar")))
    sizes = {train.location(i)[1].split("-", 1)[1]: Image.open(io.BytesIO(train.read(i).data)).size
             for i in range(len(train))}  # fmt: skip
    assert sizes == {"big.jpg": (21, 64), "small.jpg": (60, 20)}  # turned upright, then shrunk; the small one kept
    assert train.read(1).data.tobytes() == (root / "train" / "a" / "small.jpg").read_bytes()


def write_with_webdataset(folder: Path, out: Path) -> Path:
    """The JPEG folder as webdataset's own ShardWriter writes it, in the hub's naming (no
    _info.json, no class names): set-train-000000.tar, set-validation-000000.tar, ..."""
    import webdataset

    out.mkdir()
    for split, theirs in (("train", "train"), ("val", "validation")):
        with webdataset.ShardWriter(str(out / f"set-{theirs}-%06d.tar"), maxcount=5, verbose=0) as sink:
            classes = sorted(p.name for p in (folder / split).iterdir())
            for label, name in enumerate(classes):
                for path in sorted((folder / split / name).iterdir()):
                    sink.write({"__key__": f"{name}_{path.stem}", "jpg": path.read_bytes(), "cls": label})
    return out


def test_a_set_written_by_webdatasets_shardwriter_trains(tmp_path, jpegs):
    shards = write_with_webdataset(jpegs, tmp_path / "wds")
    assert len(list(shards.glob("set-train-*.tar"))) == 4
    result = fit_on("shards", shards, tmp_path / "run", "--set", "data.val_split=val")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"] == "finished"
    report = json.loads(invoke("eval", tmp_path / "run", "--json", "--split", "val", "--device", "cpu").output)
    assert report["images"] == 9 and [row["class"] for row in report["per_class"]] == ["0", "1", "2"]


@pytest.fixture
def http_root(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (Python's server, which ignores range requests)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("cache_gb", [50, 0])
def test_shards_over_http_train_to_the_weights_they_give_from_disk(tmp_path, jpegs, http_root, cache_gb, monkeypatch):
    """With a cache of 0, no shard is kept on disk: samples are read by range (here, sliced
    from whole responses)."""
    monkeypatch.setenv("GTRAIN_CACHE", str(tmp_path / "cache"))
    shards = write_shards(jpegs, tmp_path / "shards", "--shard-size", "4KB")
    from_disk = fit_on("shards", shards, tmp_path / "disk")
    assert from_disk.exit_code == 0, from_disk.output
    over_http = fit_on("shards", f"{http_root}/shards", tmp_path / "http", "--set", f"data.shard_cache_gb={cache_gb}")
    assert over_http.exit_code == 0, over_http.output
    assert_same_weights(load_file(tmp_path / "http" / "final.safetensors"), load_file(tmp_path / "disk" / "final.safetensors"))
    kept = list((tmp_path / "cache" / "shards").glob("*.tar"))
    assert len(kept) == (0 if cache_gb == 0 else len(list(shards.glob("*.tar"))))


def test_a_brace_pattern_of_urls_reads_the_shards_it_names(tmp_path, jpegs, http_root):
    shards = write_with_webdataset(jpegs, tmp_path / "wds")
    pattern = f"{http_root}/wds/set-{{train-{{000000..000003}},validation-{{000000..000001}}}}.tar"
    result = fit_on("shards", pattern, tmp_path / "run", "--set", "data.val_split=val")
    assert result.exit_code == 0, result.output


def damage(shards: Path, how: str) -> tuple[str, str]:
    """Damage the second train shard: (its name, the key the error must name)."""
    shard = sorted(shards.glob("*-train-*.tar"))[1]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    key = members[-1].name.partition(".")[0]
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[: members[-1].offset_data + 10])
    else:
        with tarfile.open(shard) as tar:
            kept = [(m, tar.extractfile(m).read()) for m in members]
        with tarfile.open(shard, "w") as tar:
            for member, data in kept:
                if member.name.endswith(".cls"):
                    if how == "no-label" and member.name.startswith(key):
                        continue
                    if how == "label-out-of-range" and member.name.startswith(key):
                        data = b"7"
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return shard.name, key


@pytest.mark.parametrize(("how", "says"), [("truncated", "truncated"), ("no-label", "has no label"),
                                           ("label-out-of-range", "out of range for 3 classes")])  # fmt: skip
def test_a_damaged_shard_is_one_line_naming_shard_and_key(tmp_path, jpegs, how, says):
    shards = write_shards(jpegs, tmp_path / "shards", "--shard-size", "4KB")
    shard, key = damage(shards, how)
    result = fit_on("shards", shards, tmp_path / "run")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and shard in lines[0] and key in lines[0], lines
    assert "Traceback" not in result.output


def test_no_shards_where_data_root_points_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = fit_on("shards", tmp_path / "empty", tmp_path / "run")
    assert result.exit_code == 2 and "no .tar shards in" in result.output and "gtrain shards" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_shard_index_is_built_once_and_rebuilt_when_the_shard_changes(tmp_path, jpegs, monkeypatch):
    from gtrain.data import shards as shard_module

    shards = write_shards(jpegs, tmp_path / "shards", "--shard-size", "4KB")
    monkeypatch.setenv("GTRAIN_CACHE", str(tmp_path / "cache"))
    built = []
    real_build = shard_module.build_index
    monkeypatch.setattr(shard_module, "build_index", lambda *a: built.append(a[1]) or real_build(*a))
    paths = sorted(str(p) for p in shards.glob("*-train-*.tar"))
    first = shard_module.ShardDataset(paths)
    assert len(built) == len(paths)
    again = shard_module.ShardDataset(paths)
    assert len(built) == len(paths) and again.targets == first.targets
    Path(paths[0]).write_bytes(Path(paths[1]).read_bytes())  # another shard's samples in its place
    changed = shard_module.ShardDataset(paths)
    assert built[-1] == paths[0] and changed.targets[: changed.lengths[0]] == first.targets[first.lengths[0] : sum(first.lengths[:2])]


def test_a_torchvision_dataset_is_written_losslessly_with_its_class_names(tmp_path):
    from gtrain.data.datasets import Digits
    from gtrain.data.shards import ShardDataset

    out = tmp_path / "shards"
    result = invoke("shards", "quickstart", out)
    assert result.exit_code == 0, result.output
    assert (out / "classes.txt").read_text().split() == [str(d) for d in range(10)]
    test = ShardDataset(sorted(str(p) for p in out.glob("*-test-*.tar")))
    digits = Digits(None, train=False)
    assert test.targets == digits.targets
    for index in (0, 100, len(digits) - 1):
        pixels = np.asarray(Image.open(io.BytesIO(test.read(index).data.tobytes())))
        assert np.array_equal(pixels, digits.data[index])


def test_predict_over_a_shard_set_gives_what_it_gives_for_the_folders_files(tmp_path, jpegs):
    shards = write_shards(jpegs, tmp_path / "shards", "--shard-size", "4KB")
    assert fit_on("ImageFolder", jpegs, tmp_path / "run").exit_code == 0
    records = {}
    last = len(json.loads((shards / "_info.json").read_text())["splits"]["val"]["filenames"]) - 1
    for name, source in (("files", jpegs / "val"), ("shards", f"{shards}/jpegs-val-{{0000..{last:04d}}}.tar")):
        out = tmp_path / f"{name}.jsonl"
        result = invoke("predict", tmp_path / "run", source, "--out", out, "--device", "cpu")
        assert result.exit_code == 0, result.output
        records[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records["shards"]) == len(records["files"]) == 9
    assert records["shards"][0]["path"].endswith(".tar:00000000-0.jpg")
    assert [r["predictions"] for r in records["shards"]] == [r["predictions"] for r in records["files"]]
