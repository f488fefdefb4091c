"""Pruning targets: an explicit shape or a parameter budget, candidate shapes for a budget, and their search.

A budget is a fraction of the teacher's parameters (``0 < x <= 1``) or a count (``> 1``), of all
parameters as model sizes are quoted (tied lm_head counted once) or of non-embedding parameters only.
Candidate shapes are hardware friendly: hidden and MLP widths are multiples of ``multiple_of`` (or
the teacher's width), whole KV groups are dropped or the same number of query heads is kept in every
group, and up to ``max_layer_drop`` of the layers are dropped. Candidates whose size lies in
``[budget * (1 - tolerance), budget]`` are pre-ranked by a cheap heuristic (balanced pruning across
axes, closeness to the budget), the first ``max_candidates`` are pruned and scored on held-out data,
and the best one wins.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import count_parameters, count_parameters_for_shape, get_adapter
from ..config import ConfigBase, ConfigError
from ..errors import MinidistillError
from ..evaluation.perplexity import heldout_loss, iter_token_chunks

logger = logging.getLogger(__name__)

SHAPE_TARGET_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
SCORES = ("loss", "kl")


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
    """``loss``: held-out LM loss of the candidate; ``kl``: KL(teacher || candidate) per token."""
    score_blocks: int = 4
    """Held-out blocks used to score each candidate."""
    batch_size: int = 4
    """Blocks per forward when scoring."""
    chunk_tokens: int = 2048
    """Positions projected to the vocabulary at once when scoring."""
    reconstruct: bool = False
    """Reconstruct every candidate before scoring (slower; otherwise only the winner is reconstructed)."""

    def validate(self) -> None:
        if self.multiple_of < 1:
            raise ConfigError(f"search.multiple_of={self.multiple_of}: must be >= 1")
        if not 0.0 < self.tolerance < 1.0:
            raise ConfigError(f"search.tolerance={self.tolerance}: must be in (0, 1)")
        if not 0.0 <= self.max_layer_drop < 1.0:
            raise ConfigError(f"search.max_layer_drop={self.max_layer_drop}: must be in [0, 1)")
        if self.max_candidates < 1:
            raise ConfigError(f"search.max_candidates={self.max_candidates}: must be >= 1")
        if self.score not in SCORES:
            raise ConfigError(f"search.score={self.score!r}: choose one of {list(SCORES)}")
        for key in ("score_blocks", "batch_size", "chunk_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"search.{key}={getattr(self, key)}: must be >= 1")


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


@dataclass
class Candidate:
    """A candidate shape, its parameter count and its pre-ranking cost (lower is tried first)."""

    shape: dict[str, int]
    params: int
    cost: float


def _balance_cost(teacher_shape: dict[str, int], shape: dict[str, int], params: int, budget: int) -> float:
    """Spread of the per-axis log keep ratios (balanced pruning) plus the relative gap to the budget."""
    ratios = torch.tensor(
        [shape[k] / teacher_shape[k] for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")],
        dtype=torch.float64,
    ).log()
    kv_keep = shape["num_kv_heads"] / teacher_shape["num_kv_heads"]
    return float(ratios.std(unbiased=False)) + (budget - params) / budget + 1e-3 * (1 - kv_keep)


def enumerate_candidates(
    counter: ParamCounter,
    budget: int,
    search: SearchConfig,
) -> list[Candidate]:
    """Hardware-friendly shapes in ``[budget * (1 - tolerance), budget]``, best pre-ranked first, capped.

    Raises TargetError (before any model is pruned) when the budget is above the teacher's size, below
    the smallest reachable shape, or when no shape falls within the tolerance.
    """
    t = counter.teacher_shape
    full = counter.count(t)
    what = "non-embedding parameters" if counter.non_embedding else "parameters"
    if budget > full:
        raise TargetError(f"target of {budget:,} {what} exceeds the teacher's {full:,}")
    min_layers = max(1, t["num_layers"] - int(math.floor(t["num_layers"] * search.max_layer_drop)))
    hidden = width_options(t["hidden_size"], search.multiple_of)
    mlp = width_options(t["intermediate_size"], search.multiple_of)
    heads = head_options(t)
    smallest = {"num_layers": min_layers, "hidden_size": hidden[0], "num_heads": 1, "num_kv_heads": 1,
                "intermediate_size": mlp[0], "head_dim": t["head_dim"]}
    smallest_params = counter.count(smallest)
    if budget < smallest_params:
        raise TargetError(
            f"target of {budget:,} {what} is below the smallest reachable shape {_fmt_shape(smallest)} "
            f"with {smallest_params:,} ({smallest_params / full:.1%} of the teacher); lower search.multiple_of "
            "or raise search.max_layer_drop to go smaller"
        )
    shapes = [
        {"num_layers": L, "hidden_size": D, "num_heads": H, "num_kv_heads": K, "intermediate_size": I,
         "head_dim": t["head_dim"]}
        for L, D, (H, K), I in itertools.product(range(min_layers, t["num_layers"] + 1), hidden, heads, mlp)
    ]
    # Architecture validation depends on widths and head counts only; ask once per combination.
    accepted = {
        (D, H, K): config_rejects_shape(counter.config, {"hidden_size": D, "num_heads": H, "num_kv_heads": K}) is None
        for D in hidden for H, K in heads
    }
    shapes = [s for s in shapes if accepted[(s["hidden_size"], s["num_heads"], s["num_kv_heads"])]]
    counts = counter.count_many(shapes)
    low = budget * (1 - search.tolerance)
    inside = [Candidate(s, p, _balance_cost(t, s, p, budget)) for s, p in zip(shapes, counts) if low <= p <= budget]
    if not inside:
        raise TargetError(
            f"no candidate shape has between {int(low):,} and {budget:,} {what}; lower search.multiple_of "
            "or raise search.tolerance"
        )
    inside.sort(key=lambda c: c.cost)
    return inside[: search.max_candidates]


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
    return total / count


@dataclass
class SearchResult:
    """The scored candidates (rows, best first) and the winner's student and prune map."""

    rows: list[dict[str, Any]]
    best_student: nn.Module
    best_map: Any
    best_reconstructed: bool
    timings: dict[str, float] = field(default_factory=dict)


