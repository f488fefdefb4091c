"""Unit selection: turn importance scores and a target shape into a :class:`PruneMap`.

Depth: the ``num_layers`` most important layers. Width: the ``hidden_size`` most important hidden
channels, and per kept layer the ``num_kv_heads`` most important KV groups, inside every kept group
the same number of most important query heads (GQA as HF implements it), and the
``intermediate_size`` most important MLP neurons. Ties go to the lower index; indices are sorted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from .prune_map import SHAPE_KEYS, LayerMap, PruneMap, PruneMapError
from .types import UnitImportance


def top_k_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending; equal scores prefer the lower index."""
    scores = scores.detach().to("cpu", torch.float64).reshape(-1)
    if torch.isnan(scores).any():
        raise PruneMapError("importance scores contain NaN; re-run importance estimation")
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[:k].tolist())


def check_target_shape(teacher_shape: dict[str, int], shape: dict[str, int]) -> None:
    """Raise PruneMapError when ``shape`` cannot be cut out of ``teacher_shape``."""
    missing = [k for k in SHAPE_KEYS if k not in shape]
    if missing:
        raise PruneMapError(f"target shape lacks {missing}; it needs all of {list(SHAPE_KEYS)}")
    for key in SHAPE_KEYS:
        value = shape[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PruneMapError(f"target shape {key}={value!r} must be a positive integer")
        if value > teacher_shape[key]:
            raise PruneMapError(
                f"target shape {key}={value} exceeds the teacher's {teacher_shape[key]}; pruning cannot add units"
            )
    if shape["head_dim"] != teacher_shape["head_dim"]:
        raise PruneMapError(
            f"target head_dim={shape['head_dim']} differs from the teacher's {teacher_shape['head_dim']}; "
            "head_dim is not prunable, remove whole heads instead"
        )
    if shape["num_heads"] % shape["num_kv_heads"]:
        raise PruneMapError(
            f"target num_heads={shape['num_heads']} is not a multiple of num_kv_heads={shape['num_kv_heads']}"
        )
    teacher_group = teacher_shape["num_heads"] // teacher_shape["num_kv_heads"]
    per_group = shape["num_heads"] // shape["num_kv_heads"]
    if per_group > teacher_group:
        raise PruneMapError(
            f"target keeps {per_group} query heads per KV group but the teacher's groups have {teacher_group}; "
            f"raise num_kv_heads or lower num_heads (at most {teacher_group * shape['num_kv_heads']})"
        )


def _check_importance_shapes(importance: UnitImportance, t: dict[str, int]) -> None:
    expected = {
        "heads": (t["num_layers"], t["num_heads"]),
        "kv_groups": (t["num_layers"], t["num_kv_heads"]),
        "neurons": (t["num_layers"], t["intermediate_size"]),
        "hidden": (t["hidden_size"],),
        "layers": (t["num_layers"],),
    }
    for name, want in expected.items():
        value = getattr(importance, name)
        if value is not None and tuple(value.shape) != want:
            raise PruneMapError(f"importance.{name} has shape {tuple(value.shape)}, the teacher needs {want}")


def select_units(
    model: nn.Module,
    importance: UnitImportance,
    shape: dict[str, int],
    *,
    teacher_info: dict | None = None,
    importance_settings: dict | None = None,
) -> PruneMap:
    """The prune map that keeps the most important units of ``model`` at the target ``shape``.

    ``teacher_info`` fills ``PruneMap.teacher`` (model_type and shape are added from ``model``);
    ``importance_settings`` defaults to ``importance.settings``.
    """
    adapter = get_adapter(model)
    t = adapter.shape(model.config)
    shape = {k: shape[k] for k in SHAPE_KEYS if k in shape}
    check_target_shape(t, shape)
    _check_importance_shapes(importance, t)

    if shape["num_layers"] < t["num_layers"]:
        if importance.layers is None:
            raise PruneMapError(
                f"target num_layers={shape['num_layers']} drops layers but importance.layers is None; "
                "estimate layer importance (depth pruning) first"
            )
        kept_layers = top_k_indices(importance.layers, shape["num_layers"])
    else:
        kept_layers = list(range(t["num_layers"]))

    teacher_group = t["num_heads"] // t["num_kv_heads"]
    per_group = shape["num_heads"] // shape["num_kv_heads"]
    layers: list[LayerMap] = []
    for layer in kept_layers:
        groups = top_k_indices(importance.kv_groups[layer], shape["num_kv_heads"])
        heads: list[int] = []
        for g in groups:
            first = g * teacher_group
            inside = top_k_indices(importance.heads[layer, first : first + teacher_group], per_group)
            heads.extend(first + h for h in inside)
        neurons = top_k_indices(importance.neurons[layer], shape["intermediate_size"])
        layers.append(LayerMap(kept_kv_groups=groups, kept_query_heads=heads, kept_neurons=neurons))

    teacher: dict[str, Any] = dict(teacher_info or {})
    teacher.setdefault("model_type", model.config.model_type)
    teacher["shape"] = dict(t)
    pmap = PruneMap(
        teacher=teacher,
        student_shape=dict(shape),
        kept_layers=kept_layers,
        kept_hidden=top_k_indices(importance.hidden, shape["hidden_size"]),
        layers=layers,
        importance=dict(importance.settings if importance_settings is None else importance_settings),
    )
    pmap.validate()
    return pmap
