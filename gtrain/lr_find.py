"""`gtrain lr-find`: the learning-rate range test (Smith 2017, "Cyclical Learning Rates").

From a recipe's model, data and optimizer, train for a few steps (at most the recipe's
first epoch) while the lr grows exponentially from `start_lr` to `end_lr` (by default from
1/1000 of the recipe's lr to 100 times it: five decades around what the recipe's optimizer
is usually run at, so that a short test still takes small steps in lr); smooth the loss
with an exponential moving average and stop when it diverges. The suggestion is the lr at
the minimum of the smoothed loss: the largest lr at which the loss still fell, Smith's
maximum lr for a schedule that warms up to it and decays from it (as gtrain's cosine and
one-cycle schedules do). The lr of the steepest descent is reported too.

Measured on the quickstart (22 steps per epoch; `gtrain fit quickstart --set optim.lr=LR`,
15 epochs, final test top-1): 0.022 91%, 0.042 95.6%, 0.072 97.5%, 0.1 (its recipe's) and
0.3 98.6%. With the default range this suggests 0.12 (seeds 0 and 1) or 0.042 (seed 2);
the steepest descent 0.072 or 0.024. From 1e-7 to 10, 22 steps are too coarse: the
suggestions fell to 2e-7 to 0.05, the steepest descent's to 0.009 to 0.022 and fastai's
"valley" (halfway along the longest decreasing stretch) to 5e-5 to 1e-2: on a short test
whose loss is flat and noisy until the lr is large, they land far below what trains well.

Nothing of it stays: the random state is restored afterwards and nothing is written, so a
later `gtrain fit` trains exactly as it would have without it.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from gtrain import distributed, runtime
from gtrain.distributed import World
from gtrain.errors import UserError
from gtrain.recipe import Recipe
from gtrain.trainer import Trainer, check_batch_split, load_data, rng_state, set_rng_state

DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum


@dataclass
class LrFindResult:
    suggested_lr: float | None  # at the smoothed loss's minimum; None when the loss never fell
    steepest_lr: float | None = None  # at its steepest descent, for reference
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw, per step
    smoothed: list[float] = field(default_factory=list)
    stopped: str = ""  # why the test ended before its last step, if it did

    def to_json(self) -> dict:
        return {"suggested_lr": self.suggested_lr, "steepest_lr": self.steepest_lr, "lrs": self.lrs, "losses": self.losses, "smoothed_losses": self.smoothed,
                "stopped": self.stopped or None}  # fmt: skip


def lr_range_test(
    recipe: Recipe, *, steps: int = 100, start_lr: float | None = None, end_lr: float | None = None,
    device: str | None = None, plot: Path | None = None,
) -> LrFindResult:
    """The range test of `recipe`; with `plot`, loss against lr drawn as a PNG there."""
    start_lr = recipe.optim.lr / 1000 if start_lr is None else start_lr
    end_lr = recipe.optim.lr * 100 if end_lr is None else end_lr
    if distributed.launched_distributed():
        raise UserError("gtrain lr-find runs in one process: start it without torchrun or srun")
    if not 0 < start_lr < end_lr:
        raise UserError(f"--start-lr {start_lr:g} and --end-lr {end_lr:g}: need 0 < start-lr < end-lr")
    if steps < 5:
        raise UserError(f"--steps {steps}: the range test needs at least 5 steps")
    if plot is not None:
        from gtrain.plot import check_plot_path

        check_plot_path(plot)  # before the test: a plot that cannot be written fails at once
    saved = rng_state()
    try:
        result = _range_test(recipe, steps=steps, start_lr=start_lr, end_lr=end_lr, device=device)
    finally:
        set_rng_state(saved)  # the caller's random stream goes on as if nothing had run
    if plot is not None:
        from gtrain.plot import write_lr_find_plot

        write_lr_find_plot(plot, result.lrs, result.losses, result.smoothed, result.suggested_lr)
    return result


def _range_test(recipe: Recipe, *, steps: int, start_lr: float, end_lr: float, device: str | None) -> LrFindResult:
    train, world = recipe.train, World()
    runtime.seed_everything(train.seed, train.deterministic)
    device_ = runtime.resolve_device(device or train.device)
    check_batch_split(recipe, world)
    data = load_data(recipe, world)
    trainer = Trainer.build(recipe, data, world=world, device=device_, pretrained=bool(recipe.model.pretrained))
    steps = min(steps, trainer.settings.steps_per_epoch)  # never past the first epoch: its data order is the recipe's
    train_loader, sampler, _ = trainer.loaders
    sampler.set_epoch(0, start_step=0)
    trainer.step_model.train()

    result = LrFindResult(suggested_lr=None)
    # The moving average spans about a twentieth of the test, up to fastai's 0.98 at 250 steps.
    smoothing = min(0.98, max(0.6, 1 - 5 / steps))
    average = 0.0
    for step, (inputs, targets) in enumerate(train_loader):
        if step == steps:
            break
        lr = start_lr * (end_lr / start_lr) ** (step / (steps - 1))
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer decay and the head scale keep their ratios
        # The step `gtrain fit` takes; its schedule's lr is overwritten before the next one.
        value = trainer.train_step(inputs, targets, step).item()
        if not math.isfinite(value):
            result.stopped = f"the loss became {value} at lr {lr:.3g}"
            break
        average = smoothing * average + (1 - smoothing) * value
        smoothed = average / (1 - smoothing ** (step + 1))  # without the start's bias towards 0
        result.lrs.append(lr)
        result.losses.append(value)
        result.smoothed.append(smoothed)
        if smoothed > DIVERGED * min(result.smoothed):
            result.stopped = f"the loss diverged at lr {lr:.3g} ({smoothed:.3g}, {DIVERGED:g}x its minimum)"
            break
    if result.smoothed and min(result.smoothed) < result.smoothed[0]:
        result.suggested_lr = result.lrs[min(range(len(result.smoothed)), key=result.smoothed.__getitem__)]
    result.steepest_lr = steepest_descent(result.lrs, result.smoothed)
    return result


def steepest_descent(lrs: list[float], smoothed: list[float]) -> float | None:
    """The lr where the smoothed loss falls fastest against log lr, up to its minimum; None
    when it never falls."""
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__, default=0)
    if lowest < 2:
        return None
    slopes = {
        i: (smoothed[i + 1] - smoothed[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1])  # central differences
        for i in range(1, lowest)
    }
    steepest = min(slopes, key=slopes.__getitem__)
    return lrs[steepest] if slopes[steepest] < 0 else None
