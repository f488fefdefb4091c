"""``prune_map.json``: what a pruned student kept of its teacher. The contract between pruner and distiller.

Schema (version 1), all indices refer to the teacher and are sorted ascending:

- ``version``: 1.
- ``teacher``: ``{"source", "sha256", "model_type", "shape"}``: where the teacher came from, a hash of
  its state dict (:func:`minidistill.models.state_dict_sha256`) and its prunable shape
  (:meth:`ArchAdapter.shape`).
- ``student_shape``: the student's prunable shape (same keys).
- ``kept_layers``: teacher layer index of each student layer (student layer i came from
  ``kept_layers[i]``).
- ``kept_hidden``: teacher hidden channels kept, in order (length = student hidden size).
- ``layers``: one entry per student layer:
  ``kept_kv_groups`` (teacher KV-head indices kept), ``kept_query_heads`` (teacher query-head
  indices kept, grouped by kept KV group in order, the same count inside every group),
  ``kept_neurons`` (teacher MLP neuron indices kept).
- ``refit``: names of student parameters that are not a selection of teacher weights but were
  re-fitted (e.g. ``model.layers.3.self_attn.o_proj.weight``); rebuilding from the map takes these
  from the student checkpoint.
- ``importance``: the importance settings used (method, aggregation, calibration data, tokens).
- ``notes``: free-form dict (e.g. search results summary).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PRUNE_MAP_VERSION = 1
PRUNE_MAP_FILENAME = "prune_map.json"
SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


class PruneMapError(ValueError):
    """A prune map is malformed or does not fit the model it is applied to."""


@dataclass
class LayerMap:
    """What one student layer kept of its teacher layer."""

    kept_kv_groups: list[int]
    kept_query_heads: list[int]
    kept_neurons: list[int]


@dataclass
class PruneMap:
    """See the module docstring for the schema."""

    teacher: dict[str, Any]
    student_shape: dict[str, int]
    kept_layers: list[int]
    kept_hidden: list[int]
    layers: list[LayerMap]
    refit: list[str] = field(default_factory=list)
    importance: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    version: int = PRUNE_MAP_VERSION

    # ------------------------------------------------------------------ construction
    @classmethod
    def identity(cls, teacher_shape: dict[str, int], teacher: dict[str, Any] | None = None) -> "PruneMap":
        """The map that keeps everything (a student equal to its teacher)."""
        s = teacher_shape
        layers = [
            LayerMap(list(range(s["num_kv_heads"])), list(range(s["num_heads"])), list(range(s["intermediate_size"])))
            for _ in range(s["num_layers"])
        ]
        return cls(
            teacher=dict(teacher or {"shape": dict(s)}),
            student_shape=dict(s),
            kept_layers=list(range(s["num_layers"])),
            kept_hidden=list(range(s["hidden_size"])),
            layers=layers,
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check internal consistency (counts, ranges, GQA grouping); raise PruneMapError."""
        if self.version != PRUNE_MAP_VERSION:
            raise PruneMapError(f"prune map version {self.version} is not supported (expected {PRUNE_MAP_VERSION})")
        t = self.teacher.get("shape")
        s = self.student_shape
        if not t or any(k not in t for k in SHAPE_KEYS) or any(k not in s for k in SHAPE_KEYS):
            raise PruneMapError(f"teacher.shape and student_shape need the keys {SHAPE_KEYS}")
        if s["head_dim"] != t["head_dim"]:
            raise PruneMapError("head_dim cannot change under pruning")
        _check_indices("kept_layers", self.kept_layers, t["num_layers"], s["num_layers"])
        _check_indices("kept_hidden", self.kept_hidden, t["hidden_size"], s["hidden_size"])
        if len(self.layers) != s["num_layers"]:
            raise PruneMapError(f"layers has {len(self.layers)} entries for {s['num_layers']} student layers")
        group = t["num_heads"] // t["num_kv_heads"]
        for i, lm in enumerate(self.layers):
            _check_indices(f"layers[{i}].kept_kv_groups", lm.kept_kv_groups, t["num_kv_heads"], s["num_kv_heads"])
            _check_indices(f"layers[{i}].kept_query_heads", lm.kept_query_heads, t["num_heads"], s["num_heads"])
            _check_indices(f"layers[{i}].kept_neurons", lm.kept_neurons, t["intermediate_size"], s["intermediate_size"])
            per_group = s["num_heads"] // s["num_kv_heads"]
            for g in lm.kept_kv_groups:
                inside = [h for h in lm.kept_query_heads if h // group == g]
                if len(inside) != per_group:
                    raise PruneMapError(
                        f"layers[{i}]: KV group {g} keeps {len(inside)} query heads, expected {per_group} "
                        "(HF requires the same number of query heads per KV group)"
                    )
            if any(h // group not in lm.kept_kv_groups for h in lm.kept_query_heads):
                raise PruneMapError(f"layers[{i}]: a kept query head belongs to a dropped KV group")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneMap":
        try:
            layers = [LayerMap(**lm) for lm in data["layers"]]
            obj = cls(**{**data, "layers": layers})
        except (KeyError, TypeError) as e:
            raise PruneMapError(f"malformed prune map: {e}") from None
        obj.validate()
        return obj

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / PRUNE_MAP_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder_or_file: str | Path) -> "PruneMap":
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / PRUNE_MAP_FILENAME
        if not path.is_file():
            raise PruneMapError(f"{path} not found: the student has no prune map (was it pruned by minidistill?)")
        return cls.from_dict(json.loads(path.read_text()))

    # ------------------------------------------------------------------ pairing helpers for the distiller
    def teacher_layer_of(self, student_layer: int) -> int:
        return self.kept_layers[student_layer]

    def student_layer_of(self, teacher_layer: int) -> int | None:
        try:
            return self.kept_layers.index(teacher_layer)
        except ValueError:
            return None


def _check_indices(name: str, idx: list[int], upper: int, count: int) -> None:
    if len(idx) != count:
        raise PruneMapError(f"{name} has {len(idx)} entries, expected {count}")
    if any(not 0 <= i < upper for i in idx):
        raise PruneMapError(f"{name} has indices outside [0, {upper})")
    if any(a >= b for a, b in zip(idx, idx[1:])):
        raise PruneMapError(f"{name} must be strictly increasing")
