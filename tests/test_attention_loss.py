"""AttentionTransferLoss against a naive float64 reference built from full attention maps."""

from __future__ import annotations

import pytest
import torch

from minidistill.distill.losses.attention import AttentionTransferLoss


def naive_attention_kl(sq, sk, tq, tk, s_scale, t_scale, s_heads, t_heads, mask=None, window=None, reduction="mean"):
    """Explicit loops over batch, head pairs and query positions; full maps in float64."""
    sq, sk, tq, tk = (x.double() for x in (sq, sk, tq, tk))
    batch, hs, length, _ = sq.shape
    ht = tq.shape[1]
    gs, gt = hs // sk.shape[1], ht // tk.shape[1]
    mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool()
    total, rows = torch.zeros((), dtype=torch.float64), 0
    for b in range(batch):
        for hs_i, ht_i in zip(s_heads, t_heads):
            s_map = sq[b, hs_i] @ sk[b, hs_i // gs].T * s_scale
            t_map = tq[b, ht_i] @ tk[b, ht_i // gt].T * t_scale
            for i in range(length):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(i + 1) if mask[b, j] and (window is None or i - j < window)]
                p = torch.softmax(t_map[i, keys], -1)
                log_q = torch.log_softmax(s_map[i, keys], -1)
                total = total + (p * (p.log() - log_q)).sum()
                rows += 1
    return total / rows if reduction == "mean" else total


def _features(batch, heads, kv, length, dim, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv, length, dim, generator=g, dtype=torch.float64)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


@pytest.mark.parametrize("s_ratio, t_ratio", [(1, 1), (2, 1), (4, 2), (1, 4)])
@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_matches_naive_reference_values_and_gradients(s_ratio, t_ratio, chunk):
    length = 13
    sq, sk = _features(2, 4, 4 // s_ratio, length, 8, seed=0, requires_grad=True)
    tq, tk = _features(2, 8, 8 // t_ratio, length, 16, seed=1)
    s_heads, t_heads = [0, 2, 3], [7, 1, 4]
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    kw = dict(student_scaling=0.3, teacher_scaling=0.25, student_heads=s_heads, teacher_heads=t_heads, attention_mask=mask)
    loss = AttentionTransferLoss(chunk_queries=chunk)(sq, sk, tq, tk, **kw)
    ref = naive_attention_kl(sq, sk, tq, tk, 0.3, 0.25, s_heads, t_heads, mask)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, (sq, sk))
    ref_grads = torch.autograd.grad(ref, (sq, sk))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert sum(g.abs().sum() for g in grads) > 0


def test_default_heads_sum_reduction_sliding_window_and_trainable_teacher():
    length = 11
    sq, sk = _features(1, 4, 2, length, 8, seed=2, requires_grad=True)
    tq, tk = _features(1, 4, 1, length, 8, seed=3, requires_grad=True)  # mutual learning: both sides trainable
    loss = AttentionTransferLoss(chunk_queries=4, reduction="sum")(
        sq, sk, tq, tk, student_scaling=0.35, teacher_scaling=0.35, sliding_window=3
    )
    ref = naive_attention_kl(sq, sk, tq, tk, 0.35, 0.35, range(4), range(4), window=3, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, (sq, sk, tq, tk))
    ref_grads = torch.autograd.grad(ref, (sq, sk, tq, tk))
    for got, want in zip(grads, ref_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_identical_maps_give_zero_and_float32_is_accurate():
    q, k = _features(2, 4, 2, 9, 8, seed=4)
    loss = AttentionTransferLoss(chunk_queries=4)(q, k, q.clone(), k.clone(), student_scaling=0.5, teacher_scaling=0.5)
    assert loss.abs().item() < 1e-12
    sq, sk = _features(2, 4, 2, 9, 8, seed=5)
    got = AttentionTransferLoss(chunk_queries=4)(sq.float(), sk.float(), q.float(), k.float(), student_scaling=0.5, teacher_scaling=0.5)
    ref = naive_attention_kl(sq, sk, q, k, 0.5, 0.5, range(4), range(4))
    assert got.dtype == torch.float32 and ref.item() > 0.01
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_backward_recomputes_chunks_instead_of_saving_maps():
    """With checkpointed chunks, no [.., chunk, T] map is kept for backward."""
    length, chunk = 64, 8
    sq, sk = _features(1, 2, 2, length, 4, seed=6, requires_grad=True)
    tq, tk = _features(1, 2, 2, length, 4, seed=7)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = AttentionTransferLoss(chunk_queries=chunk)(sq, sk, tq, tk, student_scaling=0.5, teacher_scaling=0.5)
    map_like = [s for s in saved if len(s) == 4 and s[-2] == chunk and s[-1] > 4]
    assert not map_like, map_like
    loss.backward()
    assert sq.grad is not None and sq.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    loss = AttentionTransferLoss()
    sq, sk = _features(1, 4, 2, 5, 8, seed=0)
    tq, tk = _features(1, 6, 3, 5, 8, seed=1)
    with pytest.raises(ValueError, match="teacher_heads"):
        loss(sq, sk, tq, tk, student_scaling=1.0, teacher_scaling=1.0)
    with pytest.raises(ValueError, match="outside"):
        loss(sq, sk, tq, tk, student_scaling=1.0, teacher_scaling=1.0, student_heads=[4], teacher_heads=[0])
    with pytest.raises(ValueError, match="attention_mask"):
        loss(sq, sk, sq, sk, student_scaling=1.0, teacher_scaling=1.0, attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="reduction"):
        AttentionTransferLoss(reduction="max")
