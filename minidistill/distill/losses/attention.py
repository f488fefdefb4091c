"""Attention transfer (MobileBERT, arXiv 2004.02984): KL(teacher || student) between attention distributions.

Maps are rebuilt from captured post-RoPE queries and keys, one chunk of query positions at a time. Each
chunk runs under activation checkpointing, so neither the forward nor the backward ever holds the maps of
more than one chunk.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def key_padding_mask(attention_mask: Tensor | None, batch: int, length: int, device) -> Tensor | None:
    """``attention_mask`` ``[B, T]`` (nonzero = real token) as a bool mask, checked against the features' shape."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch, length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected [batch, seq] = {(batch, length)} "
            "(the 2-D padding mask passed to the model)"
        )
    return attention_mask.to(device=device).bool()


def _chunk_kl_sum(
    s_q: Tensor,
    s_k: Tensor,
    t_q: Tensor,
    t_k: Tensor,
    valid: Tensor,
    start: int,
    key_start: int,
    sliding_window: int | None,
    s_scale: float,
    t_scale: float,
) -> Tensor:
    """Sum over real query rows of KL(softmax(t_q t_k^T) || softmax(s_q s_k^T)) on allowed keys.

    ``s_q``/``t_q`` ``[B, n, c, d]`` hold queries ``start .. start + c``, ``s_k``/``t_k`` ``[B, n, K, d]`` keys
    ``key_start .. start + c``; ``valid`` ``[B, T]`` marks real tokens. The mask is built here, so that
    checkpointing saves only the inputs.
    """
    stop = start + s_q.shape[2]
    q_pos = torch.arange(start, stop, device=s_q.device)[:, None]
    k_pos = torch.arange(key_start, stop, device=s_q.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    query_valid = valid[:, start:stop]  # [B, c]
    allowed = allowed[None, None] & valid[:, None, None, key_start:stop]  # [B, 1, c, K]
    # Padded query rows may have no allowed key; open them fully (their weight is zero) to stay finite.
    allowed = allowed | ~query_valid[:, None, :, None]

    dtype = torch.promote_types(s_q.dtype, torch.float32)
    s_logits = torch.matmul(s_q.to(dtype), s_k.to(dtype).transpose(-1, -2)) * s_scale
    t_logits = torch.matmul(t_q.to(dtype), t_k.to(dtype).transpose(-1, -2)) * t_scale
    neg_inf = torch.finfo(dtype).min
    s_logp = torch.log_softmax(s_logits.masked_fill(~allowed, neg_inf), dim=-1)
    t_logp = torch.log_softmax(t_logits.masked_fill(~allowed, neg_inf), dim=-1)
    kl = torch.where(allowed, t_logp.exp() * (t_logp - s_logp), 0.0).sum(-1)  # [B, n, c]
    return (kl * query_valid[:, None, :].to(dtype)).sum()


def chunked_softmax_kl(
    student_q: Tensor,
    student_k: Tensor,
    teacher_q: Tensor,
    teacher_k: Tensor,
    *,
    student_scaling: float,
    teacher_scaling: float,
    padding: Tensor | None = None,
    sliding_window: int | None = None,
    chunk_queries: int = 256,
) -> tuple[Tensor, Tensor]:
    """Summed causal row-softmax KL(teacher || student) over heads and real query positions, and the row count.

    All four tensors are ``[B, n, T, d]`` with matching ``B, n, T`` (``d`` may differ between student and
    teacher). Row ``(b, h, i)`` is the distribution over keys ``j <= i`` (``i - j < sliding_window`` when
    set) that are real tokens under ``padding`` (``[B, T]`` bool); padded query rows are left out.
    """
    batch, heads, length, _ = student_q.shape
    for name, x in (("student_k", student_k), ("teacher_q", teacher_q), ("teacher_k", teacher_k)):
        if x.shape[:3] != (batch, heads, length):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [{batch}, {heads}, {length}, d]")
    device = student_q.device
    valid = padding if padding is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
    rows = valid.sum() * heads
    # Both sides may be trainable (mutual learning); checkpoint whenever any input needs a gradient.
    use_checkpoint = torch.is_grad_enabled() and any(x.requires_grad for x in (student_q, student_k, teacher_q, teacher_k))
    total = student_q.new_zeros((), dtype=torch.promote_types(student_q.dtype, torch.float32))
    for start in range(0, length, chunk_queries):
        stop = min(start + chunk_queries, length)
        key_start = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        args = (
            student_q[:, :, start:stop],
            student_k[:, :, key_start:stop],
            teacher_q[:, :, start:stop],
            teacher_k[:, :, key_start:stop],
            valid,
            start,
            key_start,
            sliding_window,
            student_scaling,
            teacher_scaling,
        )
        if use_checkpoint:
            total = total + checkpoint(_chunk_kl_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_kl_sum(*args)
    return total, rows


def _select_heads(q: Tensor, k: Tensor, heads: list[int] | None, who: str) -> tuple[Tensor, Tensor]:
    """Queries of ``heads`` and, per selected head, the keys of its KV group (GQA: kv head = h // (H // KV))."""
    num_heads, num_kv = q.shape[1], k.shape[1]
    if num_heads % num_kv:
        raise ValueError(f"{who}: {num_heads} query heads are not a multiple of {num_kv} key heads")
    group = num_heads // num_kv
    if heads is None:
        heads = list(range(num_heads))
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad:
        raise ValueError(f"{who}_heads has {bad}, outside the {num_heads} query heads")
    if heads == list(range(num_heads)):
        q_sel = q
    else:
        q_sel = q.index_select(1, torch.tensor(heads, device=q.device))
    kv = [h // group for h in heads]
    if kv == list(range(num_kv)):
        k_sel = k
    else:
        k_sel = k.index_select(1, torch.tensor(kv, device=k.device))
    return q_sel, k_sel


class AttentionTransferLoss(nn.Module):
    """KL(teacher || student) between per-head causal attention distributions, averaged over heads and positions.

    Student head ``student_heads[i]`` is compared with teacher head ``teacher_heads[i]`` (default: all heads,
    in order; the counts must then match). Padded query positions (``attention_mask`` ``[B, T]``, 0 = pad)
    are left out and padded keys masked. ``sliding_window`` applies the model's sliding-window mask
    (:class:`minidistill.distill.capture.AttentionLayout`). ``reduction="mean"`` averages over compared
    heads and real query positions of the batch; ``"sum"`` sums.
    """

    def __init__(self, *, chunk_queries: int = 256, reduction: Literal["mean", "sum"] = "mean"):
        super().__init__()
        if chunk_queries < 1:
            raise ValueError(f"chunk_queries must be >= 1, got {chunk_queries}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.chunk_queries = chunk_queries
        self.reduction = reduction

    def forward(
        self,
        student_q: Tensor,
        student_k: Tensor,
        teacher_q: Tensor,
        teacher_k: Tensor,
        *,
        student_scaling: float,
        teacher_scaling: float,
        student_heads: list[int] | None = None,
        teacher_heads: list[int] | None = None,
        attention_mask: Tensor | None = None,
        sliding_window: int | None = None,
    ) -> Tensor:
        """Loss for one pair of layers; q ``[B, H, T, hd]``, k ``[B, KV, T, hd]`` for student and teacher."""
        if student_q.dim() != 4 or teacher_q.dim() != 4 or student_k.dim() != 4 or teacher_k.dim() != 4:
            raise ValueError("queries must be [B, H, T, hd] and keys [B, KV, T, hd]")
        if student_q.shape[0] != teacher_q.shape[0] or student_q.shape[2] != teacher_q.shape[2]:
            raise ValueError(
                f"student {tuple(student_q.shape)} and teacher {tuple(teacher_q.shape)} queries differ in batch or length"
            )
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        s_q, s_k = _select_heads(student_q, student_k, student_heads, "student")
        t_q, t_k = _select_heads(teacher_q, teacher_k, teacher_heads, "teacher")
        if s_q.shape[1] != t_q.shape[1]:
            raise ValueError(
                f"comparing {s_q.shape[1]} student heads with {t_q.shape[1]} teacher heads; pass student_heads / "
                "teacher_heads of equal length (e.g. teacher_heads=pair_heads(prune_map, layer))"
            )
        batch, _, length, _ = s_q.shape
        padding = key_padding_mask(attention_mask, batch, length, s_q.device)
        total, rows = chunked_softmax_kl(
            s_q,
            s_k,
            t_q,
            t_k,
            student_scaling=student_scaling,
            teacher_scaling=teacher_scaling,
            padding=padding,
            sliding_window=sliding_window,
            chunk_queries=self.chunk_queries,
        )
        if self.reduction == "sum":
            return total
        return total / rows.clamp_min(1)

