"""Training-step time of gtrain's HorNet against the release's formulation, same weights.

The reference below is written from the paper in the structure of the official release
(github.com/raoyongming/HorNet, hornet.py): its channels-first LayerNorm is composed by
hand (mean, variance, normalise, affine) and every map stays (N, C, H, W) in memory.
gtrain's `LayerNorm2d` calls the fused `F.layer_norm` on a channels-last view, so the
maps after it, and every conv, run channels-last, where oneDNN's depthwise 7x7 backward
is several times faster on CPU. Both models load one state_dict (the release's key
names), must agree within 1e-5, then each times forward + backward + SGD step, the two
alternating step by step so that load from other processes hits both alike.

    python benchmarks/hornet_vs_reference.py                  # tiny at 224 px, batch 16
    python benchmarks/hornet_vs_reference.py --models hornet_cifar_nano_gf --batch-size 128

Besides wall-clock time it reports process CPU time (all threads), which a busy machine
inflates less.
"""

import argparse
import dataclasses
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from gtrain.models import create_model, get_model_entry

# ---------------------------------------------------------------- reference formulation


class RefLayerNorm(nn.Module):
    """LayerNorm over dim 1 of (N, C, H, W) computed by hand, or over the last dim."""

    def __init__(self, dim: int, channels_first: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_first:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-6)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RefGlobalLocalFilter(nn.Module):
    def __init__(self, dim: int, h: int, w: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim // 2, dim // 2, 3, padding=1, groups=dim // 2, bias=False)
        self.complex_weight = nn.Parameter(torch.zeros(dim // 2, h, w, 2))
        self.pre_norm = RefLayerNorm(dim, channels_first=True)
        self.post_norm = RefLayerNorm(dim, channels_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        local, glob = torch.chunk(x, 2, dim=1)
        local = self.dw(local)
        n, c, h, w = glob.shape
        spectrum = torch.fft.rfft2(glob.float(), dim=(2, 3), norm="ortho")
        weight = self.complex_weight
        if weight.shape[1:3] != spectrum.shape[2:4]:
            weight = F.interpolate(
                weight.permute(3, 0, 1, 2), size=spectrum.shape[2:4], mode="bilinear", align_corners=True
            ).permute(1, 2, 3, 0)
        spectrum = spectrum * torch.view_as_complex(weight.contiguous())
        glob = torch.fft.irfft2(spectrum, s=(h, w), dim=(2, 3), norm="ortho")
        x = torch.cat([local.unsqueeze(2), glob.unsqueeze(2)], dim=2).reshape(n, 2 * c, h, w)
        return self.post_norm(x)


class RefGnConv(nn.Module):
    def __init__(self, dim: int, order: int, scale: float, gf_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.dims = [dim // 2**k for k in range(order)][::-1]
        self.scale = scale
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        total = sum(self.dims)
        if gf_size is None:
            self.dwconv = nn.Conv2d(total, total, 7, padding=3, groups=total)
        else:
            self.dwconv = RefGlobalLocalFilter(total, *gf_size)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[k], self.dims[k + 1], 1) for k in range(order - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.proj_in(x)
        p, q = torch.split(fused, (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(q) * self.scale, self.dims, dim=1)
        x = p * gates[0]
        for k in range(len(self.pws)):
            x = self.pws[k](x) * gates[k + 1]
        return self.proj_out(x)


class RefBlock(nn.Module):
    def __init__(self, dim: int, order: int, scale: float, gf_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.norm1 = RefLayerNorm(dim, channels_first=True)
        self.gnconv = RefGnConv(dim, order, scale, gf_size)
        self.norm2 = RefLayerNorm(dim, channels_first=False)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = x + self.gamma1.view(c, 1, 1) * self.gnconv(self.norm1(x))
        shortcut = x
        x = x.permute(0, 2, 3, 1)
        x = self.gamma2 * self.pwconv2(self.act(self.pwconv1(self.norm2(x))))
        return shortcut + x.permute(0, 3, 1, 2)


class RefHorNet(nn.Module):
    """The release's HorNet without drop path (the benchmark runs with drop_path_rate 0)."""

    def __init__(self, config, *, num_classes: int, in_chans: int) -> None:
        super().__init__()
        dims = [config.base_width * 2**i for i in range(4)]
        stem_padding = (config.stem_kernel_size - config.stem_stride) // 2
        stem = nn.Conv2d(in_chans, dims[0], config.stem_kernel_size, config.stem_stride, stem_padding)
        self.downsample_layers = nn.ModuleList([nn.Sequential(stem, RefLayerNorm(dims[0], True))])
        for i in range(3):
            downsample = nn.Conv2d(dims[i], dims[i + 1], 2, 2)
            self.downsample_layers.append(nn.Sequential(RefLayerNorm(dims[i], True), downsample))
        self.stages = nn.ModuleList(
            nn.Sequential(
                *[
                    RefBlock(dims[i], config.orders[i], config.gnconv_scale, config.gf_sizes[i])
                    for _ in range(config.depths[i])
                ]
            )
            for i in range(4)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.head(self.norm(x.mean([-2, -1])))


# ------------------------------------------------------------------------------ timing


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def compare(name: str, *, batch_size: int, image_size: int | None, steps: int) -> dict[str, tuple]:
    """Check that both formulations agree, then time them: {formulation: (wall ms, CPU ms)}, medians."""
    config = dataclasses.replace(get_model_entry(name).config, drop_path_rate=0.0)
    image_size = image_size or config.input_size
    torch.manual_seed(0)
    ours = create_model(name, num_classes=1000, drop_path_rate=0.0)
    reference = RefHorNet(config, num_classes=1000, in_chans=3)
    # Layer scale and LayerNorm affine away from their init values, so that the check
    # below exercises every parameter rather than a near-identity network.
    with torch.no_grad():
        for key, value in ours.named_parameters():
            if "gamma" in key or "norm" in key:
                value.copy_(torch.randn_like(value) * 0.3 + (1.0 if key.endswith("weight") else 0.0))
    reference.load_state_dict(ours.state_dict(), strict=True)

    images = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch_size,))
    with torch.no_grad():
        difference = (ours.eval()(images) - reference.eval()(images)).abs().max().item()
    print(f"{name} at {image_size} px, batch {batch_size}: max |logit difference| {difference:.2e}")
    if difference > 1e-5:
        raise SystemExit(f"{name}: outputs differ by {difference:.2e} > 1e-5")

    models = {"reference": reference.train(), "gtrain": ours.train()}
    optimizers = {key: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for key, m in models.items()}
    for key, model in models.items():  # warm-up: first-call allocation and oneDNN primitive setup
        train_step(model, optimizers[key], images, labels)
    wall_ms: dict[str, list[float]] = {key: [] for key in models}
    cpu_ms: dict[str, list[float]] = {key: [] for key in models}
    for step in range(steps):
        order = list(models) if step % 2 == 0 else list(models)[::-1]  # alternate who goes first
        for key in order:
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(models[key], optimizers[key], images, labels)
            wall_ms[key].append((time.perf_counter() - wall) * 1e3)
            cpu_ms[key].append((time.process_time() - cpu) * 1e3)
    return {key: (statistics.median(wall_ms[key]), statistics.median(cpu_ms[key])) for key in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["hornet_tiny_7x7"], help="registered hornet variants")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None, help="px; default: each variant's input_size")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model, after one warm-up step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    rows = []
    for name in args.models:
        medians = compare(name, batch_size=args.batch_size, image_size=args.image_size, steps=args.steps)
        rows.append((name, medians))
    print(f"load average after the run: {os.getloadavg()[0]:.1f} (1 min)")
    print(f"\n{'model':<24}{'formulation':<12}{'wall ms/step':>14}{'CPU ms/step':>14}{'speed-up':>16}")
    for name, medians in rows:
        ref_wall, ref_cpu = medians["reference"]
        for key, (wall, cpu) in medians.items():
            speedup = f"{ref_wall / wall:.2f}x, {ref_cpu / cpu:.2f}x" if key == "gtrain" else "wall, CPU"
            print(f"{name:<24}{key:<12}{wall:>14.0f}{cpu:>14.0f}{speedup:>16}")


if __name__ == "__main__":
    main()
