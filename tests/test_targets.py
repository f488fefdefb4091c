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
    Candidate,
    ParamCounter,
    SearchConfig,
    TargetConfig,
    TargetError,
    budget_params,
    config_rejects_shape,
    enumerate_candidates,
    explicit_shape,
    format_rows,
    head_options,
    kl_to_teacher,
    score_candidates,
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
    for c in cands:
        s = c.shape
        assert 0.98 * budget <= c.params <= budget
        assert c.params == count_parameters_for_shape(model.config, s)
        assert s["hidden_size"] % 16 == 0 and s["intermediate_size"] % 16 == 0
        assert s["num_heads"] % s["num_kv_heads"] == 0 and s["num_heads"] // s["num_kv_heads"] <= group
        assert 3 <= s["num_layers"] <= 6
    assert [c.cost for c in cands] == sorted(c.cost for c in cands)
    capped = enumerate_candidates(counter, budget, search.replace(max_candidates=3))
    assert [c.shape for c in capped] == [c.shape for c in cands[:3]]
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
        enumerate_candidates(counter, int(0.5 * full), SearchConfig(multiple_of=64, tolerance=0.001, max_layer_drop=0.0))


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
