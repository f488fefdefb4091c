"""A wall-clock budget for the training stage: how many optimizer steps fit, and when to stop.

The plan is made from the measured step time (the median of the latest ``probe_steps`` steps; the
process's first step is warm-up and not counted), the measured held-out evaluation and checkpoint times
and their intervals; the learning-rate schedule is then fitted to the planned steps so that it decays fully
inside the budget. Until half of the planned steps are done the run plans again every ``probe_steps`` steps
and takes the new count when it differs by more than 5% (a machine that speeds up or slows down after the
first steps), so the decay is fitted before it matters. A guard before every step stops the run when the
next step, the final evaluation and the final checkpoint would overrun, so a slower machine than the plan
assumed still ends on time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


REPLAN_TOLERANCE = 0.05
"""A later plan replaces the current one when the step counts differ by more than this fraction."""


@dataclass
class TimeBudget:
    """Step planning against ``seconds`` of wall-clock time for the whole training stage."""

    seconds: float
    """The budget."""
    probe_steps: int = 2
    """Steps timed before planning (the first of them is warm-up and not counted)."""
    step_times: list[float] = field(default_factory=list)
    """Durations of the steps timed so far in this process."""
    eval_seconds: float = 0.0
    """Duration of one held-out evaluation of the student."""
    checkpoint_seconds: float = 0.0
    """Duration of the last checkpoint write."""

    def record_step(self, seconds: float) -> None:
        self.step_times.append(seconds)

    @property
    def ready(self) -> bool:
        """True once enough steps were timed to plan."""
        return len(self.step_times) >= self.probe_steps

    @property
    def step_seconds(self) -> float:
        """Median duration of the latest ``probe_steps`` timed steps after the first (the first alone when only one
        was timed): the first steps after the warm-up still run slower (allocations, kernel selection for new
        shapes), and their mean planned the demo ~25% fewer steps than its budget fitted."""
        timed = sorted((self.step_times[1:] or self.step_times)[-self.probe_steps :])
        if not timed:
            return 0.0
        mid = len(timed) // 2
        return timed[mid] if len(timed) % 2 else (timed[mid - 1] + timed[mid]) / 2

    def reserve(self) -> float:
        """Seconds kept for the final evaluation and checkpoint."""
        return self.eval_seconds + self.checkpoint_seconds

    def plan(self, *, step: int, elapsed: float, max_steps: int, eval_every: int, save_every: int) -> int:
        """The last step number that fits (``step`` <= result <= ``max_steps``), given ``elapsed`` seconds so far."""
        per_step = self.step_seconds
        if eval_every:
            per_step += self.eval_seconds / eval_every
        if save_every:
            per_step += self.checkpoint_seconds / save_every
        remaining = self.seconds - elapsed - self.reserve()
        if per_step <= 0:
            return max_steps
        return max(step, min(max_steps, step + math.floor(remaining / per_step)))

    def adopt(self, fitted: int, planned: int) -> bool:
        """Whether a new plan of ``fitted`` steps replaces the current ``planned`` ones (more than 5% apart)."""
        return abs(fitted - planned) > max(1.0, REPLAN_TOLERANCE * planned)

    def next_step_overruns(self, elapsed: float) -> bool:
        """True when one more step, then the final evaluation and checkpoint, would end after the budget."""
        return elapsed + self.step_seconds + self.reserve() > self.seconds


__all__ = ["TimeBudget"]
