"""Importance estimation: planted dead units rank last, aggregation math against a naive float64 reference,
baselines against direct computations, layer importance, one forward pass, the on-disk cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from minidistill.adapters import get_adapter
from minidistill.prune import importance as imp
from minidistill.prune.importance import (
    ImportanceConfig,
    activation_importance,
    compute_importance,
    lm_loss_backward,
    magnitude_importance,
    random_importance,
    taylor_importance,
)
from minidistill.prune.layer_importance import (
    LayerSimilarity,
    layer_drop_loss_increase,
    layer_scores,
    layer_similarity,
)

HEAD_DIM = 16


# ---------------------------------------------------------------------------- planting dead units
def _rows(weight_owner, part: str, adapter, shape):
    """(tensor, row offset) of a q/k/v or gate/up block, fused or not."""
    hd = shape["head_dim"]
    if part in ("q", "k", "v"):
        if adapter.qkv_proj is not None:
            offsets = {"q": 0, "k": shape["num_heads"] * hd, "v": (shape["num_heads"] + shape["num_kv_heads"]) * hd}
            return adapter.layer_part(weight_owner, "qkv_proj"), offsets[part]
        return adapter.layer_part(weight_owner, f"{part}_proj"), 0
    if adapter.gate_up_proj is not None:
        return adapter.layer_part(weight_owner, "gate_up_proj"), 0 if part == "gate" else shape["intermediate_size"]
    return adapter.layer_part(weight_owner, f"{part}_proj"), 0


@torch.no_grad()
def plant_dead_units(model, *, dead_group: dict[int, int], dead_head: dict[int, int | list[int]], dead_neurons: dict[int, list[int]],
                     identity_layer: int | None):
    """Silence units: a KV group (its v rows, so its heads output zero), a single head (its o_proj columns),
    neurons (their gate rows, so the down_proj input is zero), a whole layer (o_proj and down_proj zeroed)."""
    adapter = get_adapter(model)
    shape = adapter.shape(model.config)
    hd = shape["head_dim"]
    layers = adapter.decoder_layers(model)
    for l, g in dead_group.items():
        v, off = _rows(layers[l], "v", adapter, shape)
        v.weight[off + g * hd : off + (g + 1) * hd] = 0
        if v.bias is not None:
            v.bias[off + g * hd : off + (g + 1) * hd] = 0
    for l, heads in dead_head.items():
        for h in [heads] if isinstance(heads, int) else heads:
            adapter.layer_part(layers[l], "o_proj").weight[:, h * hd : (h + 1) * hd] = 0
    for l, idx in dead_neurons.items():
        gate, off = _rows(layers[l], "gate", adapter, shape)
        gate.weight[[off + i for i in idx]] = 0
    if identity_layer is not None:
        adapter.layer_part(layers[identity_layer], "o_proj").weight.zero_()
        adapter.layer_part(layers[identity_layer], "down_proj").weight.zero_()
    return model


def _calibration(vocab=128, n=6, t=24, seed=1):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _last(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(scores, stable=True)[:k].tolist())


@pytest.mark.parametrize("head_signal", ["input", "output"])
def test_planted_dead_units_rank_last(model_type, head_signal):
    model = tiny_model(model_type, num_layers=3, num_heads=8, num_kv_heads=4, dtype=torch.float64)
    dead_neurons = {0: [3, 50, 77], 1: [0, 95, 40]}
    plant_dead_units(model, dead_group={0: 2, 1: 0}, dead_head={0: 1, 1: 5}, dead_neurons=dead_neurons, identity_layer=2)
    ids = _calibration()
    units, sim = activation_importance(model, [ids[:4], ids[4:]], head_signal=head_signal)
    # KV group (and its heads) silenced through v.
    assert _last(units.kv_groups[0], 1) == {2} and _last(units.kv_groups[1], 1) == {0}
    assert _last(units.heads[0], 2) >= {4, 5} if head_signal == "input" else _last(units.heads[0], 3) == {1, 4, 5}
    if head_signal == "output":  # a head silenced by its o_proj columns is seen only at the o_proj output
        assert _last(units.heads[1], 3) == {0, 1, 5}
    else:
        assert _last(units.heads[1], 2) == {0, 1}
    for l, idx in dead_neurons.items():
        assert _last(units.neurons[l], 3) == set(idx)
        assert torch.all(units.neurons[l, idx] == 0)
    # The identity layer has zero block influence and the lowest score.
    assert int(torch.argmin(units.layers)) == 2
    assert units.layers[2].abs() < 1e-12
    assert int(torch.argmin(sim.block_influence())) == 2


def test_planted_dead_layer_has_no_loss_increase(model_type):
    model = tiny_model(model_type, num_layers=3, dtype=torch.float64)
    plant_dead_units(model, dead_group={}, dead_head={}, dead_neurons={}, identity_layer=1)
    inc = layer_drop_loss_increase(model, [_calibration()])
    assert inc[1].abs() < 1e-12
    assert inc[[0, 2]].abs().min() > 1e-6
    assert int(torch.argmin(layer_scores("lm_loss", num_drop=1, loss_increase=inc.abs()))) == 1


# ---------------------------------------------------------------------------- aggregation vs naive float64
def _capture(model, batches):
    """Per batch: o_proj inputs, down_proj inputs (per layer) and the hidden-norm outputs, in float64."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    store = {"o": [], "down": [], "norms": []}
    handles = []
    for layer in layers:
        handles.append(adapter.layer_part(layer, "o_proj").register_forward_pre_hook(lambda m, a: store["o"].append(a[0].double())))
        handles.append(adapter.layer_part(layer, "down_proj").register_forward_pre_hook(lambda m, a: store["down"].append(a[0].double())))
        for part in ("attn_in_norm", "mlp_in_norm"):
            handles.append(adapter.layer_part(layer, part).register_forward_hook(lambda m, a, o: store["norms"].append(o.double())))
    handles.append(model.get_submodule(adapter.final_norm).register_forward_hook(lambda m, a, o: store["norms"].append(o.double())))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return store


