"""Unit selection and applying prune maps: exact slices, configs, and planted dead units removed losslessly."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from conftest import MODEL_TYPES, tiny_model

from minidistill.adapters import get_adapter
from minidistill.models import state_dict_sha256
from minidistill.prune.apply import apply_prune_map, rescaled_parameter_names
from minidistill.prune.prune_map import LayerMap, PruneMap, PruneMapError
from minidistill.prune.select import select_units, top_k_indices
from minidistill.prune.types import UnitImportance

HEAD_DIM = 8


def random_importance(shape: dict[str, int], seed: int = 0, with_layers: bool = True) -> UnitImportance:
    g = torch.Generator().manual_seed(seed)
    L = shape["num_layers"]
    return UnitImportance(
        heads=torch.rand(L, shape["num_heads"], generator=g),
        kv_groups=torch.rand(L, shape["num_kv_heads"], generator=g),
        neurons=torch.rand(L, shape["intermediate_size"], generator=g),
        hidden=torch.rand(shape["hidden_size"], generator=g),
        layers=torch.rand(L, generator=g) if with_layers else None,
        settings={"method": "random"},
    )


def gqa_model(model_type: str, ratio: int, **kw):
    """8 query heads of dim 8 with 8 // ratio KV groups; hidden 64, 3 layers unless given."""
    kw.setdefault("num_layers", 3)
    return tiny_model(model_type, num_heads=8, num_kv_heads=8 // ratio, head_dim=HEAD_DIM, **kw)


# ---------------------------------------------------------------------------------------------- selection
def test_top_k_indices_prefers_lower_index_on_ties():
    assert top_k_indices(torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0]), 2) == [1, 2]
    assert top_k_indices(torch.zeros(6), 3) == [0, 1, 2]
    assert top_k_indices(torch.tensor([0.1, 0.9, 0.5, 0.7]), 3) == [1, 2, 3]


def test_select_units_matches_naive_reference():
    model = tiny_model("llama", num_layers=4, num_heads=8, num_kv_heads=4, head_dim=HEAD_DIM, intermediate_size=40)
    t = get_adapter(model).shape(model.config)
    imp = random_importance(t, seed=3)
    shape = dict(t, num_layers=2, hidden_size=40, num_heads=2, num_kv_heads=2, intermediate_size=17)
    pmap = select_units(model, imp, shape, teacher_info={"source": "tiny"})

    def naive_top(scores, k):
        ranked = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
        return sorted(ranked[:k])

    assert pmap.kept_layers == naive_top(imp.layers, 2)
    assert pmap.kept_hidden == naive_top(imp.hidden, 40)
    for lm, layer in zip(pmap.layers, pmap.kept_layers):
        groups = naive_top(imp.kv_groups[layer], 2)
        assert lm.kept_kv_groups == groups
        heads = []
        for g in groups:  # teacher groups have 2 heads; keep the better one
            pair = [2 * g, 2 * g + 1]
            heads.append(pair[0] if imp.heads[layer, pair[0]] >= imp.heads[layer, pair[1]] else pair[1])
        assert lm.kept_query_heads == heads
        assert lm.kept_neurons == naive_top(imp.neurons[layer], 17)
    assert pmap.teacher["source"] == "tiny" and pmap.teacher["shape"] == t
    assert pmap.importance == {"method": "random"}
    assert pmap.student_shape == shape


def test_select_units_keeps_all_layers_without_layer_importance():
    model = tiny_model("llama", num_layers=3)
    t = get_adapter(model).shape(model.config)
    pmap = select_units(model, random_importance(t, with_layers=False), dict(t, intermediate_size=50))
    assert pmap.kept_layers == [0, 1, 2]
    with pytest.raises(PruneMapError, match="importance.layers is None"):
        select_units(model, random_importance(t, with_layers=False), dict(t, num_layers=2))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"intermediate_size": 97}, "exceeds the teacher"),
        ({"num_kv_heads": 3}, "exceeds the teacher"),
        ({"num_heads": 3}, "not a multiple"),
        ({"num_heads": 4, "num_kv_heads": 1}, "query heads per KV group"),
        ({"head_dim": 8}, "head_dim"),
        ({"hidden_size": 0}, "positive integer"),
    ],
)
def test_select_units_rejects_impossible_shapes(change, message):
    model = tiny_model("llama")  # 4 heads, 2 KV groups, head_dim 16, MLP 96
    t = get_adapter(model).shape(model.config)
    with pytest.raises(PruneMapError, match=message):
        select_units(model, random_importance(t), dict(t, **change))


