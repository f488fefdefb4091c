"""Relational knowledge distillation (Park et al., arXiv 1904.05068) on pooled per-sequence features.

Every sequence is one point ``e_i`` (its features averaged over tokens). With ``N`` points of each model:

- distance-wise: ``psi_D(i, j) = |e_i - e_j| / mu`` (``mu`` the mean distance over pairs ``i != j``); the loss is
  the smooth-L1 (Huber, delta 1) between student and teacher ``psi_D`` averaged over all ``N^2`` entries;
- angle-wise: ``psi_A(i, j, k) = <(e_i - e_j) / |e_i - e_j|, (e_k - e_j) / |e_k - e_j|>`` (a zero difference
  normalises to 0); the loss is the smooth-L1 averaged over all ``N^3`` entries.

As in the authors' code. Widths may differ between the models. The relations span the whole batch: under
data parallelism, :func:`gather_rows` collects every rank's points (gradients flow to the local rows) and
:func:`scale_gradient` makes the data-parallel gradient average equal the one-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

MIN_SEQUENCES_PER_RANK = 2


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(x: Tensor) -> Tensor:
    """``x`` [n, D] of every rank concatenated in rank order; the local rows keep their autograd graph."""
    world = _world()
    if world == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes_ = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(sizes_), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rank = dist.get_rank()
    return torch.cat([x if r == rank else parts[r][:n] for r, n in enumerate(sizes_)], 0)


def scale_gradient(loss: Tensor) -> Tensor:
    """``loss`` in value, ``world_size x`` in gradient: data-parallel averaging then yields the full gradient."""
    world = _world()
    return loss if world == 1 else loss.detach() + world * (loss - loss.detach())


def distance_potential(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise distances [N, N] divided by their mean over ``i != j`` (diagonal 0)."""
    sq = (e.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1).unsqueeze(0) - 2.0 * e @ e.t()).clamp_min(eps)
    d = sq.sqrt()
    off = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    d = torch.where(off, d, torch.zeros_like(d))
    return d / d[off].mean().clamp_min(eps)


def angle_potential(e: Tensor) -> Tensor:
    """Cosines [N, N, N] of the angle at ``j`` between ``e_i`` and ``e_k`` (index order ``[j, i, k]``)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = e_i - e_j
    return diff @ diff.transpose(1, 2)


class RelationalKDLoss(nn.Module):
    """``distance_weight * L_D + angle_weight * L_A`` between student [N, D_s] and teacher [N, D_t] points."""

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0):
        super().__init__()
        if distance_weight < 0 or angle_weight < 0 or distance_weight + angle_weight == 0:
            raise ValueError(f"distance_weight={distance_weight}, angle_weight={angle_weight}: both >= 0, not both 0")
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be [N, D] with equal N")
        if student.shape[0] < MIN_SEQUENCES_PER_RANK:
            raise ValueError(f"relational KD needs at least {MIN_SEQUENCES_PER_RANK} sequences, got {student.shape[0]}")
        dtype = torch.promote_types(student.dtype, torch.float32)
        s, t = student.to(dtype), teacher.detach().to(dtype)
        loss = s.new_zeros(())
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(distance_potential(s), distance_potential(t))
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(angle_potential(s), angle_potential(t))
        return loss
