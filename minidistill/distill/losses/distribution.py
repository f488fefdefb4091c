"""Feature-distribution matching: maximum mean discrepancy (MMD) between student and teacher activations.

Per sequence, the two models' activations of one layer pair give two sets of samples, compared by the
biased MMD^2 estimate ``mean k(X, X') + mean k(Y, Y') - 2 mean k(X, Y)``; the loss is the mean over sequences.
Every sample is L2-normalised first (so kernel bandwidths do not depend on the layer's scale).

- ``samples="neurons"``: neuron selectivity transfer (Huang & Wang, arXiv 1707.01219): every channel is one
  sample, its vector of activations over the sequence's tokens; widths may differ. With the polynomial kernel
  of degree 2 and ``coef=0`` this is NST's loss.
- ``samples="tokens"``: every token is one sample, its hidden-state vector; both sides need the same width
  (the caller selects the teacher's kept channels).

Kernels: ``linear`` ``x.y``; ``polynomial`` ``(x.y + coef)^degree``; ``gaussian`` ``exp(-|x - y|^2 / (2 sigma^2))``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Kernel = Literal["linear", "polynomial", "gaussian"]
KERNELS: tuple[str, ...] = get_args(Kernel)
Samples = Literal["neurons", "tokens"]


def kernel_matrix(x: Tensor, y: Tensor, kernel: str, *, degree: int = 2, coef: float = 0.0, sigma: float = 1.0) -> Tensor:
    """``[..., N, D]`` x ``[..., M, D]`` -> ``[..., N, M]`` kernel values."""
    dot = x @ y.transpose(-1, -2)
    if kernel == "linear":
        return dot
    if kernel == "polynomial":
        return (dot + coef).pow(degree)
    if kernel == "gaussian":
        sq = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(-2) - 2.0 * dot
        return torch.exp(-sq.clamp_min(0.0) / (2.0 * sigma * sigma))
    raise ValueError(f"kernel={kernel!r}: choose one of {list(KERNELS)}")


class FeatureMMDLoss(nn.Module):
    """MMD^2 between student and teacher activation samples of one layer pair (see the module docstring)."""

    def __init__(self, kernel: Kernel = "polynomial", *, samples: Samples = "neurons", degree: int = 2, coef: float = 0.0, sigma: float = 1.0):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: choose one of {list(KERNELS)}")
        if samples not in get_args(Samples):
            raise ValueError(f"samples={samples!r}: choose one of {list(get_args(Samples))}")
        self.kernel, self.samples = kernel, samples
        self.degree, self.coef, self.sigma = int(degree), float(coef), float(sigma)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, samples={self.samples!r}"

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Mean over sequences of MMD^2; ``student`` [B, T, D_s], ``teacher`` [B, T, D_t] (no gradient to it)."""
        if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be [B, T, D] with equal B, T")
        if self.samples == "tokens" and student.shape[-1] != teacher.shape[-1]:
            raise ValueError(f"samples='tokens' needs equal widths, got {student.shape[-1]} and {teacher.shape[-1]}")
        dtype = torch.promote_types(student.dtype, torch.float32)
        s, t = student.to(dtype), teacher.detach().to(dtype)
        if self.samples == "neurons":
            s, t = s.transpose(1, 2), t.transpose(1, 2)
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        k = lambda a, b: kernel_matrix(a, b, self.kernel, degree=self.degree, coef=self.coef, sigma=self.sigma).mean((-2, -1))  # noqa: E731
        return (k(s, s) + k(t, t) - 2.0 * k(s, t)).mean()
