"""RelationLoss (MiniLM q-q / k-k / v-v relations) against a naive float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from minidistill.distill.losses.relations import RelationLoss


def naive_relation_kl(student, teacher, relations, num_rel, mask=None):
    """Heads concatenated and re-split by explicit slicing; full T x T relations; loops over rows."""
    total = torch.zeros((), dtype=torch.float64)
    for a, b in relations:
        parts = []
        for feats in (student, teacher):
            xa, xb = feats[a].double(), feats[b].double()
            batch, _, length, _ = xa.shape
            cat_a = torch.cat([xa[:, h] for h in range(xa.shape[1])], dim=-1)  # [B, T, H*hd]
            cat_b = torch.cat([xb[:, h] for h in range(xb.shape[1])], dim=-1)
            d_rel = cat_a.shape[-1] // num_rel
            rel = [
                cat_a[..., r * d_rel:(r + 1) * d_rel] @ cat_b[..., r * d_rel:(r + 1) * d_rel].transpose(-1, -2) / math.sqrt(d_rel)
                for r in range(num_rel)
            ]
            parts.append(rel)
        valid = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool()
        term, rows = torch.zeros((), dtype=torch.float64), 0
        for r in range(num_rel):
            for bi in range(batch):
                for i in range(length):
                    if not valid[bi, i]:
                        continue
                    keys = [j for j in range(i + 1) if valid[bi, j]]
                    p = torch.softmax(parts[1][r][bi, i, keys], -1)
                    log_q = torch.log_softmax(parts[0][r][bi, i, keys], -1)
                    term = term + (p * (p.log() - log_q)).sum()
                    rows += 1
        total = total + term / rows
    return total


def _qkv(batch, heads, kv, length, dim, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (batch, heads, length, dim), "k": (batch, kv, length, dim), "v": (batch, kv, length, dim)}
    return {p: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(requires_grad) for p, s in shapes.items()}


@pytest.mark.parametrize("chunk", [4, 64])
def test_matches_reference_with_different_head_counts_and_widths(chunk):
    # Student: 3 heads x 8 (GQA, 1 KV head); teacher: 6 heads x 16 (3 KV heads). 2 relation heads.
    student = _qkv(2, 3, 1, 10, 8, seed=0, requires_grad=True)
    teacher = _qkv(2, 6, 3, 10, 16, seed=1)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, 7:] = 0
    loss_fn = RelationLoss(2, ("qq", "kk", "vv"), chunk_queries=chunk)
    loss = loss_fn(student, teacher, attention_mask=mask)
    ref = naive_relation_kl(student, teacher, ("qq", "kk", "vv"), 2, mask)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, [student[p] for p in "qkv"])
    ref_grads = torch.autograd.grad(ref, [student[p] for p in "qkv"])
    for got, want in zip(grads, ref_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_cross_relation_and_single_relation_head():
    student = _qkv(1, 4, 4, 7, 4, seed=2, requires_grad=True)
    teacher = _qkv(1, 2, 2, 7, 8, seed=3)
    loss = RelationLoss(1, ("qk",), chunk_queries=3)(student, teacher)
    ref = naive_relation_kl(student, teacher, ("qk",), 1)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_equal_features_give_zero():
    feats = _qkv(2, 4, 2, 6, 8, seed=4)
    assert RelationLoss(4)(feats, {p: x.clone() for p, x in feats.items()}).abs().item() < 1e-12


def test_bad_inputs_raise_clear_errors():
    student = _qkv(1, 4, 2, 6, 8, seed=0)
    teacher = _qkv(1, 4, 2, 6, 8, seed=1)
    with pytest.raises(ValueError, match="divisible by num_relation_heads"):
        RelationLoss(3)(student, teacher)
    with pytest.raises(ValueError, match="different widths"):
        RelationLoss(2, ("qk",))(student, teacher)
    with pytest.raises(ValueError, match="lack"):
        RelationLoss(2)({"q": student["q"]}, teacher)
    with pytest.raises(ValueError, match="two letters"):
        RelationLoss(2, ("qx",))
    with pytest.raises(ValueError, match="expected"):
        RelationLoss(2, ("qq",))(student, {"q": teacher["q"][:, :, :5]})
