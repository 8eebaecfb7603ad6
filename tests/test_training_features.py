"""The recipe keys practitioners reach for: gradient accumulation, EMA, MixUp/CutMix,
per-image augmentation policies, early stopping, TensorBoard, fine-tuning from published
weights. Each is driven through `gtrain fit` on a tiny MNIST-format set (2 steps per epoch)."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms

from gtrain.data import batch_mix
from gtrain.ema import WeightEMA
from gtrain.models import create_model

from tests.conftest import data_from, invoke, tiny_hornet, write_mnist

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A HorNet (LayerNorm only: its result does not depend on how a batch is split) on
    64 MNIST-format images at 8 px, 2 steps of 32 per epoch."""
    root = write_mnist(tmp_path_factory.mktemp("mnist"), n_train=64, n_test=40)
    return tiny_hornet(root, {"data.batch_size": 32, "train.epochs": 1, "train.deterministic": True, "model.drop_path_rate": 0.0})


def data_root(args) -> str:
    return next(a for a in args if a.startswith("data.root=")).split("=", 1)[1]


def fit(*args):
    result = invoke("fit", *args)
    assert result.exit_code == 0, result.output
    return result.output


def test_accumulated_micro_batches_train_the_same_weights_as_whole_batches(tmp_path, tiny):
    # SGD, whose step is linear in the gradient: AdamW divides a near-zero gradient by its own
    # size, so summation-order rounding (which differs between CPUs' kernels) became 1e-5 steps.
    sgd = [*tiny, "--set", "optim.name=sgd", "--set", "optim.lr=0.1"]
    fit(*sgd, "--out", tmp_path / "whole")
    output = fit(*sgd, "--set", "train.accumulate_steps=4", "--out", tmp_path / "micro")
    assert "effective 32 x 2 steps per epoch: 4 accumulated micro-batches of 8" in output
    whole, micro = load_file(tmp_path / "whole" / "final.safetensors"), load_file(tmp_path / "micro" / "final.safetensors")
    for key in whole:
        torch.testing.assert_close(micro[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)


def test_accumulate_steps_larger_than_the_batch_is_one_line(tiny):
    result = invoke("fit", *tiny, "--set", "train.accumulate_steps=64")
    assert result.exit_code == 2
    assert "train.accumulate_steps = 64" in result.output and "data.batch_size = 32" in result.output


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_published_update_with_or_without_warmup(warmup):
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9, warmup=warmup)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        decay = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9  # timm's ModelEma: no warmup
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in model.state_dict().items()}
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_weights_are_evaluated_logged_and_saved(tmp_path, tiny):
    run = tmp_path / "run"
    output = fit(*tiny, "--set", "train.ema_decay=0.5", "--set", "train.epochs=2", "--out", run)
    assert "best EMA top-1" in output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_top1_ema" in row and "val_loss_ema" in row for row in rows)
    # The saved average is the one that was evaluated: eval reproduces the logged top-1.
    result = invoke("eval", run / "final_ema.safetensors", "--json", "--set", f"data.root={data_root(tiny)}")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["top1"] == pytest.approx(rows[-1]["val_top1_ema"])
    assert (run / "best_ema.safetensors").is_file()
    final, average = load_file(run / "final.safetensors"), load_file(run / "final_ema.safetensors")
    assert any(not torch.equal(final[k], average[k]) for k in final)


def test_mixup_blends_image_pairs_and_their_labels():
    torch.manual_seed(0)
    images, labels = torch.rand(8, 1, 4, 4), torch.arange(8)
    mixed, soft = batch_mix(mixup_alpha=0.4, cutmix_alpha=0.0, num_classes=10)(images, labels)
    assert soft.shape == (8, 10)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
    lam = soft[0, 0].item()  # each image keeps lam of itself and takes 1 - lam of its neighbour
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, dims=0))
    assert soft[0, 7].item() == pytest.approx(1 - lam)


def test_cutmix_pastes_a_box_and_labels_by_its_area():
    torch.manual_seed(1)
    images, labels = torch.zeros(4, 1, 16, 16), torch.arange(4)
    images += labels.view(4, 1, 1, 1).float()  # image i is filled with the value i
    mixed, soft = batch_mix(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=4)(images, labels)
    pasted = (mixed[1] == 0).float().mean()  # image 1 receives a box of image 0
    assert soft[1, 0].item() == pytest.approx(pasted.item())
    assert soft[1, 1].item() == pytest.approx(1 - pasted.item())


