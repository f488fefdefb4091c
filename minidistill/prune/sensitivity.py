"""Per-axis sensitivity: the search's score when one axis alone is pruned, at a few keep ratios.

Each axis (``depth``: decoder layers, ``heads``: query heads / KV groups, ``mlp``: MLP neurons,
``hidden``: hidden channels) is cut alone to the hardware-friendly size nearest each keep ratio, with
the same calibration importance the search uses, and the student is scored on the search's scoring
blocks (``search.score_on``), pruned exactly as the candidates are scored (reconstructed only when
``search.reconstruct``).
Shapes are measured in memory, so a hidden width that transformers would refuse to save is still
measured. The result explains the search's pick (a markdown table and a PNG plot next to the pruned
student) and feeds its pre-score: a candidate's predicted score increase is the sum over axes of the
increase interpolated at its keep ratio (:meth:`Sensitivity.predict`).
"""

from __future__ import annotations

import bisect
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .targets import AXES, SHAPE_TARGET_KEYS, head_options, keep_ratios, width_options

logger = logging.getLogger(__name__)

SENSITIVITY_MD = "sensitivity.md"
SENSITIVITY_PNG = "sensitivity.png"


@dataclass
class SensitivityPoint:
    """One axis pruned alone to ``shape``: its actual keep ratio, score and increase over the teacher."""

    axis: str
    ratio: float
    """The requested keep ratio."""
    keep: float
    """The keep ratio of the hardware-friendly shape actually measured."""
    shape: dict[str, int]
    score: float
    increase: float
    seconds: float


