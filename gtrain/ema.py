"""An exponential moving average of the weights, evaluated and saved beside the model.

torch.optim.swa_utils.AveragedModel computes the same average, but it reads its step
counter back from the device on every update: a host sync per training step on GPUs.
Here the update is one fused lerp over all floating-point tensors, with no sync.
"""

import copy

import torch
from torch import nn


class WeightEMA:
    """ema = d * ema + (1 - d) * weights after every optimizer step, d = min(decay, (1 + n) / (10 + n))
    after n updates: the warm-up keeps the average from holding on to the random initial
    weights for thousands of steps (as timm's ModelEmaV3 and TensorFlow's EMA do).

    Floating-point buffers (BatchNorm's running statistics) are averaged too, so the
    averaged network is evaluated with statistics that match its weights; integer buffers
    (BatchNorm's batch counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup  # False: `decay` from the first update, as timm's ModelEma (v1)
        self.updates = 0  # a Python int: reading a device counter would sync every step
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self._tensors(self.module), self._tensors(model), strict=True))
        self._ema_floats = [e for e, m in pairs if e.is_floating_point()]
        self._model_floats = [m for e, m in pairs if e.is_floating_point()]
        self._ema_others = [e for e, m in pairs if not e.is_floating_point()]
        self._model_others = [m for e, m in pairs if not e.is_floating_point()]

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*module.parameters(), *module.buffers())]

    @torch.no_grad()
    def update(self) -> None:
        """Average in the current weights of the model this was made from."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        torch._foreach_lerp_(self._ema_floats, self._model_floats, 1 - decay)
        for ema, current in zip(self._ema_others, self._model_others):
            ema.copy_(current)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
