"""Logit distillation against a cached sparse teacher: its top-k log-probabilities and the rest mass.

:class:`CachedLogitKDLoss` takes the student's final hidden states and lm_head weight, and per position the
teacher's top-k token ids, their log-probabilities (temperature 1) and ``log(1 - sum of top-k probs)`` (the
"rest" bucket; -inf when the top-k hold all the mass). The loss is the forward KL from the teacher's
truncated distribution (top-k tokens plus the rest) to the student's distribution over the same buckets,
the student's rest being its total probability outside the teacher's top-k:

    KL = sum_i p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

It is the ``forward_kl`` of :class:`~minidistill.distill.losses.logits.LogitKDLoss` with ``top_k=k`` on the
teacher's logits, and at ``k = vocab`` the full-vocabulary forward KL. Like
:class:`~minidistill.distill.losses.fused.FusedLogitKDLoss` the student logits are formed ``chunk_tokens``
positions at a time (float32) and turned into hidden / weight gradients at once, so no positions x vocabulary
logits exist for the batch. ``vocab_size`` masks student head rows past the tokenizer's ids (-inf).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import precomputed_grads


def cached_kl_summed(logits_s: Tensor, top_idx: Tensor, top_lp: Tensor, rest_lp: Tensor, mask: Tensor | None,
                     vocab_size: int | None, labels: Tensor | None = None, ce_weight: float = 0.0) -> Tensor:
    """Summed forward KL of rows ``logits_s`` [n, V] against cached teacher rows (``mask``: counted rows); with
    ``ce_weight = w`` each row's loss is ``(1 - w) * KL + w * CE`` on its ``labels`` (the next tokens)."""
    width = logits_s.shape[-1]
    tokens = width if vocab_size is None else min(vocab_size, width)
    if tokens < width:
        logits_s = logits_s.masked_fill(torch.arange(width, device=logits_s.device) >= tokens, float("-inf"))
    lse = torch.logsumexp(logits_s, -1)
    top_lp, rest_lp = top_lp.to(logits_s.dtype), rest_lp.to(logits_s.dtype)
    zero = logits_s.new_zeros(())
    lq_top = logits_s.gather(-1, top_idx) - lse.unsqueeze(-1)
    finite_top = torch.isfinite(top_lp)
    safe_top = torch.where(finite_top, top_lp, zero)
    per_token = torch.where(finite_top, safe_top.exp() * (safe_top - lq_top), zero).sum(-1)
    if tokens > top_idx.shape[-1]:  # the student has a rest bucket
        lq_rest = torch.logsumexp(logits_s.scatter(-1, top_idx, float("-inf")), -1) - lse
        has_rest = torch.isfinite(rest_lp)
        safe_rest = torch.where(has_rest, rest_lp, zero)
        per_token = per_token + torch.where(has_rest, safe_rest.exp() * (safe_rest - lq_rest), zero)
    if ce_weight > 0:
        safe = labels.clamp(min=0).unsqueeze(-1)  # ignored rows are masked below
        per_token = (1 - ce_weight) * per_token + ce_weight * (lse - logits_s.gather(-1, safe).squeeze(-1))
    if mask is not None:
        per_token = torch.where(mask, per_token, zero)
    return per_token.sum()


