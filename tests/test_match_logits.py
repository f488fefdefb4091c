"""Teacher-bounded and per-token weighted logit KD against naive float64 references (plain, fused, objective)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_objective import _pruned_pair, _step

from minidistill.config import ConfigError
from minidistill.distill.losses.fused import FusedLogitKDLoss
from minidistill.distill.losses.logits import LogitKDLoss
from minidistill.distill.objective import DistillLossConfig

N, V, D = 24, 11, 6
T = 1.5


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = torch.randn(N, D, dtype=torch.float64, generator=g), torch.randn(N, D, dtype=torch.float64, generator=g)
    w_s, w_t = torch.randn(V, D, dtype=torch.float64, generator=g), torch.randn(V, D, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    # Half the positions: the student is far better than the teacher on the true token (bounded away).
    boost = torch.zeros(N, V, dtype=torch.float64)
    boost[torch.arange(0, N, 2), labels.clamp_min(0)[::2]] = 6.0
    return h_s, w_s, h_t, w_t, labels, boost


def _naive(s_logits, t_logits, labels, *, margin=None, weighting="none"):
    """Per-position loop: forward KL at temperature T (times T^2), bound and weights at temperature 1."""
    total, count, vocab = 0.0, 0, s_logits.shape[-1]
    for n in range(labels.numel()):
        if labels[n] == -100:
            continue
        count += 1
        p_t = F.softmax(t_logits[n] / T, -1)
        kl = (p_t * (F.log_softmax(t_logits[n] / T, -1) - F.log_softmax(s_logits[n] / T, -1))).sum() * T * T
        p1 = F.softmax(t_logits[n], -1)
        w = 1.0
        if weighting == "confidence":
            w = float(p1.max())
        elif weighting == "entropy":
            w = float(-(p1 * p1.log()).sum()) / math.log(vocab)
        if margin is not None:
            ce_s = -F.log_softmax(s_logits[n], -1)[labels[n]]
            ce_t = -F.log_softmax(t_logits[n], -1)[labels[n]]
            if float(ce_s.detach()) + margin <= float(ce_t):
                w = 0.0
        total = total + w * kl
    return total / count


CASES = [
    {"margin": 0.5},
    {"weighting": "confidence"},
    {"weighting": "entropy"},
    {"margin": 0.0, "weighting": "entropy"},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bounded_and_weighted_kd_match_naive_reference(case):
    h_s, w_s, h_t, w_t, labels, boost = _data()
    kw = {"bound_margin": case.get("margin"), "token_weighting": case.get("weighting", "none")}
    t_logits = h_t @ w_t.t()

    def student_logits(h):
        return h @ w_s.t() + boost

    a, b, c = (h_s.clone().requires_grad_(True) for _ in range(3))
    ref = _naive(student_logits(a), t_logits, labels, margin=case.get("margin"), weighting=case.get("weighting", "none"))
    plain = LogitKDLoss(temperature=T, **kw)(student_logits(b), t_logits, labels)
    assert plain.item() == pytest.approx(ref.item(), rel=1e-10)
    (g_ref,), (g_plain,) = torch.autograd.grad(ref, a), torch.autograd.grad(plain, b)
    assert torch.allclose(g_plain, g_ref, rtol=1e-9, atol=1e-12)
    # Fused (chunk by chunk, 5 positions at a time), on the head's own logits h @ w_s^T (no boost).
    ref2 = _naive(c @ w_s.t(), t_logits, labels, margin=case.get("margin"), weighting=case.get("weighting", "none"))
    d = h_s.clone().requires_grad_(True)
    fused = FusedLogitKDLoss(temperature=T, chunk_tokens=5, **kw)(d, w_s, h_t, w_t, labels)
    assert fused.item() == pytest.approx(ref2.item(), rel=1e-10)
    (g_ref2,), (g_fused,) = torch.autograd.grad(ref2, c), torch.autograd.grad(fused, d)
    assert torch.allclose(g_fused, g_ref2, rtol=1e-9, atol=1e-12)


def test_teacher_bound_zeroes_exactly_the_positions_the_student_wins():
    h_s, w_s, h_t, w_t, labels, boost = _data(1)
    s_logits, t_logits = h_s @ w_s.t() + boost, h_t @ w_t.t()
    loss = LogitKDLoss(temperature=T, bound_margin=0.5)
    per_token = loss.kd_per_token(s_logits, t_logits) * loss.kd_token_weights(s_logits, t_logits, labels)
    won = (-F.log_softmax(s_logits, -1).gather(-1, labels.clamp_min(0)[:, None])[:, 0] + 0.5) <= (
        -F.log_softmax(t_logits, -1).gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    )
    assert 4 <= int(won.sum()) < N  # both kinds of positions occur
    assert torch.all(per_token[won] == 0) and torch.all(per_token[~won] > 0)
    unbounded = LogitKDLoss(temperature=T)(s_logits, t_logits, labels)
    assert loss(s_logits, t_logits, labels).item() < unbounded.item()
    with pytest.raises(ValueError, match="bound_margin=0.5 needs labels"):
        loss(s_logits, t_logits)


def test_logit_options_through_the_objective_match_float64_reference():
    teacher, student, pmap = _pruned_pair()
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    for logits_cfg, kw in (
        ({"teacher_bound_margin": 0.0, "temperature": T, "chunk_tokens": 7}, {"margin": 0.0}),
        ({"token_weighting": "confidence", "temperature": T, "chunk_tokens": 7}, {"weighting": "confidence"}),
    ):
        cfg = DistillLossConfig.from_dict({"logits": logits_cfg})
        out, _ = _step(teacher, student, cfg, pmap, ids)
        with torch.no_grad():
            s = student.double()(ids).logits[:, :-1].reshape(-1, 128)
            t = teacher.double()(ids).logits[:, :-1].reshape(-1, 128)
        student.float(), teacher.float()
        ref = _naive(s, t, ids[:, 1:].reshape(-1), **kw)
        assert out["components"]["loss/logits"].item() == pytest.approx(float(ref), rel=1e-5)


def test_logit_option_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"loss\.logits\.teacher_bound_margin=-1\.0"):
        DistillLossConfig.from_dict({"logits": {"teacher_bound_margin": -1.0}})
    with pytest.raises(ConfigError, match=r"logits\.token_weighting='margin'.*\['none', 'confidence', 'entropy'\]"):
        DistillLossConfig.from_dict({"logits": {"token_weighting": "margin"}})