def _naive_token(values_bt, token_agg):
    """values_bt: list over tokens of per-token values (floats) -> one per-sequence score."""
    if token_agg == "mean_abs":
        return sum(abs(v) for v in values_bt) / len(values_bt)
    return math.sqrt(sum(v * v for v in values_bt))


def _naive_batch(scores, batch_agg):
    n = len(scores)
    if batch_agg == "mean":
        return sum(scores) / n
    if batch_agg == "l2":
        return math.sqrt(sum(s * s for s in scores))
    mean = sum(scores) / n
    return sum((s - mean) ** 2 for s in scores) / n


@pytest.mark.parametrize("token_agg", ["mean_abs", "l2"])
@pytest.mark.parametrize("batch_agg", ["mean", "l2", "var"])
def test_aggregation_matches_naive_float64(token_agg, batch_agg):
    model = tiny_model("qwen3", num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=12, hidden_size=8,
                       dtype=torch.float64)
    ids = _calibration(n=5, t=6)
    batches = [ids[:3], ids[3:]]
    units, _ = activation_importance(model, batches, token_agg=token_agg, batch_agg=batch_agg)
    store = _capture(model, batches)
    n_layers, nh = 2, 4
    # Per-sequence scores, sequences in order over batches.
    heads = torch.zeros(n_layers, nh, dtype=torch.float64)
    neurons = torch.zeros(n_layers, 12, dtype=torch.float64)
    hidden = torch.zeros(8, dtype=torch.float64)
    for l in range(n_layers):
        o = [store["o"][bi * n_layers + l] for bi in range(len(batches))]
        d = [store["down"][bi * n_layers + l] for bi in range(len(batches))]
        for h in range(nh):
            seq_scores = [
                _naive_token([x[b, t, h * HEAD_DIM : (h + 1) * HEAD_DIM].norm().item() for t in range(x.shape[1])], token_agg)
                for x in o for b in range(x.shape[0])
            ]
            heads[l, h] = _naive_batch(seq_scores, batch_agg)
        for i in range(12):
            seq_scores = [_naive_token([x[b, t, i].item() for t in range(x.shape[1])], token_agg) for x in d for b in range(x.shape[0])]
            neurons[l, i] = _naive_batch(seq_scores, batch_agg)
    norms_per_batch = 2 * n_layers + 1
    for c in range(8):
        seq_scores = []
        for bi in range(len(batches)):
            outs = store["norms"][bi * norms_per_batch : (bi + 1) * norms_per_batch]
            for b in range(outs[0].shape[0]):
                seq_scores.append(sum(_naive_token([y[b, t, c].item() for t in range(y.shape[1])], token_agg) for y in outs))
        hidden[c] = _naive_batch(seq_scores, batch_agg)
    torch.testing.assert_close(units.heads, heads, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(units.kv_groups, heads.reshape(n_layers, 2, 2).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(units.neurons, neurons, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(units.hidden, hidden, rtol=1e-10, atol=1e-12)


def test_output_head_signal_matches_projected_norm():
    model = tiny_model("llama", num_layers=1, dtype=torch.float64)
    ids = _calibration(n=2, t=5)
    units, _ = activation_importance(model, [ids], token_agg="l2", batch_agg="mean", head_signal="output")
    o = _capture(model, [ids])["o"][0]
    w = model.model.layers[0].self_attn.o_proj.weight.double()
    want = torch.zeros(4, dtype=torch.float64)
    for h in range(4):
        sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        contrib = o[..., sl] @ w[:, sl].T  # [B, T, D]
        want[h] = contrib.pow(2).sum((1, 2)).sqrt().mean()
    torch.testing.assert_close(units.heads[0], want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- layer similarity vs naive
def test_layer_similarity_matches_naive(model_type):
    model = tiny_model(model_type, num_layers=4, dtype=torch.float64)
    ids = _calibration(n=3, t=7)
    sim = layer_similarity(model, [ids[:2], ids[2:]])
    adapter = get_adapter(model)
    states = []
    handles = [layer.register_forward_pre_hook(lambda m, a, k: states.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
               for layer in adapter.decoder_layers(model)]
    handles.append(adapter.decoder_layers(model)[-1].register_forward_hook(lambda m, a, o: states.append(o.clone())))
    with torch.no_grad():
        for batch in (ids[:2], ids[2:]):
            model(input_ids=batch)
    for h in handles:
        h.remove()
    per_batch = [states[:5], states[5:]]
    cos = lambda a, b: F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
    bi = torch.stack([torch.cat([1 - cos(s[l], s[l + 1]) for s in per_batch]).mean() for l in range(4)])
    torch.testing.assert_close(sim.block_influence(), bi, rtol=1e-9, atol=1e-12)
    for n in (1, 2, 3):
        ang = torch.stack([torch.cat([torch.arccos(cos(s[l], s[l + n]).clamp(-1, 1)) / math.pi for s in per_batch]).mean()
                           for l in range(4 - n + 1)])
        torch.testing.assert_close(sim.angular_distances(n), ang, rtol=1e-7, atol=1e-9)
        start, dists = sim.best_block(n)
        assert start == int(torch.argmin(ang))
        scores = layer_scores("angular", num_drop=n, similarity=sim)
        assert _last(scores, n) == set(range(start, start + n))
    restored = LayerSimilarity.from_tensors(sim.to_tensors())
    torch.testing.assert_close(restored.mean_angle(), sim.mean_angle())


# ---------------------------------------------------------------------------- baselines
def test_magnitude_matches_direct_norms(model_type):
    model = tiny_model(model_type, num_layers=2, num_heads=4, num_kv_heads=2)
    adapter = get_adapter(model)
    shape = adapter.shape(model.config)
    units = magnitude_importance(model)
    layer = adapter.decoder_layers(model)[1]
    q, q_off = _rows(layer, "q", adapter, shape)
    k, k_off = _rows(layer, "k", adapter, shape)
    v, v_off = _rows(layer, "v", adapter, shape)
    o = adapter.layer_part(layer, "o_proj").weight.double()
    hd = HEAD_DIM
    def sq(t):
        return t.double().pow(2).sum()
    head_sq = []
    for h in range(4):
        s = sq(q.weight[q_off + h * hd : q_off + (h + 1) * hd]) + sq(o[:, h * hd : (h + 1) * hd])
        if q.bias is not None:
            s += sq(q.bias[q_off + h * hd : q_off + (h + 1) * hd])
        head_sq.append(s)
    torch.testing.assert_close(units.heads[1], torch.stack(head_sq).sqrt())
    g = 1
    kv_sq = sq(k.weight[k_off + g * hd : k_off + (g + 1) * hd]) + sq(v.weight[v_off + g * hd : v_off + (g + 1) * hd])
    if k.bias is not None:
        kv_sq += sq(k.bias[k_off + g * hd : k_off + (g + 1) * hd]) + sq(v.bias[v_off + g * hd : v_off + (g + 1) * hd])
    torch.testing.assert_close(units.kv_groups[1, g], (kv_sq + head_sq[2] + head_sq[3]).sqrt())
    gate, g_off = _rows(layer, "gate", adapter, shape)
    up, u_off = _rows(layer, "up", adapter, shape)
    down = adapter.layer_part(layer, "down_proj").weight
    i = 7
    want = (sq(gate.weight[g_off + i]) + sq(up.weight[u_off + i]) + sq(down[:, i])).sqrt()
    torch.testing.assert_close(units.neurons[1, i], want)
    torch.testing.assert_close(units.layers[1], torch.stack([sq(p) for p in layer.parameters()]).sum().sqrt())
    # Hidden channel c: every weight touching it, as a difference of total squared mass.
    c = 5
    total = sum(sq(p) for p in model.parameters())
    column_owners = [model.get_submodule(adapter.embed_tokens), model.get_submodule(adapter.lm_head)]
    row_owners, vector_owners = [], [model.get_submodule(adapter.final_norm)]
    for lay in adapter.decoder_layers(model):
        column_owners += [adapter.layer_part(lay, p) for p in ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj")
                          if getattr(adapter, p) is not None]
        row_owners += [adapter.layer_part(lay, p) for p in ("o_proj", "down_proj")]
        vector_owners += [adapter.get(lay, n) for n in adapter.layer_hidden_norms]
    with torch.no_grad():
        for m in column_owners:
            m.weight[:, c] = 0
        for m in row_owners:
            m.weight[c] = 0
        for m in vector_owners:
            m.weight[c] = 0
    left = sum(sq(p) for p in model.parameters())
    torch.testing.assert_close(units.hidden[c], (total - left).sqrt())


def test_chunked_loss_gradient_matches_full_logits():
    model = tiny_model("phi3", tie_word_embeddings=True, dtype=torch.float64)
    ids = _calibration(n=2, t=9)
    total = lm_loss_backward(model, ids, chunk_tokens=5)
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    assert abs(total - ref.item()) < 1e-9
    for n, p in model.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, rtol=1e-10, atol=1e-12)


def test_taylor_matches_weight_times_gradient(model_type):
    model = tiny_model(model_type, dtype=torch.float64)
    ids = _calibration(n=4, t=8)
    units = taylor_importance(model, [ids[:2], ids[2:]], chunk_tokens=7)
    assert all(p.grad is None for p in model.parameters()), "gradients must not be left behind"
    ref = model
    ref.zero_grad()
    logits = ref(input_ids=ids).logits[:, :-1]
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").backward()
    adapter = get_adapter(model)
    shape = adapter.shape(model.config)
    layer = adapter.decoder_layers(model)[0]
    gate, g_off = _rows(layer, "gate", adapter, shape)
    up, u_off = _rows(layer, "up", adapter, shape)
    down = adapter.layer_part(layer, "down_proj").weight
    for i in (0, 11, 95):
        want = ((gate.weight * gate.weight.grad)[g_off + i].abs().sum() + (up.weight * up.weight.grad)[u_off + i].abs().sum()
                + (down * down.grad)[:, i].abs().sum())
        torch.testing.assert_close(units.neurons[0, i], want, rtol=1e-9, atol=1e-12)
    o = adapter.layer_part(layer, "o_proj").weight
    q, q_off = _rows(layer, "q", adapter, shape)
    h = 3
    want = ((q.weight * q.weight.grad)[q_off + h * HEAD_DIM : q_off + (h + 1) * HEAD_DIM].abs().sum()
            + (o * o.grad)[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].abs().sum())
    if q.bias is not None:
        want += (q.bias * q.bias.grad)[q_off + h * HEAD_DIM : q_off + (h + 1) * HEAD_DIM].abs().sum()
    torch.testing.assert_close(units.heads[0, h], want, rtol=1e-9, atol=1e-12)


def test_random_is_seeded():
    model = tiny_model("llama")
    a, b, c = random_importance(model, 0), random_importance(model, 0), random_importance(model, 1)
    assert torch.equal(a.neurons, b.neurons) and not torch.equal(a.neurons, c.neurons)
    torch.testing.assert_close(a.kv_groups, a.heads.reshape(2, 2, 2).sum(-1))


# ---------------------------------------------------------------------------- one pass, cache, config
def test_activation_importance_is_one_forward_and_leaves_no_hooks():
    model = tiny_model("gemma3_text", num_layers=3)
    calls = []
    handle = model.get_submodule(get_adapter(model).embed_tokens).register_forward_hook(lambda *a: calls.append(1))
    ids = _calibration(n=6)
    compute_importance(model, ids, ImportanceConfig(batch_size=2, cache=False))
    assert len(calls) == 3
    handle.remove()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path))
    model = tiny_model("qwen2")
    ids = _calibration()
    cfg = ImportanceConfig(batch_size=4)
    first, sim = compute_importance(model, ids, cfg)
    assert len(list((tmp_path / "importance").iterdir())) == 1
    assert not list((tmp_path / "importance").glob(".tmp-*"))

    def boom(*a, **k):
        raise AssertionError("importance recomputed despite the cache")

    monkeypatch.setattr(imp, "activation_importance", boom)
    second, sim2 = compute_importance(model, ids, cfg)
    for name in ("heads", "kv_groups", "neurons", "hidden", "layers"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert second.settings == first.settings and second.settings["calibration_tokens"] == ids.numel()
    torch.testing.assert_close(sim2.mean_cos(), sim.mean_cos())
    # Other data, other settings, or other weights: other keys.
    keys = {
        imp.importance_cache_key(model, ids, cfg.settings()),
        imp.importance_cache_key(model, ids[:3], cfg.settings()),
        imp.importance_cache_key(model, ids, ImportanceConfig(token_agg="l2").settings()),
        imp.importance_cache_key(tiny_model("qwen2", seed=1), ids, cfg.settings()),
    }
    assert len(keys) == 4
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))


def test_config_errors_name_the_key():
    from minidistill.config import ConfigError

    for bad, key in ((dict(method="fisher"), "importance.method"), (dict(token_agg="max"), "importance.token_agg"),
                     (dict(batch_agg="sum"), "importance.batch_agg"), (dict(head_signal="x"), "importance.head_signal"),
                     (dict(batch_size=0), "importance.batch_size")):
        with pytest.raises(ConfigError, match=key):
            ImportanceConfig.from_dict(bad)
    with pytest.raises(ValueError, match="calibration ids"):
        compute_importance(tiny_model("llama"), torch.zeros(0, 8, dtype=torch.long), ImportanceConfig(cache=False))
