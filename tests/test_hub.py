"""Published weights by name, offline: torchvision's from a pre-filled cache, any URL with
its SHA-256 from a server on 127.0.0.1, and the recipe taking the weights' preprocessing."""

import functools
import hashlib
import http.server
import json
import threading

import pytest
import torch

from gtrain.distributed import World
from gtrain.errors import UserError
from gtrain.hub import fetch, local_file, resolve, with_weights_preprocessing
from gtrain.models import create_model
from gtrain.recipe import load_recipe
from gtrain.trainer import Trainer
from tests.conftest import invoke

V2_FILE = "resnext50_32x4d-1a0047aa.pth"  # torchvision's name for IMAGENET1K_V2: its hash prefix inside


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_a_torchvision_name_loads_from_the_cache_without_the_network(torch_home):
    published = create_model("resnext50_32x4d", num_classes=1000).state_dict()
    torch_home.mkdir(parents=True)
    torch.save(published, torch_home / V2_FILE)
    recipe, _ = load_recipe("quickstart", ["model.name=resnext50_32x4d", "model.pretrained=torchvision:IMAGENET1K_V2"])
    trainer = Trainer.for_model(recipe, num_classes=3, in_chans=3, steps_per_epoch=1, world=World(),
                                device=torch.device("cpu"), pretrained=True)  # fmt: skip
    assert trainer.pretrained.source == torch_home / V2_FILE and trainer.pretrained.reinitialized == ("fc.weight", "fc.bias")
    loaded = trainer.model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in published.items() if not key.startswith("fc."))
    listed = invoke("weights", "fetch", "torchvision:IMAGENET1K_V2", "--model", "resnext50_32x4d")
    assert listed.exit_code == 0 and V2_FILE in listed.output, listed.output
    table = json.loads(invoke("models", "--weights", "--json").output)
    row = next(r for r in table if r["model"] == "resnext50_32x4d" and r["name"] == "torchvision:IMAGENET1K_V2")
    assert row["cached"] and row["top1"] == pytest.approx(0.81198)


def test_a_name_without_weights_lists_the_valid_ones():
    with pytest.raises(UserError, match="IMAGENET1K_V1, torchvision:IMAGENET1K_V2"):
        resolve("torchvision:IMAGENET1K_V9", "resnext50_32x4d")
    with pytest.raises(UserError, match="none"):
        resolve("torchvision:IMAGENET1K_V1", "hornet_tiny_7x7")
    with pytest.raises(UserError, match="sha256"):
        resolve("https://example.invalid/w.pth", "resnext50_32x4d")


def test_a_url_with_its_sha256_is_downloaded_once_and_a_wrong_one_leaves_nothing(tmp_path, torch_home):
    served = tmp_path / "served"
    served.mkdir()
    (served / "weights.pth").write_bytes(b"published weights")
    digest = hashlib.sha256(b"published weights").hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/weights.pth"
    try:
        with pytest.raises(UserError, match="SHA-256"):
            fetch(resolve(f"{url}#sha256={'0' * 64}", "resnext50_32x4d"))
        assert not torch_home.exists() or list(torch_home.iterdir()) == []  # nothing kept, not even a partial file
        path = local_file(f"{url}#sha256={digest}", "resnext50_32x4d")
        assert path == torch_home / "weights.pth" and path.read_bytes() == b"published weights"
    finally:
        server.shutdown()
    assert local_file(f"{url}#sha256={digest}", "resnext50_32x4d") == path  # from the cache, the server gone


def test_an_image_folder_recipe_takes_the_weights_preprocessing_where_it_leaves_it_unset():
    base = ["model.name=resnext50_32x4d", "model.pretrained=torchvision:IMAGENET1K_V2", "data.dataset=ImageFolder"]
    recipe, _ = load_recipe("quickstart", base)
    taken, line = with_weights_preprocessing(recipe)
    data = taken.data
    assert (data.image_size, data.eval_image_size, data.eval_resize_size) == (224, 224, 232) and "IMAGENET1K_V2" in line
    mine, _ = load_recipe("quickstart", [*base, "data.image_size=176", "data.interpolation=bicubic"])
    data = with_weights_preprocessing(mine)[0].data
    assert (data.image_size, data.interpolation, data.eval_resize_size) == (176, "bicubic", 232)  # the recipe's own stay


def test_a_timm_name_loads_from_the_hub_cache_and_says_its_licence(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    from gtrain.hub import licence_line

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "models--timm--resnext50_32x4d.fb_swsl_ig1b_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    published = create_model("resnext50_32x4d", num_classes=1000).state_dict()
    save_file(published, repo / "snapshots" / "0123abcd" / "model.safetensors")
    path = local_file("timm:fb_swsl_ig1b_ft_in1k", "resnext50_32x4d")  # no network: from the cache
    assert path == repo / "snapshots" / "0123abcd" / "model.safetensors"
    model = create_model("resnext50_32x4d", num_classes=4)
    from gtrain.pretrained import load_pretrained

    report = load_pretrained(model, path)
    assert report.reinitialized == ("fc.weight", "fc.bias") and not report.unused  # timm's keys are torchvision's
    assert "non-commercial" in licence_line("timm:fb_swsl_ig1b_ft_in1k", "resnext50_32x4d")
    assert licence_line("timm:a1h_in1k", "resnext50_32x4d") is None  # Apache-2.0
