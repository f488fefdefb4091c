"""FusedLogitKDLoss (chunked lm_head + KD) against the plain loss on full logits, and its memory bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minidistill.distill.losses.fused import FusedLogitKDLoss
from minidistill.distill.losses.logits import DIVERGENCES, LogitKDLoss

N, V, D_S, D_T = 37, 53, 12, 20


def _inputs(seed=0, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, D_S, generator=g).to(dtype).requires_grad_(True)
    w_s = (torch.randn(V, D_S, generator=g) / D_S**0.5).to(dtype).requires_grad_(True)
    b_s = (0.3 * torch.randn(V, generator=g)).to(dtype).requires_grad_(True) if bias else None
    h_t = torch.randn(N, D_T, generator=g).to(dtype)
    w_t = (1.5 * torch.randn(V, D_T, generator=g) / D_T**0.5).to(dtype)
    b_t = (0.3 * torch.randn(V, generator=g)).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return h_s, w_s, b_s, h_t, w_t, b_t, labels


def _plain(kwargs, h_s, w_s, b_s, h_t, w_t, b_t, labels):
    logits_s = F.linear(h_s.float(), w_s.float(), None if b_s is None else b_s.float())
    logits_t = F.linear(h_t.float(), w_t.float(), None if b_t is None else b_t.float())
    return LogitKDLoss(**kwargs)(logits_s, logits_t, labels)


def _fused(kwargs, chunk, h_s, w_s, b_s, h_t, w_t, b_t, labels):
    return FusedLogitKDLoss(**kwargs, chunk_tokens=chunk)(
        h_s, w_s, h_t, w_t, labels, student_head_bias=b_s, teacher_head_bias=b_t
    )


SETTINGS = {
    "plain": dict(),
    "temperature_beta": dict(temperature=2.0, beta=0.3),
    "top_k": dict(top_k=7),
    "top_p_ce": dict(top_p=0.8, ce_weight=0.25),
    "sum": dict(reduction="sum", ce_weight=0.5),
}


@pytest.mark.parametrize("chunk", [10, 1000])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_matches_plain_fp32(divergence, setting, chunk):
    kwargs = dict(SETTINGS[setting], divergence=divergence)
    inputs = _inputs(seed=len(setting) + chunk)
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs
    use_labels = labels if setting != "plain" else None
    plain = _plain(kwargs, h_s, w_s, b_s, h_t, w_t, b_t, use_labels)
    want = torch.autograd.grad(plain, [h_s, w_s, b_s])
    fused = _fused(kwargs, chunk, h_s, w_s, b_s, h_t, w_t, b_t, use_labels)
    got = torch.autograd.grad(fused, [h_s, w_s, b_s])
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_fused_without_bias_and_batched_shapes():
    h_s, w_s, _, h_t, w_t, _, labels = _inputs(seed=1, bias=False)
    kwargs = dict(divergence="jsd", ce_weight=0.1)
    plain = _plain(kwargs, h_s, w_s, None, h_t, w_t, None, labels)
    fused = FusedLogitKDLoss(**kwargs, chunk_tokens=9)(h_s[:36].reshape(4, 9, D_S), w_s, h_t[:36].reshape(4, 9, D_T), w_t,
                                                       labels[:36].reshape(4, 9))
    plain36 = _plain(kwargs, h_s[:36], w_s, None, h_t[:36], w_t, None, labels[:36])
    torch.testing.assert_close(fused, plain36, rtol=1e-5, atol=1e-6)
    assert abs(float(plain36.detach() - plain.detach())) > 0  # the slice is a different problem


def test_non_contiguous_hidden_states():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _inputs(seed=8)
    h_s_t = h_s.detach().t().contiguous().requires_grad_(True)  # [D, N]; .t() below is a non-contiguous view
    kwargs = dict(divergence="forward_kl", top_p=0.9)
    fused = _fused(kwargs, 8, h_s_t.t(), w_s, b_s, h_t, w_t, b_t, labels)
    plain = _plain(kwargs, h_s, w_s, b_s, h_t, w_t, b_t, labels)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(fused, h_s_t)[0].t(), torch.autograd.grad(plain, h_s)[0],
                               rtol=1e-5, atol=1e-6)


def test_backward_scales_by_incoming_gradient_and_accumulates():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _inputs(seed=2)
    kwargs = dict(divergence="reverse_kl", top_k=9)
    (3.0 * _plain(kwargs, h_s, w_s, b_s, h_t, w_t, b_t, labels)).backward()
    want = [p.grad.clone() for p in (h_s, w_s, b_s)]
    for p in (h_s, w_s, b_s):
        p.grad = None
    (3.0 * _fused(kwargs, 6, h_s, w_s, b_s, h_t, w_t, b_t, labels)).backward()
    for p, w in zip((h_s, w_s, b_s), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_frozen_student_head_is_supported():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _inputs(seed=3)
    h_t.requires_grad_(True)
    w_s.requires_grad_(False)
    loss = _fused(dict(divergence="tv"), 16, h_s, w_s, None, h_t, w_t, None, labels)
    loss.backward()
    assert h_t.grad is None and w_s.grad is None
    plain = _plain(dict(divergence="tv"), h_s, w_s, None, h_t.detach(), w_t, None, labels)
    torch.testing.assert_close(h_s.grad, torch.autograd.grad(plain, h_s)[0], rtol=1e-5, atol=1e-6)


def test_no_grad_forward_equals_grad_forward():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _inputs(seed=4)
    with torch.no_grad():
        eval_loss = _fused(dict(divergence="skew_kl"), 7, h_s, w_s, b_s, h_t, w_t, b_t, labels)
    train_loss = _fused(dict(divergence="skew_kl"), 7, h_s, w_s, b_s, h_t, w_t, b_t, labels)
    assert eval_loss.grad_fn is None
    torch.testing.assert_close(eval_loss, train_loss.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bf16_inputs_within_documented_bound(divergence):
    """bf16 inputs: logits in float32 per chunk. Loss within 1e-5 relative of float32 arithmetic on
    the same (bf16-rounded) inputs; gradients come back in bf16, so within bf16 rounding (1e-2)."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _inputs(seed=5, dtype=torch.bfloat16)
    kwargs = dict(divergence=divergence, temperature=1.5, top_k=20, ce_weight=0.2)
    fused = _fused(kwargs, 11, h_s, w_s, b_s, h_t, w_t, b_t, labels)
    got = torch.autograd.grad(fused, [h_s, w_s, b_s])
    as32 = [x.detach().float().requires_grad_(True) for x in (h_s, w_s, b_s)]
    plain = _plain(kwargs, *as32, h_t, w_t, b_t, labels)
    want = torch.autograd.grad(plain, as32)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, rtol=1e-2, atol=1e-2 * float(w.abs().max()))


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by an aten op."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_no_full_logits_are_ever_allocated(divergence):
    n, v, d, chunk = 256, 512, 16, 32
    g = torch.Generator().manual_seed(6)
    h_s = torch.randn(n, d, generator=g, requires_grad=True)
    w_s = torch.randn(v, d, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    module = FusedLogitKDLoss(divergence, top_k=50, ce_weight=0.1, chunk_tokens=chunk)
    with _LargestOutput() as fused_mode:
        loss = module(h_s, w_s, h_t, w_t, labels)
        saved = loss.grad_fn.saved_tensors
        loss.backward()
    # Forward, backward and the tensors kept for backward stay at chunk x (V + 1), far below N x V.
    assert fused_mode.largest <= chunk * (v + 1)
    assert sorted(t.numel() for t in saved) == sorted([n * d, v * d])
    with _LargestOutput() as plain_mode:  # the probe does see full logits in the plain loss
        LogitKDLoss(divergence, top_k=50, ce_weight=0.1)(h_s @ w_s.T, h_t @ w_t.T, labels).backward()
    assert plain_mode.largest >= n * v


def test_bad_shapes_are_rejected():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _inputs()
    module = FusedLogitKDLoss(chunk_tokens=8)
    with pytest.raises(ValueError, match="student head weight"):
        module(h_s, w_t, h_t, w_t)
    with pytest.raises(ValueError, match="vocabulary"):
        module(h_s, w_s, h_t, w_t[:-1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        FusedLogitKDLoss(chunk_tokens=0)


def test_autocast_does_not_lower_logit_precision():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _inputs(seed=7)
    kwargs = dict(divergence="jsd", temperature=2.0)
    reference = _fused(kwargs, 10, h_s, w_s, b_s, h_t, w_t, b_t, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _fused(kwargs, 10, h_s, w_s, b_s, h_t, w_t, b_t, labels)
        bf16_logits = LogitKDLoss(**kwargs)(F.linear(h_s, w_s, b_s), F.linear(h_t, w_t, b_t), labels)
    torch.testing.assert_close(autocast, reference, rtol=1e-6, atol=0)
    assert abs(float(bf16_logits.detach() - reference.detach())) > 1e-5  # what autocast would have done


def test_autocast_head_precision_rounds_only_the_head_matmuls():
    """head_precision="autocast" under bf16 autocast: the loss is the plain loss on logits rounded to bf16 from
    bf16 hidden states and weights, gradients are the float32 ones within bf16 rounding; without autocast the
    option changes nothing."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _inputs(seed=3)
    kwargs = dict(divergence="forward_kl", ce_weight=0.5)
    head = dict(kwargs, head_precision="autocast")

    def rounded(h, w, b):
        return F.linear(h.detach().bfloat16().double(), w.detach().bfloat16().double(), b.detach().bfloat16().double()).bfloat16().float()

    want = LogitKDLoss(**kwargs)(rounded(h_s, w_s, b_s), rounded(h_t, w_t, b_t), labels)
    exact = _plain(kwargs, h_s, w_s, b_s, h_t, w_t, b_t, labels)
    exact_grads = torch.autograd.grad(exact, [h_s, w_s, b_s])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _fused(head, 10, h_s, w_s, b_s, h_t, w_t, b_t, labels)
        kept = _fused(kwargs, 10, h_s, w_s, b_s, h_t, w_t, b_t, labels)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=0)
    assert abs(float(got.detach() - exact.detach())) > 1e-5  # the head really ran in bf16
    torch.testing.assert_close(kept.detach(), exact.detach(), rtol=1e-6, atol=0)  # float32, the default
    grads = torch.autograd.grad(got, [h_s, w_s, b_s])
    for g, e in zip(grads, exact_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-3)
    plain_call = _fused(head, 10, h_s, w_s, b_s, h_t, w_t, b_t, labels)  # no autocast: float32 throughout
    torch.testing.assert_close(plain_call.detach(), exact.detach(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="head_precision"):
        FusedLogitKDLoss(head_precision="bf16")


@pytest.mark.parametrize("vocab_size", [None, 40])
def test_ensemble_teacher_target_is_the_mean_of_the_members_distributions(vocab_size):
    """extra_teachers: KL from the mean of the members' softmaxes (float64, by hand) to the student, and its gradients."""
    g = torch.Generator().manual_seed(11)
    n, v, ds, dts = 19, 47, 8, (10, 6, 12)
    h_s = torch.randn(n, ds, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = (torch.randn(v, ds, generator=g, dtype=torch.float64) / ds**0.5).requires_grad_(True)
    members = [(torch.randn(n, d, generator=g, dtype=torch.float64), 2 * torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5)
               for d in dts]
    tokens = v if vocab_size is None else vocab_size
    probs = torch.stack([torch.softmax((h @ w.T)[:, :tokens], -1) for h, w in members]).mean(0)
    lq = torch.log_softmax((h_s @ w_s.T)[:, :tokens], -1)
    want = (probs * (probs.log() - lq)).sum(-1).mean()
    want_g = torch.autograd.grad(want, [h_s, w_s])
    loss = FusedLogitKDLoss("forward_kl", chunk_tokens=5, vocab_size=vocab_size)
    (h0, w0), *rest = members
    got = loss(h_s, w_s, h0, w0, extra_teachers=[(h, w, None) for h, w in rest])
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    for a, b in zip(torch.autograd.grad(got, [h_s, w_s]), want_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("extra", [{}, {"top_k": 7, "ce_weight": 0.3}], ids=["full", "top_k_ce"])
def test_a_trained_teacher_side_gets_the_plain_losses_gradient(divergence, extra):
    """``detach_teacher=False`` with teacher inputs that require a gradient: the loss and the gradients of both
    sides (hidden, head weight, bias) equal autograd through the plain loss on full float64 logits."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = (t.double() if t.is_floating_point() else t for t in _inputs(seed=3))
    teacher = [t.detach().requires_grad_(True) for t in (h_t, w_t, b_t)]
    inputs = [h_s, w_s, b_s, *teacher]
    lab = labels if extra else None
    fused = FusedLogitKDLoss(divergence, chunk_tokens=8, detach_teacher=False, **extra)(
        h_s, w_s, teacher[0], teacher[1], lab, student_head_bias=b_s, teacher_head_bias=teacher[2])
    got = torch.autograd.grad(fused, inputs)
    plain = LogitKDLoss(divergence, detach_teacher=False, **extra)(
        F.linear(h_s, w_s, b_s), F.linear(teacher[0], teacher[1], teacher[2]), lab)
    want = torch.autograd.grad(plain, inputs)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-10)
    for name, a, b in zip(("h_s", "w_s", "b_s", "h_t", "w_t", "b_t"), got, want):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12), name
    assert all(g.abs().max() > 0 for g in got[3:])  # the teacher side really learns
