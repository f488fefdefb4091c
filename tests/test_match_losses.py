"""The knowledge-matching losses on random tensors against naive float64 references (values and gradients)."""

from __future__ import annotations

from itertools import product

import pytest
import torch

from minidistill.distill.losses.boundary import ActivationBoundaryLoss
from minidistill.distill.losses.distribution import KERNELS, FeatureMMDLoss
from minidistill.distill.losses.flow import FlowLoss
from minidistill.distill.losses.rkd import RelationalKDLoss
from minidistill.distill.losses.saliency import TokenAttentionLoss
from minidistill.distill.losses.weights import LinearWeightMap, WeightMatchLoss

D64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=D64, generator=torch.Generator().manual_seed(seed))


def _check(loss_fn, naive_fn, student, *others, rel=1e-10):
    """Values and gradients w.r.t. ``student`` of ``loss_fn`` and ``naive_fn`` agree."""
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    got, ref = loss_fn(a, *others), naive_fn(b, *others)
    assert got.item() == pytest.approx(ref.item(), rel=rel, abs=1e-12)
    (ga,), (gb,) = torch.autograd.grad(got, a), torch.autograd.grad(ref, b)
    assert torch.allclose(ga, gb, rtol=1e-8, atol=1e-11), (ga - gb).abs().max()
    assert gb.abs().sum() > 0  # the test would notice a missing gradient
    return got


def _norm(v):
    """``v / |v|_2`` element by element (gradients flow through the norm too)."""
    v = torch.stack(list(v))
    return v / torch.sqrt(sum(x * x for x in v))


# ---------------------------------------------------------------------------------------------- weights


def test_weight_match_equals_naive_sum_of_squares():
    s = {"a": _rand(3, 4), "b": _rand(5, seed=1)}
    t = {"a": _rand(3, 4, seed=2), "b": _rand(5, seed=3)}

    def naive(a):
        total = sum((a[i, j] - t["a"][i, j]) ** 2 for i in range(3) for j in range(4))
        total = total + sum((s["b"][i] - t["b"][i]) ** 2 for i in range(5))
        return total

    _check(lambda a: WeightMatchLoss()({"a": a, "b": s["b"]}, t), naive, s["a"])
    assert WeightMatchLoss()(t, t).item() == 0.0


def test_linear_weight_map_is_truncated_identity_then_learned():
    m = LinearWeightMap({(3, 5), (4, 4), (2, 6)}).double()
    assert set(m.maps) == {"s3_t5", "s2_t6"}  # equal sizes are not mapped
    w_t = _rand(5, 6)
    out = m(w_t, torch.Size((3, 2)))
    assert torch.equal(out, w_t[:3, :2])  # truncated identity at init
    with torch.no_grad():
        m.maps["s3_t5"].copy_(_rand(3, 5, seed=4))
        m.maps["s2_t6"].copy_(_rand(2, 6, seed=5))
    L, R = m.maps["s3_t5"], m.maps["s2_t6"]
    out = m(w_t, torch.Size((3, 2)))
    ref = torch.stack([torch.stack([sum(L[i, a] * w_t[a, b] * R[k, b] for a in range(5) for b in range(6)) for k in range(2)]) for i in range(3)])
    assert torch.allclose(out, ref, rtol=1e-10)
    vec = m(_rand(5, seed=6), torch.Size((3,)))
    assert torch.allclose(vec, L @ _rand(5, seed=6))
    out.sum().backward()
    assert L.grad is not None and R.grad is not None and L.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- MMD / NST


def _kernel(x, y, kernel, degree=2, coef=0.0, sigma=1.0):
    dot = sum(a * b for a, b in zip(x, y))
    if kernel == "linear":
        return dot
    if kernel == "polynomial":
        return (dot + coef) ** degree
    return torch.exp(-sum((a - b) ** 2 for a, b in zip(x, y)) / (2 * sigma**2))


def _naive_mmd(s, t, kernel, samples, **kw):
    out = []
    for b in range(s.shape[0]):
        xs, xt = (s[b].t(), t[b].t()) if samples == "neurons" else (s[b], t[b])
        xs, xt = [_norm(x) for x in xs], [_norm(x) for x in xt]
        k = lambda X, Y: sum(_kernel(x, y, kernel, **kw) for x in X for y in Y) / (len(X) * len(Y))  # noqa: E731
        out.append(k(xs, xs) + k(xt, xt) - 2 * k(xs, xt))
    return torch.stack(out).mean()


@pytest.mark.parametrize("kernel,samples", list(product(KERNELS, ("neurons", "tokens"))))
def test_mmd_matches_naive_reference(kernel, samples):
    s = _rand(2, 5, 4)
    t = _rand(2, 5, 6 if samples == "neurons" else 4, seed=1)
    kw = {"degree": 3, "coef": 0.5, "sigma": 0.7}
    loss = FeatureMMDLoss(kernel, samples=samples, **kw)
    got = _check(loss, lambda a, b: _naive_mmd(a, b, kernel, samples, **kw), s, t)
    assert got.item() > 1e-4
    assert loss(t[..., :4] if samples == "tokens" else t, t[..., :4] if samples == "tokens" else t).abs().item() < 1e-12


