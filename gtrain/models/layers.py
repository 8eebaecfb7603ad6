"""Layers shared by model families: stochastic depth and a channels-first LayerNorm."""

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop a whole residual branch, per sample.

    In training each sample's branch is zeroed with probability `drop_prob` and the
    kept ones are scaled by 1 / (1 - drop_prob), so the expected output is unchanged.
    In eval mode, or with `drop_prob` 0, it returns its input untouched.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1))  # (N, 1, ..., 1): one draw per sample
        return x * mask.bernoulli_(keep_prob).div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map: every pixel is normalised on its own.

    Same parameters (`weight` and `bias`, shape (C,)) and, within 1e-6, the same output
    as the hand-written mean/variance version in the ConvNeXt and HorNet releases, so
    their checkpoints load unchanged. Calling the fused `F.layer_norm` on a channels-last
    view instead of composing mean, var, sub, div, mul and add is one kernel forward and
    one backward, with none of the intermediates kept for autograd.

    The result is (N, C, H, W) in shape but channels-last in memory, and convs given such
    a tensor keep that layout; on CPU that made HorNet's depthwise-conv backward several
    times faster.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C), a view
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W), memory stays channels-last
