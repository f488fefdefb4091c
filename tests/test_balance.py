"""LossBalancer: totals, auto weighting against hand computation, gradients and checkpointing."""

from __future__ import annotations

import pytest
import torch

from minidistill.distill.balance import LossBalancer


def _components(values, requires_grad=True):
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for k, v in values.items()}


def test_fixed_total_and_log():
    comps = _components({"logits": 2.0, "hidden": 0.5, "attention": 4.0})
    total, log = LossBalancer({"logits": 1.0, "hidden": 3.0, "attention": 0.25})(comps)
    assert float(total.detach()) == pytest.approx(2.0 + 1.5 + 1.0)
    assert log["total"] == pytest.approx(4.5)
    assert log["hidden/raw"] == 0.5 and log["hidden/weighted"] == 1.5 and log["hidden/weight"] == 3.0
    assert all(isinstance(v, float) for v in log.values())


def _step(bal, *micro_batches, reduce_sum=None):
    """One optimizer step: a forward per micro-batch, then ``end_step``; returns the last forward's log."""
    log = None
    for values in micro_batches:
        _, log = bal(_components(values))
    bal.end_step(reduce_sum)
    return log


def test_auto_first_step_keeps_fixed_weights_then_scales_to_anchor():
    bal = LossBalancer({"logits": 1.0, "hidden": 3.0, "attention": 0.5}, mode="auto", momentum=0.0)
    log = _step(bal, {"logits": 2.0, "hidden": -0.5, "attention": 8.0})
    assert (log["logits/weight"], log["hidden/weight"], log["attention/weight"]) == (1.0, 3.0, 0.5)
    comps = _components({"logits": 5.0, "hidden": 1.0, "attention": 1.0})
    total, log = bal(comps)
    # weight_i = w_i * |anchor| / |loss_i| from the previous step's magnitudes (momentum 0)
    assert log["hidden/weight"] == pytest.approx(3.0 * 2.0 / 0.5)
    assert log["attention/weight"] == pytest.approx(0.5 * 2.0 / 8.0)
    assert log["logits/weight"] == 1.0
    assert float(total.detach()) == pytest.approx(5.0 + 12.0 * 1.0 + 0.125 * 1.0)
    assert log["attention/weighted"] == pytest.approx(0.125)


def test_auto_step_magnitude_is_mean_over_micro_batches_and_processes():
    """Two micro-batches on one process, one on each of two processes, one batch: the same weights."""
    halves = [{"logits": 1.0, "hidden": 4.0}, {"logits": 3.0, "hidden": -2.0}]
    accum = LossBalancer({"logits": 1.0, "hidden": 1.0}, mode="auto", momentum=0.0)
    _step(accum, *halves)
    ranks = [LossBalancer({"logits": 1.0, "hidden": 1.0}, mode="auto", momentum=0.0) for _ in halves]
    for bal, values in zip(ranks, halves):
        bal(_components(values))
    pending = [torch.cat([b._step_sums, b._step_counts]) for b in ranks]
    for bal in ranks:  # an all-reduce (sum) over the two ranks
        bal.end_step(lambda t: sum(pending))
    want = 1.0 * ((1.0 + 3.0) / 2) / ((4.0 + 2.0) / 2)
    probe = {"logits": 1.0, "hidden": 1.0}
    for bal in (accum, *ranks):
        _, log = bal(_components(probe))
        assert log["hidden/weight"] == pytest.approx(want)
    # Not the per-micro-batch ratio of either half.
    assert want != pytest.approx(1.0 / 4.0) and want != pytest.approx(3.0 / 2.0)


def test_auto_gradient_equals_detached_weighted_sum():
    x = torch.tensor([1.5, -0.7], dtype=torch.float64, requires_grad=True)
    bal = LossBalancer({"logits": 1.0, "hidden": 2.0}, mode="auto", momentum=0.0)
    _step(bal, {"logits": 2.0, "hidden": 0.5})
    comps = {"logits": (x**2).sum(), "hidden": x.sum().pow(2) + 0.1}
    total, log = bal(comps)
    (grad,) = torch.autograd.grad(total, x, retain_graph=True)
    (want,) = torch.autograd.grad(comps["logits"] + 2.0 * (2.0 / 0.5) * comps["hidden"], x, retain_graph=True)
    torch.testing.assert_close(grad, want)
    assert log["hidden/weight"] == pytest.approx(8.0)


def test_auto_ema_by_hand_and_eval_mode_does_not_measure():
    bal = LossBalancer({"logits": 1.0, "hidden": 1.0}, mode="auto", momentum=0.5)
    steps = [(2.0, 1.0), (4.0, 1.0), (4.0, 3.0)]
    ema_a = ema_h = None
    for a, h in steps:
        log = _step(bal, {"logits": a, "hidden": h})
        assert log["hidden/weight"] == (1.0 if ema_a is None else pytest.approx(ema_a / ema_h))
        ema_a = a if ema_a is None else 0.5 * ema_a + 0.5 * a
        ema_h = h if ema_h is None else 0.5 * ema_h + 0.5 * h
    bal.eval()
    _, log1 = bal(_components({"logits": 100.0, "hidden": 1.0}))
    bal.end_step()
    _, log2 = bal(_components({"logits": 100.0, "hidden": 1.0}))
    assert log1["hidden/weight"] == log2["hidden/weight"] == pytest.approx(ema_a / ema_h)


def test_state_dict_round_trip_continues_identically():
    weights = {"logits": 1.0, "hidden": 0.5, "attention": 2.0}
    a = LossBalancer(weights, mode="auto", momentum=0.9)
    for step in range(3):
        _step(a, {"logits": 1.0 + step, "hidden": 0.1 * (step + 1), "attention": 5.0 - step})
    b = LossBalancer(weights, mode="auto", momentum=0.9)
    b.load_state_dict(a.state_dict())
    nxt = {"logits": 0.7, "hidden": 0.3, "attention": 1.1}
    log_a, log_b = _step(a, nxt), _step(b, nxt)
    assert log_a == log_b
    assert _step(a, nxt) == _step(b, nxt)
    fresh = _step(LossBalancer(weights, mode="auto", momentum=0.9), nxt)
    assert fresh["hidden/weight"] != log_a["hidden/weight"]


def test_zero_component_keeps_fixed_weight_and_subsets_are_allowed():
    bal = LossBalancer({"logits": 1.0, "hidden": 2.0, "attention": 1.0}, mode="auto", momentum=0.0)
    _step(bal, {"logits": 3.0, "hidden": 0.0})
    total, log = bal(_components({"logits": 3.0, "hidden": 0.0}))
    assert log["hidden/weight"] == 2.0 and "attention/raw" not in log
    assert torch.isfinite(total)


def test_bad_input():
    with pytest.raises(ValueError, match="anchor"):
        LossBalancer({"hidden": 1.0}, mode="auto")
    with pytest.raises(ValueError, match="mode"):
        LossBalancer({"logits": 1.0}, mode="minitron")
    with pytest.raises(ValueError, match="momentum"):
        LossBalancer({"logits": 1.0}, momentum=1.0)
    bal = LossBalancer({"logits": 1.0, "hidden": 1.0}, mode="auto")
    with pytest.raises(ValueError, match="no weight"):
        bal(_components({"logits": 1.0, "relation": 1.0}))
    with pytest.raises(ValueError, match="anchor"):
        bal(_components({"hidden": 1.0}))
