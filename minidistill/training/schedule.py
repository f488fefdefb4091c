"""Learning-rate schedules: linear warmup, then cosine or WSD (warmup-stable-decay) decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(
    step: int,
    *,
    max_steps: int,
    warmup_steps: int,
    kind: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier of the peak learning rate for the optimizer step ``step`` (0-based).

    ``cosine``: linear warmup over ``warmup_steps``, then a half cosine from 1 down to
    ``min_lr_ratio`` at ``max_steps``. ``wsd``: warmup, constant at 1, then a linear decay to
    ``min_lr_ratio`` over the last ``decay_fraction`` of the steps. ``constant``: warmup, then 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    raise ValueError(f"unknown schedule {kind!r}; choose cosine, wsd or constant")


@dataclass
class LrSchedule:
    """:func:`lr_factor` with its settings; ``max_steps`` may be lowered once the run knows how many steps fit.

    A callable object, so LambdaLR's state dict saves its fields and a resumed run keeps the horizon.
    """

    max_steps: int
    warmup_steps: int
    kind: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        return lr_factor(step, max_steps=self.max_steps, warmup_steps=self.warmup_steps, kind=self.kind,
                         min_lr_ratio=self.min_lr_ratio, decay_fraction=self.decay_fraction)


def build_scheduler(optimizer: Optimizer, **kwargs) -> LambdaLR:
    """A LambdaLR over an :class:`LrSchedule` (its state is the step count and the horizon: exact on resume)."""
    return LambdaLR(optimizer, LrSchedule(**kwargs))


def schedule_of(scheduler: LambdaLR) -> LrSchedule:
    """The :class:`LrSchedule` inside a scheduler made by :func:`build_scheduler`."""
    return scheduler.lr_lambdas[0]
