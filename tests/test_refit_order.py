"""Re-fit-aware neuron ranking against a brute-force greedy search with naive least squares."""

from __future__ import annotations

import torch

from minidistill.prune.refit_order import refit_elimination_scores


def _refit_error(x: torch.Tensor, w: torch.Tensor, kept: list[int], lam: float) -> float:
    """min over the kept columns' change D of ||X (W' - W)^T||^2 + lam ||W' - W||^2, W' zero off ``kept``.

    Naive float64 ridge solve: the removed columns' output ``X_R W_R^T`` is taken over by the kept ones.
    """
    removed = [j for j in range(w.shape[1]) if j not in kept]
    xk, xr = x[:, kept], x[:, removed]
    lost = xr @ w[:, removed].T
    d = torch.linalg.solve(xk.T @ xk + lam * torch.eye(len(kept), dtype=x.dtype), xk.T @ lost)
    return float((xk @ d - lost).pow(2).sum() + lam * d.pow(2).sum() + lam * w[:, removed].pow(2).sum())


def _correlated_inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, n // 2, generator=g, dtype=torch.float64)
    mix = torch.randn(n // 2, n, generator=g, dtype=torch.float64)
    return base @ mix + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)


def test_single_removals_follow_brute_force_greedy():
    n, out, damping = 10, 6, 1e-2
    x = _correlated_inputs(n, 200, 0)
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram = x.T @ x
    lam = damping * float(gram.diagonal().mean())
    scores = refit_elimination_scores(gram, w, damping=damping, block_fraction=n + 1)  # one column a step
    order = scores.argsort().tolist()  # removal order
    alive = list(range(n))
    for removed in order[:-1]:
        errors = {j: _refit_error(x, w, [k for k in alive if k != j], lam) for j in alive}
        best = min(errors, key=errors.get)
        assert removed == best, (removed, best, errors)
        alive.remove(removed)


def test_ranking_beats_activation_ranking_on_correlated_inputs():
    """Keeping the top half by these scores leaves less re-fit error than keeping the largest activations."""
    n, out, damping = 32, 16, 1e-2
    x = _correlated_inputs(n, 400, 2)
    x[:, :8] *= 3.0  # large but redundant activations
    x[:, :8] += 0.0 * x[:, 8:16]
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gram = x.T @ x
    lam = damping * float(gram.diagonal().mean())
    keep = n // 2
    by_refit = refit_elimination_scores(gram, w, damping=damping).topk(keep).indices.tolist()
    by_activation = x.abs().mean(0).topk(keep).indices.tolist()
    assert _refit_error(x, w, by_refit, lam) < _refit_error(x, w, by_activation, lam)


def test_scores_rank_every_column_once():
    n = 50
    x = _correlated_inputs(n, 300, 4)
    w = torch.randn(8, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scores = refit_elimination_scores(x.T @ x, w)
    assert scores.unique().numel() == n


def _down_proj_inputs(model, calibration):
    """Every layer's down_proj input over the calibration blocks, [tokens, intermediate] float64 (a plain hook)."""
    seen = {i: [] for i in range(len(model.model.layers))}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].detach()))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for i in range(0, len(calibration), 2):
            model(calibration[i : i + 2])
    for h in handles:
        h.remove()
    return {i: torch.cat(v).reshape(-1, v[0].shape[-1]).double() for i, v in seen.items()}


def test_compute_importance_ranks_neurons_from_the_calibration_gram():
    """units.neurons under neuron_ranking=refit equal the elimination on a naive float64 Gram of the same tokens."""
    from conftest import tiny_model

    from minidistill.prune.importance import ImportanceConfig, compute_importance

    model = tiny_model("llama", num_layers=2, intermediate_size=48, dtype=torch.float64)
    calibration = torch.randint(3, model.config.vocab_size, (16, 16), generator=torch.Generator().manual_seed(0))
    for method in ("activation", "magnitude"):
        units, _ = compute_importance(model, calibration, ImportanceConfig(method=method, batch_size=4, cache=False))
        assert units.settings["neuron_ranking"] == "refit"
        for i, x in _down_proj_inputs(model, calibration).items():
            want = refit_elimination_scores(x.T @ x, model.model.layers[i].mlp.down_proj.weight)
            torch.testing.assert_close(units.neurons[i], want)
    plain, _ = compute_importance(model, calibration, ImportanceConfig(neuron_ranking="method", batch_size=4, cache=False))
    assert not torch.equal(plain.neurons, units.neurons)


def test_refit_ranking_leaves_less_refit_error_on_a_model():
    """Half the neurons of each layer of a tiny llama: the re-fit error on the calibration tokens is lower
    when they are chosen by the refit ranking than by activation importance."""
    from conftest import tiny_model

    from minidistill.prune.importance import ImportanceConfig, compute_importance

    model = tiny_model("llama", num_layers=2, intermediate_size=64, dtype=torch.float64)
    calibration = torch.randint(3, model.config.vocab_size, (12, 24), generator=torch.Generator().manual_seed(1))
    cfg = {"batch_size": 4, "cache": False}
    refit, _ = compute_importance(model, calibration, ImportanceConfig(**cfg))
    activation, _ = compute_importance(model, calibration, ImportanceConfig(neuron_ranking="method", **cfg))
    inputs = _down_proj_inputs(model, calibration)
    for i, x in inputs.items():
        w = model.model.layers[i].mlp.down_proj.weight.detach()
        lam = 1e-2 * float((x.T @ x).diagonal().mean())
        errors = {name: _refit_error(x, w, u.neurons[i].topk(32).indices.tolist(), lam)
                  for name, u in (("refit", refit), ("activation", activation))}
        assert errors["refit"] < errors["activation"], errors


def test_too_few_calibration_tokens_fall_back_to_the_method_scores(caplog):
    from conftest import tiny_model

    from minidistill.prune.importance import MIN_REFIT_TOKENS_PER_NEURON, ImportanceConfig, compute_importance

    model = tiny_model("llama", num_layers=2, intermediate_size=48, dtype=torch.float64)
    short = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert short.numel() < MIN_REFIT_TOKENS_PER_NEURON * 48
    units, _ = compute_importance(model, short, ImportanceConfig(batch_size=4, cache=False))
    plain, _ = compute_importance(model, short, ImportanceConfig(neuron_ranking="method", batch_size=4, cache=False))
    assert torch.equal(units.neurons, plain.neurons) and units.settings["neuron_ranking"] == "method"
    assert "raise prune.calib_blocks" in caplog.text


def test_gram_matrices_beyond_the_memory_cap_are_not_collected(monkeypatch, caplog):
    from conftest import tiny_model

    from minidistill.prune import importance
    from minidistill.prune.importance import ImportanceConfig, compute_importance

    model = tiny_model("llama", num_layers=2, intermediate_size=48, dtype=torch.float64)
    calibration = torch.randint(3, model.config.vocab_size, (16, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(importance, "MAX_GRAM_BYTES", 1000)
    grams: dict = {}
    units, _ = compute_importance(model, calibration, ImportanceConfig(batch_size=4, cache=False), gram_out=grams)
    plain, _ = compute_importance(model, calibration, ImportanceConfig(neuron_ranking="method", batch_size=4, cache=False))
    assert not grams and torch.equal(units.neurons, plain.neurons)
    assert "Gram matrices would take" in caplog.text
