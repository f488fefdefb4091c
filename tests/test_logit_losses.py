"""LogitKDLoss against a naive float64 reference, plus invariants of each divergence."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from minidistill.distill.losses.logits import DIVERGENCES, LogitKDLoss

N, V = 7, 11


def _softmax(row: torch.Tensor) -> list[torch.Tensor]:
    m = row.max().detach()
    exps = [torch.exp(row[v] - m) for v in range(row.shape[0])]
    total = sum(exps)
    return [e / total for e in exps]


def _kept_tokens(p_t: list[float], top_k, top_p) -> list[int]:
    order = sorted(range(len(p_t)), key=lambda v: -p_t[v])
    n_keep = len(order)
    if top_p is not None:
        mass, n_keep = 0.0, 0
        for v in order:
            n_keep += 1
            mass += p_t[v]
            if mass >= top_p:
                break
    if top_k is not None:
        n_keep = min(n_keep, top_k)
    return order[:n_keep]


def _divergence(P, Q, divergence, beta):
    """Plain formulas on python lists of scalar tensors."""
    def kl(a, b):
        return sum(x * torch.log(x / y) for x, y in zip(a, b))

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return kl(P, Q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return kl(Q, P)
    if divergence == "jsd":
        M = [beta * x + (1 - beta) * y for x, y in zip(P, Q)]
        return beta * kl(P, M) + (1 - beta) * kl(Q, M)
    if divergence == "tv":
        return 0.5 * sum(torch.abs(x - y) for x, y in zip(P, Q))
    if divergence == "skew_kl":
        return kl(P, [beta * x + (1 - beta) * y for x, y in zip(P, Q)])
    raise AssertionError(divergence)


def reference_loss(s, t, labels=None, *, divergence="forward_kl", temperature=1.0, beta=0.5, top_k=None, top_p=None,
                   ce_weight=0.0, ignore_index=-100, reduction="mean"):
    """Row-by-row float64 reference with explicit formulas."""
    total, count = 0.0, 0
    for n in range(s.shape[0]):
        if labels is not None and int(labels[n]) == ignore_index:
            continue
        p_s = _softmax(s[n] / temperature)
        p_t = [x.detach() for x in _softmax(t[n] / temperature)]
        kept = _kept_tokens([float(x) for x in p_t], top_k, top_p)
        P = [p_t[v] for v in kept]
        Q = [p_s[v] for v in kept]
        dropped = [v for v in range(s.shape[1]) if v not in kept]
        if dropped:
            P.append(sum(p_t[v] for v in dropped))
            Q.append(sum(p_s[v] for v in dropped))
        kd = _divergence(P, Q, divergence, beta) * temperature**2
        loss = (1 - ce_weight) * kd
        if ce_weight > 0:
            loss = loss - ce_weight * torch.log(_softmax(s[n])[int(labels[n])])
        total = total + loss
        count += 1
    if reduction == "mean":
        total = total / max(count, 1)
    return total


def _inputs(seed=0, n=N, v=V, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    labels[4] = -100
    return s, t, labels


SETTINGS = {
    "plain": dict(),
    "temperature": dict(temperature=2.5),
    "beta": dict(beta=0.2),
    "top_k": dict(top_k=4),
    "top_p": dict(top_p=0.7),
    "top_k_and_p": dict(top_k=3, top_p=0.9, temperature=1.5),
    "ce_labels": dict(ce_weight=0.3, use_labels=True),
    "sum_labels": dict(reduction="sum", use_labels=True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference_values_and_gradients(divergence, setting):
    kwargs = dict(SETTINGS[setting])
    use_labels = kwargs.pop("use_labels", False)
    s, t, labels = _inputs(seed=zlib.crc32(f"{divergence}/{setting}".encode()) % 1000)
    labels = labels if use_labels else None
    module = LogitKDLoss(divergence, **kwargs)
    got = module(s, t, labels)
    (g_got,) = torch.autograd.grad(got, s)
    want = reference_loss(s, t, labels, divergence=divergence, **kwargs)
    (g_want,) = torch.autograd.grad(want, s)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    assert float(got.detach()) > 0


@pytest.mark.parametrize("sparse", [dict(), dict(top_k=3), dict(top_p=0.5)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_for_equal_distributions(divergence, sparse):
    s, _, _ = _inputs(seed=3)
    loss = LogitKDLoss(divergence, **sparse)(s, s.detach() + 5.0)  # a constant shift leaves softmax unchanged
    (grad,) = torch.autograd.grad(loss, s)
    assert abs(float(loss.detach())) < 1e-12
    if divergence != "tv":  # |x| has a kink at 0
        assert grad.abs().max() < 1e-12


def test_jsd_half_is_symmetric_and_other_betas_are_not():
    s, t, _ = _inputs(seed=5)
    jsd = LogitKDLoss("jsd", beta=0.5)
    torch.testing.assert_close(jsd(s, t), jsd(t, s), rtol=1e-12, atol=0)
    skewed = LogitKDLoss("jsd", beta=0.2)
    assert abs(float(skewed(s, t) - skewed(t, s))) > 1e-4


def test_jsd_endpoints_and_limits():
    s, t, _ = _inputs(seed=6)
    fkl, rkl = LogitKDLoss("forward_kl")(s, t), LogitKDLoss("reverse_kl")(s, t)
    torch.testing.assert_close(LogitKDLoss("jsd", beta=0.0)(s, t), fkl)
    torch.testing.assert_close(LogitKDLoss("jsd", beta=1.0)(s, t), rkl)
    torch.testing.assert_close(LogitKDLoss("skew_kl", beta=0.0)(s, t), fkl)
    assert float(LogitKDLoss("skew_kl", beta=1.0)(s, t)) == 0.0
    eps = 1e-6  # JSD_beta / beta -> forward KL, JSD_beta / (1 - beta) -> reverse KL
    torch.testing.assert_close(LogitKDLoss("jsd", beta=eps)(s, t) / eps, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(LogitKDLoss("jsd", beta=1 - eps)(s, t) / eps, rkl, rtol=1e-4, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_teacher_equals_full_when_nothing_or_one_token_is_dropped(divergence):
    s, t, labels = _inputs(seed=7)
    full = LogitKDLoss(divergence, temperature=1.7)(s, t, labels)
    g_full = torch.autograd.grad(full, s)[0]
    for kwargs, tol in ((dict(top_k=V), 1e-13), (dict(top_k=V - 1), 1e-13), (dict(top_p=1.0), 1e-13)):
        sparse = LogitKDLoss(divergence, temperature=1.7, **kwargs)(s, t, labels)
        torch.testing.assert_close(sparse, full, rtol=tol, atol=tol)
        torch.testing.assert_close(torch.autograd.grad(sparse, s)[0], g_full, rtol=1e-10, atol=tol)
    # Dropping two or more tokens changes the loss (the rest bucket merges them).
    assert abs(float(LogitKDLoss(divergence, temperature=1.7, top_k=2)(s, t, labels) - full)) > 1e-6


def test_top_p_keeps_smallest_set_reaching_mass():
    t = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    s = torch.zeros(1, 4, dtype=torch.float64)
    # top_p = 0.75 keeps {0.5, 0.3}; rest = 0.2 against the student's 0.5.
    got = LogitKDLoss("forward_kl", top_p=0.75)(s, t)
    want = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert abs(float(got) - want) < 1e-12


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature_is_logit_scaling_times_t_squared(divergence):
    s, t, _ = _inputs(seed=8)
    temp = 3.0
    hot = LogitKDLoss(divergence, temperature=temp)(s, t)
    cold = LogitKDLoss(divergence, temperature=1.0)(s / temp, t / temp)
    torch.testing.assert_close(hot, temp**2 * cold, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignore_index_positions_do_not_count(reduction):
    s, t, labels = _inputs(seed=9)
    keep = labels != -100
    module = LogitKDLoss("jsd", ce_weight=0.4, reduction=reduction)
    masked = module(s, t, labels)
    (grad,) = torch.autograd.grad(masked, s)
    s_kept = s.detach()[keep].requires_grad_(True)
    only_kept = module(s_kept, t[keep], labels[keep])
    torch.testing.assert_close(masked, only_kept, rtol=1e-12, atol=0)
    assert grad[~keep].abs().max() == 0
    torch.testing.assert_close(grad[keep], torch.autograd.grad(only_kept, s_kept)[0], rtol=1e-12, atol=1e-15)
    all_ignored = torch.full_like(labels, -100)
    zero = module(s, t, all_ignored)
    assert float(zero) == 0.0 and torch.isfinite(torch.autograd.grad(zero, s)[0]).all()


def test_batched_shapes_equal_flat():
    s, t, labels = _inputs(seed=10, n=12)
    module = LogitKDLoss("tv", top_k=5, ce_weight=0.2)
    torch.testing.assert_close(
        module(s.reshape(3, 4, V), t.reshape(3, 4, V), labels.reshape(3, 4)), module(s, t, labels)
    )


@pytest.mark.parametrize("sparse", [dict(), dict(top_k=3), dict(top_p=0.9)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_stay_finite(divergence, sparse):
    s, t, _ = _inputs(seed=11, scale=1.0)
    s = (s.detach().float() * 500).requires_grad_(True)  # softmax probabilities underflow to exactly 0
    t = t.float() * -500
    loss = LogitKDLoss(divergence, **sparse)(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(loss.detach()) > 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bf16_logits_are_computed_in_float32(divergence):
    s, t, _ = _inputs(seed=12)
    module = LogitKDLoss(divergence, top_k=6)
    s16, t16 = s.detach().bfloat16(), t.bfloat16()
    got = module(s16, t16)
    assert got.dtype == torch.float32
    want = module(s16.double(), t16.double())  # same rounded inputs, exact arithmetic
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_rejected_early():
    with pytest.raises(ValueError, match="divergence"):
        LogitKDLoss("kl")
    with pytest.raises(ValueError, match="temperature"):
        LogitKDLoss(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        LogitKDLoss(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        LogitKDLoss(top_k=0)
    with pytest.raises(ValueError, match="ce_weight"):
        LogitKDLoss(ce_weight=2)
    s, t, labels = _inputs()
    with pytest.raises(ValueError, match="vocabulary"):
        LogitKDLoss()(s, t[:, :-1])
    with pytest.raises(ValueError, match="needs labels"):
        LogitKDLoss(ce_weight=0.5)(s, t)
    with pytest.raises(ValueError, match="labels shape"):
        LogitKDLoss()(s, t, labels[:-1])


@pytest.mark.parametrize(("ce_weight", "with_labels"), [(0.0, False), (0.0, True), (0.3, True), (1.0, True)])
def test_closed_form_gradient_equals_autograd_float64(ce_weight, with_labels):
    """summed_loss_and_grad (forward KL + CE at T=1): the summed loss and scale x its gradient equal autograd's."""
    g = torch.Generator().manual_seed(11)
    z_s = (3 * torch.randn(N, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    z_t = 3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g) if with_labels else None
    if with_labels:
        labels[2] = -100
    loss = LogitKDLoss("forward_kl", ce_weight=ce_weight)
    summed = loss.summed_loss(z_s, z_t, labels)
    (want,) = torch.autograd.grad(summed, z_s)
    got_sum, got_grad = loss.summed_loss_and_grad(z_s, z_t, labels, scale=0.25)
    torch.testing.assert_close(got_sum, summed.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, 0.25 * want, rtol=1e-12, atol=1e-12)
    if with_labels:
        assert got_grad[2].abs().max() == 0  # an ignored position gets no gradient


@pytest.mark.parametrize("kwargs", [dict(divergence="reverse_kl"), dict(temperature=2.0), dict(top_k=3), dict(top_p=0.5),
                                    dict(bound_margin=0.1), dict(token_weighting="entropy"), dict(vocab_size=V - 2)])
def test_closed_form_declines_what_it_does_not_cover(kwargs):
    z = torch.randn(N, V, dtype=torch.float64)
    assert LogitKDLoss(**kwargs).summed_loss_and_grad(z, z, torch.zeros(N, dtype=torch.long), scale=1.0) is None
