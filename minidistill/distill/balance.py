"""Weighted sum of named loss components, with fixed weights or weights that follow an anchor loss.

``fixed``: ``total = sum_i w_i * loss_i``.

``auto`` (as in Minitron): every component other than the anchor is rescaled to the anchor's
magnitude, ``weight_i = w_i * |anchor| / |loss_i|`` with the ratio detached (it steers the size of each
term, never its gradient direction); the anchor keeps ``w_anchor``. With ``momentum > 0`` the
magnitudes are exponential moving averages over training steps (``ema = momentum * ema + (1 -
momentum) * |value|``, started at the first value), held in buffers so they checkpoint with
``state_dict``; they are updated only in training mode. A component whose magnitude is below 1e-12
keeps its fixed weight (the ratio would be meaningless). Under data parallelism each rank uses its
own magnitudes.
"""

from __future__ import annotations

from typing import Literal

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

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, anchor={self.anchor!r}, momentum={self.momentum}, weights={self.weights}"

    def _magnitudes(self, components: dict[str, Tensor]) -> dict[str, float]:
        """Current (smoothed) magnitude of each given component; updates the EMA in training mode."""
        names = list(components)
        current = torch.stack([components[n].detach().abs().to(torch.float64).reshape(()) for n in names]).cpu()
        idx = torch.tensor([self.names.index(n) for n in names])
        if self.momentum == 0.0:
            smoothed = current
        else:
            previous, seen = self.magnitudes[idx].cpu(), self.seen[idx].cpu()
            smoothed = torch.where(seen, self.momentum * previous + (1 - self.momentum) * current, current)
        if self.training:
            self.magnitudes[idx] = smoothed.to(self.magnitudes.device)
            self.seen[idx] = True
        return dict(zip(names, smoothed.tolist()))

    def effective_weights(self, components: dict[str, Tensor]) -> dict[str, float]:
        """The weight each component is multiplied by this step."""
        if self.mode == "fixed":
            return {n: self.weights[n] for n in components}
        if self.anchor not in components:
            raise ValueError(f"auto balancing needs the anchor component {self.anchor!r}; got {sorted(components)}")
        mags = self._magnitudes(components)
        out = {}
        for name in components:
            w = self.weights[name]
            if name != self.anchor and mags[name] > TINY:
                w = w * mags[self.anchor] / mags[name]
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
