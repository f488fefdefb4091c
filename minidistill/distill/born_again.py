"""Born-again generations: each generation of the student is distilled from the one before it.

Generation 0 learns from the teacher as a plain run does; generation ``g >= 1`` has the student's shape and
learns from generation ``g - 1`` (Furlanello et al. 2018, "Born-Again Neural Networks"), or with
``ensemble: true`` from the mean distribution of generations ``0 .. g - 1`` (their "BANE"). Each generation is its own
run folder, ``<run_dir>/generations/gen<g>/`` (log, checkpoints, ``model/``); the last generation's model is
the run's ``<run_dir>/model/``. A resumed run skips the finished generations and continues inside the first
unfinished one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import ConfigBase, ConfigError

GENERATIONS = "generations"


@dataclass
class BornAgainConfig(ConfigBase):
    """Student generations after the first, each distilled from the previous one (or from all earlier ones)."""

    generations: int = 1
    """Generations after generation 0 (which learns from the teacher)."""
    ensemble: bool = False
    """Generation g learns from the mean of the distributions of generations 0 .. g-1 (logit term only; replica teacher)."""
    init: Literal["pruned", "previous"] = "pruned"
    """Where each generation starts: the pruned student (as generation 0 did), or the previous generation's weights."""

    def validate(self) -> None:
        if self.generations < 1:
            raise ConfigError(
                f"born_again.generations={self.generations}: must be >= 1 (generations after the first); "
                "set born_again=null for a single generation"
            )


def generation_dir(run_dir: Path, generation: int) -> Path:
    """Run folder of ``generation`` inside ``run_dir``."""
    return Path(run_dir) / GENERATIONS / f"gen{generation}"


def check_born_again(*, mutual: bool, on_policy: bool) -> None:
    """ConfigError for what born-again generations do not combine with."""
    if mutual:
        raise ConfigError("born_again trains one student per generation; set mutual=null (or born_again=null)")
    if on_policy:
        raise ConfigError("born_again does not run on-policy batches; set on_policy=null (or born_again=null)")


__all__ = ["GENERATIONS", "BornAgainConfig", "check_born_again", "generation_dir"]
