"""Flow matrices between two layers (FSP, Yim et al., CVPR 2017), matched between student and teacher.

For features ``a`` [B, T, D] and ``b`` [B, T, D'] of two layers of one model (each token's vector
L2-normalised first when ``normalize``):

- ``matrix="channels"``: FSP ``G = a^T b / T`` [B, D, D'] (both models need the same widths: the caller
  selects the teacher's kept channels);
- ``matrix="tokens"``: the token Gram ``G = a b^T`` [B, T, T] (any widths).

The loss is the mean over pairs and entries of ``(G_s - G_t)^2``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FlowMatrix = Literal["channels", "tokens"]


def flow_matrix(a: Tensor, b: Tensor, matrix: FlowMatrix = "channels", *, normalize: bool = True) -> Tensor:
    """The flow matrix between features ``a`` and ``b`` of one model (see the module docstring)."""
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"features {tuple(a.shape)} and {tuple(b.shape)} differ in [B, T]")
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if matrix == "channels":
        return a.transpose(1, 2) @ b / a.shape[1]
    if matrix == "tokens":
        return a @ b.transpose(1, 2)
    raise ValueError(f"matrix={matrix!r}: choose 'channels' or 'tokens'")


class FlowLoss(nn.Module):
    """Mean squared difference of student and teacher flow matrices over layer pairs."""

    def __init__(self, matrix: FlowMatrix = "channels", *, normalize: bool = True):
        super().__init__()
        self.matrix, self.normalize = matrix, bool(normalize)

    def extra_repr(self) -> str:
        return f"matrix={self.matrix!r}, normalize={self.normalize}"

    def forward(self, student: list[tuple[Tensor, Tensor]], teacher: list[tuple[Tensor, Tensor]]) -> Tensor:
        """``student[k]`` / ``teacher[k]``: the (first, second) layer features of pair ``k``."""
        if len(student) != len(teacher) or not student:
            raise ValueError(f"need the same non-zero number of student and teacher pairs, got {len(student)} and {len(teacher)}")
        losses = []
        for (sa, sb), (ta, tb) in zip(student, teacher):
            g_s = flow_matrix(sa, sb, self.matrix, normalize=self.normalize)
            g_t = flow_matrix(ta.detach(), tb.detach(), self.matrix, normalize=self.normalize)
            if g_s.shape != g_t.shape:
                raise ValueError(f"student flow matrix {tuple(g_s.shape)} != teacher's {tuple(g_t.shape)}")
            losses.append((g_s - g_t).pow(2).mean())
        return torch.stack(losses).mean()
