"""Run ``recipes/prune_distill.py`` with its command-line arguments, after the CPU sharding patch when asked.

Tests launch this wrapper instead of the recipe so that the recipe itself carries no test-only code:

* ``MINIDISTILL_TEST_CPU_SHARDING=1``: call :func:`minidistill.training.placement.enable_cpu_sharding_for_tests`
  first (FSDP2 / DeepSpeed on CPU processes).
* ``MINIDISTILL_TEST_PLACEMENT_DIR=DIR``: after the trainer places the teacher, each rank writes
  ``DIR/rank<r>.json`` with the teacher's full and locally stored parameter counts.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "prune_distill.py"
PLACEMENT_ENV = "MINIDISTILL_TEST_PLACEMENT_DIR"


def _record_teacher_placement(folder: Path) -> None:
    from minidistill.training import placement

    original = placement.prepare_teacher

    def prepare_teacher(accelerator, teacher):
        full = sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values())
        placed = original(accelerator, teacher)
        record = {
            "kind": placement.distributed_kind(accelerator),
            "zero_stage": placement.zero_stage(accelerator),
            "full_numel": full,
            "local_numel": placement.local_parameter_numel(placed),
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
        return placed

    placement.prepare_teacher = prepare_teacher


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    from minidistill.training.placement import CPU_SHARDING_ENV, enable_cpu_sharding_for_tests

    if os.environ.get(CPU_SHARDING_ENV) == "1":
        enable_cpu_sharding_for_tests()
    if os.environ.get(PLACEMENT_ENV):
        _record_teacher_placement(Path(os.environ[PLACEMENT_ENV]))
    sys.argv = [str(RECIPE), *sys.argv[1:]]
    runpy.run_path(str(RECIPE), run_name="__main__")
