"""Self-attention relation transfer (MiniLM v1 arXiv 2002.10957, v2 arXiv 2012.15828), causal.

For a relation ``"xy"`` (``x, y`` in ``q``, ``k``, ``v``): all heads of ``x`` (resp. ``y``) are concatenated to width
``heads * hd`` and split into ``num_relation_heads`` relation heads of width ``d_rel``; the relation of head ``r``
is ``softmax(x_r y_r^T / sqrt(d_rel))`` over causal positions, a ``T x T`` matrix whatever the widths, so a
student and a teacher with different head counts or head sizes can be compared. The loss is
KL(teacher || student) averaged over relation heads and real query positions, summed over relations.
Computed chunk by chunk over query positions, like :class:`AttentionTransferLoss`.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from minidistill.distill.losses.attention import chunked_softmax_kl, key_padding_mask

_PARTS = ("q", "k", "v")


def split_relation_heads(x: Tensor, num_relation_heads: int, who: str) -> Tensor:
    """``[B, H, T, hd]`` -> ``[B, R, T, H * hd / R]``: heads concatenated, then split into ``R`` relation heads."""
    batch, heads, length, head_dim = x.shape
    width = heads * head_dim
    if width % num_relation_heads:
        raise ValueError(
            f"{who} has width {heads} x {head_dim} = {width}, not divisible by num_relation_heads={num_relation_heads}"
        )
    x = x.transpose(1, 2).reshape(batch, length, num_relation_heads, width // num_relation_heads)
    return x.transpose(1, 2)


class RelationLoss(nn.Module):
    """MiniLM relation transfer for the ``relations`` listed (``"qq"``, ``"kk"``, ``"vv"``, or pairs like ``"qk"``).

    ``forward(student, teacher, attention_mask)`` takes dicts with keys ``"q"``, ``"k"``, ``"v"`` (those the
    relations use) mapping to ``[B, heads, T, hd]``; ``attention_mask`` ``[B, T]`` (0 = pad) masks padded keys
    and leaves padded query positions out.
    """

    def __init__(self, num_relation_heads: int, relations: tuple[str, ...] = ("qq", "kk", "vv"), *, chunk_queries: int = 256):
        super().__init__()
        if num_relation_heads < 1:
            raise ValueError(f"num_relation_heads must be >= 1, got {num_relation_heads}")
        if not relations:
            raise ValueError("relations is empty; use e.g. ('qq', 'kk', 'vv')")
        for rel in relations:
            if len(rel) != 2 or any(p not in _PARTS for p in rel):
                raise ValueError(f"relation {rel!r} must be two letters of q, k, v (e.g. 'qq', 'kk', 'vv')")
        if chunk_queries < 1:
            raise ValueError(f"chunk_queries must be >= 1, got {chunk_queries}")
        self.num_relation_heads = num_relation_heads
        self.relations = tuple(relations)
        self.chunk_queries = chunk_queries

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor], attention_mask: Tensor | None = None) -> Tensor:
        needed = sorted({p for rel in self.relations for p in rel})
        for who, feats in (("student", student), ("teacher", teacher)):
            missing = [p for p in needed if p not in feats]
            if missing:
                raise ValueError(f"{who} features lack {missing}; relations {self.relations} need {needed}")
        reference = student[needed[0]]
        batch, length = reference.shape[0], reference.shape[2]
        for who, feats in (("student", student), ("teacher", teacher)):
            for p in needed:
                x = feats[p]
                if x.dim() != 4 or x.shape[0] != batch or x.shape[2] != length:
                    raise ValueError(f"{who}[{p!r}] has shape {tuple(x.shape)}; expected [{batch}, heads, {length}, hd]")
        padding = key_padding_mask(attention_mask, batch, length, reference.device)
        split = {
            (who, p): split_relation_heads(feats[p], self.num_relation_heads, f"{who}[{p!r}]")
            for who, feats in (("student", student), ("teacher", teacher))
            for p in needed
        }
        loss = None
        for a, b in self.relations:
            s_a, s_b = split[("student", a)], split[("student", b)]
            t_a, t_b = split[("teacher", a)], split[("teacher", b)]
            if s_a.shape[-1] != s_b.shape[-1] or t_a.shape[-1] != t_b.shape[-1]:
                raise ValueError(f"relation {a + b!r} pairs features of different widths (GQA keys/values vs queries)")
            total, rows = chunked_softmax_kl(
                s_a,
                s_b,
                t_a,
                t_b,
                student_scaling=1.0 / math.sqrt(s_a.shape[-1]),
                teacher_scaling=1.0 / math.sqrt(t_a.shape[-1]),
                padding=padding,
                chunk_queries=self.chunk_queries,
            )
            term = total / rows.clamp_min(1)
            loss = term if loss is None else loss + term
        return loss
