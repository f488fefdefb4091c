"""Weighted sum of named loss components, with fixed weights or weights that follow an anchor loss.

``fixed``: ``total = sum_i w_i * loss_i``.

``auto`` (as in Minitron): every component other than the anchor is rescaled to the anchor's
magnitude, ``weight_i = w_i * |anchor| / |loss_i|`` with the ratio detached (it steers the size of each
term, never its gradient direction); the anchor keeps ``w_anchor``. Magnitudes are measured per
optimizer step: in training mode every forward adds ``|loss_i|`` to the step's sums, and
:meth:`LossBalancer.end_step` (called once per optimizer step) sums them over the step's micro-batches
and over all processes and takes the mean, so one process, data parallelism and gradient accumulation
on the same global batch measure the same value. The weights of step ``t`` use the steps before it:
with ``momentum > 0`` an exponential moving average over steps (``ema = momentum * ema + (1 -
momentum) * step_mean``, started at the first step's mean), with ``momentum = 0`` the previous step's
mean. Until a component has one measured step (the first optimizer step) it keeps its fixed weight. The
moving averages are buffers, so they checkpoint with ``state_dict``; eval-mode forwards measure
nothing. A component whose magnitude is below 1e-12 keeps its fixed weight (the ratio would be
meaningless).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

TINY = 1e-12


class LossBalancer(nn.Module):
    """Combine named loss components into one total (see the module docstring)."""

    def __init__(
        self,
        weights: dict[str, float],
        *,
        mode: Literal["fixed", "auto"] = "fixed",
        anchor: str = "logits",
        momentum: float = 0.9,
    ):
        super().__init__()
        if not weights:
            raise ValueError("weights is empty: give at least one component weight")
        if mode not in ("fixed", "auto"):
            raise ValueError(f"mode={mode!r}: choose 'fixed' or 'auto'")
        if mode == "auto" and anchor not in weights:
            raise ValueError(f"anchor={anchor!r} is not among the weights {sorted(weights)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
        for name, w in weights.items():
            if "/" in name or "." in name:
                raise ValueError(f"component name {name!r} must not contain '/' or '.'")
            if not w >= 0:
                raise ValueError(f"weights[{name!r}]={w!r} must be >= 0")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.mode = mode
        self.anchor = anchor
        self.momentum = float(momentum)
        self.names = list(weights)
        self.register_buffer("magnitudes", torch.zeros(len(self.names), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(len(self.names), dtype=torch.bool))
        # The current step's sums: plain tensors, not buffers (DDP broadcasts buffers at every forward).
        self._step_sums = torch.zeros(len(self.names), dtype=torch.float64)
        self._step_counts = torch.zeros(len(self.names), dtype=torch.float64)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, anchor={self.anchor!r}, momentum={self.momentum}, weights={self.weights}"

    def _measure(self, components: dict[str, Tensor]) -> None:
        """Add each component's ``|value|`` to the current optimizer step's sums (training mode, auto only)."""
        if self.mode != "auto" or not self.training:
            return
        idx = torch.tensor([self.names.index(n) for n in components])
        values = torch.stack([components[n].detach().abs().to(torch.float64).reshape(()) for n in components])
        self._step_sums = self._step_sums.to(values.device).index_add(0, idx.to(values.device), values)
        self._step_counts[idx] += 1.0

    def end_step(self, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """Close one optimizer step: fold the mean magnitude of its micro-batches into the moving averages.

        ``reduce_sum`` sums a tensor over all processes (e.g. ``lambda t: accelerator.reduce(t, "sum")``);
        every process must call it at the same step. Without it the step's own sums are used.
        """
        if self.mode != "auto":
            return
        stacked = torch.cat([self._step_sums.to(self.magnitudes.device), self._step_counts.to(self.magnitudes.device)])
        if reduce_sum is not None:
            stacked = reduce_sum(stacked)
        sums, counts = stacked.to(torch.float64).cpu().chunk(2)
        self._step_sums = torch.zeros_like(self._step_sums)
        self._step_counts = torch.zeros_like(self._step_counts)
        measured = counts > 0
        if not bool(measured.any()):
            return
        mean = sums / counts.clamp(min=1.0)
        previous, seen = self.magnitudes.cpu(), self.seen.cpu()
        if self.momentum > 0.0:
            mean = torch.where(seen, self.momentum * previous + (1 - self.momentum) * mean, mean)
        self.magnitudes.copy_(torch.where(measured, mean, previous).to(self.magnitudes.device))
        self.seen.copy_((seen | measured).to(self.seen.device))

    def _magnitudes(self, components: dict[str, Tensor]) -> dict[str, float | None]:
        """Each component's magnitude over the completed optimizer steps (``None`` before its first)."""
        idx = torch.tensor([self.names.index(n) for n in components])
        mags, seen = self.magnitudes[idx].cpu().tolist(), self.seen[idx].cpu().tolist()
        return {n: (m if s else None) for n, m, s in zip(components, mags, seen)}

    def effective_weights(self, components: dict[str, Tensor]) -> dict[str, float]:
        """The weight each component is multiplied by this step."""
        if self.mode == "fixed":
            return {n: self.weights[n] for n in components}
        if self.anchor not in components:
            raise ValueError(f"auto balancing needs the anchor component {self.anchor!r}; got {sorted(components)}")
        mags = self._magnitudes(components)
        anchor = mags[self.anchor]
        out = {}
        for name in components:
            w = self.weights[name]
            if name != self.anchor and anchor is not None and mags[name] is not None and mags[name] > TINY:
                w = w * anchor / mags[name]
            out[name] = w
        return out

    def forward(self, components: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Total loss and, for logging, ``total``, ``<name>/raw``, ``<name>/weighted``, ``<name>/weight``."""
        unknown = [n for n in components if n not in self.weights]
        if unknown:
            raise ValueError(f"loss components {unknown} have no weight; known: {sorted(self.weights)}")
        if not components:
            raise ValueError("no loss components given")
        weights = self.effective_weights(components)
        self._measure(components)
        total = sum(weights[n] * components[n] for n in components)
        names = list(components)
        raw = torch.stack([components[n].detach().float().reshape(()) for n in names] + [total.detach().float().reshape(())])
        values = raw.tolist()  # one device sync for all values
        log = {"total": values[-1]}
        for name, value in zip(names, values):
            log[f"{name}/raw"] = value
            log[f"{name}/weighted"] = weights[name] * value
            log[f"{name}/weight"] = weights[name]
        return total, log
