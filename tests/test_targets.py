"""Targets: explicit shapes and GQA checks, budgets, exact parameter counts, candidate enumeration, scoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from minidistill.adapters import count_parameters, count_parameters_for_shape, get_adapter
from minidistill.config import ConfigError
from minidistill.prune.targets import (
    AXES,
    Candidate,
    ParamCounter,
    SearchConfig,
    ShapeSpace,
    TargetConfig,
    TargetError,
    balance_cost,
    budget_params,
    config_rejects_shape,
    enumerate_candidates,
    explicit_shape,
    family_of,
    format_rows,
    head_options,
    kl_to_teacher,
    score_candidates,
    select_candidates,
    spearman,
    teacher_hidden_states,
    width_options,
)

TEACHER = {"num_layers": 6, "hidden_size": 64, "num_heads": 8, "num_kv_heads": 4, "head_dim": 16, "intermediate_size": 96}


# ---------------------------------------------------------------------------- explicit shapes
def test_explicit_shape_keeps_unset_dimensions():
    shape = explicit_shape(TEACHER, TargetConfig(num_layers=4, intermediate_size=48))
    assert shape == {**TEACHER, "num_layers": 4, "intermediate_size": 48}


def test_num_heads_alone_picks_the_largest_valid_kv_count():
    assert explicit_shape(TEACHER, TargetConfig(num_heads=6))["num_kv_heads"] == 3
    assert explicit_shape(TEACHER, TargetConfig(num_heads=4))["num_kv_heads"] == 4


@pytest.mark.parametrize(
    "target,match",
    [
        (dict(num_heads=6, num_kv_heads=4), "not a multiple of num_kv_heads=4"),
        (dict(num_heads=16, num_kv_heads=4), r"num_heads=16 must be in \[1, 8\]"),
        (dict(num_heads=6, num_kv_heads=2), "3 query heads per KV group but the teacher's groups have 2"),
        (dict(num_kv_heads=5), r"num_kv_heads=5 must be in \[1, 4\]"),
        (dict(num_layers=7), r"num_layers=7 must be in \[1, 6\]"),
        (dict(num_heads=7), "not a multiple"),
    ],
)
def test_shapes_that_break_gqa_or_exceed_the_teacher(target, match):
    with pytest.raises(TargetError, match=match):
        explicit_shape(TEACHER, TargetConfig(**target))


def test_target_config_errors():
    with pytest.raises(ConfigError, match="at least one target shape field"):
        TargetConfig.from_dict({})
    with pytest.raises(ConfigError, match="exclude each other"):
        TargetConfig.from_dict({"params": 0.5, "hidden_size": 32})
    with pytest.raises(ConfigError, match="target.params=-1"):
        TargetConfig.from_dict({"params": -1})
    with pytest.raises(ConfigError, match="target.num_layers=0"):
        TargetConfig.from_dict({"num_layers": 0})
    with pytest.raises(ConfigError, match="search.tolerance"):
        SearchConfig.from_dict({"tolerance": 0})
    with pytest.raises(ConfigError, match="search.max_candidates"):
        SearchConfig.from_dict({"max_candidates": 0})


# ---------------------------------------------------------------------------- budgets and counts
def test_budget_fraction_and_count():
    assert budget_params(1000, 0.5) == 500
    assert budget_params(1000, 1.0) == 1000
    assert budget_params(1000, 750) == 750
    with pytest.raises(TargetError, match="exceeds the teacher's 1,000"):
        budget_params(1000, 1001)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("non_embedding", [False, True])
def test_param_counter_is_exact(model_type, tied, non_embedding):
    model = tiny_model(model_type, num_layers=3, num_heads=8, num_kv_heads=2, intermediate_size=80, tie_word_embeddings=tied)
    counter = ParamCounter(model.config, non_embedding=non_embedding)
    assert counter.coefficients is not None
    assert counter.count(counter.teacher_shape) == count_parameters(model, non_embedding=non_embedding)
    g = torch.Generator().manual_seed(7)
    t = counter.teacher_shape
    shapes = []
    for _ in range(4):
        kv = int(torch.randint(1, 3, (1,), generator=g))
        shapes.append({**t, "num_layers": int(torch.randint(1, 4, (1,), generator=g)),
                       "hidden_size": int(torch.randint(8, t["hidden_size"] + 1, (1,), generator=g)),
                       "num_kv_heads": kv, "num_heads": kv * int(torch.randint(1, 5, (1,), generator=g)),
                       "intermediate_size": int(torch.randint(1, 81, (1,), generator=g))})
    want = [count_parameters_for_shape(model.config, s, non_embedding=non_embedding) for s in shapes]
    assert counter.count_many(shapes) == want


# ---------------------------------------------------------------------------- enumeration
def test_width_and_head_options():
    assert width_options(96, 32) == [32, 64, 96]
    assert width_options(100, 32) == [32, 64, 96, 100]
    assert width_options(20, 64) == [20]
    assert sorted(head_options(TEACHER)) == sorted([(kv * p, kv) for kv in range(1, 5) for p in (1, 2)])


def test_candidates_are_hardware_friendly_and_within_budget():
    model = tiny_model("llama", num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=96)
    counter = ParamCounter(model.config)
    full = count_parameters(model)
    budget = int(0.55 * full)
    search = SearchConfig(multiple_of=16, tolerance=0.02, max_layer_drop=0.5, max_candidates=1000)
    cands = enumerate_candidates(counter, budget, search)
    assert len(cands) > 5
    group = 2
    t = counter.teacher_shape
    for c in cands:
        s = c.shape
        if c.in_band:
            assert 0.98 * budget <= c.params <= budget and c.eligible
        else:  # the nearest single-axis shape outside the band, kept so that the axis is scored
            assert c.family in AXES and family_of(t, s) == c.family
            assert c.eligible == (0.97 * budget <= c.params <= 1.01 * budget)
        assert c.params == count_parameters_for_shape(model.config, s)
        assert s["hidden_size"] % 16 == 0 and s["intermediate_size"] % 16 == 0
        assert s["num_heads"] % s["num_kv_heads"] == 0 and s["num_heads"] // s["num_kv_heads"] <= group
        assert 3 <= s["num_layers"] <= 6
    assert [c.cost for c in cands] == sorted(c.cost for c in cands)
    in_band = [c for c in cands if c.in_band]
    capped = enumerate_candidates(counter, budget, search.replace(max_candidates=3))
    assert [c.shape for c in in_band[:3]] == [c.shape for c in capped if c.in_band][:3]
    width_only = enumerate_candidates(counter, budget, search.replace(max_layer_drop=0.0))
    assert all(c.shape["num_layers"] == 6 for c in width_only)


def test_budget_errors_name_what_is_reachable():
    model = tiny_model("llama", num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=96)
    counter = ParamCounter(model.config, non_embedding=True)
    full = count_parameters(model, non_embedding=True)
    search = SearchConfig(multiple_of=16, max_layer_drop=0.5)
    with pytest.raises(TargetError, match="exceeds the teacher"):
        enumerate_candidates(counter, full + 1, search)
    smallest = count_parameters_for_shape(model.config, {**counter.teacher_shape, "num_layers": 3, "hidden_size": 16,
                                                         "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 16},
                                          non_embedding=True)
    with pytest.raises(TargetError, match=f"smallest reachable shape L3 D16 H1/KV1 I16 with {smallest:,}"):
        enumerate_candidates(counter, smallest - 1, search)
    # Widths in steps of 64 leave gaps that a 0.1% window cannot hit.
    with pytest.raises(TargetError, match="no candidate shape"):
        enumerate_candidates(counter, int(0.5 * full), SearchConfig(multiple_of=64, tolerance=0.001, max_layer_drop=0.0,
                                                                   single_axis_slack=0.0))


# ---------------------------------------------------------------------------- scoring
def test_kl_to_teacher_matches_full_logits_float64():
    teacher = tiny_model("gemma3_text", dtype=torch.float64)
    student = tiny_model("gemma3_text", seed=1, dtype=torch.float64)
    batches = [torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    kl = kl_to_teacher(student, teacher, teacher_hidden_states(teacher, batches), batches, chunk_tokens=5)
    with torch.no_grad():
        ref, n = 0.0, 0
        for ids in batches:
            t = F.log_softmax(teacher(input_ids=ids).logits, -1)
            s = F.log_softmax(student(input_ids=ids).logits, -1)
            ref += (t.exp() * (t - s)).sum().item()
            n += ids.numel()
    assert math.isclose(kl, ref / n, rel_tol=1e-10)
    assert abs(kl_to_teacher(teacher, teacher, teacher_hidden_states(teacher, batches), batches)) < 1e-12


def test_score_candidates_ranks_by_heldout_loss_and_keeps_the_best(caplog):
    teacher = tiny_model("llama")
    others = {1: tiny_model("llama", seed=1), 2: tiny_model("llama", seed=2)}
    t = get_adapter(teacher).shape(teacher.config)
    cands = [Candidate({**t, "num_layers": k}, 100 * k, 0.0) for k in (1, 2)]
    built = []

    def build(shape, reconstruct):
        built.append((shape["num_layers"], reconstruct))
        return others[shape["num_layers"]], f"map{shape['num_layers']}"

    heldout = [torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))]
    from minidistill.evaluation.perplexity import heldout_loss

    losses = {k: heldout_loss(m, heldout)["loss"] for k, m in others.items()}
    with caplog.at_level("INFO"):
        res = score_candidates(teacher, cands, build, heldout, SearchConfig(), full_params=1000)
    best = min(losses, key=losses.get)
    assert res.best_map == f"map{best}" and res.best_student is others[best]
    assert [r["num_layers"] for r in res.rows] == sorted(losses, key=losses.get)
    assert [r["rank"] for r in res.rows] == [1, 2]
    assert built == [(1, False), (2, False)]
    assert math.isclose(res.rows[0]["loss"], losses[best])
    assert "budget search" in caplog.text and "| rank |" in caplog.text
    table = format_rows(res.rows)
    assert table.count("\n") == 3 and "100" in table


def test_candidates_only_shapes_transformers_can_save():
    # LlamaConfig refuses hidden sizes that are not a multiple of the head count (even with head_dim set),
    # so a pruned checkpoint of such a shape could not be saved or reloaded.
    model = tiny_model("llama", hidden_size=96, num_heads=6, num_kv_heads=3, num_layers=2, intermediate_size=96)
    counter = ParamCounter(model.config)
    assert config_rejects_shape(model.config, {"hidden_size": 64, "num_heads": 6, "num_kv_heads": 3})
    assert config_rejects_shape(model.config, {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2}) is None
    search = SearchConfig(multiple_of=32, tolerance=0.5, max_candidates=1000, max_layer_drop=0.0)
    cands = enumerate_candidates(counter, int(counter.count(counter.teacher_shape) * 0.7), search)
    assert cands and all(config_rejects_shape(model.config, c.shape) is None for c in cands)
    assert all(c.shape["hidden_size"] % c.shape["num_heads"] == 0 for c in cands)


# ---------------------------------------------------------------------------- lazy enumeration over every axis
def _brute_force_band(model, search, low, high):
    """Every shape of the full product whose exact count lies in [low, high] (the reference)."""
    import itertools

    counter = ParamCounter(model.config)
    t = counter.teacher_shape
    min_layers = max(1, t["num_layers"] - int(t["num_layers"] * search.max_layer_drop))
    out = {}
    for L, D, (H, K), I in itertools.product(range(min_layers, t["num_layers"] + 1),
                                             width_options(t["hidden_size"], search.multiple_of), head_options(t),
                                             width_options(t["intermediate_size"], search.multiple_of)):
        shape = {"num_layers": L, "hidden_size": D, "num_heads": H, "num_kv_heads": K, "intermediate_size": I,
                 "head_dim": t["head_dim"]}
        if config_rejects_shape(model.config, shape) is None:
            p = counter.count(shape)
            if low <= p <= high:
                out[(L, D, H, K, I)] = p
    return out


@pytest.mark.parametrize("model_type,fraction", [("llama", 0.55), ("qwen3", 0.4), ("gemma3_text", 0.7)])
def test_lazy_enumeration_equals_brute_force_filter_of_the_product(model_type, fraction):
    model = tiny_model(model_type, num_layers=5, hidden_size=128, num_heads=8, num_kv_heads=4, intermediate_size=96)
    search = SearchConfig(multiple_of=16, tolerance=0.05, max_layer_drop=0.6)
    counter = ParamCounter(model.config)
    budget = int(fraction * counter.count(counter.teacher_shape))
    low, high = budget * (1 - search.tolerance), budget
    want = _brute_force_band(model, search, low, high)
    space = ShapeSpace(counter, search)
    got = {tuple(s[k] for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")): p
           for s, p in space.iter_band(low, high)}
    assert got == want and len(got) >= 5
    for key in list(got)[:3]:  # the closed form is exact: check against meta-device builds
        shape = dict(zip(("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"), key))
        assert got[key] == count_parameters_for_shape(model.config, {**counter.teacher_shape, **shape})
    assert space.shapes_built == len(got) < space.product_size


def test_8b_enumeration_is_lazy_fast_and_bounded(monkeypatch):
    import inspect
    import time
    import tracemalloc

    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    counter = ParamCounter(cfg, non_embedding=True)
    assert counter.coefficients is not None

    def no_bulk_count(*a, **k):
        raise AssertionError("the enumeration counted shapes in bulk")

    monkeypatch.setattr(ParamCounter, "count_many", no_bulk_count)
    monkeypatch.setattr(ParamCounter, "build_count", no_bulk_count)
    search = SearchConfig(multiple_of=64, max_candidates=6)
    space = ShapeSpace(counter, search)
    budget = budget_params(counter.count(counter.teacher_shape), 0.5)
    assert inspect.isgenerator(space.iter_band(0, budget))
    tracemalloc.start()
    t0 = time.perf_counter()
    sel = select_candidates(space, budget)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert space.product_size == 17 * 64 * 32 * 224
    assert sel.in_band > 1000 and sel.shapes_built < space.product_size / 100
    assert seconds < 30 and peak < 64 * 2**20
    families = {c.family for c in sel.candidates}
    assert {"depth", "heads", "mlp", "hidden", "mix"} <= families
    depth = [c for c in sel.candidates if c.family == "depth"]
    # depth-only cannot hit 50% exactly: its nearest shape (16 layers) is scored, flagged outside the band
    assert any(c.shape["num_layers"] == 16 and not c.in_band and c.eligible for c in depth)


def test_scored_set_holds_the_best_prescored_shape_of_every_family():
    model = tiny_model("llama", num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=96)
    counter = ParamCounter(model.config)
    budget = int(0.7 * counter.count(counter.teacher_shape))
    search = SearchConfig(multiple_of=16, tolerance=0.04, max_layer_drop=0.5, max_candidates=2)
    t = counter.teacher_shape

    def prescore(shape, params):  # balance-like: favours mixes, the old pre-rank that hid single axes
        return balance_cost(t, shape, params, budget)

    low = budget * (1 - search.tolerance)
    every = [(s, p) for s, p in ShapeSpace(counter, search).iter_band(low, budget)]
    best = {}
    for s, p in every:
        f = family_of(t, s)
        if f not in best or prescore(s, p) < prescore(*best[f]):
            best[f] = (s, p)
    sel = select_candidates(ShapeSpace(counter, search), budget, prescore)
    shapes = [c.shape for c in sel.candidates]
    assert best and all(s in shapes for s, _ in best.values())
    top2 = sorted(every, key=lambda sp: prescore(*sp))[:2]
    assert all(s in shapes for s, _ in top2)
    for axis in AXES:  # every axis is scored: in the band, or its nearest shapes either side
        assert any(c.family == axis for c in sel.candidates), axis
        if axis not in best:
            assert all(not c.in_band for c in sel.candidates if c.family == axis)
    assert sel.per_family == {f: sum(family_of(t, s) == f for s, _ in every) for f in ("depth", "heads", "mlp", "hidden", "mix")}


def test_no_candidate_names_the_limiting_axis_and_nearest_budget():
    model = tiny_model("llama", num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=96)
    counter = ParamCounter(model.config, non_embedding=True)
    full = counter.count(counter.teacher_shape)
    search = SearchConfig(multiple_of=64, tolerance=0.001, max_layer_drop=0.0, single_axis_slack=0.0)
    with pytest.raises(TargetError) as e:
        enumerate_candidates(counter, int(0.5 * full), search)
    msg = str(e.value)
    assert "nearest below:" in msg and "nearest above:" in msg and "nearest reachable budget is" in msg
    # the reference: the sizes of the full product nearest the band on each side
    space = ShapeSpace(ParamCounter(model.config, non_embedding=True), search)
    all_sizes = sorted({space.count(L, D, H, K, I) for L, D, H, K in space.triples() for I in space.mlp})
    budget = int(0.5 * full)
    below = max(p for p in all_sizes if p < budget * (1 - search.tolerance))
    above = min(p for p in all_sizes if p > budget)
    assert f"nearest below: {below:,}" in msg and f"nearest above: {above:,}" in msg
    nearest = below if budget - below <= above - budget else above
    assert f"nearest reachable budget is {nearest:,}" in msg
    assert "finest step near this budget is the heads" in msg and "search.multiple_of" in msg


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, generator=g).tolist()
    y = [v + 0.3 * float(torch.rand(1, generator=g)) for v in x]
    y[3] = y[4]  # a tie
    assert math.isclose(spearman(x, y), stats.spearmanr(x, y).statistic, rel_tol=1e-12)
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_ineligible_candidates_are_scored_but_never_win():
    teacher = tiny_model("llama")
    others = {1: tiny_model("llama", seed=1), 2: tiny_model("llama", seed=2)}
    heldout = [torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))]
    from minidistill.evaluation.perplexity import heldout_loss

    losses = {k: heldout_loss(m, heldout)["loss"] for k, m in others.items()}
    best, worst = min(losses, key=losses.get), max(losses, key=losses.get)
    t = get_adapter(teacher).shape(teacher.config)
    cands = [Candidate({**t, "num_layers": best}, 100, 0.0, "depth", in_band=False, eligible=False),
             Candidate({**t, "num_layers": worst}, 100, 1.0, "depth")]
    built = []

    def build(shape, refit):
        built.append((shape["num_layers"], refit))
        return others[shape["num_layers"]], shape["num_layers"]

    res = score_candidates(teacher, cands, build, heldout, SearchConfig(reconstruct=True), full_params=1000)
    assert res.best_map == worst and res.rows[0]["num_layers"] == worst and res.rows[1]["eligible"] is False
    assert res.prescore_spearman is None  # two rows: no rank correlation
    # the one that cannot win is not re-fitted (the re-fit is the search's main cost)
    assert sorted(built) == sorted([(best, False), (worst, True)])
    assert {r["num_layers"]: r["refit"] for r in res.rows} == {best: False, worst: True}