def test_select_units_rejects_importance_of_wrong_shape():
    model = tiny_model("llama")
    t = get_adapter(model).shape(model.config)
    imp = random_importance(t)
    imp.neurons = imp.neurons[:, :10]
    with pytest.raises(PruneMapError, match="importance.neurons"):
        select_units(model, imp, t)


# ---------------------------------------------------------------------------------------------- exact slices
def _heads(w: torch.Tensor, heads: list[int], hd: int, dim: int) -> torch.Tensor:
    """Naive head selection along ``dim`` via a reshape to [n_heads, hd]."""
    if dim == 0:
        return torch.cat([w[h * hd : (h + 1) * hd] for h in heads], dim=0)
    return torch.cat([w[:, h * hd : (h + 1) * hd] for h in heads], dim=1)


def expected_params(teacher, pmap: PruneMap) -> dict[str, torch.Tensor]:
    """Student parameters computed independently of minidistill.prune.apply (python index lists)."""
    a = get_adapter(teacher)
    t = pmap.teacher["shape"]
    hd, H = t["head_dim"], pmap.kept_hidden
    tp = dict(teacher.named_parameters())
    out = {
        f"{a.embed_tokens}.weight": tp[f"{a.embed_tokens}.weight"][:, H],
        f"{a.final_norm}.weight": tp[f"{a.final_norm}.weight"][H],
    }
    if f"{a.lm_head}.weight" in tp:
        out[f"{a.lm_head}.weight"] = tp[f"{a.lm_head}.weight"][:, H]
    for i, (layer, lm) in enumerate(zip(pmap.kept_layers, pmap.layers)):
        src, dst = f"{a.layers}.{layer}.", f"{a.layers}.{i}."
        w = lambda part, kind="weight": tp[f"{src}{getattr(a, part)}.{kind}"]  # noqa: E731
        key = lambda part, kind="weight": f"{dst}{getattr(a, part)}.{kind}"  # noqa: E731
        if a.qkv_proj:
            full = w("qkv_proj")
            nq, nkv = t["num_heads"] * hd, t["num_kv_heads"] * hd
            q, k, v = full[:nq], full[nq : nq + nkv], full[nq + nkv :]
            parts = [_heads(q, lm.kept_query_heads, hd, 0), _heads(k, lm.kept_kv_groups, hd, 0), _heads(v, lm.kept_kv_groups, hd, 0)]
            out[key("qkv_proj")] = torch.cat(parts)[:, H]
        else:
            out[key("q_proj")] = _heads(w("q_proj"), lm.kept_query_heads, hd, 0)[:, H]
            out[key("k_proj")] = _heads(w("k_proj"), lm.kept_kv_groups, hd, 0)[:, H]
            out[key("v_proj")] = _heads(w("v_proj"), lm.kept_kv_groups, hd, 0)[:, H]
            if f"{src}{a.q_proj}.bias" in tp:
                out[key("q_proj", "bias")] = _heads(w("q_proj", "bias"), lm.kept_query_heads, hd, 0)
                out[key("k_proj", "bias")] = _heads(w("k_proj", "bias"), lm.kept_kv_groups, hd, 0)
                out[key("v_proj", "bias")] = _heads(w("v_proj", "bias"), lm.kept_kv_groups, hd, 0)
        out[key("o_proj")] = _heads(w("o_proj")[H], lm.kept_query_heads, hd, 1)
        N = lm.kept_neurons
        if a.gate_up_proj:
            full = w("gate_up_proj")
            inter = t["intermediate_size"]
            out[key("gate_up_proj")] = torch.cat([full[:inter][N], full[inter:][N]])[:, H]
        else:
            out[key("gate_proj")] = w("gate_proj")[N][:, H]
            out[key("up_proj")] = w("up_proj")[N][:, H]
        out[key("down_proj")] = w("down_proj")[H][:, N]
        for norm in a.layer_hidden_norms:
            out[f"{dst}{norm}.weight"] = tp[f"{src}{norm}.weight"][H]
        for part in ("q_norm", "k_norm"):
            if getattr(a, part):
                out[key(part)] = w(part)
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_apply_prune_map_slices_bit_exactly(model_type, tied):
    teacher = gqa_model(model_type, ratio=2, tie_word_embeddings=tied, intermediate_size=48, num_layers=4)
    a = get_adapter(teacher)
    t = a.shape(teacher.config)
    before = state_dict_sha256(teacher)
    shape = dict(t, num_layers=3, hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=30)
    pmap = select_units(teacher, random_importance(t, seed=1), shape)
    student = apply_prune_map(teacher, pmap)

    assert state_dict_sha256(teacher) == before, "the teacher must not be modified"
    assert a.shape(student.config) == shape
    want = expected_params(teacher, pmap)
    got = dict(student.named_parameters())
    assert set(got) == set(want)
    scale = math.sqrt(t["hidden_size"] / shape["hidden_size"])
    rescaled = rescaled_parameter_names(teacher, pmap)
    for name, value in got.items():
        if name in rescaled:
            continue
        assert torch.equal(value, want[name]), name
    if a.embed_scaled_by_sqrt_hidden:
        emb = f"{a.embed_tokens}.weight"
        assert rescaled[0] == emb
        torch.testing.assert_close(got[emb], want[emb] * scale, rtol=1e-6, atol=0)
        if tied:
            norm = f"{a.final_norm}.weight"
            off = a.norm_weight_offset
            torch.testing.assert_close(got[norm] + off, (want[norm] + off) / scale, rtol=1e-6, atol=1e-7)
    else:
        assert rescaled == []
    emb = student.get_submodule(a.embed_tokens).weight
    head = student.get_submodule(a.lm_head).weight
    assert (head is emb) == tied and bool(student.config.tie_word_embeddings) == tied
    for i, layer in enumerate(a.decoder_layers(student)):
        assert a.layer_part(layer, "o_proj").weight.shape[1] == 4 * HEAD_DIM
        assert layer.self_attn.layer_idx == i
    for name in a.per_layer_config_lists:
        if getattr(teacher.config, name, None) is not None:
            assert getattr(student.config, name) == [getattr(teacher.config, name)[k] for k in pmap.kept_layers]
    # The student runs.
    student(torch.randint(0, 128, (1, 6)))


