"""Held-out perplexity of a causal LM over packed token blocks, without full-batch vocabulary logits."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter


def iter_token_chunks(hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
    """Yield (hidden rows, labels) chunks of at most ``chunk_tokens`` flattened positions."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    for i in range(0, h.shape[0], chunk_tokens):
        yield h[i : i + chunk_tokens], y[i : i + chunk_tokens]


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    chunk_tokens: int = 2048,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean next-token NLL (nats), perplexity and token count over batches of ``input_ids``.

    Runs the backbone once per batch and projects hidden states to the vocabulary ``chunk_tokens``
    positions at a time, so at most ``chunk_tokens x vocab`` logits exist at once.
    """
    adapter = get_adapter(model)
    backbone = model.get_submodule(adapter.backbone)
    head = model.get_submodule(adapter.lm_head)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for input_ids in batches:
        input_ids = input_ids.to(device)
        hidden = backbone(input_ids=input_ids).last_hidden_state[:, :-1]
        labels = input_ids[:, 1:]
        for h, y in iter_token_chunks(hidden, labels, chunk_tokens):
            logits = head(h).float()
            total += F.cross_entropy(logits, y, reduction="sum").item()
            count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
