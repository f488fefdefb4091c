"""CachedLogitKDLoss against a naive float64 reference, and against the dense fused forward KL at k = vocab."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minidistill.distill.losses.cached import CachedLogitKDLoss
from minidistill.distill.losses.fused import FusedLogitKDLoss

N, V, D_S, D_T = 31, 47, 12, 20


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, D_S, generator=g, dtype=torch.float64)
    w_s = torch.randn(V, D_S, generator=g, dtype=torch.float64) / D_S**0.5
    b_s = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    h_t = torch.randn(N, D_T, generator=g, dtype=torch.float64)
    w_t = 1.5 * torch.randn(V, D_T, generator=g, dtype=torch.float64) / D_T**0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return h_s, w_s, b_s, h_t, w_t, labels


def _teacher_topk(h_t, w_t, k):
    lp = F.log_softmax(h_t @ w_t.T, -1)
    top = lp.topk(k, -1)
    rest = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), -1)
    return top.indices.to(torch.int32), top.values, rest


def _naive(h_s, w_s, b_s, idx, top_lp, rest_lp, labels):
    """Per position, a loop over buckets in float64."""
    lq = F.log_softmax(h_s @ w_s.T + b_s, -1)
    total, count = h_s.new_zeros(()), 0
    for n in range(h_s.shape[0]):
        if labels is not None and labels[n] == -100:
            continue
        count += 1
        kept = idx[n].long()
        for j in range(kept.numel()):
            total = total + top_lp[n, j].exp() * (top_lp[n, j] - lq[n, kept[j]])
        others = torch.ones(lq.shape[-1], dtype=torch.bool)
        others[kept] = False
        if others.any():
            lq_rest = torch.logsumexp(lq[n][others], 0)
            total = total + rest_lp[n].exp() * (rest_lp[n] - lq_rest)
    return total / count


@pytest.mark.parametrize("k,chunk,use_labels", [(1, 4, True), (5, 8, True), (20, 1000, False)])
def test_matches_naive_float64(k, chunk, use_labels):
    h_s, w_s, b_s, h_t, w_t, labels = _inputs(seed=k)
    labels = labels if use_labels else None
    idx, top_lp, rest = _teacher_topk(h_t, w_t, k)
    ref_h, ref_w, ref_b = (t.clone().requires_grad_(True) for t in (h_s, w_s, b_s))
    want = _naive(ref_h, ref_w, ref_b, idx, top_lp, rest, labels)
    want_g = torch.autograd.grad(want, [ref_h, ref_w, ref_b])
    h, w, b = (t.float().requires_grad_(True) for t in (h_s, w_s, b_s))
    got = CachedLogitKDLoss(chunk_tokens=chunk)(h, w, idx, top_lp.half(), rest.half(), labels, student_head_bias=b)
    got_g = torch.autograd.grad(got, [h, w, b])
    # Cached values in float16: the reference uses the same rounded values.
    want16 = _naive(h_s, w_s, b_s, idx, top_lp.half().double(), rest.half().double(), labels)
    torch.testing.assert_close(got.double(), want16, rtol=1e-5, atol=1e-6)
    assert abs(float(want16) - float(want.detach())) < 5e-3
    for g, r in zip(got_g, want_g):
        torch.testing.assert_close(g.double(), r, rtol=2e-3, atol=2e-4)


def test_full_k_equals_the_dense_fused_forward_kl():
    h_s, w_s, _, h_t, w_t, labels = _inputs(seed=3)
    idx, top_lp, rest = _teacher_topk(h_t, w_t, V)
    assert torch.isinf(rest).all()
    h, w = h_s.float().requires_grad_(True), w_s.float().requires_grad_(True)
    got = CachedLogitKDLoss(chunk_tokens=6)(h, w, idx, top_lp.float(), rest.float(), labels)
    got_g = torch.autograd.grad(got, [h, w])
    h2, w2 = h_s.float().requires_grad_(True), w_s.float().requires_grad_(True)
    dense = FusedLogitKDLoss("forward_kl", chunk_tokens=6)(h2, w2, h_t.float(), w_t.float(), labels)
    dense_g = torch.autograd.grad(dense, [h2, w2])
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, dense_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # top-k with the rest bucket equals LogitKDLoss(top_k=k) on full teacher logits
    idx, top_lp, rest = _teacher_topk(h_t, w_t, 6)
    sparse = FusedLogitKDLoss("forward_kl", top_k=6)(h_s.float(), w_s.float(), h_t.float(), w_t.float(), labels)
    torch.testing.assert_close(CachedLogitKDLoss()(h_s.float(), w_s.float(), idx, top_lp.float(), rest.float(), labels),
                               sparse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ce_weight", [0.5, 1.0])
def test_hard_labels_mix_like_the_dense_loss(ce_weight):
    """ce_weight: (1 - w) * KL + w * CE, equal to the dense fused loss at k = vocab (values and gradients), and to
    KL and CE written out in float64 at k < vocab."""
    h_s, w_s, b_s, h_t, w_t, labels = _inputs(seed=5)
    idx, top_lp, rest = _teacher_topk(h_t, w_t, V)
    h, w = h_s.float().requires_grad_(True), w_s.float().requires_grad_(True)
    got = CachedLogitKDLoss(chunk_tokens=7, ce_weight=ce_weight)(h, w, idx, top_lp.float(), rest.float(), labels)
    got_g = torch.autograd.grad(got, [h, w])
    h2, w2 = h_s.float().requires_grad_(True), w_s.float().requires_grad_(True)
    dense = FusedLogitKDLoss("forward_kl", chunk_tokens=7, ce_weight=ce_weight)(h2, w2, h_t.float(), w_t.float(), labels)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, torch.autograd.grad(dense, [h2, w2])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    idx, top_lp, rest = _teacher_topk(h_t, w_t, 4)
    kept = labels != -100
    ce = F.cross_entropy(h_s @ w_s.T + b_s, labels, ignore_index=-100)
    want = (1 - ce_weight) * _naive(h_s, w_s, b_s, idx, top_lp, rest, labels) + ce_weight * ce
    sparse = CachedLogitKDLoss(ce_weight=ce_weight)(h_s, w_s, idx, top_lp, rest, labels, student_head_bias=b_s)
    torch.testing.assert_close(sparse, want, rtol=1e-7, atol=1e-9)
    assert kept.sum() < labels.numel()  # ignored positions count in neither part
    with pytest.raises(ValueError, match="needs labels"):
        CachedLogitKDLoss(ce_weight=0.5)(h_s, w_s, idx, top_lp, rest)


def test_shapes_and_k_are_checked():
    h_s, w_s, _, h_t, w_t, _ = _inputs()
    idx, top_lp, rest = _teacher_topk(h_t, w_t, 4)
    with pytest.raises(ValueError, match="do not match the student positions"):
        CachedLogitKDLoss()(h_s[:-1], w_s, idx, top_lp, rest)
    with pytest.raises(ValueError, match="k=4 tokens per position but the vocabulary has 3"):
        CachedLogitKDLoss(vocab_size=3)(h_s, w_s, idx, top_lp, rest)
