"""Depth selection: iterative greedy removal and the contiguous block, against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from minidistill.adapters import get_adapter
from minidistill.data import DataConfig, TextData, TokenBlocks
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.layer_importance import (
    LAYER_METHODS,
    iterative_layer_removal,
    layer_drop_loss_increase,
    layer_loss_scores,
    layer_scores,
    layer_similarity,
)
from minidistill.prune.pipeline import PruneConfig, prune_model
from minidistill.prune.prune_map import PruneMap


def tiny_data(vocab=128, train=8, heldout=3, seq_len=12, seed=0) -> TextData:
    g = torch.Generator().manual_seed(seed)
    return TextData(train=TokenBlocks(torch.randint(3, vocab, (train, seq_len), generator=g)),
                    heldout=TokenBlocks(torch.randint(3, vocab, (heldout, seq_len), generator=g)),
                    config=DataConfig(seq_len=seq_len))


def prune_cfg(**kw) -> PruneConfig:
    """Explicit depth targets, no reconstruction: the comparison is about which layers are kept."""
    return PruneConfig.from_dict({"calib_blocks": 8, "show_progress": False, "importance": {"batch_size": 4, "cache": False},
                                  "reconstruction": {"enabled": False}, **kw})


def _batches(vocab=128, n=4, t=12, seed=1):
    ids = torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    return [ids[:2], ids[2:]]


def _depth_pruned(model, kept: list[int]):
    """The model with only the decoder layers ``kept``, built through a prune map (a real smaller model)."""
    shape = get_adapter(model).shape(model.config)
    pmap = PruneMap.identity(shape, teacher={"source": "tiny", "shape": dict(shape)})
    pmap.kept_layers = list(kept)
    pmap.layers = [pmap.layers[i] for i in kept]
    pmap.student_shape = {**shape, "num_layers": len(kept)}
    pmap.validate()
    return apply_prune_map(model, pmap)


def _brute_force_greedy(model, batches, num_drop):
    """Greedy removal evaluating every candidate on an explicitly built pruned model."""
    num_layers = model.config.num_hidden_layers
    order, losses = [], []
    for _ in range(num_drop):
        trial = {}
        for i in range(num_layers):
            if i in order:
                continue
            kept = [j for j in range(num_layers) if j not in order and j != i]
            trial[i] = heldout_loss(_depth_pruned(model, kept), batches)["loss"]
        best = min(trial, key=lambda i: (trial[i], i))
        order.append(best)
        losses.append(trial[best])
    return order, losses


def test_iterative_first_removal_is_one_shot_lm_loss_argmin(model_type):
    model = tiny_model(model_type, num_layers=4, dtype=torch.float64)
    batches = _batches()
    inc = layer_drop_loss_increase(model, batches)
    removal = iterative_layer_removal(model, batches, 1)
    assert removal.order == [int(torch.argmin(inc))]
    assert removal.losses[0] - removal.base_loss == pytest.approx(float(inc.min()), rel=1e-9, abs=1e-12)
    assert removal.evaluations == 4
    # The last step's increases are the one-shot ones at step 1.
    torch.testing.assert_close(removal.last_increase, inc, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])  # plain, q/k norms, per-layer attention types
def test_iterative_equals_brute_force_greedy(arch):
    model = tiny_model(arch, num_layers=5, dtype=torch.float64)
    batches = _batches()
    want_order, want_losses = _brute_force_greedy(model, batches, 3)
    for cache_prefix in (True, False):
        removal = iterative_layer_removal(model, batches, 3, cache_prefix=cache_prefix)
        assert removal.order == want_order
        assert removal.losses == pytest.approx(want_losses, rel=1e-9)
        assert removal.evaluations == 5 + 4 + 3
        assert removal.base_loss == pytest.approx(heldout_loss(model, batches)["loss"], rel=1e-12)
        # The model is left as it was.
        assert all(type(layer).__name__.endswith("DecoderLayer") for layer in get_adapter(model).decoder_layers(model))
    scores = removal.scores()
    for n in range(4):  # the n lowest scores are the first n removals
        assert set(torch.argsort(scores)[:n].tolist()) == set(want_order[:n])


def test_iterative_in_prune_model_drops_the_greedy_layers_and_records_them():
    teacher = tiny_model("llama", num_layers=5, dtype=torch.float64)
    data = tiny_data(train=8, seq_len=12)
    cfg = prune_cfg(layer_method="iterative", layer_loss_blocks=4, target={"num_layers": 3})
    res = prune_model(teacher, None, data, cfg, teacher_source="tiny")
    batches = [data.train.input_ids[:4]]  # importance.batch_size=4
    order, losses = _brute_force_greedy(teacher, batches, 2)
    assert res.prune_map.kept_layers == sorted(set(range(5)) - set(order))
    imp = res.prune_map.importance
    assert imp["layer_method"] == "iterative"
    assert imp["layer_removal_order"] == order
    assert imp["layer_removal_losses"] == pytest.approx(losses, abs=1e-6)
    assert imp["layer_loss_blocks"] == 4 and imp["layer_loss_evaluations"] == 5 + 4
    assert "layer_loss_s" in res.timings
    # The pruned student is exactly the brute-force reference model.
    ids = data.heldout.input_ids
    with torch.no_grad():
        want = _depth_pruned(teacher, res.prune_map.kept_layers)(input_ids=ids).logits
        got = res.student(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_layer_loss_scores_lm_loss_is_the_one_shot_increase():
    model = tiny_model("llama", num_layers=3, dtype=torch.float64)
    batches = _batches()
    scores, record = layer_loss_scores("lm_loss", model, batches, max_drop=1)
    torch.testing.assert_close(scores, layer_drop_loss_increase(model, batches))
    assert record["layer_loss_blocks"] == 4
    with pytest.raises(ValueError, match="not loss-based"):
        layer_loss_scores("angular", model, batches, max_drop=1)


# ---------------------------------------------------------------------------- contiguous block
def _naive_block_distances(model, batches, n):
    """Angular distance between the input of layer l and of layer l + n, per start l, in float64."""
    layers = get_adapter(model).decoder_layers(model)
    per_batch = []
    for ids in batches:
        states = []
        handles = [layer.register_forward_pre_hook(lambda m, a, k: states.append((a[0] if a else k["hidden_states"]).clone()),
                                                   with_kwargs=True) for layer in layers]
        handles.append(layers[-1].register_forward_hook(lambda m, a, o: states.append(o.clone())))
        with torch.no_grad():
            model(input_ids=ids)
        for h in handles:
            h.remove()
        per_batch.append(states)
    out = []
    for start in range(len(layers) - n + 1):
        angles = []
        for s in per_batch:
            a, b = s[start].reshape(-1, s[start].shape[-1]), s[start + n].reshape(-1, s[start].shape[-1])
            angles.append(torch.arccos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / math.pi)
        out.append(torch.cat(angles).mean())
    return torch.stack(out)


def test_contiguous_drops_the_brute_force_best_block(model_type):
    model = tiny_model(model_type, num_layers=6, dtype=torch.float64)
    batches = _batches()
    sim = layer_similarity(model, batches)
    ang = sim.mean_angle()
    for n in range(1, 5):
        brute = min(range(6 - n + 1), key=lambda s: float(ang[s, s + n]))  # every block of n layers
        if n in (1, 3):  # the statistics themselves against naive float64 angles
            assert brute == int(torch.argmin(_naive_block_distances(model, batches, n)))
        for method in ("contiguous", "angular"):
            scores = layer_scores(method, num_drop=n, similarity=sim)
            assert set(torch.argsort(scores, stable=True)[:n].tolist()) == set(range(brute, brute + n))


def test_contiguous_in_prune_model_keeps_the_complement_of_the_block():
    teacher = tiny_model("llama", num_layers=6, dtype=torch.float64)
    data = tiny_data(train=8, seq_len=12)
    res = prune_model(teacher, None, data, prune_cfg(layer_method="contiguous", target={"num_layers": 3}),
                      teacher_source="tiny")
    naive = _naive_block_distances(teacher, [data.train.input_ids[:4], data.train.input_ids[4:]], 3)
    start = int(torch.argmin(naive))
    assert res.prune_map.kept_layers == [i for i in range(6) if not start <= i < start + 3]
    assert res.prune_map.importance["layer_method"] == "contiguous"


def test_methods_listed():
    assert {"contiguous", "iterative", "lm_loss", "block_influence", "angular"} <= set(LAYER_METHODS)