class _CachedLinearKD(torch.autograd.Function):
    """Chunked lm_head + cached-teacher KL; saves only the input gradients."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, top_idx: Tensor, top_lp: Tensor,
                rest_lp: Tensor, mask: Tensor | None, denominator: float, chunk_tokens: int, vocab_size: int | None,
                labels: Tensor | None, ce_weight: float) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        w = weight.detach() if weight.dtype in (torch.float32, torch.float64) else weight.detach().float()
        b = None if bias is None else bias.detach().to(w.dtype)
        grad_h = torch.empty(hidden.shape, dtype=w.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros_like(b) if need_b else None
        total = torch.zeros((), dtype=w.dtype, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                stop = min(start + chunk_tokens, hidden.shape[0])
                h = hidden[start:stop].detach().to(w.dtype)
                rows = (top_idx[start:stop].long(), top_lp[start:stop], rest_lp[start:stop],
                        None if mask is None else mask[start:stop], vocab_size,
                        None if labels is None else labels[start:stop], ce_weight)
                with torch.no_grad():
                    logits = F.linear(h, w, b)
                if not (need_h or need_w or need_b):
                    with torch.no_grad():
                        total += cached_kl_summed(logits, *rows) / denominator
                    continue
                logits.requires_grad_(True)
                with torch.enable_grad():
                    loss = cached_kl_summed(logits, *rows) / denominator
                    (g,) = torch.autograd.grad(loss, logits)
                total += loss.detach()
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[start:stop])
                if grad_w is not None:
                    grad_w.addmm_(g.t(), h)
                if grad_b is not None:
                    grad_b += g.sum(0)
        ctx.has_grads = (need_h, need_w, need_b)
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        return (*precomputed_grads(ctx, grad_output), None, None, None, None, None, None, None, None, None)


class CachedLogitKDLoss(nn.Module):
    """Forward KL of a cached top-k teacher (plus its rest bucket) to the student (see the module docstring).

    ``ce_weight = w``: the per-position loss is ``(1 - w) * KL + w * CE`` with the data's next tokens (``labels``).
    """

    def __init__(self, *, chunk_tokens: int = 256, ignore_index: int = -100, reduction: Literal["mean", "sum"] = "mean",
                 vocab_size: int | None = None, ce_weight: float = 0.0):
        super().__init__()
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight={ce_weight!r} must be in [0, 1]")
        self.ce_weight = float(ce_weight)
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens!r} must be >= 1")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'sum'")
        self.chunk_tokens, self.ignore_index, self.reduction, self.vocab_size = int(chunk_tokens), ignore_index, reduction, vocab_size

    def extra_repr(self) -> str:
        return f"chunk_tokens={self.chunk_tokens}, reduction={self.reduction!r}, vocab_size={self.vocab_size}"

    def forward(self, student_hidden: Tensor, student_head_weight: Tensor, top_indices: Tensor, top_logprobs: Tensor,
                rest_logprob: Tensor, labels: Tensor | None = None, *, student_head_bias: Tensor | None = None) -> Tensor:
        """Loss for hidden states [..., D], head weight [V, D], ``top_indices`` / ``top_logprobs`` [..., k] and
        ``rest_logprob`` [...]; ``labels`` [...] masks ``ignore_index`` positions and, with ``ce_weight``, are the
        cross-entropy targets."""
        d = student_hidden.shape[-1]
        if student_head_weight.dim() != 2 or student_head_weight.shape[1] != d:
            raise ValueError(f"student head weight {tuple(student_head_weight.shape)} does not take hidden size {d}")
        positions = student_hidden.shape[:-1]
        if top_indices.shape[:-1] != positions or top_logprobs.shape != top_indices.shape or rest_logprob.shape != positions:
            raise ValueError(
                f"cached teacher rows (indices {tuple(top_indices.shape)}, log-probs {tuple(top_logprobs.shape)}, rest "
                f"{tuple(rest_logprob.shape)}) do not match the student positions {tuple(positions)}"
            )
        rows = min(student_head_weight.shape[0], self.vocab_size or student_head_weight.shape[0])
        if top_indices.shape[-1] > rows:
            raise ValueError(f"the cache holds k={top_indices.shape[-1]} tokens per position but the vocabulary has {rows}")
        k = top_indices.shape[-1]
        if self.ce_weight > 0 and labels is None:
            raise ValueError(f"ce_weight={self.ce_weight} needs labels; pass labels or set ce_weight=0")
        mask = None if labels is None else (labels.reshape(-1) != self.ignore_index)
        count = positions.numel() if mask is None else int(mask.sum())
        denominator = 1.0 if self.reduction == "sum" else float(max(count, 1))
        return _CachedLinearKD.apply(
            student_hidden.reshape(-1, d), student_head_weight, student_head_bias, top_indices.reshape(-1, k),
            top_logprobs.reshape(-1, k), rest_logprob.reshape(-1), mask, denominator, self.chunk_tokens, self.vocab_size,
            None if labels is None else labels.reshape(-1).long(), self.ce_weight,
        )