def test_mixing_off_is_no_transform():
    assert batch_mix(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=10) is None


def test_randaugment_and_erasing_are_per_image_transforms(tmp_path, tiny):
    root = data_root(tiny)
    data = data_from("MNIST", root, image_size=8, auto_augment="randaugment", random_erasing=0.25)
    kinds = [type(t) for t in data.train.transform.transforms]
    assert transforms.RandAugment in kinds and transforms.RandomErasing in kinds
    assert data.augmentation is None  # so the batched in-memory path, which only crops and flips, is not used
    trivial = data_from("MNIST", root, auto_augment="trivialaugment")
    assert transforms.TrivialAugmentWide in [type(t) for t in trivial.train.transform.transforms]
    assert data_from("MNIST", root).augmentation is not None
    fit(*tiny, "--set", "data.auto_augment=trivialaugment", "--set", "data.random_erasing=0.5", "--out", tmp_path / "r")


def test_in_memory_on_with_per_image_augmentation_is_one_line(tmp_path, tiny):
    result = invoke("fit", *tiny, "--set", "data.in_memory=on", "--set", "data.auto_augment=randaugment",
                    "--out", tmp_path / "r")  # fmt: skip
    assert result.exit_code == 2
    assert "data.auto_augment and data.random_erasing run per image" in result.output


