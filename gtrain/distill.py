"""Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network"): the student learns from the labels and from a trained teacher's softened outputs.

The teacher is a model gtrain trained (a run folder or its weights file). It runs in eval
mode without gradients, in the run's precision, on the student's own batch: the same crops,
flips and MixUp/CutMix, re-normalised with the teacher's mean and std where they differ.
It holds no state that changes, so a checkpoint need not hold it and a resume stays exact.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gtrain.checkpoint import load_model
from gtrain.errors import UserError
from gtrain.recipe import DistillSection
from gtrain.run_folder import weights_file


@dataclass
class Teacher:
    model: nn.Module
    temperature: float
    alpha: float
    renormalize: tuple[torch.Tensor, torch.Tensor] | None  # (scale, shift): the student's inputs as the teacher's

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.renormalize is not None:
            scale, shift = self.renormalize
            inputs = inputs * scale + shift
        return self.model(inputs)

    def loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor, label_loss: torch.Tensor) -> torch.Tensor:
        """(1 - alpha) x the label loss + alpha x T² x KL(teacher || student) at temperature T;
        T² keeps the soft loss's gradients the size of the label loss's as T grows (Hinton)."""
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                        reduction="batchmean", log_target=True)  # fmt: skip
        return (1 - self.alpha) * label_loss + self.alpha * t * t * soft


def load_teacher(
    distill: DistillSection, *, num_classes: int, in_chans: int, mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
    device: torch.device, channels_last: bool,
) -> Teacher | None:  # fmt: skip
    """The recipe's teacher on `device`, or None; one line if it cannot teach these classes.
    `mean` / `std`: the student's normalisation (None: the same as the teacher's)."""
    if distill.teacher is None:
        return None
    try:
        path = weights_file(Path(distill.teacher))
    except UserError as error:
        raise UserError(f"distill.teacher: {error}") from None
    model, meta = load_model(path)
    if meta.num_classes != num_classes or meta.in_chans != in_chans:
        raise UserError(
            f"distill.teacher {path} was trained for {meta.num_classes} classes of {meta.in_chans}-channel images; "
            f"this run has {num_classes} of {in_chans}: give a teacher trained on the same classes"
        )
    model = model.to(device).eval().requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    renormalize = None
    if mean is not None and (tuple(meta.mean) != tuple(mean) or tuple(meta.std) != tuple(std)):
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, per channel.
        shape = (1, -1, 1, 1)
        s_mean, s_std = torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)
        t_mean, t_std = torch.tensor(meta.mean, device=device).view(shape), torch.tensor(meta.std, device=device).view(shape)
        renormalize = (s_std / t_std, (s_mean - t_mean) / t_std)
    return Teacher(model, distill.temperature, distill.alpha, renormalize)
