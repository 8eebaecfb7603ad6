"""HorNet: high-order spatial interactions with recursive gated convolutions.

Rao et al., "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated
Convolutions", NeurIPS 2022 (https://arxiv.org/abs/2207.14284). A ConvNeXt-style
network whose token mixer is gnConv: a depthwise conv (or a Global-Local Filter) whose
output gates a stack of 1x1 convs, giving n-th order interactions between positions.

Parameter names, shapes and order match the official release (github.com/raoyongming/
HorNet, hornet.py), so its published ImageNet checkpoints load with `strict=True` and
give its outputs (tests/test_hornet.py pins both).

Unlike the release, every channels-first LayerNorm is the fused `LayerNorm2d`, whose
output is channels-last in memory; the convs after it keep that layout, in which oneDNN's
depthwise 7x7 backward is several times faster on CPU. Same outputs within 1e-5;
benchmarks/hornet_vs_reference.py measures the training step.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gtrain.errors import UserError
from gtrain.models.layers import DropPath, LayerNorm2d

# ---------------------------------------------------------------------------- helpers


def _init_weights(module: nn.Module) -> None:
    # As the release: truncated normal (std .02) for every conv and linear weight, zero
    # bias; LayerNorms keep their ones/zeros and layer scales their init value.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- blocks


class GlobalLocalFilter(nn.Module):
    """Depthwise filter for gnConv mixing a local and a global (Fourier) view of the map.

    After a LayerNorm, half of the channels go through a depthwise 3x3 conv, the other
    half are multiplied in the frequency domain (rfft2, orthonormal) by a learned complex
    weight, a global circular filter. The two halves are interleaved channel by channel
    and normalised again.

    Args:
        dim: channels in and out (even).
        h, w: size of the complex weight, the rfft2 half-spectrum of the expected map:
            (H, W // 2 + 1). Another map size resizes the weight bilinearly.
    """

    def __init__(self, dim: int, h: int, w: int) -> None:
        super().__init__()
        half = dim // 2
        self.dw = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        # (C/2, h, w, 2): real and imaginary parts, the layout of the release's checkpoints.
        self.complex_weight = nn.Parameter(torch.empty(half, h, w, 2))
        nn.init.trunc_normal_(self.complex_weight, std=0.02)
        self.pre_norm = LayerNorm2d(dim, eps=1e-6)
        self.post_norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        local, glob = torch.chunk(x, 2, dim=1)  # two (N, C/2, H, W) views
        local = self.dw(local)
        height, width = x.shape[-2:]
        # cuFFT runs half precision only on power-of-two sizes, so the FFT is done in fp32.
        spectrum = torch.fft.rfft2(glob.float(), dim=(2, 3), norm="ortho")  # (N, C/2, H, W//2+1)
        weight = self.complex_weight
        if weight.shape[1:3] != spectrum.shape[2:4]:
            # Another input resolution: resize the filter over its two frequency axes.
            weight = weight.permute(3, 0, 1, 2)  # (C/2, h, w, 2) -> (2, C/2, h, w)
            weight = F.interpolate(weight, size=spectrum.shape[2:4], mode="bilinear", align_corners=True)
            weight = weight.permute(1, 2, 3, 0).contiguous()  # -> (C/2, H, W//2+1, 2)
        spectrum = spectrum * torch.view_as_complex(weight)
        glob = torch.fft.irfft2(spectrum, s=(height, width), dim=(2, 3), norm="ortho")
        # Interleave local[0], glob[0], local[1], ... as the release does, so its weights apply.
        x = torch.stack((local, glob), dim=2).flatten(1, 2)  # (N, C/2, 2, H, W) -> (N, C, H, W)
        return self.post_norm(x)


class GnConv(nn.Module):
    """Recursive gated convolution (gnConv) of order n, the token mixer of HorNet.

    With widths C_k = dim / 2^(n-1-k) for k = 0..n-1 (so C_{n-1} = dim), a 1x1 conv
    `proj_in` maps x to 2*dim channels, split into p_0 (C_0 channels) and q_0..q_{n-1}
    (sum C_k channels). One depthwise filter f over all the q's, scaled by s, gives
    the gates; then

        p_1 = f(q_0) * p_0,    p_{k+1} = f(q_k) * g_k(p_k)  for k = 1..n-1,

    where g_k (`pws[k-1]`) is a 1x1 conv from C_{k-1} to C_k channels, and the output
    is `proj_out`(p_n). Each step multiplies by one more spatially mixed gate, so p_n
    holds n-th order interactions. The low orders run on few channels (C_k halves as
    k falls), so all n steps together cost little more than one gating at full width.

    Args:
        dim: channels in and out; divisible by 2^(order-1).
        order: n, the number of gating steps (2..5 in HorNet's stages).
        scale: s, multiplies the filter output (1/3 in every released variant).
        gf_size: None for a depthwise 7x7 conv (with bias) as the filter; (h, w) for a
            GlobalLocalFilter whose complex weight has that size.

    Works on any (N, dim, H, W): `GnConv(64, order=3)(torch.randn(2, 64, 9, 9))`.
    """

    def __init__(
        self, dim: int, order: int, *, scale: float = 1 / 3, gf_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        if order < 1 or dim % 2 ** (order - 1):
            raise ValueError(f"gnConv of order {order} needs dim divisible by {2 ** (order - 1)}, got {dim}")
        self.dims = [dim // 2**k for k in reversed(range(order))]  # [C/2^(n-1), ..., C/2, C]
        self.scale = scale
        gate_channels = sum(self.dims)
        self.proj_in = nn.Conv2d(dim, 2 * dim, kernel_size=1)
        # One filter over all the q_k at once: a depthwise filter acts per channel, so this
        # equals filtering each q_k apart, in one call.
        if gf_size is None:
            self.dwconv = nn.Conv2d(gate_channels, gate_channels, 7, padding=3, groups=gate_channels)
        else:
            self.dwconv = GlobalLocalFilter(gate_channels, *gf_size)
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1)
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[k], self.dims[k + 1], 1) for k in range(order - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)  # views
        gates = torch.split(self.dwconv(q) * self.scale, self.dims, dim=1)  # views, one per order
        p = p * gates[0]
        for pw, gate in zip(self.pws, gates[1:]):
            p = pw(p) * gate
        return self.proj_out(p)


class HorNetBlock(nn.Module):
    """ConvNeXt-style block with gnConv as the spatial mixer, then an MLP of ratio 4.

    x + drop_path(gamma1 * gnConv(LN(x))), then x + drop_path(gamma2 * MLP(LN(x))).
    """

    def __init__(
        self,
        dim: int,
        *,
        order: int,
        scale: float,
        gf_size: tuple[int, int] | None,
        drop_path: float,
        layer_scale_init: float,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.gnconv = GnConv(dim, order, scale=scale, gf_size=gf_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)  # the MLP runs channels-last, on (N, H, W, C)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # As the release, layer_scale_init 0 means no layer scale (and no gamma parameters).
        has_gamma = layer_scale_init > 0
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init)) if has_gamma else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init)) if has_gamma else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gnconv(self.norm1(x))
        if self.gamma1 is not None:
            y = y * self.gamma1[:, None, None]  # (C,) -> (C, 1, 1)
        x = x + self.drop_path(y)
        y = self.norm2(x.permute(0, 2, 3, 1))  # (N, C, H, W) -> (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma2 is not None:
            y = y * self.gamma2
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)


# ------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class HorNetConfig:
    depths: tuple[int, int, int, int]  # blocks per stage
    base_width: int  # stage widths are base_width * (1, 2, 4, 8)
    # gnConv order per stage. As widths double, the first-order width C / 2^(n-1) stays
    # base_width / 2 in every stage while deeper stages get more interaction steps.
    orders: tuple[int, int, int, int] = (2, 3, 4, 5)
    # Per stage: None for gnConv's depthwise 7x7 filter, or the (h, w) of a Global-Local
    # Filter's weight: the rfft2 half-spectrum (H, W // 2 + 1) of that stage's map at
    # input_size. The paper uses it in stages 3 and 4 only.
    gf_sizes: tuple[tuple[int, int] | None, ...] = (None, None, None, None)
    gnconv_scale: float = 1 / 3  # s: the release scales the filter output by 1/3 in every variant
    # Stem conv: the paper's 4x4 stride-4 patchify; padding is (kernel - stride) // 2.
    stem_kernel_size: int = 4
    stem_stride: int = 4
    input_size: int = 224  # default training resolution, px
    drop_path_rate: float = 0.0  # stochastic depth of the last block, linear from 0 over the blocks
    layer_scale_init: float = 1e-6  # initial gamma of both residual branches; 0 disables layer scale


class HorNet(nn.Module):
    """HorNet classifier: stem conv, four stages of HorNetBlocks, pooled LayerNorm head.

    The module layout (`downsample_layers`, `stages`, `norm`, `head`) is the release's,
    so its state_dicts load as they are.
    """

    def __init__(self, config: HorNetConfig, *, num_classes: int, in_chans: int) -> None:
        super().__init__()
        if not len(config.depths) == len(config.orders) == len(config.gf_sizes) == 4:
            raise UserError(
                f"HorNet has 4 stages: depths, orders and gf_sizes need 4 entries each, got "
                f"{len(config.depths)}, {len(config.orders)} and {len(config.gf_sizes)}"
            )
        widths = [config.base_width * 2**i for i in range(4)]
        self.num_features = widths[-1]
        # Three 2x downsamples after the stem: smaller inputs would leave a map below 1x1.
        self.min_input_size = config.stem_stride * 8

        kernel, stride = config.stem_kernel_size, config.stem_stride
        stem = nn.Conv2d(in_chans, widths[0], kernel, stride=stride, padding=(kernel - stride) // 2)
        self.downsample_layers = nn.ModuleList([nn.Sequential(stem, LayerNorm2d(widths[0], eps=1e-6))])
        for i in range(3):
            downsample = nn.Conv2d(widths[i], widths[i + 1], kernel_size=2, stride=2)
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(widths[i], eps=1e-6), downsample))

        # Stochastic depth grows linearly over the blocks. On the CPU so that the model
        # also builds under `torch.device("meta")`, where `.tolist()` has no values.
        drop_paths = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            first = sum(config.depths[:i])
            blocks = [
                HorNetBlock(
                    widths[i],
                    order=config.orders[i],
                    scale=config.gnconv_scale,
                    gf_size=config.gf_sizes[i],
                    drop_path=drop_paths[first + j],
                    layer_scale_init=config.layer_scale_init,
                )
                for j in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))

        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head = nn.Linear(self.num_features, num_classes)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, num_features, H/32, W/32); H/8, W/8 with the CIFAR stem."""
        if min(x.shape[-2:]) < self.min_input_size:
            raise UserError(
                f"input {tuple(x.shape[-2:])} is too small for this HorNet: it needs at least "
                f"{self.min_input_size}x{self.min_input_size} px"
            )
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map -> logits: global average pool, LayerNorm, Linear."""
        return self.head(self.norm(x.mean((-2, -1))))  # (N, C, H, W) -> (N, C) -> (N, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear with a freshly initialised one, e.g. to fine-tune."""
        old = self.head.weight
        self.head = nn.Linear(self.num_features, num_classes).to(device=old.device, dtype=old.dtype)
        _init_weights(self.head)


def block_of(name: str) -> tuple[int, int] | None:
    """(stage, position) of a parameter in a stage: a stage's downsampling layer first, then
    its blocks; None for the stem and the final norm and head."""
    if match := re.match(r"stages\.(\d+)\.(\d+)\.", name):
        return int(match[1]), int(match[2]) + 1
    if (match := re.match(r"downsample_layers\.(\d+)\.", name)) and match[1] != "0":
        return int(match[1]), 0
    return None


# ----------------------------------------------------------------------------- variants

# Global-Local Filters in stages 3 and 4 at 224 px: their maps are 14x14 and 7x7.
_GF_224 = (None, None, (14, 8), (7, 4))
# CIFAR variants: a 3x3 stride-1 stem keeps 32 px inputs at 32, 16, 8, 4 px per stage
# (a stride-4 stem would leave 1x1 in stage 4), and still runs on 8x8 inputs (8, 4, 2, 1).
# Their filters match the 8x8 and 4x4 maps of stages 3 and 4.
_GF_32 = (None, None, (8, 5), (4, 3))
_CIFAR_STEM = dict(stem_kernel_size=3, stem_stride=1, input_size=32)

# drop_path_rate: the release's ImageNet-1k recipes (TRAINING.md), ImageNet-22k for large.
VARIANTS: dict[str, HorNetConfig] = {
    "hornet_tiny_7x7": HorNetConfig((2, 3, 18, 2), base_width=64, drop_path_rate=0.2),
    "hornet_tiny_gf": HorNetConfig((2, 3, 18, 2), base_width=64, gf_sizes=_GF_224, drop_path_rate=0.2),
    "hornet_small_7x7": HorNetConfig((2, 3, 18, 2), base_width=96, drop_path_rate=0.4),
    "hornet_small_gf": HorNetConfig((2, 3, 18, 2), base_width=96, gf_sizes=_GF_224, drop_path_rate=0.4),
    "hornet_base_7x7": HorNetConfig((2, 3, 18, 2), base_width=128, drop_path_rate=0.5),
    "hornet_base_gf": HorNetConfig((2, 3, 18, 2), base_width=128, gf_sizes=_GF_224, drop_path_rate=0.5),
    "hornet_large_7x7": HorNetConfig((2, 3, 18, 2), base_width=192, drop_path_rate=0.2),
    "hornet_large_gf": HorNetConfig((2, 3, 18, 2), base_width=192, gf_sizes=_GF_224, drop_path_rate=0.2),
    # For CPUs: a step on 64 images of 16 (32) px takes 0.3 (0.8) s on one core, measured.
    "hornet_cifar_nano_7x7": HorNetConfig((1, 1, 2, 1), base_width=32, **_CIFAR_STEM),
    "hornet_cifar_nano_gf": HorNetConfig((1, 1, 2, 1), base_width=32, gf_sizes=_GF_32, **_CIFAR_STEM),
    # HorNet-T's widths and orders with a third of its stage-3 blocks: at 32 px and stride 1,
    # stage 1 already sees a 32x32 map.
    "hornet_cifar_tiny_7x7": HorNetConfig((2, 3, 6, 2), base_width=64, drop_path_rate=0.1, **_CIFAR_STEM),
    "hornet_cifar_tiny_gf": HorNetConfig(
        (2, 3, 6, 2), base_width=64, gf_sizes=_GF_32, drop_path_rate=0.1, **_CIFAR_STEM
    ),
}
# No paper reports the CIFAR variants: they are counted with a CIFAR-10 head, the rest
# with ImageNet-1k's 1000 classes, as in the paper.
NUM_CLASSES = {name: 10 for name in VARIANTS if name.startswith("hornet_cifar_")}