def test_early_stopping_ends_the_run_and_a_resume_needs_more_patience(tmp_path, tiny):
    run = tmp_path / "run"
    # A learning rate too small to change a prediction: top-1 never improves after epoch 1.
    frozen = [*tiny, "--set", "optim.lr=1e-12", "--set", "optim.warmup_epochs=0", "--set", "optim.schedule=constant"]
    output = fit(*frozen, "--set", "train.epochs=6", "--set", "train.early_stopping_patience=2", "--out", run)
    assert "stopped early" in output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["stopped_early"] and status["epochs_done"] == 3
    assert (run / "final.safetensors").is_file()

    again = invoke("fit", "--resume", run)
    assert again.exit_code == 2 and "stopped early after epoch 3" in again.output
    fit("--resume", run, "--set", "train.early_stopping_patience=3")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_tensorboard_events_hold_the_logged_metrics(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    fit(*tiny, "--set", "log.tensorboard=true", "--set", "train.epochs=2", "--out", run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in events.Scalars("val/top1")]
    assert logged == [(row["epoch"], pytest.approx(row["val_top1"])) for row in rows]
    assert {"train/loss", "val/loss", "lr", "images_per_s"} <= set(events.Tags()["scalars"])


def test_tensorboard_without_the_package_is_one_line(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    result = invoke("fit", *tiny, "--set", "log.tensorboard=true", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "pip install 'gtrain[tensorboard]'" in result.output


def test_fine_tuning_loads_published_weights_and_replaces_the_head(tmp_path, tiny):
    # An official-release-style checkpoint: RGB input, 100 classes, wrapped in {"model": ...}.
    torch.manual_seed(0)
    published = create_model("hornet_cifar_nano_7x7", num_classes=100, in_chans=3)
    torch.save({"model": published.state_dict(), "epoch": 299}, tmp_path / "hornet.pth")
    run = tmp_path / "run"
    frozen = ["--set", "optim.lr=1e-12", "--set", "optim.warmup_epochs=0", "--set", "optim.weight_decay=0"]
    output = fit(*tiny, *frozen, "--set", f"model.pretrained={tmp_path / 'hornet.pth'}", "--out", run)
    assert "re-initialized head.weight" in output and "100" in output
    trained, source = load_file(run / "final.safetensors"), published.state_dict()
    stem = next(k for k in trained if source[k].shape[1:2] == (3,) and trained[k].shape[1:2] == (1,))
    torch.testing.assert_close(trained[stem], source[stem].sum(dim=1, keepdim=True), atol=1e-6, rtol=0)
    body = [k for k in trained if k != stem and not k.startswith("head.")]
    for key in body:
        torch.testing.assert_close(trained[key], source[key], atol=1e-6, rtol=0, msg=key)
    assert trained["head.weight"].shape == (10, source["head.weight"].shape[1])


def test_a_missing_pretrained_file_is_one_line(tmp_path, tiny):
    result = invoke("fit", *tiny, "--set", f"model.pretrained={tmp_path / 'nope.pth'}", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "nope.pth" in result.output and "Traceback" not in result.output


def test_compile_trains_through_torch_compile_and_saves_plain_weights(tmp_path, tiny, monkeypatch):
    # Dynamo's "eager" backend traces the model as torch.compile does but skips code
    # generation, which takes minutes on CPU; the wiring is what is tested here.
    compiled = []
    original = torch.compile

    def compile_eagerly(module, **kwargs):
        compiled.append(type(module).__name__)
        return original(module, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    run = tmp_path / "run"
    output = fit(*tiny, "--set", "train.compile=true", "--out", run)
    assert "compiled" in output and compiled == ["HorNet", "HorNet"]  # the training and the evaluation module
    weights = load_file(run / "final.safetensors")
    assert not any(key.startswith("_orig_mod.") for key in weights)
    assert invoke("eval", run, "--json").exit_code == 0


def test_a_checkpoint_written_before_the_newer_recipe_keys_still_resumes(tmp_path, tiny):
    run = tmp_path / "run"
    fit(*tiny, "--out", run)
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    for section, key in [("data", "auto_augment"), ("data", "random_erasing"), ("data", "mixup_alpha"),
                         ("data", "cutmix_alpha"), ("train", "accumulate_steps"), ("train", "compile")]:  # fmt: skip
        del state["recipe"][section][key]
    del state["recipe"]["log"]
    torch.save(state, last)
    fit("--resume", run, "--set", "train.epochs=2")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_batch_norm_equals_each_group_normalised_on_its_own(channels_last):
    from gtrain.models.layers import GhostBatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(12, 5, 3, 4, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ghost = GhostBatchNorm2d(5, group_size=4).double()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 2), ghost.bias.uniform_(-1, 1)
    separate = [nn.BatchNorm2d(5).double() for _ in range(3)]  # one per GPU of a 3-GPU run
    for bn in separate:
        bn.load_state_dict(ghost.state_dict())
    x_ghost, x_separate = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ghost(x_ghost)
    expected = torch.cat([bn(chunk) for bn, chunk in zip(separate, x_separate.split(4))])
    assert torch.allclose(out, expected, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    # The gradients a multi-GPU step would sum, for the inputs and the shared scale and shift.
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.allclose(x_ghost.grad, x_separate.grad, atol=1e-12)
    assert torch.allclose(ghost.weight.grad, sum(bn.weight.grad for bn in separate), atol=1e-12)
    # Running statistics: the mean of the groups' updates; evaluation is plain BatchNorm's.
    assert torch.allclose(ghost.running_mean, torch.stack([bn.running_mean for bn in separate]).mean(0), atol=1e-12)
    assert torch.allclose(ghost.running_var, torch.stack([bn.running_var for bn in separate]).mean(0), atol=1e-12)
    ghost.eval(), separate[0].eval()
    separate[0].load_state_dict(ghost.state_dict())
    assert torch.equal(ghost(x), separate[0](x))


def test_bn_group_size_trains_grouped_statistics_and_saves_plain_weights(tmp_path):
    small = ["quickstart", "--set", "model.stage_depths=[1, 1, 1]", "--set", "train.epochs=1", "--set", "train.precision=fp32"]
    grouped = invoke("fit", *small, "--set", "train.bn_group_size=16", "--out", tmp_path / "grouped", "-q")
    assert grouped.exit_code == 0, grouped.output
    whole = invoke("fit", *small, "--out", tmp_path / "whole", "-q")  # the same run, statistics over all 64
    assert whole.exit_code == 0, whole.output
    a, b = load_file(tmp_path / "grouped" / "final.safetensors"), load_file(tmp_path / "whole" / "final.safetensors")
    assert a.keys() == b.keys() and not torch.equal(a["bn1.running_var"], b["bn1.running_var"])
    scored = invoke("eval", tmp_path / "grouped", "--json")  # a plain BatchNorm model
    assert scored.exit_code == 0, scored.output


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["train.bn_group_size=48"], "train.bn_group_size = 48 must divide the 64 images"),
        (["train.bn_group_size=16", "train.accumulate_steps=8"], "split into 8 equal micro-batches"),
        (["train.bn_group_size=16", "train.sync_bn=true"], "set one of them"),
        (["train.bn_group_size=16", "model.name=hornet_tiny_7x7"], "has no BatchNorm layers"),
    ],
)
def test_bn_groups_that_do_not_fit_are_one_line(tmp_path, settings, message):
    args = [arg for setting in settings for arg in ("--set", setting)]
    result = invoke("fit", "quickstart", *args, "--set", "train.epochs=1", "--out", tmp_path / "run")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
