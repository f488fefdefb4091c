"""Re-fit-aware ranking of MLP neurons: greedy elimination on the Gram matrix of the down_proj inputs.

Removing the neurons ``R`` of a layer and re-fitting ``down_proj`` on the kept ones ``K`` by least
squares (teacher mode of :mod:`.reconstruct`) leaves the output error

    E(R) = tr(W_R (H^-1)_RR^-1 W_R^T),   H = X^T X + lam I,

where ``X`` holds the down_proj inputs of the calibration tokens and ``W`` the current (already
compensated) weights: the optimal brain surgeon cost of a group of columns, the least
``||X (W' - W)^T||^2 + lam ||W' - W||^2`` over weights ``W'`` that are zero on ``R`` (the damping
penalises the change of the kept weights, as in OBS / SparseGPT). Ranking neurons by their
activation ignores that a kept neuron can take over a removed, correlated one; this ranking does not.
Neurons are removed greedily in small blocks (``1 / block_fraction`` of the remaining ones at a time),
each removal compensating the remaining columns and down-dating ``H^-1``, so the kept sets for every
width are nested and one elimination order serves every candidate width.
"""

from __future__ import annotations

import torch


def refit_elimination_scores(
    gram: torch.Tensor, weight: torch.Tensor, *, damping: float = 1e-2, block_fraction: int = 32
) -> torch.Tensor:
    """Per-column keep scores (higher: removed later) from greedy OBS elimination; float64 on the CPU.

    ``gram``: [n, n] ``X^T X`` of the layer's down_proj inputs; ``weight``: [out, n] down_proj weight;
    ``damping``: ridge strength relative to the mean diagonal (as in the re-fit); ``block_fraction``:
    each step removes ``max(1, remaining // block_fraction)`` columns. Scores are the removal step,
    ordered by cost within a step; the last column standing scores highest.
    """
    n = gram.shape[0]
    if gram.shape != (n, n) or weight.shape[-1] != n:
        raise ValueError(f"gram {tuple(gram.shape)} and weight {tuple(weight.shape)} do not match")
    h = gram.detach().to("cpu", torch.float64)
    lam = damping * h.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    h_inv = torch.linalg.inv(h + lam * torch.eye(n, dtype=torch.float64))
    w = weight.detach().to("cpu", torch.float64).clone()
    alive = torch.arange(n)
    scores = torch.empty(n, dtype=torch.float64)
    step = 0
    while len(alive) > 1:
        cost = w.pow(2).sum(0) / h_inv.diagonal()
        m = max(1, len(alive) // block_fraction)
        removed = torch.topk(cost, m, largest=False).indices  # ascending cost
        scores[alive[removed]] = step + torch.arange(m, dtype=torch.float64) / m
        kept = torch.ones(len(alive), dtype=torch.bool)
        kept[removed] = False
        kept = kept.nonzero().squeeze(1)
        # Block OBS: compensate the kept columns, then the inverse of H restricted to them.
        rr_inv = torch.linalg.inv(h_inv[removed][:, removed])
        rk = h_inv[removed][:, kept]
        w = w[:, kept] - w[:, removed] @ rr_inv @ rk
        h_inv = h_inv[kept][:, kept] - rk.T @ rr_inv @ rk
        alive = alive[kept]
        step += 1
    scores[alive] = step
    return scores


__all__ = ["refit_elimination_scores"]