def test_apply_prune_map_reindexes_layer_types_and_window_fields():
    teacher = tiny_model("qwen2", num_layers=4, sliding_window=8, use_sliding_window=True, max_window_layers=2)
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    pmap = PruneMap.identity(get_adapter(teacher).shape(teacher.config))
    keep = [1, 2, 3]
    pmap.kept_layers, pmap.layers = keep, [pmap.layers[k] for k in keep]
    pmap.student_shape["num_layers"] = 3
    student = apply_prune_map(teacher, pmap)
    assert student.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert student.config.max_window_layers == 1
    assert student.config.num_hidden_layers == 3


def test_apply_prune_map_rejects_map_of_another_teacher():
    teacher = tiny_model("llama")
    shape = get_adapter(teacher).shape(teacher.config)
    other = PruneMap.identity(dict(shape, intermediate_size=128))
    with pytest.raises(PruneMapError, match="made for a teacher of shape"):
        apply_prune_map(teacher, other)
    typed = PruneMap.identity(shape, teacher={"shape": shape, "model_type": "qwen3"})
    with pytest.raises(PruneMapError, match="qwen3"):
        apply_prune_map(teacher, typed)


# ---------------------------------------------------------------------------------------------- planted dead units
def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-10) -> None:
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max abs error {err:.3e} vs scale {want.abs().max().item():.3e}"


