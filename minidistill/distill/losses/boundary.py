"""Activation-boundary transfer (Heo et al., arXiv 1811.03233) on MLP gate pre-activations.

A teacher neuron is active where its gate pre-activation is positive. The student's matching neuron is pushed
to the same side of zero by at least ``margin``:
``loss = mean[ 1[t > 0] * relu(margin - s)^2 + 1[t <= 0] * relu(margin + s)^2 ]`` over tokens and neurons.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ActivationBoundaryLoss(nn.Module):
    """Hinge on student gate pre-activations ``[..., I]`` against the teacher's active set ``[..., I]``."""

    def __init__(self, margin: float = 0.25):
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin={margin} must be >= 0")
        self.margin = float(margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student gates {tuple(student.shape)} != teacher gates {tuple(teacher.shape)}")
        s = student.to(torch.promote_types(student.dtype, torch.float32))
        active = teacher.detach() > 0
        hinge = torch.where(active, torch.relu(self.margin - s), torch.relu(self.margin + s))
        return hinge.pow(2).mean()
