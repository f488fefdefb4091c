"""Pruning targets: an explicit shape or a parameter budget, candidate shapes for a budget, and their search.

A budget is a fraction of the teacher's parameters (``0 < x <= 1``) or a count (``> 1``), of all
parameters as model sizes are quoted (tied lm_head counted once) or of non-embedding parameters only.
Candidate shapes are hardware friendly: hidden and MLP widths are multiples of ``multiple_of`` (or
the teacher's width), whole KV groups are dropped or the same number of query heads is kept in every
group, up to ``max_layer_drop`` of the layers are dropped, and transformers must accept the shape.
They are enumerated lazily from the closed-form parameter count (:class:`ShapeSpace`): every mix of
axes whose size lies in ``[budget * (1 - tolerance), budget]``, single-axis shapes included. A cheap
pre-score (the per-axis sensitivity model, or balanced pruning when sensitivity is off) orders them;
the ``max_candidates`` best plus the best of every axis family (depth-only, heads-only, MLP-only,
hidden-only, mix) are pruned and scored on blocks that no calibration step sees (``search.score_on``),
and the best eligible one wins. The rank correlation between pre-score and score is recorded, so the
pre-score is measured, not assumed.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import count_parameters, count_parameters_for_shape, get_adapter
from ..config import ConfigBase, ConfigError
from ..errors import MinidistillError
from ..evaluation.perplexity import heldout_nll_sum, iter_token_chunks
from .distributed import SINGLE, CalibrationShard
from .prune_map import PRUNABLE_SHAPE_KEYS

logger = logging.getLogger(__name__)

SHAPE_TARGET_KEYS = PRUNABLE_SHAPE_KEYS
SCORES = ("loss", "kl")
ScoreSet = Literal["train_tail", "heldout"]
SCORE_SETS = get_args(ScoreSet)


class TargetError(MinidistillError, ValueError):
    """A pruning target cannot be reached from the teacher (the message says what can)."""


@dataclass
class TargetConfig(ConfigBase):
    """What to prune to: a parameter budget, or an explicit shape (unset dimensions are kept)."""

    params: float | None = None
    """Parameter budget: a fraction of the teacher (0 < x <= 1) or a count (> 1). Exclusive with the shape fields."""
    non_embedding: bool = False
    """Count only non-embedding parameters (no input embeddings, no untied lm_head) for ``params``."""
    num_layers: int | None = None
    """Explicit target: decoder layers kept."""
    hidden_size: int | None = None
    """Explicit target: hidden channels kept."""
    num_heads: int | None = None
    """Explicit target: query heads per layer (a multiple of ``num_kv_heads``)."""
    num_kv_heads: int | None = None
    """Explicit target: KV groups per layer."""
    intermediate_size: int | None = None
    """Explicit target: MLP neurons per layer."""

    def explicit(self) -> dict[str, int]:
        """The shape fields that are set."""
        return {k: getattr(self, k) for k in SHAPE_TARGET_KEYS if getattr(self, k) is not None}

    @property
    def is_budget(self) -> bool:
        return self.params is not None

    def validate(self) -> None:
        shape = self.explicit()
        if self.params is None and not shape:
            raise ConfigError("target: set target.params (a budget) or at least one target shape field")
        if self.params is not None and shape:
            raise ConfigError(f"target.params and target shape fields {sorted(shape)} exclude each other; set one")
        if self.params is not None and (self.params <= 0 or not math.isfinite(self.params)):
            raise ConfigError(f"target.params={self.params}: must be a fraction in (0, 1] or a count > 1")
        if self.params is not None and self.params > 1 and not float(self.params).is_integer():
            raise ConfigError(
                f"target.params={self.params}: a parameter count must be a whole number (or a fraction in (0, 1])"
            )
        for k, v in shape.items():
            if v < 1:
                raise ConfigError(f"target.{k}={v}: must be >= 1")


@dataclass
class SearchConfig(ConfigBase):
    """How a parameter budget becomes a shape."""

    multiple_of: int = 64
    """Hidden and MLP widths are multiples of this (or the teacher's own width)."""
    tolerance: float = 0.02
    """Candidates lie in [budget * (1 - tolerance), budget]."""
    max_layer_drop: float = 0.5
    """At most this fraction of the layers may be dropped (0 = width pruning only)."""
    max_candidates: int = 6
    """Candidates pruned and scored (after the cheap pre-ranking)."""
    score: str = "loss"
    """``loss``: LM loss of the candidate on the scoring blocks; ``kl``: KL(teacher || candidate) per token."""
    score_blocks: int = 4
    """Blocks used to score each candidate (see ``score_on``)."""
    score_on: ScoreSet = "train_tail"
    """Which blocks score candidates: ``train_tail``, the last ``score_blocks`` of ``data.train`` (with
    ``data.mix``, a seeded interleave of every source; disjoint from the calibration and short-distillation
    blocks, which come first) or ``heldout``, the first ``score_blocks`` of ``data.heldout`` (``data.source``
    only, and the same documents the report publishes, so the pick fits them)."""
    batch_size: int = 4
    """Blocks per forward when scoring."""
    chunk_tokens: int = 2048
    """Positions projected to the vocabulary at once when scoring."""
    reconstruct: bool = False
    """Reconstruct every candidate before scoring (slower; otherwise only the winner is reconstructed)."""
    single_axis_slack: float = 0.01
    """Single-axis shapes (depth-only, MLP-only, heads-only, hidden-only) that cannot land inside the band
    are scored anyway (the nearest on each side); one within this fraction of the budget outside the band may win."""
    sensitivity: bool = True
    """Measure per-axis sensitivity (the score when one axis alone is pruned) and pre-score candidates by it."""
    sensitivity_reconstruct: bool | None = None
    """Re-fit each sensitivity shape before scoring it (None: as ``reconstruct``). The re-fit is the
    costly part; off keeps sensitivity to a few forwards while candidates are still scored re-fitted."""
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.25])
    """Keep ratios at which each axis is pruned alone (the nearest hardware-friendly size is used)."""
    distill_steps: int = 0
    """Rank the top ``distill_candidates`` after this many logit-KD steps each (0: zero-shot ranking)."""
    distill_candidates: int = 3
    """Candidates (best zero-shot first) distilled briefly when ``distill_steps > 0``."""
    distill_batch_size: int = 4
    """Training blocks per short-distillation step (steps x batch must fit in the training blocks)."""
    distill_lr: float = 2.0e-4
    """AdamW learning rate of the short distillation (constant, no warm-up)."""
    seed: int = 0
    """Seed of each candidate's short distillation (the same for all)."""

    def validate(self) -> None:
        if self.multiple_of < 1:
            raise ConfigError(f"search.multiple_of={self.multiple_of}: must be >= 1")
        if not 0.0 < self.tolerance < 1.0:
            raise ConfigError(f"search.tolerance={self.tolerance}: must be in (0, 1)")
        if not 0.0 <= self.max_layer_drop < 1.0:
            raise ConfigError(f"search.max_layer_drop={self.max_layer_drop}: must be in [0, 1)")
        if self.max_candidates < 1:
            raise ConfigError(f"search.max_candidates={self.max_candidates}: must be >= 1")
        if self.score_on not in SCORE_SETS:
            raise ConfigError(f"search.score_on={self.score_on!r}: choose one of {list(SCORE_SETS)}")
        if self.score not in SCORES:
            raise ConfigError(f"search.score={self.score!r}: choose one of {list(SCORES)}")
        for key in ("score_blocks", "batch_size", "chunk_tokens", "distill_candidates", "distill_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"search.{key}={getattr(self, key)}: must be >= 1")
        if not 0.0 <= self.single_axis_slack < 1.0:
            raise ConfigError(f"search.single_axis_slack={self.single_axis_slack}: must be in [0, 1)")
        if not self.sensitivity_ratios or any(not 0.0 < r < 1.0 for r in self.sensitivity_ratios):
            raise ConfigError(f"search.sensitivity_ratios={self.sensitivity_ratios}: give keep ratios in (0, 1), e.g. [0.75, 0.5, 0.25]")
        if self.distill_steps < 0:
            raise ConfigError(f"search.distill_steps={self.distill_steps}: must be >= 0 (0 = zero-shot ranking)")
        if not self.distill_lr > 0:
            raise ConfigError(f"search.distill_lr={self.distill_lr}: must be > 0")


# ---------------------------------------------------------------------------- shapes
def check_shape(teacher_shape: dict[str, int], shape: dict[str, int]) -> None:
    """Raise TargetError when ``shape`` cannot be cut out of ``teacher_shape`` (GQA grouping included)."""
    for key in SHAPE_TARGET_KEYS:
        if not 1 <= shape[key] <= teacher_shape[key]:
            raise TargetError(f"target {key}={shape[key]} must be in [1, {teacher_shape[key]}] (the teacher has {teacher_shape[key]})")
    heads, kv = shape["num_heads"], shape["num_kv_heads"]
    if heads % kv:
        raise TargetError(f"target num_heads={heads} is not a multiple of num_kv_heads={kv} (GQA needs equal groups)")
    group = teacher_shape["num_heads"] // teacher_shape["num_kv_heads"]
    if heads // kv > group:
        raise TargetError(
            f"target keeps {heads // kv} query heads per KV group but the teacher's groups have {group}; "
            f"with num_kv_heads={kv} keep at most {group * kv} heads, or keep more KV groups"
        )


def config_rejects_shape(config, shape: dict[str, int]) -> str | None:
    """transformers' own objection to a config of ``config``'s type at ``shape`` (None when accepted).

    Config classes validate their architecture when saved (e.g. LlamaConfig requires hidden_size to
    be a multiple of num_attention_heads even with an explicit head_dim); a pruned shape that fails
    it could not be saved as a plain checkpoint.
    """
    cfg = copy.copy(config)
    get_adapter(cfg).set_shape(cfg, {**get_adapter(config).shape(config), **shape})
    validate = getattr(cfg, "validate_architecture", None)
    if validate is None:
        return None
    try:
        validate()
    except ValueError as e:
        return str(e)
    return None


def explicit_shape(teacher_shape: dict[str, int], target: TargetConfig) -> dict[str, int]:
    """The full target shape: the teacher's shape with the target's set fields replaced, checked.

    When only ``num_heads`` is given, ``num_kv_heads`` is lowered (if needed) to the largest divisor that
    the teacher's groups allow.
    """
    shape = {**teacher_shape, **target.explicit()}
    if target.num_heads is not None and target.num_kv_heads is None and shape["num_heads"] % shape["num_kv_heads"]:
        group = teacher_shape["num_heads"] // teacher_shape["num_kv_heads"]
        options = [k for k in range(1, teacher_shape["num_kv_heads"] + 1)
                   if shape["num_heads"] % k == 0 and shape["num_heads"] // k <= group]
        if options:
            shape["num_kv_heads"] = max(options)
    check_shape(teacher_shape, shape)
    return shape


class ParamCounter:
    """Exact parameter counts of shapes of one config, without building a model per shape.

    A model's size is a polynomial in (layers L, hidden D, heads H, KV groups K, MLP width I) with the
    monomials 1, D, L, LD, LH, LK, LI, LDH, LDK, LDI. Its coefficients are fitted on meta-device
    builds (:func:`count_parameters_for_shape`) and verified on further shapes, the teacher's included;
    when the check fails every shape is counted by a build instead.
    """

    def __init__(self, config, *, non_embedding: bool = False):
        self.config = config
        self.non_embedding = non_embedding
        self.teacher_shape = get_adapter(config).shape(config)
        self._cache: dict[tuple, int] = {}
        self.coefficients: torch.Tensor | None = self._fit()

    @staticmethod
    def _features(shapes: Sequence[dict[str, int]]) -> torch.Tensor:
        rows = []
        for s in shapes:
            L, D, H, K, I = (float(s[k]) for k in SHAPE_TARGET_KEYS)
            rows.append([1, D, L, L * D, L * H, L * K, L * I, L * D * H, L * D * K, L * D * I])
        return torch.tensor(rows, dtype=torch.float64)

    def build_count(self, shape: dict[str, int]) -> int:
        key = tuple(shape[k] for k in SHAPE_TARGET_KEYS)
        if key not in self._cache:
            full = {**self.teacher_shape, **shape}
            self._cache[key] = count_parameters_for_shape(self.config, full, non_embedding=self.non_embedding)
        return self._cache[key]

    def _fit(self) -> torch.Tensor | None:
        t = self.teacher_shape
        group = t["num_heads"] // t["num_kv_heads"]
        g = torch.Generator().manual_seed(0)

        def sample(layers: int) -> dict[str, int]:
            kv = int(torch.randint(1, t["num_kv_heads"] + 1, (1,), generator=g))
            return {
                "num_layers": layers,
                "hidden_size": int(torch.randint(1, t["hidden_size"] + 1, (1,), generator=g)),
                "num_kv_heads": kv,
                "num_heads": kv * int(torch.randint(1, group + 1, (1,), generator=g)),
                "intermediate_size": int(torch.randint(1, t["intermediate_size"] + 1, (1,), generator=g)),
            }

        layer_choices = [1, 2] if t["num_layers"] >= 2 else [1]
        fit_shapes = [sample(layer_choices[i % len(layer_choices)]) for i in range(14)]
        x = self._features(fit_shapes)
        y = torch.tensor([self.build_count(s) for s in fit_shapes], dtype=torch.float64)
        coef = torch.linalg.lstsq(x, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        checks = [dict(t), sample(min(3, t["num_layers"]))] + fit_shapes
        for s in checks:
            if round(float(self._features([s]) @ coef)) != self.build_count(s):
                logger.warning("parameter-count polynomial does not fit %s; counting each shape by a build", t)
                return None
        return coef

    def count(self, shape: dict[str, int]) -> int:
        if self.coefficients is None:
            return self.build_count(shape)
        return round(float(self._features([shape]) @ self.coefficients))

    def count_many(self, shapes: Sequence[dict[str, int]]) -> list[int]:
        if self.coefficients is None:
            return [self.build_count(s) for s in shapes]
        return [round(v) for v in (self._features(shapes) @ self.coefficients).tolist()]


def budget_params(total: int, params: float) -> int:
    """A budget in parameters from a fraction (0 < x <= 1) or a count (> 1) of ``total``."""
    if params <= 0:
        raise TargetError(f"target params={params} must be positive")
    if params <= 1:
        return int(round(total * params))
    if params > total:
        raise TargetError(f"target params={int(params):,} exceeds the teacher's {total:,} parameters")
    return int(params)


def width_options(teacher_width: int, multiple_of: int) -> list[int]:
    """Multiples of ``multiple_of`` up to the teacher's width, and the teacher's width itself."""
    return sorted({*range(multiple_of, teacher_width + 1, multiple_of), teacher_width})


def head_options(teacher_shape: dict[str, int]) -> list[tuple[int, int]]:
    """(num_heads, num_kv_heads) pairs: any count of whole KV groups, the same head count in each."""
    group = teacher_shape["num_heads"] // teacher_shape["num_kv_heads"]
    return [(kv * per, kv) for kv in range(1, teacher_shape["num_kv_heads"] + 1) for per in range(1, group + 1)]


# ---------------------------------------------------------------------------- enumeration
AXES = ("depth", "heads", "mlp", "hidden")
"""Prunable axes: decoder layers, attention heads / KV groups, MLP neurons, hidden channels."""
FAMILIES = (*AXES, "mix")
"""Axis families of candidate shapes: one axis cut alone, or several cut together (``mix``)."""


@dataclass
class Candidate:
    """A candidate shape, its parameter count and its pre-score (lower is tried first).

    ``family`` is the single axis it cuts (``depth``, ``heads``, ``mlp``, ``hidden``) or ``mix``;
    ``in_band`` is False for a single-axis shape just outside the budget band (kept so that every
    axis is scored); ``eligible`` says whether it may win (inside the band widened by
    ``search.single_axis_slack``).
    """

    shape: dict[str, int]
    params: int
    cost: float = 0.0
    family: str = "mix"
    in_band: bool = True
    eligible: bool = True


def keep_ratios(teacher_shape: dict[str, int], shape: dict[str, int]) -> dict[str, float]:
    """Fraction kept on each axis: layers, query heads, MLP neurons, hidden channels."""
    return {
        "depth": shape["num_layers"] / teacher_shape["num_layers"],
        "heads": shape["num_heads"] / teacher_shape["num_heads"],
        "mlp": shape["intermediate_size"] / teacher_shape["intermediate_size"],
        "hidden": shape["hidden_size"] / teacher_shape["hidden_size"],
    }


def axes_cut(teacher_shape: dict[str, int], shape: dict[str, int]) -> tuple[str, ...]:
    """The axes on which ``shape`` is smaller than the teacher (KV groups count as heads)."""
    cut = {
        "depth": shape["num_layers"] < teacher_shape["num_layers"],
        "heads": shape["num_heads"] < teacher_shape["num_heads"] or shape["num_kv_heads"] < teacher_shape["num_kv_heads"],
        "mlp": shape["intermediate_size"] < teacher_shape["intermediate_size"],
        "hidden": shape["hidden_size"] < teacher_shape["hidden_size"],
    }
    return tuple(a for a in AXES if cut[a])


def family_of(teacher_shape: dict[str, int], shape: dict[str, int]) -> str:
    """``depth`` / ``heads`` / ``mlp`` / ``hidden`` when one axis alone is cut, else ``mix``."""
    cut = axes_cut(teacher_shape, shape)
    return cut[0] if len(cut) == 1 else "mix"


def balance_cost(teacher_shape: dict[str, int], shape: dict[str, int], params: int, budget: int) -> float:
    """Spread of the per-axis log keep ratios (balanced pruning) plus the relative gap to the budget."""
    logs = [math.log(shape[k] / teacher_shape[k]) for k in PRUNABLE_SHAPE_KEYS if k != "num_kv_heads"]  # KV: the tie-break
    mean = sum(logs) / len(logs)
    spread = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
    kv_keep = shape["num_kv_heads"] / teacher_shape["num_kv_heads"]
    return spread + (budget - params) / budget + 1e-3 * (1 - kv_keep)


PreScore = Callable[[dict[str, int], int], float]
"""``(shape, params) -> pre-score``; lower is scored first."""


class ShapeSpace:
    """The hardware-friendly shapes of a search, enumerated lazily from the closed-form parameter count.

    Layers range over ``[min_layers, L]``, hidden and MLP widths over :func:`width_options`, heads over
    :func:`head_options`, and (hidden, heads) pairs that transformers would refuse to save are skipped.
    The count is linear in the MLP width ``I`` for fixed (L, D, H, K), so for every such triple the
    range of ``I`` whose size lands in a band is solved in closed form and only those shapes are built:
    the Cartesian product is never materialised. ``triples_visited`` and ``shapes_built`` count the
    work done (tests compare them with :attr:`product_size`).
    """

    def __init__(self, counter: ParamCounter, search: SearchConfig):
        self.counter = counter
        self.search = search
        t = self.teacher_shape = counter.teacher_shape
        self.min_layers = max(1, t["num_layers"] - int(math.floor(t["num_layers"] * search.max_layer_drop)))
        self.layers = list(range(self.min_layers, t["num_layers"] + 1))
        self.hidden = width_options(t["hidden_size"], search.multiple_of)
        self.mlp = width_options(t["intermediate_size"], search.multiple_of)
        self.heads = head_options(t)
        self._accepted: dict[tuple[int, int, int], bool] = {}
        self._coef = None if counter.coefficients is None else [float(c) for c in counter.coefficients.tolist()]
        self.triples_visited = 0
        self.shapes_built = 0

    @property
    def product_size(self) -> int:
        """Number of shapes in the full Cartesian product (never built)."""
        return len(self.layers) * len(self.hidden) * len(self.heads) * len(self.mlp)

    def shape(self, L: int, D: int, H: int, K: int, I: int) -> dict[str, int]:
        self.shapes_built += 1
        return {"num_layers": L, "hidden_size": D, "num_heads": H, "num_kv_heads": K, "intermediate_size": I,
                "head_dim": self.teacher_shape["head_dim"]}

    def accepted(self, D: int, H: int, K: int) -> bool:
        """Whether transformers accepts hidden ``D`` with ``H`` heads / ``K`` KV groups (asked once per triple)."""
        key = (D, H, K)
        if key not in self._accepted:
            self._accepted[key] = config_rejects_shape(
                self.counter.config, {"hidden_size": D, "num_heads": H, "num_kv_heads": K}) is None
        return self._accepted[key]

    def linear_in_mlp(self, L: int, D: int, H: int, K: int) -> tuple[float, float]:
        """(a, b) with count(L, D, H, K, I) = a + b * I."""
        c = self._coef
        if c is not None:
            a = c[0] + c[1] * D + L * (c[2] + c[3] * D + c[4] * H + c[5] * K + c[7] * D * H + c[8] * D * K)
            return a, L * (c[6] + c[9] * D)
        base = {"num_layers": L, "hidden_size": D, "num_heads": H, "num_kv_heads": K, "head_dim": self.teacher_shape["head_dim"]}
        i0, i1 = 1, self.teacher_shape["intermediate_size"]
        p0 = self.counter.build_count({**base, "intermediate_size": i0})
        if i1 == i0:
            return float(p0), 0.0
        p1 = self.counter.build_count({**base, "intermediate_size": i1})
        b = (p1 - p0) / (i1 - i0)
        return p0 - b * i0, b

    def count(self, L: int, D: int, H: int, K: int, I: int) -> int:
        a, b = self.linear_in_mlp(L, D, H, K)
        return round(a + b * I)

    def triples(self):
        """Accepted (L, D, H, K) in a fixed order (layers, then hidden, then heads, descending)."""
        for L in reversed(self.layers):
            for D in reversed(self.hidden):
                for H, K in reversed(self.heads):
                    if self.accepted(D, H, K):
                        self.triples_visited += 1
                        yield L, D, H, K

    def iter_band(self, low: float, high: float):
        """Every shape whose count lies in ``[low, high]``, as (shape, params), lazily."""
        mlp = self.mlp
        for L, D, H, K in self.triples():
            a, b = self.linear_in_mlp(L, D, H, K)
            if b <= 0:
                lo_i, hi_i = (0, len(mlp)) if low <= a <= high else (0, 0)
            else:
                lo_i = bisect.bisect_left(mlp, math.ceil((low - a) / b - 1e-9))
                hi_i = bisect.bisect_right(mlp, math.floor((high - a) / b + 1e-9))
            for I in mlp[max(lo_i - 1, 0): hi_i + 1]:  # one either side absorbs float rounding
                p = round(a + b * I)
                if low <= p <= high:
                    yield self.shape(L, D, H, K, I), p

    def single_axis(self, axis: str):
        """The shapes that cut ``axis`` alone (the teacher's size on the other axes), as (shape, params)."""
        t = self.teacher_shape
        L, D, H, K, I = (t[k] for k in SHAPE_TARGET_KEYS)
        if axis == "depth":
            options = [(l, D, H, K, I) for l in self.layers[:-1]]
        elif axis == "heads":
            options = [(L, D, h, k, I) for h, k in self.heads if (h, k) != (H, K)]
        elif axis == "mlp":
            options = [(L, D, H, K, i) for i in self.mlp[:-1]]
        elif axis == "hidden":
            options = [(L, d, H, K, I) for d in self.hidden[:-1]]
        else:
            raise ValueError(f"unknown axis {axis!r}; choose one of {AXES}")
        for dims in options:
            if self.accepted(dims[1], dims[2], dims[3]):
                yield self.shape(*dims), self.count(*dims)

    def smallest(self) -> tuple[dict[str, int], int]:
        """The smallest shape of the space (before architecture validation) and its count."""
        dims = (self.min_layers, self.hidden[0], 1, 1, self.mlp[0])
        return self.shape(*dims), self.count(*dims)


@dataclass
class CandidateSet:
    """The candidates chosen for scoring, and what the enumeration saw."""

    candidates: list[Candidate]
    in_band: int
    per_family: dict[str, int]
    shapes_built: int
    product_size: int
    seconds: float


def band(budget: int, search: SearchConfig) -> tuple[float, int]:
    """The budget band ``[budget * (1 - tolerance), budget]``."""
    return budget * (1 - search.tolerance), budget


def widened_band(budget: int, search: SearchConfig) -> tuple[float, float]:
    """The band single-axis shapes may win in: widened by ``single_axis_slack`` of the budget on each side."""
    low, high = band(budget, search)
    return low - search.single_axis_slack * budget, high + search.single_axis_slack * budget


def check_budget(space: ShapeSpace, budget: int) -> None:
    """Raise TargetError unless some shape of ``space`` can be scored for ``budget`` (stops at the first one).

    The message names the limiting axis and the nearest reachable sizes.
    """
    counter, search, t = space.counter, space.search, space.teacher_shape
    full = counter.count(t)
    what = "non-embedding parameters" if counter.non_embedding else "parameters"
    if budget > full:
        raise TargetError(f"target of {budget:,} {what} exceeds the teacher's {full:,}")
    smallest, smallest_params = space.smallest()
    if budget < smallest_params:
        limits = [f"depth stops at {space.min_layers} layers (search.max_layer_drop={search.max_layer_drop})"]
        limits.append(f"widths stop at {space.hidden[0]} hidden / {space.mlp[0]} MLP (search.multiple_of={search.multiple_of})")
        raise TargetError(
            f"target of {budget:,} {what} is below the smallest reachable shape {_fmt_shape(smallest)} "
            f"with {smallest_params:,} ({smallest_params / full:.1%} of the teacher): {'; '.join(limits)}. "
            f"The nearest reachable budget is {smallest_params:,}; lower search.multiple_of or raise "
            "search.max_layer_drop to go smaller"
        )
    low, high = band(budget, search)
    if next(iter(space.iter_band(low, high)), None) is not None:
        return
    wlow, whigh = widened_band(budget, search)
    for axis in AXES:
        if any(wlow <= p <= whigh for _, p in space.single_axis(axis)):
            return
    raise TargetError(no_candidate_message(space, budget))


def no_candidate_message(space: ShapeSpace, budget: int) -> str:
    """Why no shape lands in the band: the nearest sizes below and above, and the axis steps near them."""
    search, counter = space.search, space.counter
    what = "non-embedding parameters" if counter.non_embedding else "parameters"
    low, high = band(budget, search)
    below: tuple[int, tuple] | None = None
    above: tuple[int, tuple] | None = None
    for L, D, H, K in space.triples():
        a, b = space.linear_in_mlp(L, D, H, K)
        for I in space.mlp:
            p = round(a + b * I)
            if p < low and (below is None or p > below[0]):
                below = (p, (L, D, H, K, I))
            if p > high and (above is None or p < above[0]):
                above = (p, (L, D, H, K, I))
    near = min((x for x in (below, above) if x is not None), key=lambda x: abs(x[0] - budget))
    L, D, H, K, I = near[1]
    p = space.count(L, D, H, K, I)
    step: dict[str, int] = {}
    if len(space.mlp) > 1:
        j = space.mlp.index(I)
        step["MLP width"] = abs(p - space.count(L, D, H, K, space.mlp[j - 1 if j else 1]))
    if len(space.layers) > 1:
        step["depth"] = abs(p - space.count(L - 1 if L > space.min_layers else L + 1, D, H, K, I))
    if len(space.hidden) > 1:
        j = space.hidden.index(D)
        step["hidden width"] = abs(p - space.count(L, space.hidden[j - 1 if j else 1], H, K, I))
    if len(space.heads) > 1:
        step["heads"] = min(abs(p - space.count(L, D, h, k, I)) for h, k in space.heads if (h, k) != (H, K))
    step = {k: v for k, v in step.items() if v} or {"MLP width": 0}
    finest_axis, finest = min(step.items(), key=lambda kv: kv[1])
    unit = {"MLP width": f"per step of search.multiple_of={search.multiple_of} neurons",
            "hidden width": f"per step of search.multiple_of={search.multiple_of} channels",
            "depth": "per layer", "heads": "per head count"}[finest_axis]
    parts = [f"no candidate shape has between {int(low):,} and {budget:,} {what}"]
    if below:
        parts.append(f"nearest below: {below[0]:,} ({_fmt_shape(space.shape(*below[1]))})")
    if above:
        parts.append(f"nearest above: {above[0]:,} ({_fmt_shape(space.shape(*above[1]))})")
    parts.append(
        f"the finest step near this budget is the {finest_axis} ({finest:,} parameters {unit}), wider than the "
        f"band of {budget - int(low):,}; the nearest reachable budget is {near[0]:,}. Lower "
        "search.multiple_of, raise search.max_layer_drop or raise search.tolerance"
    )
    return "; ".join(parts)


def select_candidates(
    space: ShapeSpace,
    budget: int,
    prescore: PreScore | None = None,
    *,
    log: bool = True,
) -> CandidateSet:
    """Candidates to score: the ``max_candidates`` best pre-scored shapes in the band, plus the best of
    every axis family (so that no axis is left out), plus, for a single axis with no shape in the band,
    its nearest shape on each side of the band (``in_band=False``). ``log``: log the enumeration's summary.

    Memory stays bounded: the enumeration is consumed lazily into a heap of ``max_candidates`` and one
    best shape per family. Raises TargetError (see :func:`check_budget`) when nothing can be scored.
    """
    t0 = time.perf_counter()
    search, t = space.search, space.teacher_shape
    check_budget(space, budget)
    prescore = prescore or (lambda shape, params: balance_cost(t, shape, params, budget))
    low, high = band(budget, search)
    wlow, whigh = widened_band(budget, search)
    heap: list[tuple[float, int, Candidate]] = []  # max-heap on cost (negated), size <= max_candidates
    best: dict[str, Candidate] = {}
    per_family = dict.fromkeys(FAMILIES, 0)
    total = 0
    for shape, params in space.iter_band(low, high):
        total += 1
        family = family_of(t, shape)
        if family not in per_family:  # the teacher's own shape (budget = full size)
            family = "mix"
        per_family[family] += 1
        cand = Candidate(shape, params, prescore(shape, params), family)
        if family not in best or cand.cost < best[family].cost:
            best[family] = cand
        item = (-cand.cost, -total, cand)
        if len(heap) < search.max_candidates:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    chosen = {id(c): c for c in [c for _, _, c in heap] + list(best.values())}
    for axis in AXES:
        if per_family[axis]:
            continue
        below = above = None
        for shape, params in space.single_axis(axis):
            if params < low and (below is None or params > below[1]):
                below = (shape, params)
            if params > high and (above is None or params < above[1]):
                above = (shape, params)
        for near in (below, above):
            if near is not None:
                c = Candidate(near[0], near[1], prescore(*near), axis, in_band=False,
                              eligible=wlow <= near[1] <= whigh)
                chosen[id(c)] = c
    cands = sorted(chosen.values(), key=lambda c: (c.cost, -c.params))
    if log:
        logger.info("budget search: %d shape(s) in the band (%s), %d built of a %d-shape product, %d to score (%.2f s)",
                    total, ", ".join(f"{k} {v}" for k, v in per_family.items()), space.shapes_built, space.product_size,
                    len(cands), time.perf_counter() - t0)
    return CandidateSet(cands, total, per_family, space.shapes_built, space.product_size, time.perf_counter() - t0)


def enumerate_candidates(
    counter: ParamCounter,
    budget: int,
    search: SearchConfig,
    prescore: PreScore | None = None,
) -> list[Candidate]:
    """The candidates :func:`select_candidates` picks for ``budget``, best pre-scored first."""
    return select_candidates(ShapeSpace(counter, search), budget, prescore).candidates


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError("spearman needs sequences of equal length")
    if len(x) < 3:
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    if vx == 0 or vy == 0:
        return None
    return cov / (vx * vy)


def _fmt_shape(shape: dict[str, int]) -> str:
    return (f"L{shape['num_layers']} D{shape['hidden_size']} H{shape['num_heads']}/KV{shape['num_kv_heads']} "
            f"I{shape['intermediate_size']}")


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Final hidden states of the teacher per batch (kept once, projected to logits chunk by chunk later)."""
    backbone = teacher.get_submodule(get_adapter(teacher).backbone)
    device = next(teacher.parameters()).device
    return [backbone(input_ids=ids.to(device)).last_hidden_state for ids in batches]


@torch.no_grad()
def kl_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    teacher_hidden: Sequence[torch.Tensor],
    batches: Sequence[torch.Tensor],
    *,
    chunk_tokens: int = 2048,
) -> float:
    """Mean per-token KL(teacher || student) in nats, projecting ``chunk_tokens`` positions at a time."""
    total, count = kl_sum_to_teacher(student, teacher, teacher_hidden, batches, chunk_tokens=chunk_tokens)
    return total / count


@torch.no_grad()
def kl_sum_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    teacher_hidden: Sequence[torch.Tensor],
    batches: Sequence[torch.Tensor],
    *,
    chunk_tokens: int = 2048,
) -> tuple[float, int]:
    """The summed per-token KL(teacher || student) in nats and the token count (``(0.0, 0)`` for no batch)."""
    s_adapter, t_adapter = get_adapter(student), get_adapter(teacher)
    s_backbone = student.get_submodule(s_adapter.backbone)
    s_head, t_head = student.get_submodule(s_adapter.lm_head), teacher.get_submodule(t_adapter.lm_head)
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for ids, t_hidden in zip(batches, teacher_hidden):
        s_hidden = s_backbone(input_ids=ids.to(device)).last_hidden_state
        dummy = torch.zeros(ids.shape, dtype=torch.long)
        for (sh, _), (th, _) in zip(iter_token_chunks(s_hidden, dummy, chunk_tokens),
                                   iter_token_chunks(t_hidden, dummy, chunk_tokens)):
            s_logits, t_logits = s_head(sh), t_head(th)
            dtype = torch.promote_types(s_logits.dtype, torch.float32)
            s_logp = F.log_softmax(s_logits.to(dtype), dim=-1)
            t_logp = F.log_softmax(t_logits.to(dtype), dim=-1)
            total += F.kl_div(s_logp, t_logp, log_target=True, reduction="sum").item()
            count += sh.shape[0]
    return total, count


@dataclass
class SearchResult:
    """The scored candidates (rows, best first) and the winner's student and prune map."""

    rows: list[dict[str, Any]]
    best_student: nn.Module
    best_map: Any
    best_reconstructed: bool
    timings: dict[str, float] = field(default_factory=dict)
    prescore_spearman: float | None = None
    """Spearman rank correlation between the candidates' pre-scores and their scores."""


ScoreFn = Callable[[nn.Module], float]
"""``student -> score`` on the search's scoring blocks (lower is better)."""


def make_score_fn(teacher: nn.Module, heldout: Sequence[torch.Tensor], search: SearchConfig, *,
                  shard: CalibrationShard = SINGLE) -> ScoreFn:
    """The search's score: LM loss on the scoring batches, or KL to the teacher (its hidden states computed once).

    With a distributed ``shard`` each rank runs its batches ``rank::world`` and the sums are all-reduced, so every
    rank gets the score of all batches (every rank must call the score function for the same models, in order).
    """
    mine = list(heldout)[shard.rank :: shard.world] if shard.distributed else list(heldout)
    if search.score == "kl":
        teacher_hidden = teacher_hidden_states(teacher, mine)

        def sums(student: nn.Module) -> tuple[float, int]:
            return kl_sum_to_teacher(student, teacher, teacher_hidden, mine, chunk_tokens=search.chunk_tokens)
    else:

        def sums(student: nn.Module) -> tuple[float, int]:
            return heldout_nll_sum(student, mine, chunk_tokens=search.chunk_tokens)

    def score(student: nn.Module) -> float:
        total, count = sums(student)
        if shard.distributed:
            total, count = shard.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        if count == 0:
            raise ValueError("no scoring tokens")
        return total / count

    return score


def score_candidates(
    teacher: nn.Module,
    candidates: Sequence[Candidate],
    build: Callable[[dict[str, int], bool], tuple[nn.Module, Any]],
    heldout: Sequence[torch.Tensor],
    search: SearchConfig,
    *,
    full_params: int,
    score_fn: ScoreFn | None = None,
) -> SearchResult:
    """Prune each candidate with ``build(shape, reconstruct)`` -> (student, prune map), score it, keep the best.

    Rows hold the shape, family, parameter count, its fraction of ``full_params``, pre-score and rank,
    the score (lower is better) and the seconds spent; they are logged as a table and returned best
    first. Only ``eligible`` candidates can win; the others are shown with ``eligible=False`` and, since
    they cannot win, scored without the re-fit (``refit`` says which rows were re-fitted).
    """
    score_fn = score_fn or make_score_fn(teacher, heldout, search)
    rows: list[dict[str, Any]] = []
    best: tuple[float, nn.Module, Any] | None = None
    for i, cand in enumerate(candidates):
        t0 = time.perf_counter()
        refit = search.reconstruct and cand.eligible
        student, pmap = build(cand.shape, refit)
        score = score_fn(student)
        rows.append({**{k: cand.shape[k] for k in SHAPE_TARGET_KEYS}, "family": cand.family, "params": cand.params,
                     "fraction": cand.params / full_params, "in_band": cand.in_band, "eligible": cand.eligible,
                     "refit": refit, "prescore": cand.cost, "prerank": i, search.score: score,
                     "score_s": time.perf_counter() - t0})
        if cand.eligible and (best is None or score < best[0]):
            best = (score, student, pmap)
        logger.info("candidate %d/%d %s (%s%s): %s=%.4f", i + 1, len(candidates), _fmt_shape(cand.shape), cand.family,
                    "" if cand.in_band else ", outside the band", search.score, score)
        del student
    if best is None:
        raise TargetError("no eligible candidate was scored; raise search.single_axis_slack or search.tolerance")
    rows.sort(key=lambda r: (not r["eligible"], r[search.score]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    scored_alike = [r for r in rows if r["eligible"]]  # the ineligible ones skip the re-fit
    rho = spearman([r["prescore"] for r in scored_alike], [r[search.score] for r in scored_alike])
    logger.info("budget search (lower %s is better; pre-score vs score Spearman %s):\n%s", search.score,
                "n/a" if rho is None else f"{rho:.3f}", format_rows(rows))
    return SearchResult(rows=rows, best_student=best[1], best_map=best[2], best_reconstructed=search.reconstruct,
                        prescore_spearman=rho)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of candidate rows."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    keys = ["rank"] + [k for k in keys if k != "rank"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]

    def cell(r: dict[str, Any], k: str) -> str:
        v = r.get(k, "")
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, list):
            return " / ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in v)
        return f"{v:,}" if k == "params" else str(v)

    for r in rows:
        cells = [cell(r, k) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_params(model: nn.Module, *, non_embedding: bool = False) -> int:
    """The teacher's size as budgets count it."""
    return count_parameters(model, non_embedding=non_embedding)