def plant_dead_units(teacher, ratio: int) -> PruneMap:
    """Zero units in ``teacher`` (in place) and return the map that drops exactly them."""
    a = get_adapter(teacher)
    t = a.shape(teacher.config)
    n_kv, group = t["num_kv_heads"], ratio
    dead_groups = {1} if n_kv > 1 else set()
    if ratio == 1:
        dead_groups = {1, 5}
    dead_heads_in_group = set(range(0, group, 2)) if group > 1 else set()  # every other head in a group
    dead_neurons = {0, 5, 6, 50, 95}
    dead_layer = 1
    kept_groups = [g for g in range(n_kv) if g not in dead_groups]
    kept_heads = [g * group + j for g in kept_groups for j in range(group) if j not in dead_heads_in_group]
    dead_heads = [h for h in range(t["num_heads"]) if h not in kept_heads]
    with torch.no_grad():
        for index, layer in enumerate(a.decoder_layers(teacher)):
            o = a.layer_part(layer, "o_proj").weight
            down = a.layer_part(layer, "down_proj").weight
            if index == dead_layer:
                o.zero_()
                down.zero_()
                continue
            for h in dead_heads:
                o[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
            down[:, sorted(dead_neurons)] = 0
    kept_layers = [k for k in range(t["num_layers"]) if k != dead_layer]
    neurons = [n for n in range(t["intermediate_size"]) if n not in dead_neurons]
    shape = dict(
        t,
        num_layers=len(kept_layers),
        num_heads=len(kept_heads),
        num_kv_heads=len(kept_groups),
        intermediate_size=len(neurons),
    )
    layers = [LayerMap(list(kept_groups), list(kept_heads), list(neurons)) for _ in kept_layers]
    return PruneMap({"shape": t}, shape, kept_layers, list(range(t["hidden_size"])), layers)


@pytest.mark.parametrize("ratio", [1, 2, 4], ids=["mha", "gqa2", "gqa4"])
def test_dead_heads_groups_neurons_and_layers_prune_losslessly(model_type, ratio):
    teacher = gqa_model(model_type, ratio=ratio, dtype=torch.float64)
    pmap = plant_dead_units(teacher, ratio)
    assert pmap.student_shape["num_heads"] < 8 and pmap.student_shape["num_layers"] == 2
    student = apply_prune_map(teacher, pmap)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(student(ids).logits, teacher(ids).logits)


def norm_adjusted_reference(teacher, kept: int):
    """The teacher with every hidden RMSNorm computing its mean over ``kept`` channels instead of all.

    When the dropped channels are zero at a norm's input, ``rms_K = rms_H * sqrt(H / K)`` exactly if
    the gain ``(offset + w)`` is multiplied by ``sqrt(K / H)`` and eps by ``K / H``.
    """
    a = get_adapter(teacher)
    ref = copy.deepcopy(teacher)
    H = a.shape(teacher.config)["hidden_size"]
    norms = [ref.get_submodule(a.final_norm)]
    for layer in a.decoder_layers(ref):
        norms += [layer.get_submodule(n) for n in a.layer_hidden_norms]
    with torch.no_grad():
        for norm in norms:
            off = a.norm_weight_offset
            norm.weight.copy_((norm.weight + off) * math.sqrt(kept / H) - off)
            for eps in ("variance_epsilon", "eps"):
                if hasattr(norm, eps):
                    setattr(norm, eps, getattr(norm, eps) * kept / H)
    return ref


def use_float64_norms(model, offset: float) -> None:
    """Replace every RMSNorm's forward by a float64 one (HF's compute in float32 even for float64 models)."""

    def forward(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
        x = x.double()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + self.weight.double())

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dead_hidden_channels_match_hand_computed_reference(model_type, tied):
    teacher = gqa_model(model_type, ratio=2, dtype=torch.float64, tie_word_embeddings=tied)
    a = get_adapter(teacher)
    t = a.shape(teacher.config)
    dead = [3, 17, 18, 40, 63]
    kept = [c for c in range(t["hidden_size"]) if c not in dead]
    with torch.no_grad():
        teacher.get_submodule(a.embed_tokens).weight[:, dead] = 0
        for layer in a.decoder_layers(teacher):
            a.layer_part(layer, "o_proj").weight[dead] = 0
            a.layer_part(layer, "down_proj").weight[dead] = 0
    pmap = PruneMap.identity(t)
    pmap.kept_hidden = kept
    pmap.student_shape["hidden_size"] = len(kept)
    student = apply_prune_map(teacher, pmap)
    reference = norm_adjusted_reference(teacher, len(kept))
    for model in (teacher, student, reference):
        use_float64_norms(model, a.norm_weight_offset)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        assert_logits_close(student(ids).logits, want)
        # The norm adjustment matters: the unadjusted teacher differs well beyond rounding.
        assert (teacher(ids).logits - want).abs().max() > 1e-6 * want.abs().max()


def test_every_model_type_is_covered():
    assert set(MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"}
