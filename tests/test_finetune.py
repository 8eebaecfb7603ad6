"""Fine-tuning your own classes: a frozen backbone at first, layer-wise learning rates, and
unbalanced classes (loss weights, a balanced sampler, balanced accuracy)."""


import pytest
import torch
from safetensors.torch import load_file

from gtrain.data.loaders import BalancedSampler
from gtrain.errors import UserError
from gtrain.evaluate import EvalResult
from gtrain.models import create_model
from gtrain.optim import build_optimizer, param_groups
from gtrain.recipe import OptimSection
from tests.conftest import invoke

# One epoch of the quickstart's digits in 5 steps, one block per stage.
QUICK = ["quickstart", "--set", "train.epochs=1", "--set", "model.stage_depths=[1, 1, 1]", "--set", "train.precision=fp32",
         "--set", "data.batch_size=256", "-q"]  # fmt: skip


def test_frozen_epochs_train_the_classifier_alone_and_keep_batchnorm_statistics(tmp_path):
    published = create_model("resnext29_2x16d", num_classes=10, in_chans=1, stage_depths=(1, 1, 1)).state_dict()
    torch.save(published, tmp_path / "published.pth")
    tuned = invoke("fit", *QUICK, "--set", f"model.pretrained={tmp_path / 'published.pth'}", "--set", "train.freeze_epochs=1",
                   "--out", tmp_path / "probe")  # fmt: skip
    assert tuned.exit_code == 0, tuned.output
    probed = load_file(tmp_path / "probe" / "final.safetensors")
    changed = {key for key in published if not torch.equal(published[key], probed[key])}
    assert changed == {"fc.weight", "fc.bias"}  # running means and variances included: unchanged


def test_the_trainer_starts_the_schedule_again_when_the_backbone_starts_training():
    from gtrain.distributed import World
    from gtrain.recipe import load_recipe
    from gtrain.trainer import Trainer

    recipe, _ = load_recipe("quickstart", ["train.freeze_epochs=2", "train.epochs=4", "optim.warmup_epochs=1",
                                           "optim.schedule=cosine", "model.pretrained=published.pth"])  # fmt: skip
    trainer = Trainer.for_model(recipe, num_classes=10, in_chans=1, steps_per_epoch=3, world=World(), device=torch.device("cpu"))
    lrs = []
    for _ in range(12):
        lrs.append(trainer.lr)
        trainer.optimizer.step()
        trainer.scheduler.step()
    peak = recipe.optim.lr
    assert lrs[:3] == pytest.approx([peak / 3, 2 * peak / 3, peak])  # the classifier's warmup
    assert lrs[3:6] == pytest.approx([peak, 0.75 * peak, 0.25 * peak])  # then its cosine decay
    assert lrs[6:9] == pytest.approx([peak / 3, 2 * peak / 3, peak])  # every layer: a warmup of its own


def test_freeze_epochs_without_published_weights_is_one_line(tmp_path):
    result = invoke("fit", *QUICK, "--set", "train.freeze_epochs=1", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "model.pretrained" in result.output and len(result.output.strip().splitlines()) == 1


def _scales(model, **settings) -> dict[str, float]:
    return {id(p): group["lr_scale"] for group in param_groups(model, 1e-4, **settings) for p in group["params"]}


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        # ResNeXt as timm groups ResNet: stem, each bottleneck, head. 3 blocks: 5 depths.
        ("resnext29_2x16d", {"stage_depths": (1, 1, 1)},
         {"conv1.weight": 0.5**4, "bn1.bias": 0.5**4, "layer1.0.conv1.weight": 0.5**3, "layer2.0.bn3.weight": 0.5**2,
          "layer3.0.conv2.weight": 0.5, "fc.weight": 10.0, "fc.bias": 10.0}),
        # HorNet by stage and block, a stage's downsampling before its blocks, the final norm
        # with the head. 4 blocks and 3 downsamplings: 9 depths.
        ("hornet_cifar_nano_7x7", {"depths": (1, 1, 1, 1)},
         {"downsample_layers.0.0.weight": 0.5**8, "stages.0.0.gamma1": 0.5**7, "downsample_layers.1.1.weight": 0.5**6,
          "stages.1.0.norm1.weight": 0.5**5, "downsample_layers.2.0.weight": 0.5**4, "stages.2.0.gamma2": 0.5**3,
          "downsample_layers.3.1.bias": 0.5**2, "stages.3.0.gamma1": 0.5, "norm.weight": 1.0, "head.weight": 10.0}),
    ],
)  # fmt: skip
def test_layer_decay_gives_each_parameter_its_depths_lr(name, overrides, expected):
    model = create_model(name, num_classes=10, **overrides)
    scales = _scales(model, layer_decay=0.5, head_lr_scale=10.0)
    by_name = {key: scales[id(p)] for key, p in model.named_parameters()}
    for key, scale in expected.items():
        assert by_name[key] == pytest.approx(scale), key
    optimizer = build_optimizer(model, OptimSection(lr=0.2, layer_decay=0.5, head_lr_scale=10.0))
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(lrs[id(p)] == pytest.approx(0.2 * by_name[key]) for key, p in model.named_parameters())


def test_without_layer_decay_every_parameter_trains_at_the_one_lr():
    model = create_model("resnext29_2x16d", num_classes=10, stage_depths=(1, 1, 1))
    assert set(_scales(model).values()) == {1.0}
    assert len(param_groups(model, 1e-4)) == 2  # the groups checkpoints have always held


def test_balanced_sampler_draws_each_class_equally_often_and_resumes_to_the_same_order():
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 5)
    whole = BalancedSampler(labels, 3, seed=7, global_batch=9)
    whole.set_epoch(2)
    order = whole.indices()
    assert len(order) == 45 and torch.bincount(labels[order], minlength=3).tolist() == [15, 15, 15]
    assert set(order[labels[order] == 2].tolist()) == set(range(40, 45))  # the small class, drawn again
    again = BalancedSampler(labels, 3, seed=7, global_batch=9)
    again.set_epoch(2, start_step=3)  # a resume after 3 steps
    assert torch.equal(again.indices(), order[27:])
    shards = [BalancedSampler(labels, 3, seed=7, global_batch=9, rank=r, world_size=3) for r in range(3)]
    for shard in shards:
        shard.set_epoch(2)
    assert sorted(torch.cat([s.indices() for s in shards]).tolist()) == sorted(order.tolist())
    keys = whole.keys()  # each draw of an image has its own augmentation stream
    assert len({(key.index, key.draw) for key in keys}) == 45 and {key.draw for key in keys} == {0, 1, 2}
    assert again.keys() == keys[27:] and sorted(sum((s.keys() for s in shards), [])) == sorted(keys)
    whole.set_epoch(3)
    assert not torch.equal(whole.indices(), order)  # a new order every epoch


def test_balanced_sampler_refuses_a_class_without_images():
    with pytest.raises(UserError, match="class 1 has no training images"):
        BalancedSampler(torch.tensor([0, 0, 2, 2]), 3, seed=0, global_batch=2)


def test_balanced_class_weights_and_balanced_accuracy():
    from gtrain.data import balanced_class_weights

    class Labelled:
        targets = [0] * 30 + [1] * 10

    assert balanced_class_weights(Labelled(), 2).tolist() == pytest.approx([40 / 60, 40 / 20])
    result = EvalResult(loss=0.0, top1=0.85, top5=1.0, images=40, seconds=1.0, class_correct=[30, 4],
                        class_total=[30, 10], confusion=[[30, 0], [6, 4]])  # fmt: skip
    assert result.balanced_top1 == pytest.approx((1.0 + 0.4) / 2)
