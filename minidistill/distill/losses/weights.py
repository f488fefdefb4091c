"""Weight matching (hint training on weights): L2 between student parameters and teacher weights.

Two ways to get each student parameter's target:

- through a prune map: the target is the teacher parameter sliced to the student's kept rows / columns
  (exactly what :func:`minidistill.prune.apply.apply_prune_map` builds, so a student pruned without re-fit
  starts at loss 0);
- without a map: the teacher parameter of the same name (layer indices mapped through a layer pairing) sent
  through learned linear maps, one per axis whose student and teacher sizes differ:
  ``target = L W_t R^T`` for a matrix, ``L w_t`` for a vector, where ``L`` [out_s, out_t] and ``R``
  [in_s, in_t] are shared by every axis with the same (student size, teacher size) and start as the
  truncated identity. Axes of equal size are compared as they are (no map, e.g. the vocabulary).

The loss is the sum of squared differences over all matched elements, ``sum_p |W_s[p] - target[p]|^2`` (not a
mean: its gradient ``2 w (W_s - target)`` per element, for a term weight ``w``, pulls every weight towards its
target like weight decay towards the teacher, whatever the model size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearWeightMap(nn.Module):
    """Learned maps from teacher axis sizes to student axis sizes, shared by (student size, teacher size)."""

    def __init__(self, size_pairs: set[tuple[int, int]]):
        super().__init__()
        self.maps = nn.ParameterDict(
            {f"s{s}_t{t}": nn.Parameter(torch.eye(s, t)) for s, t in sorted(size_pairs) if s != t}
        )

    @staticmethod
    def axis_pairs(student_shape: torch.Size, teacher_shape: torch.Size) -> list[tuple[int, int]]:
        """(student size, teacher size) of every axis of a parameter (the first two axes at most)."""
        return [(int(s), int(t)) for s, t in zip(student_shape[:2], teacher_shape[:2])]

    def _map(self, s: int, t: int) -> Tensor | None:
        return None if s == t else self.maps[f"s{s}_t{t}"]

    def forward(self, teacher_weight: Tensor, student_shape: torch.Size) -> Tensor:
        """``teacher_weight`` mapped to ``student_shape`` (1-D: ``L w``; 2-D: ``L W R^T``)."""
        pairs = self.axis_pairs(student_shape, teacher_weight.shape)
        out = teacher_weight
        left = self._map(*pairs[0])
        if left is not None:
            out = left.to(out.dtype) @ out
        if out.dim() > 1:
            right = self._map(*pairs[1])
            if right is not None:
                out = out @ right.to(out.dtype).t()
        return out


class WeightMatchLoss(nn.Module):
    """``sum_p |W_s[p] - target[p]|^2`` over the parameters named in ``student`` (all must be in ``targets``)."""

    def forward(self, student: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        if not student:
            raise ValueError("no parameter to match: the student and its targets share no parameter name")
        total = None
        for name, w in student.items():
            target = targets[name]
            if target.shape != w.shape:
                raise ValueError(f"{name}: student shape {tuple(w.shape)} != target shape {tuple(target.shape)}")
            dtype = torch.promote_types(w.dtype, torch.float32)
            sq = (w.to(dtype) - target.to(dtype)).pow(2).sum()
            total = sq if total is None else total + sq
        return total