def test_nst_is_polynomial_mmd_over_normalised_neurons():
    """NST (Huang & Wang): |mean_ij k(s_i, s_j) + mean k(t, t) - 2 mean k(s, t)| with k = (x.y)^2."""
    s, t = _rand(1, 7, 3), _rand(1, 7, 5, seed=2)
    fs, ft = torch.nn.functional.normalize(s[0].t(), dim=1), torch.nn.functional.normalize(t[0].t(), dim=1)
    ref = (fs @ fs.t()).pow(2).mean() + (ft @ ft.t()).pow(2).mean() - 2 * (fs @ ft.t()).pow(2).mean()
    assert FeatureMMDLoss("polynomial", samples="neurons")(s, t).item() == pytest.approx(ref.item(), rel=1e-12)


def test_mmd_rejects_unknown_kernel():
    with pytest.raises(ValueError, match=r"choose one of \['linear', 'polynomial', 'gaussian'\]"):
        FeatureMMDLoss("laplace")


# ---------------------------------------------------------------------------------------------- token attention


def test_token_attention_matches_naive_reference():
    s, t = _rand(2, 6, 4), _rand(2, 6, 7, seed=1)

    def naive(a, b):
        out = []
        for i in range(a.shape[0]):
            qa = _norm([sum(a[i, j, c] ** 2 for c in range(a.shape[2])) for j in range(6)])
            qb = _norm([sum(b[i, j, c] ** 2 for c in range(b.shape[2])) for j in range(6)])
            out.append(sum((qa - qb) ** 2))
        return torch.stack(out).mean()

    got = _check(TokenAttentionLoss(), naive, s, t)
    assert got.item() > 1e-3
    assert TokenAttentionLoss()(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-14)  # scale-free


# ---------------------------------------------------------------------------------------------- activation boundaries


def test_activation_boundary_matches_naive_hinge():
    s, t = _rand(2, 3, 5), _rand(2, 3, 5, seed=1)
    m = 0.3

    def naive(a, b):
        terms = [torch.relu(m - a[i, j, k]) ** 2 if b[i, j, k] > 0 else torch.relu(m + a[i, j, k]) ** 2 for i in range(2) for j in range(3) for k in range(5)]
        return torch.stack(terms).mean()

    _check(ActivationBoundaryLoss(m), naive, s, t)
    # Zero once every student neuron is past the margin on the teacher's side.
    assert ActivationBoundaryLoss(m)(torch.where(t > 0, t.abs() + m, -t.abs() - m), t).item() == 0.0


# ---------------------------------------------------------------------------------------------- flow matrices


@pytest.mark.parametrize("matrix", ["channels", "tokens"])
@pytest.mark.parametrize("normalize", [True, False])
def test_flow_matrix_loss_matches_naive(matrix, normalize):
    B, T = 2, 4
    sa, sb = _rand(B, T, 3), _rand(B, T, 3, seed=1)
    ta, tb = _rand(B, T, 3 if matrix == "channels" else 5, seed=2), _rand(B, T, 3 if matrix == "channels" else 5, seed=3)

    def G(a, b, i):
        xa = [_norm(a[i, r]) if normalize else a[i, r] for r in range(T)]
        xb = [_norm(b[i, r]) if normalize else b[i, r] for r in range(T)]
        if matrix == "channels":
            return torch.stack([torch.stack([sum(xa[r][c] * xb[r][d] for r in range(T)) / T for d in range(len(xb[0]))]) for c in range(len(xa[0]))])
        return torch.stack([torch.stack([sum(xa[r][c] * xb[q][c] for c in range(len(xa[0]))) for q in range(T)]) for r in range(T)])

    def naive(a):
        return torch.stack([((G(a, sb, i) - G(ta, tb, i)) ** 2).mean() for i in range(B)]).mean()

    _check(lambda a: FlowLoss(matrix, normalize=normalize)([(a, sb)], [(ta, tb)]), naive, sa)


# ---------------------------------------------------------------------------------------------- relational KD


def _huber(x):
    return 0.5 * x * x if abs(float(x.detach())) < 1 else abs(x) - 0.5


def _naive_rkd(s, t, wd, wa):
    n = s.shape[0]

    def dist(e):
        d = [[torch.sqrt(sum((e[i] - e[j]) ** 2)) if i != j else e.new_zeros(()) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    def unit(v):
        norm = torch.sqrt(sum(v**2))
        return v / norm if float(norm.detach()) > 0 else v * 0

    def angle(e):
        return {(i, j, k): sum(unit(e[i] - e[j]) * unit(e[k] - e[j])) for i in range(n) for j in range(n) for k in range(n)}

    ds, dt = dist(s), dist(t)
    l_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = angle(s), angle(t)
    l_a = sum(_huber(a_s[key] - a_t[key]) for key in a_s) / n**3
    return wd * l_d + wa * l_a


def test_rkd_matches_naive_park_et_al():
    s, t = _rand(5, 3), _rand(5, 8, seed=1)
    got = _check(RelationalKDLoss(1.5, 2.5), lambda a, b: _naive_rkd(a, b, 1.5, 2.5), s, t, rel=1e-9)
    assert got.item() > 1e-3
    # Relations are invariant to rotation, translation and scale of the embedding.
    q, _ = torch.linalg.qr(_rand(8, 8, seed=3))
    assert RelationalKDLoss()(3.0 * t @ q + 1.0, t).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_needs_two_sequences():
    with pytest.raises(ValueError, match="at least 2 sequences"):
        RelationalKDLoss()(_rand(1, 3), _rand(1, 3))
