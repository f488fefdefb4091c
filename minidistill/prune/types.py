"""Result types shared by importance estimation, unit selection and the budget search."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class UnitImportance:
    """Importance scores of a model's prunable units; higher means more important everywhere.

    Shapes: ``heads`` [num_layers, num_heads], ``kv_groups`` [num_layers, num_kv_heads],
    ``neurons`` [num_layers, intermediate_size], ``hidden`` [hidden_size], ``layers`` [num_layers]
    (optional: depth pruning needs it). ``settings`` records how the scores were measured.
    """

    heads: torch.Tensor
    kv_groups: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor
    layers: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Tensors and settings, for ``torch.save``-free caching via safetensors + JSON."""
        tensors = {k: getattr(self, k) for k in ("heads", "kv_groups", "neurons", "hidden", "layers")}
        return {"tensors": {k: v for k, v in tensors.items() if v is not None}, "settings": dict(self.settings)}
