"""Layers shared by model families: stochastic depth, a channels-first LayerNorm, and
ghost batch norm (BatchNorm over groups within a batch, for `train.bn_group_size`)."""

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


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from groups of `group_size` consecutive
    images of the batch (ghost batch norm, Hoffer et al. 2017): what each of several GPUs
    computes for its share of a batch without SyncBatchNorm, here on one device in one
    forward pass. The running statistics move by the mean of the groups' statistics; in
    evaluation, and in its state dict, it is BatchNorm2d."""

    def __init__(self, num_features: int, group_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if not self.training or batch == self.group_size:
            return super().forward(x)
        if batch % self.group_size:
            raise ValueError(f"a batch of {batch} images does not split into groups of {self.group_size}")
        groups, size, channels = batch // self.group_size, self.group_size, self.num_features
        # (groups * size, C, H, W) -> (size, groups * C, H, W): each group's channels are
        # channels of their own, so one batch_norm call normalises every group separately.
        folded = x.unflatten(0, (groups, size)).transpose(0, 1).flatten(1, 2)
        def repeated(tensor):
            return tensor.repeat(groups) if tensor is not None else None

        running_mean, running_var = repeated(self.running_mean), repeated(self.running_var)
        momentum = 0.0
        if self.track_running_stats:
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        out = F.batch_norm(folded, running_mean, running_var, repeated(self.weight), repeated(self.bias),
                           True, momentum, self.eps)  # fmt: skip
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(groups, channels).mean(0))
                self.running_var.copy_(running_var.view(groups, channels).mean(0))
        out = out.unflatten(1, (groups, channels)).transpose(0, 1).flatten(0, 1)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    @classmethod
    def convert(cls, module: nn.Module, group_size: int) -> int:
        """Replace every BatchNorm2d in `module` by one of these, with its parameters and
        statistics; return how many were replaced."""
        count = 0
        for name, child in module.named_children():
            if type(child) is nn.BatchNorm2d:
                ghost = cls(child.num_features, group_size, eps=child.eps, momentum=child.momentum,
                            affine=child.affine, track_running_stats=child.track_running_stats)  # fmt: skip
                ghost.load_state_dict(child.state_dict())
                ghost.to(next(child.buffers(), next(child.parameters(), torch.empty(0))).device)
                setattr(module, name, ghost)
                count += 1
            else:
                count += cls.convert(child, group_size)
        return count

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
