"""Pruning the bundled teacher (SmolLM2-135M-Instruct): activation importance against the baselines,
and the prune recipe with its budget search."""

from __future__ import annotations

import json

import pytest
import torch

from minidistill.adapters import count_parameters, get_adapter
from minidistill.data import DataConfig, build_text_data
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.models import ModelConfig, load_model_and_tokenizer
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.importance import ImportanceConfig, compute_importance
from minidistill.prune.pipeline import units_for_shape
from minidistill.prune.select import select_units

pytestmark = pytest.mark.slow

# About 50% of the teacher's non-embedding parameters (the budget search's pick for target.params=0.5, non_embedding).
HALF_SHAPE = {"num_layers": 27, "hidden_size": 384, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1344}


@pytest.fixture(scope="module")
def bundled():
    teacher, tok = load_model_and_tokenizer(ModelConfig())
    return teacher, tok, build_text_data(DataConfig(seq_len=256), tok)


def test_activation_importance_beats_magnitude_and_random(bundled):
    teacher, _, data = bundled
    t_shape = get_adapter(teacher).shape(teacher.config)
    shape = {**t_shape, **HALF_SHAPE}
    calib = data.train.input_ids[:16]
    heldout = list(data.heldout.batches(4, 4))
    ppl, fractions = {}, {}
    for method in ("activation", "magnitude", "random"):
        units, sim = compute_importance(teacher, calib, ImportanceConfig(method=method, cache=False), layer_stats=False)
        scores = units_for_shape(units, sim, "unit", t_shape, shape)
        student = apply_prune_map(teacher, select_units(teacher, scores, shape))
        fractions[method] = count_parameters(student, non_embedding=True) / count_parameters(teacher, non_embedding=True)
        ppl[method] = heldout_loss(student, heldout)["perplexity"]
        del student
    assert all(abs(f - 0.5) < 0.02 for f in fractions.values()), fractions
    assert ppl["activation"] < ppl["magnitude"], ppl
    assert ppl["activation"] < ppl["random"], ppl


def test_prune_recipe_with_search_on_bundled(tmp_path):
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("prune_recipe", Path(__file__).resolve().parents[1] / "recipes" / "prune.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "student"
    rc = recipe.main(["--model", "bundled", "--output", str(out), "--target_params", "0.5", "--non_embedding",
                      "--calib_blocks", "8", "--eval_blocks", "2", "--max_candidates", "2",
                      "importance.cache=false", "search.score_blocks=2"])
    assert rc == 0
    summary = json.loads((out / "prune_summary.json").read_text())
    target = summary["target_params"]
    assert abs(summary["non_embedding_params_after"] - target) <= 0.02 * target
    assert len(summary["candidates"]) >= 2  # max_candidates best pre-scored + the best of every axis family
    assert summary["heldout_perplexity_after"] > summary["heldout_perplexity_before"]
    student = AutoModelForCausalLM.from_pretrained(out)
    assert count_parameters(student) == summary["params_after"]
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
