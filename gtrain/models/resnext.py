"""ResNeXt: residual networks of grouped-convolution bottlenecks (Xie et al. 2017,
"Aggregated Residual Transformations for Deep Neural Networks", arXiv:1611.05431).

A ResNeXt block is a ResNet bottleneck whose 3x3 conv is split into `cardinality`
groups of `width_per_group` channels (the paper's C and d, form (c) of its Fig. 3).
One model class covers both the ImageNet networks and the CIFAR ResNeXt-29; the
variants at the bottom of this file differ only in numbers.

Module names follow torchvision's ResNet (conv1, bn1, layer1.., fc) so that
torchvision's ImageNet weights load into the ImageNet variants with `strict=True`.
The CIFAR variants keep the same names for their 3x3 stem (conv1, bn1) and their
three stages (layer1..layer3).
"""

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gtrain.errors import UserError

STEM_WIDTH = 64  # channels after the stem, for both stems (paper Table 1; the authors' CIFAR code)
STEMS = ("imagenet", "cifar")


@dataclass(frozen=True)
class ResNeXtConfig:
    stage_depths: tuple[int, ...]  # bottlenecks per stage; stage i has 64 * 2**i planes
    cardinality: int  # groups in every 3x3 conv: the paper's C
    width_per_group: int  # channels per group in the first stage, doubling per stage: the paper's d
    # "imagenet": 7x7 stride-2 conv + 3x3 stride-2 max pool (32x downsampling overall);
    # "cifar": one 3x3 stride-1 conv, no pool (4x overall), for 32 px and smaller images.
    stem: Literal["imagenet", "cifar"]
    input_size: int  # the image side, in pixels, that the variant was designed for
    # Zero the last BN's scale in each block, so every block starts as the identity:
    # Goyal et al. 2017 (arXiv:1706.02677) report +0.2-0.3% top-1 on ImageNet, and without
    # it the quickstart's SGD at lr 0.1 blew the loss up in its first epoch. On by default,
    # as in timm; off in the paper (its recipes here turn it off). Loaded weights replace it.
    zero_init_last_bn: bool = True


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 grouped conv -> 1x1 expand to `planes * 4`, plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int, cardinality: int, width_per_group: int):
        super().__init__()
        # `planes` is 64, 128, 256, 512 in stages 1-4, so the group width doubles per stage.
        width = int(planes * width_per_group / 64) * cardinality
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # The stride sits on the 3x3 grouped conv, not on the first 1x1 as in the original
        # ResNet: the "ResNet v1.5" placement torchvision uses (and ResNeXt's own Torch code).
        # A strided 1x1 would drop 3/4 of its input positions without looking at them.
        self.conv2 = nn.Conv2d(
            width, width, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # Projection shortcut only where the shape changes (the paper's option B).
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNeXt(nn.Module):
    def __init__(self, config: ResNeXtConfig, *, num_classes: int, in_chans: int):
        super().__init__()
        if config.stem not in STEMS:
            raise UserError(f"resnext stem must be one of {', '.join(STEMS)}, got {config.stem!r}")
        self.config = config

        if config.stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)

        # Stages are attributes layer1, layer2, ... (not a ModuleList) to keep torchvision's keys.
        self.stage_names = [f"layer{i + 1}" for i in range(len(config.stage_depths))]
        channels = STEM_WIDTH
        for i, (name, depth) in enumerate(zip(self.stage_names, config.stage_depths)):
            planes = 64 * 2**i
            blocks = []
            for j in range(depth):
                # The first stage keeps the stem's resolution; each later one halves it.
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(
                    Bottleneck(
                        channels,
                        planes,
                        stride=stride,
                        cardinality=config.cardinality,
                        width_per_group=config.width_per_group,
                    )
                )
                channels = planes * Bottleneck.expansion
            self.add_module(name, nn.Sequential(*blocks))

        self.num_features = channels
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(config.zero_init_last_bn)

    def _init_weights(self, zero_init_last_bn: bool) -> None:
        # As in the paper (He et al. 2015 init) and torchvision; fc keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one, for fine-tuning."""
        self.fc = nn.Linear(self.num_features, num_classes).to(
            device=self.fc.weight.device, dtype=self.fc.weight.dtype
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H / 32, W / 32); H / 4 with the CIFAR stem."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # global average pool: (B, C, H, W) -> (B, C)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# The ImageNet variants equal torchvision's models of the same name, key for key.
# The CIFAR variants are the paper's ResNeXt-29: 3 stages of 3 blocks with outputs of
# 256/512/1024 channels, named CxWd (C = cardinality, W = group width in stage 1). The
# paper's 8x64d and 16x64d are GPU-sized; 2x16d and 4x16d (2-3M parameters) fit a laptop CPU.
# Columns C and d are cardinality and width_per_group, in the paper's letters.
def block_of(name: str) -> tuple[int, int] | None:
    """(stage, block) of a parameter in a bottleneck, as timm groups ResNet's blocks for
    layer decay; None for the stem and the classifier."""
    match = re.match(r"layer(\d+)\.(\d+)\.", name)
    return (int(match[1]), int(match[2])) if match else None


VARIANTS: dict[str, ResNeXtConfig] = {
    #                                  stage_depths    C   d   stem        input_size
    "resnext50_32x4d":   ResNeXtConfig((3, 4, 6, 3),   32, 4,  "imagenet", 224),
    "resnext101_32x8d":  ResNeXtConfig((3, 4, 23, 3),  32, 8,  "imagenet", 224),
    "resnext101_64x4d":  ResNeXtConfig((3, 4, 23, 3),  64, 4,  "imagenet", 224),
    "resnext29_8x64d":   ResNeXtConfig((3, 3, 3),      8,  64, "cifar",    32),
    "resnext29_16x64d":  ResNeXtConfig((3, 3, 3),      16, 64, "cifar",    32),
    "resnext29_2x16d":   ResNeXtConfig((3, 3, 3),      2,  16, "cifar",    32),
    "resnext29_4x16d":   ResNeXtConfig((3, 3, 3),      4,  16, "cifar",    32),
}
# The CIFAR variants are counted with a CIFAR-10 head, as in the paper's Table 7 (8x64d:
# 34.4M parameters); the others with ImageNet-1k's 1000 classes.
NUM_CLASSES = {name: 10 for name, config in VARIANTS.items() if config.stem == "cifar"}
