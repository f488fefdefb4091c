"""Held-out evaluation during training: student NLL / perplexity and top-1 agreement with the teacher.

Works from final hidden states and head weights (:class:`ModelFeatures`), projecting ``chunk_tokens``
positions to the vocabulary at a time, so no batch x sequence x vocabulary logits exist. Positions and
chunking follow :func:`minidistill.evaluation.perplexity.heldout_loss`, so the numbers agree with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..evaluation.perplexity import iter_token_chunks


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias).float()[..., :vocab_size]


def _chunks(features, labels: torch.Tensor, chunk_tokens: int, vocab_size: int | None):
    """(logits or, for an ensemble, mixture log-probs [n, V], labels [n]) chunk by chunk."""
    members = getattr(features, "members", None)
    if members is None:
        for h, y in iter_token_chunks(features.final_hidden[:, :-1], labels, chunk_tokens):
            yield _logits(h, features.head_weight, features.head_bias, vocab_size), y
        return
    from ..distill.losses.fused import mixture_logprobs

    streams = [iter_token_chunks(m.final_hidden[:, :-1], labels, chunk_tokens) for m in members]
    for parts in zip(*streams):
        logits = [_logits(h, m.head_weight, m.head_bias, vocab_size) for (h, _), m in zip(parts, members)]
        yield mixture_logprobs(logits, None), parts[0][1]


@torch.no_grad()
def heldout_stats(features, input_ids: torch.Tensor, *, chunk_tokens: int, reference=None,
                  vocab_size: int | None = None) -> torch.Tensor:
    """``[nll_sum, tokens, agreeing_tokens]`` (float64) of next-token prediction on ``input_ids``.

    ``features`` are the evaluated model's; ``reference`` (optional) the teacher's, for top-1 agreement (either may
    be an ensemble's :class:`~minidistill.distill.objective.EnsembleFeatures`: its mean distribution is scored).
    ``vocab_size`` (optional): only the first this many head rows are scored, so padding rows past the
    tokenizer's ids take no probability mass and are never the predicted token.
    """
    labels = input_ids[:, 1:]
    out = torch.zeros(3, dtype=torch.float64, device=input_ids.device)
    ref_chunks = _chunks(reference, labels, chunk_tokens, vocab_size) if reference is not None else None
    for logits, y in _chunks(features, labels, chunk_tokens, vocab_size):
        out[0] += F.cross_entropy(logits, y, reduction="sum").double()
        out[1] += y.numel()
        if ref_chunks is not None:
            ref_logits, _ = next(ref_chunks)
            out[2] += (logits.argmax(-1) == ref_logits.argmax(-1)).sum().double()
    return out


def summarize(stats: torch.Tensor, prefix: str = "heldout", *, agreement: bool = True) -> dict[str, float]:
    """Turn summed ``[nll, tokens, agree]`` into loss, perplexity and agreement fields."""
    nll, tokens, agree = (float(x) for x in stats.tolist())
    if tokens == 0:
        raise ValueError("no held-out tokens were evaluated")
    loss = nll / tokens
    out = {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(loss), f"{prefix}_tokens": int(tokens)}
    if agreement:
        out["top1_agreement"] = agree / tokens
    return out