def score_candidates(
    teacher: nn.Module,
    candidates: Sequence[Candidate],
    build: Callable[[dict[str, int], bool], tuple[nn.Module, Any]],
    heldout: Sequence[torch.Tensor],
    search: SearchConfig,
    *,
    full_params: int,
) -> SearchResult:
    """Prune each candidate with ``build(shape, reconstruct)`` -> (student, prune map), score it, keep the best.

    Rows hold the shape, parameter count, its fraction of ``full_params``, and the score (lower is
    better); they are logged as a table and returned best first.
    """
    teacher_hidden = teacher_hidden_states(teacher, heldout) if search.score == "kl" else None
    rows: list[dict[str, Any]] = []
    best: tuple[float, nn.Module, Any] | None = None
    for i, cand in enumerate(candidates):
        student, pmap = build(cand.shape, search.reconstruct)
        if search.score == "kl":
            score = kl_to_teacher(student, teacher, teacher_hidden, heldout, chunk_tokens=search.chunk_tokens)
        else:
            score = heldout_loss(student, heldout, chunk_tokens=search.chunk_tokens)["loss"]
        rows.append({**{k: cand.shape[k] for k in SHAPE_TARGET_KEYS}, "params": cand.params,
                     "fraction": cand.params / full_params, "prerank": i, search.score: score})
        if best is None or score < best[0]:
            best = (score, student, pmap)
        logger.info("candidate %d/%d %s: %s=%.4f", i + 1, len(candidates), _fmt_shape(cand.shape), search.score, score)
    rows.sort(key=lambda r: r[search.score])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    logger.info("budget search (lower %s is better):\n%s", search.score, format_rows(rows))
    return SearchResult(rows=rows, best_student=best[1], best_map=best[2], best_reconstructed=search.reconstruct)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of candidate rows."""
    if not rows:
        return ""
    keys = list(rows[0])
    keys = ["rank"] + [k for k in keys if k != "rank"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.4f}" if isinstance(r[k], float) else (f"{r[k]:,}" if k == "params" else str(r[k])) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_params(model: nn.Module, *, non_embedding: bool = False) -> int:
    """The teacher's size as budgets count it."""
    return count_parameters(model, non_embedding=non_embedding)