@dataclass
class Sensitivity:
    """Per-axis sensitivity curves measured against the teacher's own score ``base``."""

    base: float
    score: str
    reconstructed: bool
    points: list[SensitivityPoint] = field(default_factory=list)

    def curve(self, axis: str) -> tuple[list[float], list[float]]:
        """(keep ratios ascending, score increases), the teacher's (1.0, 0.0) included."""
        pts = sorted({p.keep: p.increase for p in self.points if p.axis == axis}.items())
        if not pts or pts[-1][0] < 1.0:
            pts.append((1.0, 0.0))
        return [k for k, _ in pts], [v for _, v in pts]

    def increase(self, axis: str, keep: float) -> float:
        """Score increase of cutting ``axis`` alone to ``keep``: piecewise linear, extrapolated below the curve."""
        xs, ys = self.curve(axis)
        if keep >= 1.0 or len(xs) == 1:
            return 0.0
        i = max(1, min(bisect.bisect_left(xs, keep), len(xs) - 1))
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (keep - x0) / (x1 - x0)

    def predict(self, teacher_shape: dict[str, int], shape: dict[str, int]) -> float:
        """Predicted score increase of ``shape``: the sum of the per-axis increases at its keep ratios."""
        return sum(self.increase(axis, r) for axis, r in keep_ratios(teacher_shape, shape).items())

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "score": self.score, "reconstructed": self.reconstructed,
                "points": [asdict(p) for p in self.points]}

    def markdown(self) -> str:
        """A markdown table: one row per measured point, with the teacher's score stated above it."""
        how = "reconstructed" if self.reconstructed else "no reconstruction"
        lines = [
            "# Per-axis sensitivity",
            "",
            f"Search {self.score} when one axis alone is pruned ({how}; the search's calibration importance "
            f"and scoring blocks). Teacher: {self.base:.4f}.",
            "",
            f"| axis | keep ratio asked | keep ratio measured | shape | {self.score} | increase | seconds |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for p in sorted(self.points, key=lambda p: (AXES.index(p.axis), -p.keep)):
            s = p.shape
            shape = f"L{s['num_layers']} D{s['hidden_size']} H{s['num_heads']}/KV{s['num_kv_heads']} I{s['intermediate_size']}"
            lines.append(f"| {p.axis} | {p.ratio:.2f} | {p.keep:.3f} | {shape} | {p.score:.4f} | {p.increase:+.4f} "
                         f"| {p.seconds:.1f} |")
        return "\n".join(lines) + "\n"

    def plot_png(self) -> bytes:
        """A PNG of score increase against keep ratio, one line per axis."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for axis in AXES:
            xs, ys = self.curve(axis)
            if len(xs) > 1:
                ax.plot(xs, ys, marker="o", label=axis)
        ax.set_xlabel("fraction kept on the axis")
        ax.set_ylabel(f"{self.score} increase over the teacher")
        ax.set_title("Per-axis sensitivity (one axis pruned alone)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()


def _nearest(options: Sequence[int], target: float) -> int:
    """The option nearest ``target`` (ties: the larger)."""
    return min(options, key=lambda o: (abs(o - target), -o))


def axis_shape(teacher_shape: dict[str, int], axis: str, ratio: float, multiple_of: int) -> dict[str, int]:
    """The teacher's shape with ``axis`` alone cut to the hardware-friendly size nearest ``ratio``.

    Layers: the nearest count (at least 1). Heads: the (heads, KV groups) pair of :func:`head_options`
    whose head count is nearest, more KV groups on ties. Widths: the nearest :func:`width_options`.
    """
    t = dict(teacher_shape)
    if axis == "depth":
        t["num_layers"] = max(1, round(ratio * teacher_shape["num_layers"]))
    elif axis == "heads":
        h, k = min(head_options(teacher_shape),
                   key=lambda hk: (abs(hk[0] - ratio * teacher_shape["num_heads"]), -hk[1], -hk[0]))
        t["num_heads"], t["num_kv_heads"] = h, k
    elif axis == "mlp":
        t["intermediate_size"] = _nearest(width_options(teacher_shape["intermediate_size"], multiple_of),
                                          ratio * teacher_shape["intermediate_size"])
    elif axis == "hidden":
        t["hidden_size"] = _nearest(width_options(teacher_shape["hidden_size"], multiple_of),
                                    ratio * teacher_shape["hidden_size"])
    else:
        raise ValueError(f"unknown axis {axis!r}; choose one of {AXES}")
    return t


def sensitivity_shapes(
    teacher_shape: dict[str, int], ratios: Sequence[float], multiple_of: int, *, min_layers: int = 1,
) -> list[tuple[str, float, dict[str, int]]]:
    """(axis, requested ratio, shape) to measure; a shape reached by two ratios, or the teacher's, appears once.

    Depth stops at ``min_layers`` (the search's ``max_layer_drop``): no candidate goes below it.
    """
    seen: set[tuple] = set()
    out = []
    for axis in AXES:
        for r in ratios:
            shape = axis_shape(teacher_shape, axis, r, multiple_of)
            shape["num_layers"] = max(shape["num_layers"], min_layers)
            key = tuple(shape[k] for k in SHAPE_TARGET_KEYS)
            if shape == teacher_shape or key in seen:
                continue
            seen.add(key)
            out.append((axis, r, shape))
    return out


def measure_sensitivity(
    build: Callable[[dict[str, int], bool], tuple[nn.Module, Any]],
    score_fn: Callable[[nn.Module], float],
    teacher_shape: dict[str, int],
    *,
    base: float,
    ratios: Sequence[float],
    multiple_of: int,
    reconstruct: bool,
    score: str = "loss",
    min_layers: int = 1,
) -> Sensitivity:
    """Prune each axis alone with ``build(shape, reconstruct)`` and score it with ``score_fn``.

    ``base`` is the teacher's own score on the same blocks (its loss on them, or 0 for KL).
    """
    result = Sensitivity(base=base, score=score, reconstructed=reconstruct)
    for axis, r, shape in sensitivity_shapes(teacher_shape, ratios, multiple_of, min_layers=min_layers):
        t0 = time.perf_counter()
        student, _ = build(shape, reconstruct)
        value = score_fn(student)
        del student
        keep = keep_ratios(teacher_shape, shape)[axis]
        result.points.append(SensitivityPoint(axis, float(r), keep, dict(shape), value, value - base,
                                              time.perf_counter() - t0))
        logger.info("sensitivity %s kept %.3f: %s=%.4f (%+.4f)", axis, keep, score, value, value - base)
    return result


__all__ = ["SENSITIVITY_MD", "SENSITIVITY_PNG", "Sensitivity", "SensitivityPoint", "axis_shape", "measure_sensitivity",
           "sensitivity_shapes"]
