"""Hidden-state distillation: per-position losses between student and teacher features, and a
learnable projection from the student's width to the teacher's.

Loss kinds (``s``, ``t`` the student/teacher vectors [D] at one counted position; results are means
over counted positions):

- ``mse``: mean over channels of (s - t)^2.
- ``cosine``: 1 - <s, t> / (max(|s|, eps) * max(|t|, eps)), eps = 1e-8.
- ``nmse``: |s - t|^2 / max(|t|^2, eps), the squared error normalised by the teacher's squared norm
  at the same position, so that layers and tokens of very different scale count alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from minidistill.prune.prune_map import PruneMap

HiddenLossKind = Literal["mse", "cosine", "nmse"]
HIDDEN_LOSS_KINDS: tuple[str, ...] = get_args(HiddenLossKind)
EPS = 1e-8


class HiddenStateLoss(nn.Module):
    """Loss between student and teacher hidden states [..., D] (see the module docstring).

    The teacher side is detached unless ``detach_teacher=False`` (e.g. mutual learning).
    """

    def __init__(self, kind: HiddenLossKind = "nmse", *, detach_teacher: bool = True):
        super().__init__()
        if kind not in HIDDEN_LOSS_KINDS:
            raise ValueError(f"kind={kind!r}: choose one of {list(HIDDEN_LOSS_KINDS)}")
        self.kind = kind
        self.detach_teacher = detach_teacher

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def per_position(self, student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
        """Loss at every position: [..., D] -> [...] (float32 or wider)."""
        dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        s, t = student_hidden.to(dtype), teacher_hidden.to(dtype)
        if self.kind == "mse":
            return (s - t).pow(2).mean(-1)
        if self.kind == "nmse":
            return (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(EPS)
        dot = (s * t).sum(-1)
        norms = s.norm(dim=-1).clamp_min(EPS) * t.norm(dim=-1).clamp_min(EPS)
        return 1.0 - dot / norms

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean loss over the positions where ``mask`` [...] is True (all positions when None)."""
        if student_hidden.shape != teacher_hidden.shape:
            raise ValueError(
                f"student hidden {tuple(student_hidden.shape)} != teacher hidden {tuple(teacher_hidden.shape)}; "
                "project the student first (ChannelProjection)"
            )
        if mask is not None and mask.shape != student_hidden.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} != hidden positions {tuple(student_hidden.shape[:-1])}")
        if self.detach_teacher:
            teacher_hidden = teacher_hidden.detach()
        losses = self.per_position(student_hidden, teacher_hidden)
        if mask is None:
            return losses.mean()
        mask = mask.to(torch.bool)
        total = torch.where(mask, losses, losses.new_zeros(())).sum()
        return total / mask.sum().clamp_min(1)


class ChannelProjection(nn.Module):
    """Learnable linear map (no bias) from the student's hidden width to the teacher's.

    Initialised as the selection of kept channels: ``W[kept[i], i] = 1`` and 0 elsewhere, so that a
    student pruned only in width (``kept_channels`` = the prune map's ``kept_hidden``) maps its
    channels back to where they came from. With equal widths and no ``kept_channels`` it is the identity.
    """

    def __init__(self, student_dim: int, teacher_dim: int, kept_channels: list[int] | None = None):
        super().__init__()
        if kept_channels is None:
            if student_dim != teacher_dim:
                raise ValueError(
                    f"student_dim={student_dim} != teacher_dim={teacher_dim}: pass kept_channels "
                    "(the prune map's kept_hidden) to say which teacher channel each student channel came from"
                )
            kept_channels = list(range(student_dim))
        kept = [int(c) for c in kept_channels]
        if len(kept) != student_dim:
            raise ValueError(f"kept_channels has {len(kept)} entries, expected student_dim={student_dim}")
        if len(set(kept)) != len(kept) or any(not 0 <= c < teacher_dim for c in kept):
            raise ValueError(f"kept_channels must be distinct indices in [0, {teacher_dim})")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        weight = torch.zeros(teacher_dim, student_dim)
        weight[torch.tensor(kept, dtype=torch.long), torch.arange(student_dim)] = 1.0
        self.weight = nn.Parameter(weight)

    @classmethod
    def from_prune_map(cls, prune_map: "PruneMap") -> "ChannelProjection":
        """The projection for a student built from ``prune_map`` (teacher width from its teacher shape)."""
        teacher_dim = int(prune_map.teacher["shape"]["hidden_size"])
        return cls(len(prune_map.kept_hidden), teacher_dim, prune_map.kept_hidden)

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}"

    def forward(self, x: Tensor) -> Tensor:
        """[..., student_dim] -> [..., teacher_dim], computed in the projection's dtype."""
        if x.shape[-1] != self.student_dim:
            raise ValueError(f"input width {x.shape[-1]} != student_dim {self.student_dim}")
        return F.linear(x.to(self.weight.dtype), self.weight)
