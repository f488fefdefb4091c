"""The run's log: JSONL records (``<run_dir>/log.jsonl``), accelerate trackers and a tqdm bar, main process only.

Record schema (one JSON object per line): ``kind`` (``train`` once per logged optimizer step,
``eval`` per evaluation), ``step`` (optimizer steps completed), then flat numeric fields: for train
``loss`` (balanced total), ``loss/<term>`` (unweighted terms), ``lr``, ``grad_norm``, ``tokens``,
``tokens_per_s``, ``mem_mb``, ``elapsed_s``; for eval ``heldout_loss``, ``heldout_perplexity``,
``top1_agreement`` (and ``teacher_heldout_*`` once at step 0).
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

LOG_FILE = "log.jsonl"


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: str | Path, step: int) -> None:
    """Drop records after ``step`` (used on resume, so the log reads as one uninterrupted run)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_records_tolerant(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def read_records_tolerant(path: Path) -> list[dict[str, Any]]:
    """Records of a log, skipping a last line cut short by a crash."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class RunLog:
    """Writes records to the JSONL file and the accelerate trackers, and drives the progress bar."""

    def __init__(self, accelerator, run_dir: Path, *, total_steps: int, initial_step: int, progress_bar: bool):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = run_dir / LOG_FILE
        self._file = open(self.path, "a", buffering=1) if self.main else None
        self.bar = None
        if self.main and progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="distill", unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (main process) and forward its numbers to the trackers."""
        if self.main:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        numbers = {f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=record.get("step"))

    def set_total(self, total_steps: int) -> None:
        """The progress bar's total, once a time budget has planned the steps."""
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
