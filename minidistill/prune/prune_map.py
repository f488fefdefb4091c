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
- ``student_weights``: ``"pruned"`` (the folder's weights are the teacher slices the map names, plus
  the ``refit`` tensors: :func:`~minidistill.prune.save.rebuild_student` reproduces them) or
  ``"trained"`` (the map of the *initial* student of a model whose weights were trained afterwards, as in
  a distilled run's ``model/``: the architecture and the teacher origin of every layer, head, neuron and
  channel still hold, so feature pairing uses it, but rebuilding from the teacher is refused). Absent
  in maps written before this field: ``"pruned"``.

Loading (:meth:`PruneMap.load`) names the file in every parse or consistency error;
:func:`minidistill.prune.save.verify_student_map` checks a map against its teacher and student folder.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import MinidistillError

PRUNE_MAP_VERSION = 1
PRUNE_MAP_FILENAME = "prune_map.json"
STUDENT_WEIGHTS = ("pruned", "trained")
PRUNABLE_SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
"""The axes a student's shape is cut along (``head_dim`` is kept)."""
SHAPE_KEYS = (*PRUNABLE_SHAPE_KEYS[:4], "head_dim", PRUNABLE_SHAPE_KEYS[4])
"""Every key of a shape dict (the adapters' ``shape()``), in their order."""


class PruneMapError(MinidistillError, ValueError):
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
    student_weights: Literal["pruned", "trained"] = "pruned"

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
        if self.student_weights not in STUDENT_WEIGHTS:
            raise PruneMapError(f"student_weights={self.student_weights!r}: expected one of {STUDENT_WEIGHTS}")
        if not isinstance(self.teacher, dict) or not isinstance(self.student_shape, dict):
            raise PruneMapError("teacher and student_shape must be JSON objects")
        t = self.teacher.get("shape")
        s = self.student_shape
        if not isinstance(t, dict) or any(k not in t for k in SHAPE_KEYS) or any(k not in s for k in SHAPE_KEYS):
            raise PruneMapError(f"teacher.shape and student_shape need the keys {SHAPE_KEYS}")
        bad = [k for k in SHAPE_KEYS for d in (t, s) if not _is_int(d[k]) or d[k] < 1]
        if bad:
            raise PruneMapError(f"shape entries {sorted(set(bad))} must be positive integers")
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
        if not isinstance(data, dict):
            raise PruneMapError(f"malformed prune map: a JSON object is expected, not {type(data).__name__}")
        try:
            layers = [LayerMap(**lm) for lm in data["layers"]]
            obj = cls(**{**data, "layers": layers})
        except KeyError as e:
            raise PruneMapError(f"malformed prune map: the key {e} is missing") from None
        except TypeError as e:
            raise PruneMapError(f"malformed prune map: {e}") from None
        obj.validate()
        return obj

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / PRUNE_MAP_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder_or_file: str | Path) -> "PruneMap":
        """Read and validate a ``prune_map.json`` (or the one in a folder); PruneMapError naming the file."""
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / PRUNE_MAP_FILENAME
        if not path.is_file():
            raise PruneMapError(f"{path} not found: the student has no prune map (was it pruned by minidistill?)")
        fix = "re-create it by pruning again (recipes/prune.py), or delete it to use the student without a map"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise PruneMapError(f"{path} is not UTF-8 text: {fix}") from None
        except json.JSONDecodeError as e:
            raise PruneMapError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): {fix}") from None
        try:
            return cls.from_dict(data)
        except PruneMapError as e:
            raise PruneMapError(f"{path}: {e}; the file was edited or damaged: {fix}") from None

    # ------------------------------------------------------------------ pairing helpers for the distiller
    def teacher_layer_of(self, student_layer: int) -> int:
        return self.kept_layers[student_layer]

    def student_layer_of(self, teacher_layer: int) -> int | None:
        try:
            return self.kept_layers.index(teacher_layer)
        except ValueError:
            return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_indices(name: str, idx: list[int], upper: int, count: int) -> None:
    if not isinstance(idx, list) or not all(_is_int(i) for i in idx):
        raise PruneMapError(f"{name} must be a list of integers")
    if len(idx) != count:
        raise PruneMapError(f"{name} has {len(idx)} entries, expected {count}")
    outside = [i for i in idx if not 0 <= i < upper]
    if outside:
        raise PruneMapError(f"{name} has indices outside [0, {upper}): {outside[:5]}")
    if len(set(idx)) != len(idx):
        repeated = sorted(i for i, n in Counter(idx).items() if n > 1)
        raise PruneMapError(f"{name} repeats the indices {repeated[:5]}")
    if any(a > b for a, b in zip(idx, idx[1:])):
        raise PruneMapError(f"{name} must be sorted ascending")
