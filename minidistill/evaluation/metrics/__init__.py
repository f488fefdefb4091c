"""Local ``evaluate`` metric modules (accuracy, perplexity, top-1 agreement), loaded from these files.

Each metric is a folder here holding ``<name>/<name>.py``; :func:`load_metric` passes its absolute
path to ``evaluate.load``, so nothing is fetched from the Hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

METRICS_DIR = Path(__file__).resolve().parent
LOCAL_METRICS = ("accuracy", "agreement", "perplexity")


def metric_path(name: str) -> Path:
    """Absolute folder of the local metric ``name``."""
    if name not in LOCAL_METRICS:
        raise ValueError(f"unknown local metric {name!r}; choose one of {list(LOCAL_METRICS)}")
    return METRICS_DIR / name


def load_metric(name: str):
    """``evaluate.load`` of a local metric module (works offline)."""
    import evaluate

    return evaluate.load(str(metric_path(name)))


def top1_agreement(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor], *, chunk_tokens: int = 2048) -> float:
    """Fraction of positions where the student's greedy next token equals the teacher's."""
    from ..perplexity import top1_predictions

    student_ids, teacher_ids = top1_predictions(student, teacher, batches, chunk_tokens=chunk_tokens)
    return load_metric("agreement").compute(predictions=student_ids.tolist(), references=teacher_ids.tolist())["agreement"]
